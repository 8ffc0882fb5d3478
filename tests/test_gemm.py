"""The tensor-core int4 GEMM rule (schedules/gemm.py): it schedules the dispatch's "gemm" copies in a real
CUDA build (mma.sync/ldmatrix in the generated code), falls back to dlight for what it cannot tile, and
(on a GPU) matches an fp32 reference of the dequantized weights.

One module-scoped build serves every test: two int4 linears (symmetric K=4096; zero points + bias),
through compiler.build.build_module, so the dispatch pass and the rule order in schedules.gpu_rules are
what is tested.
"""
import shutil

import numpy as np
import pytest

from compiler.quantize import QuantConfig, dequantize, quantize
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

LINEARS = {  # Relax function name -> (N, K, QuantConfig, has_bias)
    "main": (256, 4096, QuantConfig(128, True), False),
    "asym_bias": (128, 512, QuantConfig(64, False), True),  # (group 32 < block_k 64: dlight's)
}


def _module():
    from tvm import relax, tirx

    from compiler.int4_kernel import int4_matmul_func

    bb = relax.BlockBuilder()
    for name, (n, k, cfg, bias) in LINEARS.items():
        m = tirx.Var("m", "int64")
        g = cfg.group(k)
        params = [relax.Var("x", relax.TensorType([m, k], "float16")),
                  relax.Var("qweight", relax.TensorType([n, k // 8], "uint32")),
                  relax.Var("scales", relax.TensorType([n, k // g], "float16"))]
        if not cfg.symmetric:
            params.append(relax.Var("zeros", relax.TensorType([n, k // g], "float16")))
        if bias:
            params.append(relax.Var("bias", relax.TensorType([n], "float16")))
        with bb.function(name, params):
            with bb.dataflow():
                gv = bb.add_func(int4_matmul_func(n, k, cfg, "float16", bias), f"int4_{name}")
                y = bb.emit_output(relax.call_tir(gv, params, relax.TensorType([m, n], "float16")))
            bb.emit_func_output(y)
    return bb.get()


@pytest.fixture(scope="module")
def built():
    """(executable, CUDA sources handed to nvcc) for sm_90, or for the local GPU's arch if there is one."""
    import tvm_ffi

    import compiler.cuda as cuda
    from compiler.build import build_module
    from compiler.target import local_gpu_arch, resolve

    spec = resolve("cuda", local_gpu_arch() or "sm_90")
    sources = []
    register = cuda.register_nvcc_callback

    def register_and_record(arch):  # build_module registers nvcc itself: wrap what it registers
        register(arch)
        nvcc = tvm_ffi.get_global_func("tvm_callback_cuda_compile")

        def record(code):
            sources.append(code)
            return nvcc(code)

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", record, override=True)

    cuda.register_nvcc_callback = register_and_record
    try:
        ex = build_module(_module(), spec)
    finally:
        cuda.register_nvcc_callback = register
        register(spec["arch"])
    return ex, "\n".join(sources)


def test_gemm_rule_emits_tensor_core_code(built):
    from compiler.build import prepare
    from compiler.target import resolve, tvm_target
    from schedules.gemm import GEMM

    _, src = built
    spec = resolve("cuda", "sm_90")
    mod, _ = prepare(_module(), spec)
    for name in LINEARS:  # every gemm copy is ours (none falls through to dlight)
        assert GEMM().apply(mod[f"int4_{name}_gemm"], tvm_target(spec), False) is not None, name
        assert f"int4_{name}_gemm_kernel" in src  # the dispatch's gemm copy became a CUDA kernel ...
    assert "nb_dequant8" in src and "cp.async.cg.shared.global" in src  # ... ours, not dlight's
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src  # fp32 accumulation
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src


def test_rule_declines_what_it_cannot_tile():
    from compiler.int4_kernel import int4_matmul_func
    from compiler.target import resolve, tvm_target
    from schedules.gemm import GEMM

    target = tvm_target(resolve("cuda", "sm_90"))
    rule = GEMM()
    ok = int4_matmul_func(256, 4096, QuantConfig(128), "float16").with_attr({"nibble.kernel": "gemm"})
    assert rule.apply(ok.with_attr({"nibble.kernel": "gemv"}), target, False) is None  # not our copy
    assert rule.apply(ok.without_attr("nibble.kernel"), target, False) is None
    odd_n = int4_matmul_func(200, 4096, QuantConfig(128), "float16").with_attr({"nibble.kernel": "gemm"})
    assert rule.apply(odd_n, target, False) is None  # N % 128: dlight's job
    f32 = int4_matmul_func(256, 4096, QuantConfig(128), "float32").with_attr({"nibble.kernel": "gemm"})
    assert rule.apply(f32, target, False) is None
    assert rule.apply(ok, target, False) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 64, 200, 333])
@pytest.mark.parametrize("name", list(LINEARS))
def test_gemm_matches_fp32_reference(built, name, m):
    import tvm
    from tvm import relax

    n, k, cfg, bias = LINEARS[name]
    rng = np.random.default_rng(m)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    parts = quantize(w, cfg)
    wdq = dequantize(parts, k, cfg)
    x = rng.standard_normal((m, k)).astype(np.float16)
    args = [x, parts["qweight"], parts["scales"]]
    if "zeros" in parts:
        args.append(parts["zeros"])
    b = rng.standard_normal(n).astype(np.float16) if bias else None
    if bias:
        args.append(b)
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(built[0], dev)
    y = vm[name](*[tvm.runtime.tensor(a, dev) for a in args]).numpy()
    ref = x.astype(np.float64) @ wdq.astype(np.float64).T + (b.astype(np.float64) if bias else 0)
    assert np.isfinite(y).all()
    assert rel_err(y, ref) <= 2e-3, rel_err(y, ref)
