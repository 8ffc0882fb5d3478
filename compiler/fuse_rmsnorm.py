"""RMSNorm as one op: the exported arithmetic -> relax.nn.rms_norm, so a norm is one kernel, not two.

Exporters write RMSNorm (Llama, Qwen, Mistral...) as

    p = power(x, 2)  |  multiply(x, x)
    m = mean(p, axis=[-1], keepdims=True)
    r = divide(1, sqrt(add(m, eps)))  |  rsqrt(add(m, eps))
    y = multiply(x, r)
  ==>
    y = rms_norm(x, ones[K], axes=[-1], epsilon=eps)

(the weight multiply and casts that follow stay; FuseOps fuses them into the norm). Why: TVM's FuseOps
will not fuse an elementwise producer into `mean` (its PrimFunc is reduce + divide, not a plain
reduction), so `power` ran as its own kernel: in a Llama-2-7B decode step 65 extra launches, ~0.1 ms
(h200_generate.md). rms_norm legalizes to one reduction that GeneralReduction schedules with its
consumers. Numerics: 1/sqrt becomes rsqrt, within fp32 rounding.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from .relax_util import BindingRewriter, is_op, rewrite_main, scalar




@mutator
class _Fuse(BindingRewriter):

    def _match(self, call):
        """(x, eps) if `call` is the multiply ending the chain in the module docstring."""
        if not is_op(call, "relax.multiply"):
            return None
        for x, r in (call.args, call.args[::-1]):
            inv = self.bound(r, "relax.rsqrt")
            if inv is not None:
                inner = inv.args[0]
            else:
                div = self.bound(r, "relax.divide")
                sqrt = self.bound(div.args[1], "relax.sqrt") if div is not None and scalar(div.args[0]) == 1.0 else None
                if sqrt is None:
                    continue
                inner = sqrt.args[0]
            add = self.bound(inner, "relax.add")
            if add is None:
                continue
            for m, eps in (add.args, add.args[::-1]):
                mean = self.bound(m, "relax.mean")
                if mean is not None and scalar(eps) is not None:
                    break
            else:
                continue
            if not (mean.attrs.keepdims and mean.attrs.axis is not None and len(mean.attrs.axis) == 1):
                continue
            sq = self.bindings.get(mean.args[0])
            squares = ((is_op(sq, "relax.power") and sq.args[0].same_as(x) and scalar(sq.args[1]) == 2.0)
                       or (is_op(sq, "relax.multiply") and sq.args[0].same_as(x) and sq.args[1].same_as(x)))
            ty = x.ty
            if not squares or not isinstance(ty, relax.TensorType) or ty.shape is None:
                continue
            axis = int(mean.attrs.axis[0])
            if axis not in (-1, ty.ndim - 1) or not isinstance(ty.shape.values[-1], tirx.IntImm):
                continue
            return x, scalar(eps)
        return None

    def rewrite(self, value):
        m = self._match(value)
        if m is None:
            return None
        x, eps = m
        k, dtype = int(x.ty.shape.values[-1]), str(x.ty.dtype)
        ones = relax.const(np.ones(k, dtype), dtype)
        return relax.op.nn.rms_norm(self.visit_expr(x), ones, axes=[-1], epsilon=eps)


def fuse_rmsnorm(mod: tvm.IRModule, func_name: str | None = None):
    """Apply the rewrite to mod[func_name] (default: every entry function); returns (module, number of norms rewritten)."""
    rw = _Fuse(mod)
    out = rewrite_main(mod, rw, func_name)
    return out, rw.count
