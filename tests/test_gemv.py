"""schedules/gemv.py: the small-m GEMV rule. CUDA code is built here without a GPU; numerics need one."""
import re

import numpy as np
import pytest

from compiler.dispatch import KERNEL_ATTR
from compiler.int4_kernel import int4_matmul_func
from compiler.quantize import QuantConfig, dequantize, quantize


def _target():
    from compiler.target import resolve, tvm_target

    return tvm_target(resolve("cuda", "sm_90"))


def tagged_copy(kind, n, k, rows=None, cfg=QuantConfig(), bias=False, swiglu=False, **config):
    """The int4 PrimFunc of an n x k linear as compiler/dispatch.py tags its `kind` copy for m <= rows
    (None: unbounded); `config` (Config fields) as a tuning record would set it."""
    from compiler.dispatch import bucket_copy
    from compiler.tuning import CONFIG_ATTR

    func = bucket_copy(int4_matmul_func(n, k, cfg, has_bias=bias, swiglu=swiglu), "k", rows, kind)
    return func.with_attr(CONFIG_ATTR, config) if config else func


def _gemv_copy(n, k, rows, cfg=QuantConfig(), bias=False):
    return tagged_copy("gemv", n, k, rows, cfg, bias)


def _build(funcs: dict):
    """{name: PrimFunc} -> (runtime module, CUDA source), our rules first as in the real build."""
    import tvm
    from tvm.s_tir import dlight as dl

    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from schedules import gpu_rules

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    target = _target()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        mod = dl.ApplyDefaultSchedule(*gpu_rules(target))(mod)
    ex = tvm.compile(mod, target=target)

    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)

    cuda = [m for m in walk(ex.mod) if m.kind == "cuda"][0]
    return ex, cuda.inspect_source()


@pytest.mark.parametrize("n,k,rows,cfg,bias", [
    (256, 4096, 1, QuantConfig(), False),
    (128, 11008, 4, QuantConfig(), False),  # K/32 = 344 chunks: not a multiple of 32 lanes
    (96, 512, 2, QuantConfig(32, symmetric=False), True),
])
def test_rule_emits_vectorized_decode_gemv(n, k, rows, cfg, bias):
    from schedules.gemv import GEMV

    func = _gemv_copy(n, k, rows, cfg, bias)
    sch = GEMV().apply(func, _target(), False)
    assert sch is not None and sch.mod["main"].attrs[KERNEL_ATTR] == "gemv"
    ex, src = _build({"k": func})
    body = src[src.index("void __launch_bounds__"):]
    assert "*(uint4*)(qweight_ptr" in body  # 128-bit loads of the packed weight
    assert re.search(r"\*\(uint4\*\)\(x_ptr", body)  # 8 fp16 activations per load
    assert "__shfl_down_sync" in body  # warp-shuffle reduction over the K split
    assert "1258291200" in body  # 0x4B000000: the magic-number decode, no int->float convert
    assert "(half)" not in body.split("y_ptr[")[0]  # nothing rounds to fp16 before the final store


@pytest.mark.parametrize("attrs", [{}, {KERNEL_ATTR: "gemm"}])
def test_rule_declines_untagged_and_gemm_copies(attrs):
    from schedules.gemv import GEMV

    func = int4_matmul_func(256, 256, QuantConfig())
    assert GEMV().apply(func.with_attr(attrs) if attrs else func, _target(), False) is None


def test_rule_declines_shapes_it_does_not_cover():
    import tvm
    from schedules.gemv import GEMV

    assert GEMV().apply(_gemv_copy(64, 200, 1, QuantConfig(8)), _target(), False) is None  # K % 32
    assert GEMV().apply(_gemv_copy(64, 256, 1), tvm.target.Target("llvm"), False) is None


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,bias", [(QuantConfig(), False), (QuantConfig(64, symmetric=False), True)])
def test_gemv_numerics_on_gpu(cfg, bias):
    """Every m in 1..16 through the GEMV bucket copies the dispatch would use (and the 8/16 buckets it
    currently does not), against numpy with the dequantized weights: rel. error <= 2e-3 at K=4096."""
    import tvm

    n, k = 512, 4096
    rng = np.random.default_rng(0)
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, cfg)
    w = dequantize(parts, k, cfg)
    b = rng.standard_normal(n).astype(np.float16) if bias else None
    ex, _ = _build({f"g{r}": _gemv_copy(n, k, r, cfg, bias) for r in (1, 2, 4, 8, 16)})
    dev = tvm.cuda(0)
    ws = [tvm.runtime.tensor(parts[p], device=dev) for p in ("qweight", "scales", "zeros") if p in parts]
    if bias:
        ws.append(tvm.runtime.tensor(b, device=dev))
    for m in range(1, 17):
        x = rng.standard_normal((m, k)).astype(np.float16)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float16), device=dev)
        ex[f"g{next(r for r in (1, 2, 4, 8, 16) if m <= r)}"](tvm.runtime.tensor(x, device=dev), *ws, y)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b.astype(np.float64) if bias else 0)
        got = y.numpy().astype(np.float64)
        assert np.isfinite(got).all(), m
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= 2e-3, (m, err)
