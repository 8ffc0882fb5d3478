"""Token-count dispatch for the int4 kernels: one kernel copy per bucket of m, picked at run time.

The int4 pass emits one PrimFunc per linear shape with a single symbolic token dim m, but no one
schedule is good for both decode (m = 1..16: memory-bound) and prefill (m in the hundreds: tensor-core
GEMM), and even the GEMM wants other tiles and K splits at 16 tokens than at 2048. This pass, run by
build.py for CUDA after the int4 pass, gives each int4 PrimFunc one copy per entry of its routes
(`routes_for`: ROUTES, with FALLBACK_ROUTES' parts where the Hopper/tensor-core kernels do not take it),
    <name>_mma8, _mma16              tagged "nibble.kernel"="mma", "nibble.rows"=B   (schedules/gemv_mma.py)
    <name>_gemm32, _gemm64, ...      tagged "nibble.kernel"="gemm", "nibble.rows"=R  (schedules/gemm.py)
    <name>_wgmma32, ..., _wgmma1024  tagged "nibble.kernel"="wgmma", "nibble.rows"=R (schedules/gemm_wgmma.py)
    <name>_wgmma                     tagged "nibble.kernel"="wgmma" (no bound: every larger m)
(FALLBACK_ROUTES' <name>_gemm256 and unbounded <name>_gemm where the wgmma GEMM does not take it)
and replaces every `call_tir(<name>, args)` with a call to a private Relax function

    @R.function(private=True)
    def <name>_dispatch(x: R.Tensor((m, K)), qweight, scales, ...):
        if m <= 8:   y = call_tir(<name>_mma8, ...)
        elif m <= 16: y = call_tir(<name>_mma16, ...)
        ...
        elif m <= 1024: y = call_tir(<name>_wgmma1024, ...)
        else:        y = call_tir(<name>_wgmma, ...)
        return y

Relax `If` cannot sit in a dataflow block, hence the separate function (pure, so main's dataflow
blocks may call it); the condition is a PrimValue of the symbolic m, which the VM evaluates from x's
shape at run time, so one compiled module serves every m. The bound R of a copy is all its rule needs
to pick a tile (and, schedules/gemm.py `plan`, a K split). A bucket costs one more kernel (two with
split-K) in the module.
"""
from __future__ import annotations

import re

import tvm
from tvm import relax, tirx

from .int4_kernel import ATTR

KERNEL_ATTR = "nibble.kernel"  # = schedules.template.KERNEL_ATTR
ROWS_ATTR = "nibble.rows"  # = schedules.template.ROWS_ATTR

# The decision rule, as data: (bound R, kernel kind) by increasing R; m runs the first copy with m <= R,
# the last entry (no bound) every larger m. Measured on the H200 against every other copy that could
# serve these m, summed over the four Llama-2-7B shapes (bench_linear.py --candidates,
# h200_bench_linear_mma_candidates.md, h200_bench_linear_wgmma_candidates.md):
#  * m <= 8 / 16: the tensor-core GEMV with one / two 8-token tiles: m = 1 44.1 us vs 48.0 for the
#    CUDA-core GEMV, m = 2 45.3 vs 60.3 (gemv2), m = 4 47.0 vs 87.3 (gemv4), m = 8 53.2 vs 96.9 (gemm16),
#    m = 16 82.0 vs 98.9 (gemm16).
#  * m <= 32, 64, 128, 256, 1024 and past: the Hopper wgmma GEMM (schedules/gemm_wgmma.py), its tile per
#    bucket and N, its K split by the bucket's grid at m = R (so m = 128 and m = 200 get different
#    splits; h200_bench_linear_wgmma_split.md): m = 32 92.0 us vs 118.8 for the mma.sync GEMM's 32-row
#    bucket, m = 64 109.0 vs 182.2, m = 128 138.6 vs 164.9 in the 256 bucket.
#    Where it does not take the shape (not sm_90, K % 128), the mma.sync GEMM's 32-, 64- and 128-row tiles.
DECODE = ((8, "mma"), (16, "mma"))
PREFILL = ((32, "wgmma"), (64, "wgmma"), (128, "wgmma"), (256, "wgmma"), (1024, "wgmma"), (None, "wgmma"))
ROUTES = DECODE + PREFILL
# Where the tensor-core GEMV does not take a spec (pre-sm_80, groups not a multiple of 128, K % 128):
#  * m <= 4: the CUDA-core GEMV (1.25-2.5x faster than cuBLAS fp16 there; past 4 tokens it is bound by
#    L1 traffic for x and fp32 FMAs); m = 5..16 the split-K GEMM with 16-row tiles.
DECODE_FALLBACK = ((1, "gemv"), (2, "gemv"), (4, "gemv"), (16, "gemm"))
PREFILL_FALLBACK = ((32, "gemm"), (64, "gemm"), (256, "gemm"), (None, "gemm"))
FALLBACK_ROUTES = DECODE_FALLBACK + PREFILL_FALLBACK
BUCKETS = tuple(r for r, kind in FALLBACK_ROUTES if kind == "gemv")  # the CUDA-core GEMV buckets
# Copies the benchmark times beside the routed one (bench_linear.py --candidates): every bucket that
# could serve an m, so one GPU run can move the bounds above.
CANDIDATES = ((1, "gemv"), (2, "gemv"), (4, "gemv"), (8, "gemv"), (16, "gemv"), (8, "mma"), (16, "mma"),
              (16, "gemm"), (32, "gemm"), (64, "gemm"), (256, "gemm"), (None, "gemm"), (32, "wgmma"),
              (64, "wgmma"), (128, "wgmma"), (256, "wgmma"), (1024, "wgmma"), (None, "wgmma"))


def parse_copy(copy: str) -> tuple:
    """(bound or None, kind) of a copy suffix: "gemv4" -> (4, "gemv"), "gemm" -> (None, "gemm")."""
    kind, rows = re.fullmatch(r"([a-z]+?)(\d*)", copy).groups()
    return (int(rows) if rows else None), kind


def copy_name(rows: int | None, kind: str) -> str:
    """The suffix of a bucket copy: "gemv4", "gemm16", "gemm" (unbounded)."""
    return f"{kind}{'' if rows is None else rows}"


def kernel_for(m: int, routes=ROUTES) -> str:
    """The copy (its suffix) the dispatch runs at m tokens."""
    return next(copy_name(r, kind) for r, kind in routes if r is None or m <= r)


def routes_for(spec: dict, arch: str | None) -> tuple:
    """The routes of an int4 spec on arch ("sm_90"): DECODE where the tensor-core GEMV takes it (else
    DECODE_FALLBACK), then PREFILL where the wgmma GEMM takes it (else PREFILL_FALLBACK)."""
    from schedules.gemm_wgmma import takes as wgmma_takes
    from schedules.gemv_mma import takes as mma_takes

    return ((DECODE if mma_takes(spec, arch) else DECODE_FALLBACK)
            + (PREFILL if wgmma_takes(spec, arch) else PREFILL_FALLBACK))


def candidates_for(m: int, candidates=CANDIDATES) -> list[str]:
    """Every copy in `candidates` that serves m tokens (bound >= m)."""
    return [copy_name(r, kind) for r, kind in candidates if r is None or m <= r]


def base_name(name: str) -> str:
    """The int4 PrimFunc a copy was made from: strips "_gemv4", "_gemm16", "_gemm", "_wgmma"."""
    return re.sub(r"_(gemv|gemm|mma|wgmma)\d*$", "", name)


def bucket_copy(func: tirx.PrimFunc, name: str, rows: int | None, kind: str) -> tirx.PrimFunc:
    """One tagged copy of an int4 PrimFunc (its schedule rule reads the tags)."""
    attrs = {"global_symbol": name, KERNEL_ATTR: kind}
    if rows is not None:
        attrs[ROWS_ATTR] = rows
    return func.with_attr(attrs)


def relax_params(func: tirx.PrimFunc, m: tirx.Var) -> list:
    """Relax parameters for an int4 PrimFunc's inputs (x, qweight, scales, ...; not y), x bound to m tokens."""
    bufs = list(func.params)  # TVM 0.27: typed buffer params (name, shape, dtype)
    params = [relax.Var("x", relax.TensorType([m, bufs[0].shape[1]], bufs[0].dtype))]
    return params + [relax.Var(b.name, relax.TensorType(list(b.shape), b.dtype)) for b in bufs[1:-1]]


def dispatch_function(func: tirx.PrimFunc, kernels: list, last) -> relax.Function:
    """The private Relax function that picks a kernel by m (see the module docstring): kernels are
    (bound, GlobalVar of a copy of func) by increasing bound; last(params, out type) is what runs past
    the last bound (here a call_tir of the unbounded copy)."""
    m = tirx.Var("m", "int64")
    params = relax_params(func, m)
    y = func.params[-1]
    out = relax.TensorType([m, y.shape[1]], y.dtype)

    def branch(i):
        if i == len(kernels):
            return last(params, out)
        rows, gv = kernels[i]
        return relax.If(relax.prim_value(m <= rows), relax.call_tir(gv, params, out), branch(i + 1))

    bb = relax.BlockBuilder()
    with bb.function("dispatch", params, pure=True, private=True):
        y = bb.emit(branch(0))  # normalizes each branch into its own binding block
        bb.emit_func_output(y)
    return bb.get()["dispatch"]


def _gemm_takes(func: tirx.PrimFunc, rows: int, arch: str | None) -> bool:
    from schedules.gemm import takes

    return takes(func.attrs[ATTR], rows, arch)


def dispatch_small_m(mod: tvm.IRModule, routes=None, arch: str | None = None) -> tvm.IRModule:
    """Split every int4 PrimFunc into bucket copies (`routes`, default `routes_for` the function's spec
    on `arch`; the entry with no bound is the unbounded copy) behind an m dispatch.

    Bounded "gemm" copies are made only where our GEMM template takes the shape on `arch` (e.g.
    "sm_90"): elsewhere dlight's Matmul schedules every "gemm" copy the same way, so one copy serves
    all m past the GEMV buckets."""
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
        kernels, large = [], "gemm"
        for rows, kind in routes or routes_for(func.attrs[ATTR], arch):
            if rows is None:
                large = kind
                continue
            if kind == "gemm" and not _gemm_takes(func, rows, arch):
                continue
            copy = f"{name}_{copy_name(rows, kind)}"
            kernels.append((rows, add(bucket_copy(func, copy, rows, kind), copy)))
        copy = f"{name}_{large}"
        big = add(bucket_copy(func, copy, None, large), copy)
        last = lambda ps, out, big=big: relax.call_tir(big, ps, out)  # noqa: E731
        route[gv] = add(dispatch_function(func, kernels, last), f"{name}_dispatch")
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    out = rw.builder_.get()
    for gv in route:
        del out[gv]  # now unreferenced
    return out
