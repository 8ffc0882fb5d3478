"""CPU (llvm) schedule of the fused int4 matmul: correct and fast enough for CI numerics, not a product.

Unscheduled, TVM runs the PrimFunc as written: dequantize the whole weight, then an m x n x k loop.
Here each parallel chunk of output columns dequantizes only its own rows (compute_at: once per call,
cache resident) and reuses them for all m rows. (The bigger CPU win is F16C: compiler/target.py builds
for x86-64-v3 where the host has it.)
"""
from __future__ import annotations

import dataclasses

from tvm import s_tir
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

ATTR = "nibble.int4"  # = compiler.int4_kernel.ATTR
VERSION = 1  # bump when the template changes meaning: tuning records of other versions are ignored


@dataclasses.dataclass(frozen=True)
class Config:
    n_chunk: int = 32  # output columns per parallel task (their dequantized rows stay in cache)
    k_split: int = 1  # split the reduction loop (1 = no split); >1 unrolls the inner part by this factor


SPACE = {"n_chunk": (8, 16, 32, 64, 128), "k_split": (1, 4, 8)}


class Int4MatmulCPU(CPUScheduleRule):
    def apply(self, func, target, _tunable):
        if func.attrs is None or ATTR not in func.attrs:
            return None
        from compiler.tuning import config_from

        cfg = config_from(func, Config, Config())
        sch = s_tir.Schedule(func)
        mm, epi = sch.get_sblock("matmul"), sch.get_sblock("epilogue")
        i, j, k = sch.get_loops(mm)
        jo, ji = sch.split(j, [None, cfg.n_chunk])
        sch.reorder(jo, i, ji, k)
        sch.parallel(jo)
        if cfg.k_split > 1:
            _, kin = sch.split(k, [None, cfg.k_split])
            sch.unroll(kin)
        sch.compute_at(sch.get_sblock("dequantize"), jo)
        sch.reverse_compute_at(epi, jo)
        return sch


def rule():
    return Int4MatmulCPU()


def default_config(target, func=None) -> Config:
    return Config()
