"""CPU (llvm) schedule of the fused int4 matmul: correct and fast enough for CI numerics, not a product.

Unscheduled, TVM runs the PrimFunc as written: dequantize the whole weight, then a scalar
m x n x k loop on one core (3 s for a 74-token call of the demo model). Here each parallel chunk of
output columns dequantizes only its own rows (compute_at: once per call, cache resident) and every
thread reuses them for all m rows.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from compiler.int4_kernel import ATTR

N_CHUNK = 32  # output columns per parallel task


class Int4MatmulCPU(CPUScheduleRule):
    def apply(self, func, target, _tunable):
        if func.attrs is None or ATTR not in func.attrs:
            return None
        sch = s_tir.Schedule(func)
        mm, epi = sch.get_sblock("matmul"), sch.get_sblock("epilogue")
        i, j, k = sch.get_loops(mm)
        jo, ji = sch.split(j, [None, N_CHUNK])
        sch.reorder(jo, i, ji, k)
        sch.parallel(jo)
        sch.compute_at(sch.get_sblock("dequantize"), jo)
        sch.reverse_compute_at(epi, jo)
        return sch
