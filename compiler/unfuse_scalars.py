"""Relax pass (between AnnotateTIROpPattern and FuseOps): TIR functions that compute with a scalar
parameter are marked opaque, so FuseOps does not fuse them.

    @T.prim_func def add1(lv6: T.Buffer((seq,), "int64"), past: T.int64, T_add: ...)   # op_pattern 0
 => the same function with op_pattern = kOpaque (8)

Importers pass a shape value as a scalar operand where a graph does arithmetic with it (HF decoders
compute position ids as arange(seq) + past_length, so `R.add(x, past)` lowers to a TIR function
taking `past: T.int64`). TVM 0.27's FuseTIR fails on a fused group with such a parameter
("RenewDefs: Check failed: VarRemapGet(source) == nullptr"), so no HF decoder built for CUDA. Left
unfused, the function is one small extra kernel (once per call of the model, not per layer).

Two more pattern fixes, both for FuseOps across symbolic token dims:
Scalars that only appear in buffer shapes are not operands and fuse fine (tested on the same HF
decoders): an op on [batch * seq, K] gets batch and seq that way, and marking those opaque kept
kernels apart. And a reshape over symbolic dims (legalized R.reshape, [b, s, K] <-> [b * s, K]) is
annotated opaque because its index map is not analyzable; it is injective, and left opaque it cut every
chain through it (int4 output -> reshape -> RoPE or SiLU*mul), so it is marked injective. The same goes
for a concatenate along a symbolic dim: the KV cache's concat(past, new) now shares a kernel with the
op that makes `new` (RoPE for keys, the transpose for values): two launches fewer per layer.
"""
from __future__ import annotations

import tvm

K_OPAQUE = 8  # relax OpPatternKind::kOpaque
K_INJECTIVE = 2  # relax OpPatternKind::kInjective
# legalized ops TVM annotates opaque over symbolic dims although each output element reads one input
# element: reshape, and concatenate (the KV cache's concat(past, new) along the symbolic length)
INJECTIVE_OPS = ("reshape", "concatenate")


def _has_scalar_param(func) -> bool:
    """A scalar parameter the function computes with. Scalars that only give buffer shapes (an op on
    [batch * seq, K] gets batch and seq, since they cannot be recovered from the product) fuse fine,
    and marking those opaque would stop most decode-step fusions."""
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    shape_vars = set()
    # TVM 0.27: buffer params are typed tirx.BufferType (with a shape), scalar params a PrimType
    for p in func.params:
        if isinstance(p.ty, tvm.tirx.BufferType):
            for dim in p.ty.shape:
                shape_vars.update(collect_vars_used_in_prim_expr(dim))
    return any(isinstance(p.ty, tvm.ir.PrimType) and p not in shape_vars for p in func.params)


@tvm.transform.module_pass(opt_level=0, name="nibble.UnfuseScalarParamFuncs")
def unfuse_scalar_param_funcs(mod, _ctx):
    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and _has_scalar_param(func):
            func = func.with_attr("op_pattern", K_OPAQUE)
        elif (isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith(INJECTIVE_OPS)
              and int(func.attrs.get("op_pattern", 0)) == K_OPAQUE):
            func = func.with_attr("op_pattern", K_INJECTIVE)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)
