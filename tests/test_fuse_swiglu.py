"""compiler/fuse_swiglu.py: SwiGLU after a merged gate/up projection -> written by the projection's decode
GEMV (CUDA). The rewrite and the CUDA build run here; the numbers need a GPU (the `gpu` tests)."""
import json

import numpy as np
import pytest

from compiler.quantize import QuantConfig, quantize
from tests import models
from tests.test_gemv import _build, tagged_copy

LLAMA = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)


def _callees(func) -> list[str]:
    from tvm import relax

    names = []

    def visit(e):
        if isinstance(e, relax.Call):
            op = e.args[0] if getattr(e.op, "name", "") == "relax.call_tir" else e.op
            names.append(op.name_hint if hasattr(op, "name_hint") else op.name)

    relax.analysis.post_order_visit(func, visit)
    return names


def test_llama_swiglu_goes_into_the_gate_up_gemv(tmp_path):
    """Each layer's SwiGLU is one call of the projection's swiglu dispatch, in both entries: the 8- and
    16-token copies are tensor-core GEMVs that take the SwiGLU spec; past 16 tokens the chain as it was."""
    models.hf_llama_with_past(tmp_path / "l.onnx", half=True, **LLAMA)
    mod = models.prepared_for_sm90(tmp_path / "l.onnx")
    for entry in ("main", "main_new_kv"):
        ops = _callees(mod[entry])
        assert "relax.sigmoid" not in ops, entry
        assert ops.count("int4_matmul_n512_k128_g128_float16_swiglu_dispatch") == 2, ops  # one per layer
    funcs = {gv.name_hint: f for gv, f in mod.functions_items()}
    for bucket in ("mma8", "mma16"):
        copy = funcs[f"int4_matmul_n512_k128_g128_float16_swiglu_{bucket}"]
        assert copy.attrs["nibble.kernel"] == "mma" and bool(copy.attrs["nibble.int4"]["swiglu"])
        assert [int(d) for d in copy.params[-1].shape[1:]] == [256]  # y: half the projection's width
    prefill = _callees(funcs["int4_matmul_n512_k128_g128_float16_swiglu_prefill"])
    assert "relax.sigmoid" in prefill and "int4_matmul_n512_k128_g128_float16_dispatch" in prefill


@pytest.mark.parametrize("half,config", [(True, dict(LLAMA, hidden_size=64)),  # K = 64: no 128-k chunk
                                         (False, LLAMA)])  # fp32 activations: the GEMV takes fp16 only
def test_left_alone_where_the_gemv_does_not_take_it(tmp_path, half, config):
    models.hf_llama_with_past(tmp_path / "l.onnx", half=half, **config)
    mod = models.prepared_for_sm90(tmp_path / "l.onnx")
    assert "relax.sigmoid" in _callees(mod["main_new_kv"])
    assert not any("swiglu" in gv.name_hint for gv in mod.get_global_vars())


def test_builds_for_cuda_and_waits(tmp_path):
    """The copies compile for sm_90 and wait for the previous kernel in a CUDA graph like every GEMV."""
    import nibble

    models.hf_llama_with_past(tmp_path / "l.onnx", half=True, **LLAMA)
    lines = []
    art = nibble.compile_model(tmp_path / "l.onnx", target="cuda", arch="sm_90", output=tmp_path / "l.nibble",
                               log=lines.append)
    assert "4 SwiGLUs computed by their gate/up projection's decode GEMV" in lines  # 2 layers x 2 entries
    waiting = json.loads((art / "manifest.json").read_text())["graph_wait_kernels"]
    assert {"int4_matmul_n512_k128_g128_float16_swiglu_mma8_kernel",
            "int4_matmul_n512_k128_g128_float16_swiglu_mma16_kernel"} <= set(waiting), waiting


def _chain(f: int):
    """The graph's SwiGLU as TVM builds it (what the fused copies must reproduce): y[m, 2f] -> [m, f]."""
    from tvm import te, tirx

    from compiler.int4_kernel import silu_times

    m = tirx.Var("m", "int64")
    y = te.placeholder((m, tirx.IntImm("int64", 2 * f)), "float16", name="y")
    out = te.compute((m, tirx.IntImm("int64", f)), lambda i, j: silu_times(y[i, j], y[i, j + f]), name="swiglu")
    return te.create_prim_func([y, out])


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{}, {"row_tiles": 2, "warps": 4}])
def test_copies_give_the_chains_bits_on_gpu(config):
    """Every m in 1..16 (and 13 / 21 tokens over two tiles of the 8- / 16-token copy): the SwiGLU copy's
    output equals, bit for bit, the plain copy's output followed by TVM's kernel for the graph's SwiGLU."""
    import tvm

    n, k = 768, 4096
    rng = np.random.default_rng(0)
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, QuantConfig())
    ex, _ = _build({f"{kind}{rows}": tagged_copy("mma", n, k, rows, swiglu=kind == "sw", **config)
                    for kind in ("sw", "plain") for rows in (8, 16)} | {"chain": _chain(n // 2)})
    dev = tvm.cuda(0)
    ws = [tvm.runtime.tensor(parts[p], device=dev) for p in ("qweight", "scales")]
    for m, rows in [(m, 8 if m <= 8 else 16) for m in range(1, 17)] + [(13, 8), (21, 16)]:
        x = tvm.runtime.tensor((rng.standard_normal((m, k)) * 2).astype(np.float16), device=dev)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float16), device=dev)
        want = tvm.runtime.tensor(np.full((m, n // 2), np.nan, np.float16), device=dev)
        got = tvm.runtime.tensor(np.full((m, n // 2), np.nan, np.float16), device=dev)
        ex[f"plain{rows}"](x, *ws, y)
        ex["chain"](y, want)
        ex[f"sw{rows}"](x, *ws, got)
        assert np.isfinite(got.numpy()).all(), (m, rows)
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=f"m={m} rows={rows}")


@pytest.mark.gpu
def test_same_tokens_and_bits_as_the_chain_on_gpu(tmp_path, monkeypatch):
    """fp16 Llama built with the rewrite and without: the prompt's logits and caches (the prefill runs the
    chain either way) and a decode step's logits are equal bit for bit, and so are 12 greedy tokens."""
    fused, chain, ids = models.gpu_llama_with_and_without(
        tmp_path, monkeypatch, "compiler.fuse_swiglu", "fuse_swiglu", lambda mod, arch, func_name=None: (mod, 0))
    assert any("swiglu" in n for n in fused.manifest["graph_wait_kernels"])
    assert not any("swiglu" in n for n in chain.manifest["graph_wait_kernels"])
    outs = [models.first_steps(m, ids) for m in (fused, chain)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fused.generate(ids, max_new_tokens=12).tokens,
                                  chain.generate(ids, max_new_tokens=12).tokens)
