"""Injective kernels over symbolic shapes (KV-cache concat, transpose, scale, cast, RoPE...): a grid
that needs no division by a symbolic extent, with 16-byte vector accesses along a static last dim.

dlight's Fallback fuses every loop into one flat index and splits it over 1024-thread blocks, so each
element recovers its coordinates with floordiv/floormod by symbolic extents such as (past + seq) * 256,
in int64 (the shapes are int64 and cannot be proven to fit int32): several software 64-bit divisions per
element, no vectorization. On an H200 that made a 2 MB decode-step concat take ~9 us.

This rule keeps int64 indices (correct for any size) but removes the divisions instead:
  * the loops after the innermost symbolic one are static: they are fused with it into one loop over
    blockIdx.x * threads + threadIdx.x, so coordinates come from div/mod by *constants* only (shifts or
    a multiply-high), and the symbolic loop index itself needs none;
  * the loops before it (batch, heads, ...) are fused onto blockIdx.y (decoded by constants except
    the outermost);
  * if the last loop is static and every access is contiguous along it, it is split by 16 bytes /
    widest element and vectorized (uint4 loads/stores for fp16 rows of 128).
Functions with only static shapes are left to Fallback (NarrowDataType already gives them int32 math).
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

THREADS = 256  # threads per block (x)
VECTOR_BYTES = 16  # one 128-bit access per thread
MAX_GRID_Y = 65535


def _static(e) -> int | None:
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _bytes(dtype) -> int:
    import tvm

    t = tvm.DataType(str(dtype))
    return max(1, t.bits * t.lanes // 8)


def _widest_value(expr) -> int:
    """Bytes of the widest dtype among the values an expression computes (not its indices): a cast to
    fp32 between fp16 buffers makes fp32 vectors, and TVM 0.27's CUDA codegen miswrites 32-byte ones
    (an 8-lane fp32 constant came out as make_ulonglong4 of 8 floats, which nvcc rejects)."""
    # PrimExprs carry their dtype as .ty in TVM 0.27; integer and bool values are indices and conditions
    widest = _bytes(expr.ty) if str(expr.ty).startswith(("float", "bfloat")) else 1
    if isinstance(expr, tvm.ir.expr.TensorLoad):  # a buffer read (its indices are not values)
        return widest
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        sub = getattr(expr, field, None)
        if isinstance(sub, tvm.ir.expr.Expr):
            widest = max(widest, _widest_value(sub))
    for sub in getattr(expr, "args", None) or ():
        if isinstance(sub, tvm.ir.expr.Expr):
            widest = max(widest, _widest_value(sub))
    return widest


_ANALYZER = tvm.sym.Analyzer()


def _contiguous_lanes(block, inner_var, vec: int) -> bool:
    """Every buffer access indexes its last dim with inner_var (+ a multiple of vec), and every
    accessed buffer's last dim is a static multiple of vec, so vec-wide accesses are aligned."""
    for region in list(block.reads) + list(block.writes):
        buf = region.source
        if not buf.shape or _static(buf.shape[-1]) is None or _static(buf.shape[-1]) % vec:
            return False
        last = region.region[-1]
        if _static(last.extent) != 1:
            return False
        # the last index must be inner_var + (something free of it and a multiple of vec): a constant
        # offset, or a head's column block of a merged q/k/v output (h * 128 + 512 + d)
        rest = _ANALYZER.simplify(last.min - inner_var)
        if any(v.same_as(inner_var) for v in _vars(rest)):
            return False
        if not _ANALYZER.can_prove_equal(tirx.floormod(rest, vec), 0):
            return False
        # the other dims must not depend on the vectorized var
        for r in region.region[:-1]:
            if any(v.same_as(inner_var) for v in _vars(r.min)):
                return False
    return True


def _vars(expr) -> list:
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    return list(collect_vars_used_in_prim_expr(expr))


class Injective(GPUScheduleRule):
    """A single injective block (after inlining) with at least one symbolic loop extent."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1 or not infos[0].is_injective():
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if not loops or any(sch.get(lp).thread_binding is not None for lp in loops):
            return None
        extents = [sch.get(lp).extent for lp in loops]
        symbolic = [i for i, e in enumerate(extents) if _static(e) is None]
        if not symbolic:
            return None  # static shapes: Fallback's divisions are by constants, NarrowDataType -> int32
        k = symbolic[-1]
        outer = loops[:k]
        if k > 0 and any(_static(e) is None for e in extents[1:k]):
            return None  # a symbolic extent inside the outer fusion would need a symbolic division
        static_outer = 1
        for e in extents[1:k]:
            static_outer *= _static(e)
        if k > 0 and _static(extents[0]) is not None and _static(extents[0]) * static_outer > MAX_GRID_Y:
            return None

        blk = sch.get(block)
        inner = list(loops[k:])
        vec = 1
        if k < len(loops) - 1:
            widest = max(_bytes(r.source.dtype) for r in list(blk.reads) + list(blk.writes))
            if isinstance(blk.body, tirx.BufferStore):
                widest = max(widest, _widest_value(blk.body.value))
            vec = max(1, VECTOR_BYTES // widest)
            last = _static(extents[-1])
            while vec > 1 and last % vec:
                vec //= 2
            if vec > 1 and not _contiguous_lanes(blk, blk.iter_vars[-1].var, vec):
                vec = 1
        if vec > 1:
            lo, lv = sch.split(inner[-1], factors=[None, vec])
            inner = inner[:-1] + [lo]
        fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        bx, tx = sch.split(fused, factors=[None, THREADS])
        if outer:
            by = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.reorder(by, bx, tx)
            sch.bind(by, "blockIdx.y")
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if vec > 1:
            sch.vectorize(lv)
        return sch
