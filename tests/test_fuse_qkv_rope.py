"""compiler/fuse_qkv_rope.py: a merged q/k/v projection's heads (slices, RoPE, transposes) -> one kernel (CUDA).
The rewrite and the CUDA build run here; the numbers need a GPU (the `gpu` test)."""
import json

import numpy as np
import pytest

from tests import models


def _calls(func):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


@pytest.mark.parametrize("half,heads,kv_heads", [(False, 4, 2), (True, 2, 2)])
def test_llama_heads_come_from_one_kernel(tmp_path, half, heads, kv_heads):
    """Each layer's q, k and v heads (GQA: fewer k/v heads; fp32: a cast after the fp16 projection) come
    from one kernel call, in both entries; no rotation or transpose op of theirs is left."""
    models.hf_llama_with_past(tmp_path / "l.onnx", half=half, hidden_size=heads * 32, head_dim=32,
                              num_attention_heads=heads, num_key_value_heads=kv_heads)
    mod = models.prepared_for_sm90(tmp_path / "l.onnx")
    for entry in ("main", "main_new_kv"):
        calls = _calls(mod[entry])
        rope = [c for c in calls if "qkv_rope" in str(getattr(c.args[0], "name_hint", ""))]
        assert len(rope) == 2, entry  # one per layer
        assert "relax.negative" not in [str(c.op) for c in calls]  # rotate_half's negation: gone with its chain
        heads_out = [int(t.shape.values[1]) for t in rope[0].ty.fields]  # [b, H, s, d] per group
        assert heads_out == [heads, kv_heads, kv_heads]
    kernel = next(f for gv, f in mod.functions_items() if "qkv_rope" in gv.name_hint)
    assert kernel.attrs["nibble.kernel"] == "qkv_rope"


def test_attention_without_rotation_is_left_alone(tmp_path):
    models.onnx_sdpa(tmp_path / "a.onnx")  # q, k, v are inputs: no projection to split
    from compiler.fuse_qkv_rope import fuse_qkv_rope
    from frontends import import_model

    assert fuse_qkv_rope(import_model(str(tmp_path / "a.onnx")).mod)[1] == 0


def test_builds_for_cuda_and_waits(tmp_path):
    """The kernel compiles for sm_90 and, reading the projection's output, waits for it in a CUDA graph
    (compiler/cuda_graph.py)."""
    import nibble

    models.hf_llama_with_past(tmp_path / "l.onnx", half=True, hidden_size=64, head_dim=32,
                              num_attention_heads=2, num_key_value_heads=2)
    lines = []
    art = nibble.compile_model(tmp_path / "l.onnx", target="cuda", arch="sm_90", output=tmp_path / "l.nibble",
                               log=lines.append)
    assert "4 q/k/v projections split into rotated heads by one kernel each" in lines  # 2 layers x 2 entries
    waiting = json.loads((art / "manifest.json").read_text())["graph_wait_kernels"]
    assert any(name.startswith("qkv_rope_") for name in waiting), waiting


@pytest.mark.gpu
def test_same_numbers_as_the_chains_on_gpu(tmp_path, monkeypatch):
    """fp16 Llama (head dim 128), built with the kernel and with the chains it replaces: the prompt's
    logits and caches and a decode step's logits agree to fp16 rounding, and greedy tokens are equal."""
    fused, chains, ids = models.gpu_llama_with_and_without(
        tmp_path, monkeypatch, "compiler.fuse_qkv_rope", "fuse_qkv_rope", lambda mod, func_name=None: (mod, 0))
    assert not any(n.startswith("qkv_rope_") for n in chains.manifest["graph_wait_kernels"])
    outs = [[a.astype(np.float32) for a in models.first_steps(m, ids)] for m in (fused, chains)]
    for a, b in zip(*outs):
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
        assert err <= 2e-3, err
    np.testing.assert_array_equal(fused.generate(ids, max_new_tokens=12).tokens,
                                  chains.generate(ids, max_new_tokens=12).tokens)
