"""The tensor-core int4 GEMM rule (schedules/gemm.py): it schedules the dispatch's "gemm" copies in a real
CUDA build (mma.sync/ldmatrix in the generated code), splits K for the few-token buckets (a second,
reduction kernel), falls back to dlight for what it cannot tile, and (on a GPU) matches an fp32
reference of the dequantized weights at every token count, through the dispatch and copy by copy.

One module-scoped build serves the CPU tests: two int4 linears (symmetric K=4096; zero points + bias at
a short K=512, where the split is cut to keep the ring's prologue), through compiler.build.build_module,
so the dispatch pass and the rule order in schedules.gpu_rules are what is tested. The GPU tests also
run zero points + bias at K=4096, copy by copy (a build of their own: no CPU time here).
"""
import shutil

import numpy as np
import pytest

from compiler.quantize import QuantConfig, dequantize, quantize
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

LINEARS = {  # Relax function name -> (N, K, QuantConfig, has_bias)
    "main": (256, 4096, QuantConfig(128, True), False),
    "asym_bias": (128, 512, QuantConfig(64, False), True),  # 8 k steps: at most 2 K slices
}
GPU_LINEARS = {"main": LINEARS["main"], "asym_bias_4096": (128, 4096, QuantConfig(128, False), True)}
MS = (1, 2, 4, 8, 16, 17, 32, 33, 64, 65, 128, 129, 200, 256, 333)  # every bucket of compiler.dispatch.ROUTES, both ends


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


def _kernel_source(src: str, name: str) -> str:
    """The CUDA definition of one __global__ kernel (from its launch bounds to the next kernel)."""
    lines = src.split("\n")
    start = next(i for i, line in enumerate(lines) if f" {name}(" in line and line.rstrip().endswith("{"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('extern "C" __global__')),
               len(lines))
    first = lines[start][lines[start].index("void __launch_bounds__"):]
    return "\n".join([first] + lines[start + 1:end])


def test_gemm_rule_emits_tensor_core_code(built):
    from compiler.build import prepare
    from compiler.dispatch import ROUTES
    from compiler.target import resolve, tvm_target
    from schedules.gemm import GEMM

    _, src = built
    spec = resolve("cuda", "sm_90")
    mod, _ = prepare(_module(), spec)
    copies = [f"gemm{r}" for r, kind in ROUTES if kind == "gemm"]  # the unbounded copy: wgmma (sm_90)
    for name in LINEARS:  # every gemm copy is ours (none falls through to dlight)
        for copy in copies:
            assert GEMM().apply(mod[f"int4_{name}_{copy}"], tvm_target(spec), False) is not None, (name, copy)
            assert f"int4_{name}_{copy}_kernel" in src  # the dispatch's copy became a CUDA kernel ...
    assert "nb_dequant8" in src and "cp.async.cg.shared.global" in src  # ... ours, not dlight's
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src  # fp32 accumulation
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src


def test_split_k_for_few_tokens_not_for_the_unbounded_copy(built):
    """The smallest GEMM bucket: 16-row tiles (4 warps) for "asym_bias" (group 64: no tensor-core GEMV),
    K over blockIdx.z, fp32 partials to the workspace, and a second kernel that sums them, adds the bias
    and rounds; on sm_90 "main" has no mma.sync GEMM copy (wgmma from m = 17), its smallest wgmma copy
    splits K the same way; the unbounded copy (the wgmma GEMM on sm_90): one kernel."""
    from compiler.dispatch import routes_for
    from schedules.gemm import DEFAULTS, plan

    _, src = built
    arch = DEFAULTS["sm_90"]
    smallest = {}
    for name, (n, k, cfg, bias) in LINEARS.items():
        attrs = {"n": n, "k": k, "group_size": cfg.group(k), "symmetric": cfg.symmetric,
                 "has_bias": bias, "x_dtype": "float16"}
        rows = smallest[name] = next((r for r, kind in routes_for(attrs, "sm_90") if kind == "gemm"), None)
        whole = _kernel_source(src, f"int4_{name}_wgmma_kernel")  # the unbounded copy, on Hopper
        assert "blockIdx.z" not in whole and "ws_ptr" not in whole and "nb_wgmma_" in whole
        assert f"int4_{name}_gemm_kernel" not in src
        if rows is None:
            few = _kernel_source(src, f"int4_{name}_wgmma32_kernel")
            assert "blockIdx.z" in few and "nb_wgmma_" in few and "ws_ptr" in few
            assert "ws_ptr" in _kernel_source(src, f"int4_{name}_wgmma32_kernel_1")
            continue
        c, split = plan(attrs, arch, rows)
        assert c.block_m == rows and split > 1, name
        few = _kernel_source(src, f"int4_{name}_gemm{rows}_kernel")
        assert few.startswith("void __launch_bounds__(128)")  # 1 x 4 warps
        assert "blockIdx.z" in few and "float* __restrict__ ws_ptr" in few
        assert "*(float2*)(ws_ptr" in few and "y_ptr" not in few  # partials only
        reduce = _kernel_source(src, f"int4_{name}_gemm{rows}_kernel_1")
        assert "ws_ptr" in reduce and "y_ptr" in reduce and ("bias_ptr" in reduce) == bias
        assert "mma.sync" not in reduce and "*(float4*)(ws_ptr" in reduce  # 16-byte partial loads
    assert smallest == {"main": None, "asym_bias": 16}  # group 64: no tensor-core GEMV, gemm16 serves 5..16
    # the short K (8 steps of 64) splits in 2 at most: every slice fills the 4-stage ring's prologue
    assert "blockIdx.z" in _kernel_source(src, "int4_asym_bias_gemm16_kernel")


def test_plan_fills_the_gpu_for_each_bucket():
    """The split rule on the Llama-2-7B shapes (H200: 132 SMs): few-token buckets make about
    sms x resident blocks, the split never exceeds split_max or starves a slice, the unbounded copy
    never splits, wide N keeps the large tile at 256 tokens, and a tuned split_k is taken as given."""
    import dataclasses

    from schedules.gemm import DEFAULTS, checked_plan, fits, plan

    arch = DEFAULTS["sm_90"]
    for k, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]:
        attrs = {"n": n, "k": k, "group_size": 128, "symmetric": True, "has_bias": False, "x_dtype": "float16"}
        for rows in (16, 32, 64, 256):
            c, split = checked_plan(attrs, arch, rows)
            blocks = -(-rows // c.block_m) * (n // c.block_n) * split
            resident = min(arch.split_fill, arch.smem_per_sm // (c.smem_bytes() + 1024))
            assert 1 <= split <= arch.split_max, (k, n, rows)
            if split > 1:  # about one wave of resident blocks: not more, and not a half-empty GPU
                assert arch.sms * resident / 2 < blocks <= arch.sms * resident, (k, n, rows)
            assert k // c.block_k // split >= c.stages - 1
        assert plan(attrs, arch, 16)[0].block_m == 16 and plan(attrs, arch, 32)[0].block_m == 32
        assert plan(attrs, arch, None) == (arch.large, 1)
    wide = {"n": 22016, "k": 4096, "group_size": 128, "symmetric": True, "has_bias": False, "x_dtype": "float16"}
    assert plan(wide, arch, 256)[0] == arch.large and plan(wide, arch, 64)[0].block_m == 64
    assert plan(wide, arch, 16)[1] > 1  # 172 tiles: still split to fill 4 blocks per SM
    tuned = dataclasses.replace(arch.tiles[0][1], split_k=3)
    assert plan(wide, arch, 16, tuned) == (tuned, 3)
    short = dict(wide, k=256)  # 4 k steps: a split would leave slices shorter than the ring
    assert plan(short, arch, 16)[1] == 1
    assert fits(short, dataclasses.replace(tuned, split_k=2), arch.max_smem, 2) is not None
    assert checked_plan(short, arch, 16, dataclasses.replace(tuned, split_k=2))[0].stages == 3  # fewer stages
    assert checked_plan(short, arch, 16, dataclasses.replace(tuned, split_k=4)) is None  # 1-step slices


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
    assert rule.apply(ok.with_attr({"nibble.rows": 16}), target, False) is not None


def _case(name, m, seed):
    """(args, reference) for one linear at m tokens: random weights quantized, fp64 reference."""
    n, k, cfg, bias = {**LINEARS, **GPU_LINEARS}[name]
    rng = np.random.default_rng(seed)
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
    ref = x.astype(np.float64) @ wdq.astype(np.float64).T + (b.astype(np.float64) if bias else 0)
    return args, ref


@pytest.mark.gpu
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name", list(LINEARS))
def test_gemm_matches_fp32_reference(built, name, m):
    """Through the dispatch (the copy ROUTES picks for m), rel. error <= 2e-3 (issue 3's bound)."""
    import tvm
    from tvm import relax

    args, ref = _case(name, m, m)
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(built[0], dev)
    y = vm[name](*[tvm.runtime.tensor(a, dev) for a in args]).numpy()
    assert np.isfinite(y).all()
    assert rel_err(y, ref) <= 2e-3, rel_err(y, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_LINEARS))
def test_every_bucket_copy_matches_at_every_m_it_serves(name):
    """Each candidate copy of compiler.dispatch.CANDIDATES (GEMV 1..16, GEMM 16..256 with their splits,
    the unbounded GEMM), called directly at m in MS up to its bound, NaN-poisoned output: the copies
    that the dispatch's thresholds may route to once the H200 picks them."""
    import tvm
    from tvm.s_tir import dlight as dl

    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.dispatch import CANDIDATES, bucket_copy, candidates_for, copy_name
    from compiler.int4_kernel import int4_matmul_func
    from compiler.target import local_gpu_arch, resolve, tvm_target
    from schedules import gpu_rules

    n, k, cfg, bias = GPU_LINEARS[name]
    arch = local_gpu_arch()
    ensure_cuda_runtime()
    register_nvcc_callback(arch)
    target = tvm_target(resolve("cuda", arch))
    base = int4_matmul_func(n, k, cfg, "float16", bias)
    mod = tvm.IRModule({copy_name(r, kind): bucket_copy(base, copy_name(r, kind), r, kind)
                        for r, kind in CANDIDATES})
    with target:
        mod = dl.ApplyDefaultSchedule(*gpu_rules(target))(mod)
    lib = tvm.compile(mod, target=target)
    dev = tvm.cuda(0)
    for m in MS:
        args, ref = _case(name, m, 1000 + m)
        targs = [tvm.runtime.tensor(a, dev) for a in args]
        for copy in candidates_for(m):
            y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float16), dev)
            lib[copy](*targs, y)
            got = y.numpy()
            assert np.isfinite(got).all(), (copy, m)
            assert rel_err(got, ref) <= 2e-3, (copy, m, rel_err(got, ref))
