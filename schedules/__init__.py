"""TensorIR schedule rules for the fused int4 matmul (compiler/int4_kernel.py), dlight style:
each rule is `apply(func, target, tunable) -> Schedule | None`; the first rule that answers wins.
"""
from __future__ import annotations


def gpu_rules(target) -> list:
    """Rules for a CUDA target, ours first; TVM's dlight rules schedule everything else."""
    from tvm.s_tir import dlight as dl

    from .gemm import GEMM
    from .gemm_wgmma import GEMMWGMMA
    from .gemv import GEMV
    from .gemv_mma import GEMVMMA
    from .injective import Injective

    return [
        GEMVMMA(),  # small-m ("mma") copies made by compiler/dispatch.py: tensor-core decode GEMV
        GEMV(),  # small-m ("gemv") copies: CUDA-core GEMV; None for anything else
        GEMMWGMMA(),  # the unbounded ("wgmma") copy on Hopper: wgmma with the int4 weight as A
        GEMM(),  # the big-m ("gemm") copy: tensor-core int4 GEMM; None if the shape does not tile
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        Injective(),  # symbolic-shape injective ops (KV concat, transpose, cast): no symbolic div/mod
        dl.gpu.Fallback(),
    ]
