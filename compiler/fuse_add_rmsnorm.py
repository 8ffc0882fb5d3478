"""Residual add + RMSNorm -> one kernel with two outputs (schedules/add_rmsnorm.py). CUDA only.

After compiler/fuse_rmsnorm.py a pre-norm layer reads (HF Llama in fp16, one of its two norms):

    b  = reshape(astype(o_proj, f32), [b, s, K])     (casts / reshapes in front of the operands: any)
    r  = add(a, b)                                   (r: the residual stream, read again later)
    n  = rms_norm(r, gamma, axes=[-1], eps)
    c  = astype(n, f16)                              (the epilogue: casts, reshapes keeping K, and
    y  = multiply(w, c)                               multiplies by [K] weights, in any order)
  ==>
    t  = call_tir(add_rmsnorm, [o_proj, a, gamma, w], out=[[rows, K] f32, [rows, K] f16])
    r  = reshape(t[0], r's shape);  y = reshape(t[1], y's shape)

FuseOps cannot do this itself: it fuses a producer into a consumer only when the consumer
post-dominates it, and r also feeds the next residual add. So a decode step ran the add (with its
casts) and the norm as two kernels, twice per layer; on Llama-2-7B 64 launches and ~80 us of kernels
per token, plus their share of the CUDA graph's per-launch gaps (h200_generate.md). The casts in
front of the operands and the epilogue's cast / multiply are folded into the kernel when nothing else
reads their values; r is materialized (the next add reads it), the norm's intermediates are not.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from schedules.add_rmsnorm import ADD_RMSNORM, add_rmsnorm_func

from .dispatch import KERNEL_ATTR
from .relax_util import BindingRewriter, is_op, rewrite_main, same


def _last_dim(expr) -> int | None:
    ty = expr.ty
    if (not isinstance(ty, relax.TensorType) or ty.shape is None or not ty.shape.values
            or not isinstance(ty.shape.values[-1], tirx.IntImm)):
        return None
    return int(ty.shape.values[-1])


def _vector(expr, k: int, bound: dict) -> bool:
    """A [k] constant or parameter (not computed in the block: the kernel call comes before the norm):
    the weights a norm or its epilogue multiplies by."""
    ty = expr.ty
    return (isinstance(ty, relax.TensorType) and ty.shape is not None and len(ty.shape.values) == 1
            and _last_dim(expr) == k and (isinstance(expr, tvm.ir.GenericConst) or
                                          (isinstance(expr, relax.Var) and expr not in bound)))


@mutator
class _Fuse(BindingRewriter):
    def __init__(self, mod):
        super().__init__(mod)
        self.funcs: dict = {}  # kernel key -> GlobalVar

    # -- matching ---------------------------------------------------------------------------------
    def _peel(self, x, k):
        """The source of operand x through astype / reshape (last dim k kept) that only it reads:
        (source expr, [dtypes cast to, in order])."""
        casts = []
        while self.uses.get(x) == 1:
            value = self.bindings.get(x)
            if is_op(value, "relax.astype"):
                casts.append(str(value.attrs.dtype))
            elif not (is_op(value, "relax.reshape") and _last_dim(value.args[0]) == k):
                break
            x = value.args[0]
        return x, casts[::-1]

    def _match(self, r_var, add):
        """The fusion rooted at r = add(a, b) if a norm reads r: a dict, else None."""
        k = _last_dim(r_var)
        if k is None or not all(_last_dim(x) == k for x in add.args):
            return None
        a_ty, b_ty = (x.ty for x in add.args)
        if not all(isinstance(t, relax.TensorType) and t.shape is not None for t in (a_ty, b_ty)):
            return None
        if len(a_ty.shape.values) != len(b_ty.shape.values) or not all(
                same(x, y) for x, y in zip(a_ty.shape.values, b_ty.shape.values)):
            return None  # broadcasting adds are not residual adds
        users = self.users_of().get(r_var, [])
        norm_var = next((u for u in users if is_op(self.bindings[u], "relax.nn.rms_norm")), None)
        if norm_var is None:
            return None
        norm = self.bindings[norm_var]
        if list(int(a) for a in norm.attrs.axes) not in ([-1], [len(a_ty.shape.values) - 1]):
            return None
        gamma = norm.args[1]
        if not _vector(gamma, k, self.bindings):
            return None
        # the epilogue: single-use casts, reshapes keeping k, multiplies by a [k] vector
        steps, weights, cur = [], [], norm_var
        while self.uses.get(cur) == 1 and len(self.users_of().get(cur, [])) == 1:
            nxt = self.users_of()[cur][0]
            value = self.bindings[nxt]
            if is_op(value, "relax.astype") and _last_dim(value) == k:
                steps.append(("cast", str(value.attrs.dtype)))
            elif is_op(value, "relax.reshape") and _last_dim(value) == k:
                pass
            elif is_op(value, "relax.multiply") and len(value.args) == 2:
                w = value.args[0] if value.args[1].same_as(cur) else value.args[1]
                if not _vector(w, k, self.bindings) or str(w.ty.dtype) != str(value.ty.dtype) or \
                        str(value.args[0].ty.dtype) != str(value.args[1].ty.dtype):
                    break
                steps.append(("mul", str(w.ty.dtype)))
                weights.append(w)
            else:
                break
            cur = nxt
        srcs = [self._peel(x, k) for x in add.args]
        return dict(k=k, eps=float(norm.attrs.epsilon), srcs=srcs, add_dtype=str(r_var.ty.dtype),
                    gamma=gamma, steps=steps, weights=weights, y=cur, y_dtype=str(cur.ty.dtype))

    # -- rewriting --------------------------------------------------------------------------------
    def _kernel(self, m):
        inputs = [(str(src.ty.dtype), casts) for src, casts in m["srcs"]]
        key = (m["k"], m["eps"], tuple((d, tuple(c)) for d, c in inputs), m["add_dtype"], str(m["gamma"].ty.dtype),
               tuple(m["steps"]), m["y_dtype"])
        if key not in self.funcs:
            func = add_rmsnorm_func(m["k"], m["eps"], inputs, m["add_dtype"], str(m["gamma"].ty.dtype),
                                    m["steps"], m["y_dtype"])
            gv = None
            if func is not None:
                name = f"add_rmsnorm_k{m['k']}_{len(self.funcs)}"
                tag = {KERNEL_ATTR: ADD_RMSNORM, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque
                gv = self.builder_.add_func(func.with_attr({"global_symbol": name, **tag}), name)
            self.funcs[key] = gv
        return self.funcs[key]

    def rewrite(self, value):
        """r = add(a, b) -> r = reshape(t[0]) with t the kernel call; y, later, gets reshape(t[1])."""
        var = self.current
        if not is_op(value, "relax.add") or not isinstance(var.ty, relax.TensorType):
            return None
        m = self._match(var, value)
        gv = self._kernel(m) if m is not None else None
        if gv is None:
            return None
        k, b = m["k"], self.builder_
        rows = 1  # the leading dims, flattened
        for d in list(var.ty.shape.values)[:-1]:
            rows = rows * d
        flat = lambda x: b.emit(relax.op.reshape(self.visit_expr(x), [rows, k]))
        args = [flat(src) for src, _ in m["srcs"]] + [self.visit_expr(m["gamma"])]
        args += [self.visit_expr(w) for w in m["weights"]]
        out = [relax.TensorType([rows, k], m["add_dtype"]), relax.TensorType([rows, k], m["y_dtype"])]
        t = b.emit(relax.call_tir(gv, args, out))
        self.pending[m["y"]] = relax.op.reshape(relax.TupleGetItem(t, 1), m["y"].ty.shape)
        return relax.op.reshape(relax.TupleGetItem(t, 0), var.ty.shape)


def fuse_add_rmsnorm(mod: tvm.IRModule, func_name: str | None = None):
    """Apply the rewrite to mod[func_name] (default: every entry function); returns (module, number of
    add + norm pairs fused)."""
    rw = _Fuse(mod)
    out = rewrite_main(mod, rw, func_name)
    return out, rw.count
