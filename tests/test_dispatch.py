"""compiler/dispatch.py: one module, symbolic m, GEMV copies for small m and the GEMM copy otherwise."""
import numpy as np
import pytest

import tvm
from tvm import relax, te, tirx

from compiler.dispatch import BUCKETS, KERNEL_ATTR, ROWS_ATTR, dispatch_small_m
from compiler.int4_kernel import ATTR
from compiler.int4_pass import quantize_linears

K, N = 256, 64


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


def test_dispatch_structure():
    mod = dispatch_small_m(_linear_module()[0])
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


def _marker_kernel(like: tirx.PrimFunc, value: float) -> tirx.PrimFunc:
    """A PrimFunc with `like`'s signature that writes `value` everywhere: shows which copy ran."""
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, tirx.IntImm("int64", K)), "float16", name="x")
    rest = [te.placeholder(p.shape, p.dtype, name=p.name) for p in like.params[1:-1]]
    y = te.compute((m, tirx.IntImm("int64", N)), lambda i, j: x[i, 0] * tirx.const(0, "float16")
                   + tirx.const(value, "float16"), name="y")
    return te.create_prim_func([x, *rest, y]).with_attrs(like.attrs)


@pytest.mark.parametrize("m_val", [1, 2, 3, 4, 5, 17, 200])
def test_dispatch_picks_kernel_by_m_at_run_time(m_val):
    """Built once for llvm with every copy replaced by a marker kernel, then run at several m: the VM's
    If on the symbolic m picks the bucket copy for m <= 4 and the GEMM copy above."""
    mod, params = _linear_module()
    mod = dispatch_small_m(mod)
    marks = {name: float(i + 1) for i, name in enumerate(sorted(_prim_funcs(mod)))}
    for name, f in _prim_funcs(mod).items():
        mod[mod.get_global_var(name)] = _marker_kernel(f, marks[name])
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.zeros((m_val, K), np.float16)
    y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]])
    want = next((f"_gemv{b}" for b in BUCKETS if m_val <= b), "_gemm")
    ran = {v: k for k, v in marks.items()}[float(y.numpy()[0, 0])]
    assert ran.endswith(want) and (y.numpy() == marks[ran]).all()


@pytest.mark.gpu
def test_built_module_launches_gemv_at_m1_and_gemm_at_m200():
    """The real CUDA build through build.py: name the kernels the GPU runs (torch's CUPTI profiler)."""
    import torch

    from compiler.build import build_module
    from compiler.target import resolve

    mod, params = _linear_module(k=4096, n=512)
    vm = relax.VirtualMachine(build_module(mod, resolve("cuda", "sm_90")), tvm.cuda(0))
    ws = [tvm.runtime.tensor(params[p.name], device=tvm.cuda(0)) for p in mod["main"].params[1:]]
    ran = {}
    for m_val in (1, 200):
        x = tvm.runtime.tensor(np.random.default_rng(m_val).standard_normal((m_val, 4096)).astype(np.float16),
                               device=tvm.cuda(0))
        vm["main"](x, *ws)  # warm up (module load) outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            vm["main"](x, *ws)
            torch.cuda.synchronize()
        ran[m_val] = [e.name for e in prof.events() if "int4_matmul" in e.name]
    print(ran)
    assert ran[1] and all("_gemv1" in n for n in ran[1])
    assert ran[200] and all("_gemm" in n for n in ran[200])
