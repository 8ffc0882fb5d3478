"""Token-count dispatch for the int4 kernels: GEMV copies for small m, the GEMM (dlight Matmul) for the rest.

The int4 pass emits one PrimFunc per linear shape with a single symbolic token dim m, but no one
schedule is good for both decode (m = 1..16: memory-bound GEMV) and prefill (m in the hundreds:
tensor-core GEMM). This pass, run by build.py for CUDA after the int4 pass, gives each int4 PrimFunc
    <name>_gemv1, _gemv2, _gemv4, ...   copies tagged "nibble.kernel"="gemv", "nibble.rows"=B
    <name>_gemm                         copy tagged "nibble.kernel"="gemm"
(schedules.gemv.GEMV schedules the first kind; dlight the second) and replaces every
`call_tir(<name>, args)` with a call to a private Relax function

    @R.function(private=True)
    def <name>_dispatch(x: R.Tensor((m, K)), qweight, scales, ...):
        if m <= 1:   y = call_tir(<name>_gemv1, ...)
        elif m <= 2: y = call_tir(<name>_gemv2, ...)
        ...
        else:        y = call_tir(<name>_gemm, ...)
        return y

Relax `If` cannot sit in a dataflow block, hence the separate function (pure, so main's dataflow
blocks may call it); the condition is a PrimValue of the symbolic m, which the VM evaluates from x's
shape at run time, so one compiled module serves every m. A bucket costs one more kernel in the
module; the thresholds come from benchmarks/bench_linear.py (results in benchmarks/results/).
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

from .int4_kernel import ATTR

KERNEL_ATTR = "nibble.kernel"  # = schedules.template.KERNEL_ATTR
ROWS_ATTR = "nibble.rows"  # = schedules.gemv.ROWS_ATTR
# m <= 4 runs the GEMV (bucket = the next power of two >= m, so a copy never does more than 2x the
# token work). Chosen from the H200 measurements (benchmarks/results/): past m = 4 this CUDA-core
# GEMV is bound by L1 traffic for x and fp32 FMAs and loses to the GEMM copy; see the results notes.
BUCKETS = (1, 2, 4)


def _copy(func: tirx.PrimFunc, name: str, **attrs) -> tirx.PrimFunc:
    return func.with_attr({"global_symbol": name, **attrs})


def _dispatch_function(func: tirx.PrimFunc, kernels: list, gemm: tvm.ir.GlobalVar) -> relax.Function:
    """The private Relax function that picks a kernel by m (see the module docstring)."""
    bufs = list(func.params)  # TVM 0.27: typed buffer params (name, shape, dtype)
    m = tirx.Var("m", "int64")
    x_shape = [m, bufs[0].shape[1]]
    params = [relax.Var("x", relax.TensorType(x_shape, bufs[0].dtype))]
    params += [relax.Var(b.name, relax.TensorType(list(b.shape), b.dtype)) for b in bufs[1:-1]]
    out = relax.TensorType([m, bufs[-1].shape[1]], bufs[-1].dtype)

    def branch(i):
        if i == len(kernels):
            return relax.call_tir(gemm, params, out)
        rows, gv = kernels[i]
        return relax.If(relax.prim_value(m <= rows), relax.call_tir(gv, params, out), branch(i + 1))

    bb = relax.BlockBuilder()
    with bb.function("dispatch", params, pure=True, private=True):
        y = bb.emit(branch(0))  # normalizes each branch into its own binding block
        bb.emit_func_output(y)
    return bb.get()["dispatch"]


def dispatch_small_m(mod: tvm.IRModule, buckets=BUCKETS) -> tvm.IRModule:
    """Split every int4 PrimFunc into GEMV bucket copies + a GEMM copy behind an m dispatch."""
    int4 = [(gv, f) for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and ATTR in f.attrs
            and KERNEL_ATTR not in f.attrs]
    if not int4:
        return mod

    @relax.expr_functor.mutator
    class _Reroute(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == tvm.ir.Op.get("relax.call_tir") and call.args[0] in route:
                return relax.Call(route[call.args[0]], list(call.args[1].fields))
            return call

    rw = _Reroute(mod)
    add = rw.builder_.add_func  # gives each new GlobalVar its type, which calls to it need
    route = {}  # original PrimFunc GlobalVar -> its dispatch function
    for gv, func in int4:
        name = gv.name_hint
        kernels = [(rows, add(_copy(func, f"{name}_gemv{rows}", **{KERNEL_ATTR: "gemv", ROWS_ATTR: rows}),
                              f"{name}_gemv{rows}")) for rows in buckets]
        gemm = add(_copy(func, f"{name}_gemm", **{KERNEL_ATTR: "gemm"}), f"{name}_gemm")
        route[gv] = add(_dispatch_function(func, kernels, gemm), f"{name}_dispatch")
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    out = rw.builder_.get()
    for gv in route:
        del out[gv]  # now unreferenced
    return out
