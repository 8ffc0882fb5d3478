"""schedules/gemv_mma.py: the tensor-core decode GEMV. CUDA code is built here without a GPU; numerics
need one (the `gpu` test)."""
import numpy as np
import pytest

from compiler.dispatch import KERNEL_ATTR
from compiler.int4_kernel import ATTR
from compiler.quantize import QuantConfig, dequantize, quantize
from tests.test_gemv import _build, _target, tagged_copy


def _copy(n, k, rows, cfg=QuantConfig(), bias=False, **config):
    return tagged_copy("mma", n, k, rows, cfg, bias, **config)


def test_takes_only_what_it_tiles():
    from schedules.gemv_mma import takes

    spec = lambda n, k, g=128, xd="float16": {"n": n, "k": k, "group_size": g, "x_dtype": xd}  # noqa: E731
    assert takes(spec(4096, 11008), "sm_90") and takes(spec(4096, 4096), "sm_80")
    assert not takes(spec(4096, 4096), "sm_75")  # no m16n8k16 fp32-accumulate mma before Ampere
    assert not takes(spec(4096, 4096, g=64), "sm_90")  # a 128-k chunk must lie in one group
    assert not takes(spec(4096, 4000), "sm_90") and not takes(spec(4100, 4096), "sm_90")
    assert not takes(spec(4096, 4096, xd="float32"), "sm_90")


@pytest.mark.parametrize("n,k,rows,cfg,bias,config", [
    (256, 4096, 8, QuantConfig(), False, {}),
    (64, 11008, 16, QuantConfig(128, symmetric=False), True, {}),  # 86 chunks: a partial last iteration
    (96, 512, 1, QuantConfig(-1), False, {"row_tiles": 2, "warps": 4}),  # 96 % 32: row_tiles falls to 1
])
def test_rule_emits_mma_kernel(n, k, rows, cfg, bias, config):
    import tvm

    from schedules.gemv_mma import GEMVMMA

    func = _copy(n, k, rows, cfg, bias, **config)
    sch = GEMVMMA().apply(func, _target(), False)
    assert sch is not None and sch.mod["main"].attrs[KERNEL_ATTR] == "mma"
    assert sch.mod["main"].attrs[ATTR]["n"] == n  # the spec attrs survive for dispatch/tuning/inspect
    _, src = _build({"k": func})
    body = src[src.index("void __launch_bounds__"):]
    # 128-bit weight loads, streamed past L1 with a 256-byte L2 fetch (Config.loads)
    assert "nb_mma_chunk(" in body and "ld.global.nc.L1::no_allocate.L2::256B.v4.u32" in src
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    # the first weights are requested before the wait for the previous kernel (compiler/cuda_graph.py),
    # x (that kernel's output) only after it
    assert body.index("(&(qweight_ptr[") < body.index("nb_grid_wait();") < body.index("nb_mma_chunk(")
    assert "x_ptr" not in body[body.index("{"):body.index("nb_grid_wait();")]
    if not config:  # TVM's own vector load where no qualifiers are asked for
        _, plain = _build({"k": _copy(n, k, rows, cfg, bias, loads="")})
        assert "*(uint4*)(wv_ptr + 0) = *(uint4*)(qweight_ptr" in plain and "ld.global.nc" not in plain
    assert GEMVMMA().apply(func, tvm.target.Target("llvm"), False) is None
    assert GEMVMMA().apply(func.with_attr({KERNEL_ATTR: "gemv"}), _target(), False) is None  # not our copy


@pytest.mark.gpu
@pytest.mark.parametrize("k,cfg,bias", [(4096, QuantConfig(), False),
                                         (11008, QuantConfig(128, symmetric=False), True),
                                         (4096, QuantConfig(-1), False)])
def test_mma_numerics_on_gpu(k, cfg, bias):
    """Every m in 1..16 through the 8- and 16-token copies (and an m that needs two token tiles of the
    8-token copy) against numpy with the dequantized weights: rel. error <= 2e-3."""
    import tvm

    n = 512
    rng = np.random.default_rng(0)
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, cfg)
    w = dequantize(parts, k, cfg)
    b = rng.standard_normal(n).astype(np.float16) if bias else None
    ex, _ = _build({"g8": _copy(n, k, 8, cfg, bias), "g16": _copy(n, k, 16, cfg, bias),
                    "g8r2": _copy(n, k, 8, cfg, bias, row_tiles=2, warps=4, chunks=2)})
    dev = tvm.cuda(0)
    ws = [tvm.runtime.tensor(parts[p], device=dev) for p in ("qweight", "scales", "zeros") if p in parts]
    if bias:
        ws.append(tvm.runtime.tensor(b, device=dev))
    for m, name in [(m, "g8" if m <= 8 else "g16") for m in range(1, 17)] + [(3, "g8r2"), (13, "g8"), (21, "g16")]:
        x = rng.standard_normal((m, k)).astype(np.float16)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float16), device=dev)
        ex[name](tvm.runtime.tensor(x, device=dev), *ws, y)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b.astype(np.float64) if bias else 0)
        got = y.numpy().astype(np.float64)
        assert np.isfinite(got).all(), (m, name)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= 2e-3, (m, name, err)
