"""compiler/dispatch.py: one module, symbolic m, a kernel copy per token bucket of ROUTES (tensor-core GEMV
copies for small m, GEMM bucket copies where our GEMM takes the shape, the unbounded GEMM copy past
them); FALLBACK_ROUTES (CUDA-core GEMV copies) where the tensor-core GEMV does not take the shape."""
import numpy as np
import pytest

import tvm
from tvm import relax, te, tirx

from compiler.dispatch import (BUCKETS, DECODE, DECODE_FALLBACK, FALLBACK_ROUTES, KERNEL_ATTR, PREFILL,
                               PREFILL_FALLBACK, ROUTES, ROWS_ATTR, dispatch_small_m, kernel_for, routes_for)
from compiler.int4_kernel import ATTR
from compiler.int4_pass import quantize_linears

K, N = 192, 64  # K % 128 != 0: not the tensor-core GEMV's; N % 128 != 0: not our GEMM's either


def _linear_module(k=K, n=N, seed=0):
    bb = relax.BlockBuilder()
    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([m, k], "float16"))
    w = relax.Var("w", relax.TensorType([n, k], "float16"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(x, relax.op.permute_dims(w))))
        bb.emit_func_output(y)
    weight = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float16)
    mod, params, _ = quantize_linears(bb.get(), {"w": weight})
    return mod, params


def _prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


TILED = (256, 128)  # (K, N) our GEMM tiles on sm_90: it gets the GEMM bucket copies too


def test_routes_for_picks_the_tensor_core_gemv_where_it_takes_the_shape():
    spec = {"n": 4096, "k": 4096, "group_size": 128, "x_dtype": "float16"}
    assert routes_for(spec, "sm_90") == ROUTES and routes_for(spec, "sm_75") == FALLBACK_ROUTES
    g64 = routes_for({**spec, "group_size": 64}, "sm_90")  # 64-k groups: the wgmma GEMM, not the mma GEMV
    assert g64 == DECODE_FALLBACK + PREFILL
    assert routes_for(spec, "sm_80") == DECODE + PREFILL_FALLBACK  # wgmma is Hopper-only
    assert routes_for(spec, None) == FALLBACK_ROUTES
    assert kernel_for(1) == "mma8" and kernel_for(1, FALLBACK_ROUTES) == "gemv1"
    assert kernel_for(200) == "wgmma256" and kernel_for(1000) == "wgmma1024" and kernel_for(1025) == "wgmma"
    assert kernel_for(200, FALLBACK_ROUTES) == "gemm256" and kernel_for(257, FALLBACK_ROUTES) == "gemm"


def test_dispatch_structure():
    """K % 128 and N = 64 fit neither the tensor-core GEMV nor our GEMM: the CUDA-core GEMV buckets + one
    "gemm" copy (dlight's, for every larger m)."""
    mod = dispatch_small_m(_linear_module()[0], arch="sm_90")
    prims = _prim_funcs(mod)
    kinds = sorted((str(f.attrs[KERNEL_ATTR]), int(f.attrs[ROWS_ATTR]) if ROWS_ATTR in f.attrs else 0)
                   for f in prims.values())
    assert kinds == sorted([("gemv", b) for b in BUCKETS] + [("gemm", 0)])  # the original is gone
    assert all(ATTR in f.attrs for f in prims.values())  # still recognizable as our kernel
    dispatch = [gv for gv, f in mod.functions_items() if gv.name_hint.endswith("_dispatch")]
    assert len(dispatch) == 1 and "global_symbol" not in (mod[dispatch[0]].attrs or {})  # private
    text = mod.script()
    assert all(f"if m <= {b}:" in text for b in BUCKETS)
    assert f"cls.{dispatch[0].name_hint}(x" in text  # main calls it in place of the call_tir
    assert dispatch_small_m(mod).script() == text  # idempotent: tagged copies are left alone


def test_dispatch_structure_with_gemm_buckets():
    """A shape the tensor-core GEMV, our GEMM and the wgmma GEMM take: one copy per ROUTES entry (the
    last, unbounded, is the wgmma one), each tagged with its bound."""
    mod = dispatch_small_m(_linear_module(*TILED)[0], arch="sm_90")
    kinds = sorted((str(f.attrs[KERNEL_ATTR]), int(f.attrs[ROWS_ATTR]) if ROWS_ATTR in f.attrs else 0)
                   for f in _prim_funcs(mod).values())
    assert kinds == sorted((kind, r or 0) for r, kind in ROUTES)
    assert {kind for _, kind in ROUTES} == {"mma", "wgmma"}  # the test means something
    text = mod.script()
    assert all(f"if m <= {r}:" in text for r, _ in ROUTES if r is not None)
    names = sorted(_prim_funcs(mod))
    assert all(any(n.endswith(f"_{kind}{r or ''}") for n in names) for r, kind in ROUTES)


def _marker_kernel(like: tirx.PrimFunc, value: float) -> tirx.PrimFunc:
    """A PrimFunc with `like`'s signature that writes `value` everywhere: shows which copy ran."""
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, like.params[0].shape[1]), "float16", name="x")
    rest = [te.placeholder(p.shape, p.dtype, name=p.name) for p in like.params[1:-1]]
    y = te.compute((m, like.params[-1].shape[1]), lambda i, j: x[i, 0] * tirx.const(0, "float16")
                   + tirx.const(value, "float16"), name="y")
    return te.create_prim_func([x, *rest, y]).with_attrs(like.attrs)


@pytest.fixture(scope="module")
def marker_vm():
    """The dispatch of a GEMM-tiled shape built once for llvm with every copy replaced by a marker kernel."""
    mod, params = _linear_module(*TILED)
    mod = dispatch_small_m(mod, arch="sm_90")
    marks = {name: float(i + 1) for i, name in enumerate(sorted(_prim_funcs(mod)))}
    for name, f in _prim_funcs(mod).items():
        mod[mod.get_global_var(name)] = _marker_kernel(f, marks[name])
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    return vm, weights, {v: k for k, v in marks.items()}


@pytest.mark.parametrize("m_val", [1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 64, 65, 200, 256, 257])
def test_dispatch_picks_bucket_by_m_at_run_time(marker_vm, m_val):
    """The VM's If chain on the symbolic m runs the copy compiler.dispatch.kernel_for names, at both ends
    of every bucket."""
    vm, weights, ran_of = marker_vm
    y = vm["main"](tvm.runtime.tensor(np.zeros((m_val, TILED[0]), np.float16)), *weights).numpy()
    ran = ran_of[float(y[0, 0])]
    assert ran.endswith("_" + kernel_for(m_val)) and (y == y[0, 0]).all(), (ran, kernel_for(m_val))


@pytest.mark.parametrize("m_val", [1, 2, 3, 4, 5, 17, 200])
def test_dispatch_picks_kernel_by_m_at_run_time(m_val):
    """Built once for llvm with every copy replaced by a marker kernel, then run at several m: the VM's
    If on the symbolic m picks the CUDA-core GEMV copy for m <= 4 and the GEMM copy above (a shape neither
    the tensor-core GEMV nor our GEMM takes: FALLBACK_ROUTES without GEMM buckets)."""
    mod, params = _linear_module()
    mod = dispatch_small_m(mod, arch="sm_90")
    marks = {name: float(i + 1) for i, name in enumerate(sorted(_prim_funcs(mod)))}
    for name, f in _prim_funcs(mod).items():
        mod[mod.get_global_var(name)] = _marker_kernel(f, marks[name])
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.zeros((m_val, K), np.float16)
    y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]])
    want = next((f"_gemv{b}" for b in BUCKETS if m_val <= b), "_gemm")  # no GEMM buckets: N % 128
    ran = {v: k for k, v in marks.items()}[float(y.numpy()[0, 0])]
    assert ran.endswith(want) and (y.numpy() == marks[ran]).all()


@pytest.mark.gpu
def test_built_module_launches_the_routed_bucket_copy():
    """The real CUDA build through build.py: name the kernels the GPU runs (torch's CUPTI profiler): the
    tensor-core GEMV at m=1 and 16, the wgmma GEMM's bucket copies at 32, 200 and 1000 (N = 512 has 4 row
    blocks, so each splits K: its kernel + the reduction kernel), and the unbounded, unsplit copy at 1100."""
    import torch

    from compiler.build import build_module
    from compiler.target import resolve

    mod, params = _linear_module(k=4096, n=512)
    vm = relax.VirtualMachine(build_module(mod, resolve("cuda", "sm_90")), tvm.cuda(0))
    ws = [tvm.runtime.tensor(params[p.name], device=tvm.cuda(0)) for p in mod["main"].params[1:]]
    ran = {}
    for m_val in (1, 16, 32, 200, 1000, 1100):
        x = tvm.runtime.tensor(np.random.default_rng(m_val).standard_normal((m_val, 4096)).astype(np.float16),
                               device=tvm.cuda(0))
        vm["main"](x, *ws)  # warm up (module load) outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            vm["main"](x, *ws)
            torch.cuda.synchronize()
        ran[m_val] = [e.name for e in prof.events() if "int4_matmul" in e.name]
    print(ran)
    for m_val, kernels in ran.items():
        copy = kernel_for(m_val)
        assert kernels and all(n.split("int4_matmul")[1].split("_kernel")[0].endswith("_" + copy)
                               for n in kernels), (m_val, kernels)
    assert len(set(ran[32])) == len(set(ran[1000])) == 2 and len(set(ran[1100])) == 1  # split: + reduction
    assert kernel_for(1) == "mma8" and kernel_for(16) == "mma16"
