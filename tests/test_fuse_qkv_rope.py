"""compiler/fuse_qkv_rope.py: a merged q/k/v projection's heads (slices, RoPE, transposes) -> one kernel (CUDA),
and for decode the projection's GEMV writing them. The rewrites and the CUDA build run here; the numbers
need a GPU (the `gpu` tests)."""
import json

import numpy as np
import pytest

from compiler.quantize import QuantConfig, quantize
from tests import models
from tests.test_fuse_swiglu import _callees
from tests.test_gemv import _build, tagged_copy

LLAMA = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2)  # K = 128: the GEMV takes it
PROJ = "int4_matmul_n256_k128_g128_float16"  # its merged q/k/v projection: (4 + 2 + 2) heads x 32


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


def test_decode_gemv_writes_the_heads(tmp_path):
    """Where the tensor-core GEMV takes the projection, each layer's q/k/v is one call of a rope dispatch:
    up to 16 tokens GEMV copies that take cos and sin and return the rotated heads ([b, H, s, d], GQA),
    past that the projection and the heads kernel."""
    models.hf_llama_with_past(tmp_path / "l.onnx", half=True, **LLAMA)
    mod = models.prepared_for_sm90(tmp_path / "l.onnx")
    for entry in ("main", "main_new_kv"):
        ops = _callees(mod[entry])
        assert ops.count(f"{PROJ}_rope0_dispatch") == 2, ops  # one per layer
        assert "relax.negative" not in ops and not any(o.startswith("qkv_rope") for o in ops)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items()}
    for bucket in ("mma8", "mma16"):
        copy = funcs[f"{PROJ}_rope0_{bucket}"]
        assert bool(copy.attrs["tirx.is_scheduled"])
        assert [[int(b.shape[1]), int(b.shape[3])] for b in copy.params[-3:]] == [[4, 32], [2, 32], [2, 32]]
        # q, k, v: [b, H, s, d] (b, s symbolic)
    prefill = _callees(funcs[f"{PROJ}_rope0_prefill"])
    assert f"{PROJ}_dispatch" in prefill and any(o.startswith("qkv_rope_") for o in prefill)


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


def test_decode_gemv_builds_for_cuda_and_waits(tmp_path):
    import nibble

    models.hf_llama_with_past(tmp_path / "l.onnx", half=True, **LLAMA)
    art = nibble.compile_model(tmp_path / "l.onnx", target="cuda", arch="sm_90", output=tmp_path / "l.nibble",
                               log=lambda *a: None)
    waiting = json.loads((art / "manifest.json").read_text())["graph_wait_kernels"]
    assert {f"{PROJ}_rope0_mma8_kernel", f"{PROJ}_rope0_mma16_kernel"} <= set(waiting), waiting


def _rope_kernels(n, k, d, pieces, **config):
    """{name: PrimFunc}: the rope GEMV copies (8 / 16 tokens), the plain copies and the heads kernel."""
    import dataclasses

    from compiler.int4_kernel import int4_matmul_func
    from schedules import gemv_mma
    from schedules.qkv_rope import qkv_rope_func

    spec = dict(int4_matmul_func(n, k, QuantConfig()).attrs["nibble.int4"])
    rope = dict(d=d, dtype="float16", pieces=pieces)
    funcs = {"heads": qkv_rope_func(n, d, "float16", "float16", pieces).with_attr("tirx.is_scheduled", True)}
    for rows in (8, 16):
        cfg = dataclasses.replace(gemv_mma.default_for(gemv_mma._H200, n, rows), **config)
        funcs[f"rope{rows}"] = gemv_mma.gemv_mma_func(spec, rows, cfg, rope).with_attr("tirx.is_scheduled", True)
        funcs[f"plain{rows}"] = tagged_copy("mma", n, k, rows, **config)
    return funcs


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{}, {"row_tiles": 2, "warps": 4}])
def test_rope_copies_give_the_kernels_bits_on_gpu(config):
    """Every m in 1..16 (and 13 / 21 tokens over two tiles of the 8- / 16-token copy; batch 1 and, for
    12 tokens, 3 x 4 with per-batch cos / sin): the rope copy's q / k / v equal, bit for bit, the plain
    copy's output followed by the heads kernel (GQA, a scale on q, v not rotated)."""
    import tvm

    d, k = 128, 4096
    pieces = [dict(col=0, heads=4, dtype="float16", rope=True, scale=0.08838834764831845),
              dict(col=512, heads=2, dtype="float16", rope=True, scale=None),
              dict(col=768, heads=2, dtype="float16", rope=False, scale=None)]
    n = 1024
    rng = np.random.default_rng(0)
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, QuantConfig())
    ex, _ = _build(_rope_kernels(n, k, d, pieces, **config))
    dev = tvm.cuda(0)
    t = lambda a: tvm.runtime.tensor(a, device=dev)  # noqa: E731
    ws = [t(parts[p]) for p in ("qweight", "scales")]
    cases = [(1, m, 8 if m <= 8 else 16) for m in range(1, 17)] + [(1, 13, 8), (1, 21, 16), (3, 4, 16)]
    for b, s, rows in cases:
        m = b * s
        x = t((rng.standard_normal((m, k)) * 2).astype(np.float16))
        cb = b if b > 1 else 1
        cos, sin = (t(rng.uniform(-1, 1, (cb, 1, s, d)).astype(np.float16)) for _ in range(2))
        y = t(np.full((m, n), np.nan, np.float16))
        outs = lambda: [t(np.full((b, p["heads"], s, d), np.nan, np.float16)) for p in pieces]  # noqa: E731
        want, got = outs(), outs()
        ex[f"plain{rows}"](x, *ws, y)
        ex["heads"](y, cos, sin, *want)
        ex[f"rope{rows}"](x, *ws, cos, sin, *got)
        for w, g in zip(want, got):
            assert np.isfinite(g.numpy()).all(), (b, s, rows)
            np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=f"b={b} s={s} rows={rows}")


@pytest.mark.gpu
def test_decode_gemv_same_bits_as_the_heads_kernel_on_gpu(tmp_path, monkeypatch):
    """fp16 Llama built with the decode GEMV route and without it (the heads kernel after the projection):
    the prompt's logits and caches and a decode step's logits are equal bit for bit, and so are 12
    greedy tokens."""
    from compiler import fuse_qkv_rope as fq

    plain = fq.fuse_qkv_rope
    fused, kernel, ids = models.gpu_llama_with_and_without(
        tmp_path, monkeypatch, "compiler.fuse_qkv_rope", "fuse_qkv_rope",
        lambda mod, func_name=None, arch=None: plain(mod, func_name))
    assert any("_rope0_mma8" in n for n in fused.manifest["graph_wait_kernels"])
    assert not any("_rope0_mma8" in n for n in kernel.manifest["graph_wait_kernels"])
    outs = [models.first_steps(m, ids) for m in (fused, kernel)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fused.generate(ids, max_new_tokens=12).tokens,
                                  kernel.generate(ids, max_new_tokens=12).tokens)


@pytest.mark.gpu
def test_same_numbers_as_the_chains_on_gpu(tmp_path, monkeypatch):
    """fp16 Llama (head dim 128), built with the kernel and with the chains it replaces: the prompt's
    logits and caches and a decode step's logits agree to fp16 rounding, and greedy tokens are equal."""
    fused, chains, ids = models.gpu_llama_with_and_without(
        tmp_path, monkeypatch, "compiler.fuse_qkv_rope", "fuse_qkv_rope", lambda mod, func_name=None, arch=None: (mod, 0))
    assert not any(n.startswith("qkv_rope_") for n in chains.manifest["graph_wait_kernels"])
    outs = [[a.astype(np.float32) for a in models.first_steps(m, ids)] for m in (fused, chains)]
    for a, b in zip(*outs):
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
        assert err <= 2e-3, err
    np.testing.assert_array_equal(fused.generate(ids, max_new_tokens=12).tokens,
                                  chains.generate(ids, max_new_tokens=12).tokens)
