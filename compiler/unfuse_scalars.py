"""Relax pass (between AnnotateTIROpPattern and FuseOps): TIR functions with a scalar parameter are
marked opaque, so FuseOps does not fuse them.

    @T.prim_func def add1(lv6: T.Buffer((seq,), "int64"), past: T.int64, T_add: ...)   # op_pattern 0
 => the same function with op_pattern = kOpaque (8)

Importers pass a shape value as a scalar operand where a graph does arithmetic with it (HF decoders
compute position ids as arange(seq) + past_length, so `R.add(x, past)` lowers to a TIR function
taking `past: T.int64`). TVM 0.27's FuseTIR fails on a fused group with such a parameter
("RenewDefs: Check failed: VarRemapGet(source) == nullptr"), so no HF decoder built for CUDA. Left
unfused, the function is one small extra kernel (once per call of the model, not per layer).
"""
from __future__ import annotations

import tvm

K_OPAQUE = 8  # relax OpPatternKind::kOpaque


def _has_scalar_param(func) -> bool:
    # TVM 0.27: buffer params are typed tirx.BufferType, scalar params a PrimType
    return any(isinstance(p.ty, tvm.ir.PrimType) for p in func.params)


@tvm.transform.module_pass(opt_level=0, name="nibble.UnfuseScalarParamFuncs")
def unfuse_scalar_param_funcs(mod, _ctx):
    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and _has_scalar_param(func):
            func = func.with_attr("op_pattern", K_OPAQUE)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)
