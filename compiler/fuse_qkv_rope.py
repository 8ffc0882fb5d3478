"""Q, K, V heads of one merged projection -> one kernel that slices, rotates and transposes them all.

After compiler/merge_linears.py an exported Llama attention reads (HF, fp16; d the head dim):

    qkv = int4_matmul(x)                                              [b*s, (Hq + Hk + Hv) * d]
    X_i = permute_dims(reshape(strided_slice(qkv, columns of i)), [0, 2, 1, 3])       [b, H_i, s, d]
          (any number of reshapes, at most one astype, between the slice and the permute)
    q   = multiply(rope(X_q), c)      (the SDPA scale on q, where the export has one; c a scalar)
    k   = rope(X_k)                   rope(X) = add(multiply(X, C), multiply(R, S)),
    v   = X_v                         R = concat((negative(X[..., d/2:]), X[..., :d/2]), axis=-1)
  ==>
    t = call_tir(qkv_rope, [qkv, C, S], out=[q, k, v])    (schedules/qkv_rope.py)
    q = t[0];  k = t[1];  v = t[2]

C and S (cos and sin of the positions, [b|1, 1, s, d]) must be the same for every rotated group. TVM
fuses each of the three chains into a kernel of its own: in a Llama-2-7B decode step three launches of
~1.4 us per layer that move 24 KB, 0.13 ms of a 1.95 ms step plus their gaps (h200_generate.md). A
group of the projection that is neither rotated nor only transposed keeps its chain; a projection with
no rotated group is left alone (one kernel already serves it). CUDA only (build.py's prepare).
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from schedules.qkv_rope import QKV_ROPE, qkv_rope_func

from .dispatch import KERNEL_ATTR
from .relax_util import BindingRewriter, is_op, rewrite_main, same, scalar, slice_args


def _static(values) -> bool:
    return all(isinstance(v, tirx.IntImm) for v in values)


@mutator
class _Fuse(BindingRewriter):
    def __init__(self, mod):
        super().__init__(mod)
        self.funcs: dict = {}  # kernel key -> GlobalVar
        self.groups: dict = {}  # the binding var where a group's call goes -> the group

    # -- matching ---------------------------------------------------------------------------------
    def _slice(self, x):
        """x [b, s, H, d] back to strided_slice(M, columns [a, e)) of a 2-D M [b s, N] through
        single-use reshapes (row-major: element (i, j, h, t) is M[i s + j, a + h d + t]) and at most one
        astype: (M, a, e) or None (also where M's width is not static)."""
        found = self.column_slice(x, casts=1)
        if found is None or found[0].ty.shape is None or not _static(found[0].ty.shape.values[1:]):
            return None
        return found

    def _piece(self, x):
        """A permute_dims [0, 2, 1, 3] of a column slice of a merged projection: its description, or None."""
        value = self.bindings.get(x)
        if not (is_op(value, "relax.permute_dims") and value.attrs.axes is not None
                and [int(a) for a in value.attrs.axes] == [0, 2, 1, 3]):
            return None
        ty = x.ty
        if not (isinstance(ty, relax.TensorType) and ty.shape is not None and ty.ndim == 4):
            return None
        b, h, s, d = ty.shape.values
        if not _static([h, d]):
            return None
        found = self._slice(value.args[0])
        if found is None:
            return None
        m, lo, hi = found
        if hi - lo != int(h) * int(d) or lo < 0 or hi > int(m.ty.shape.values[1]) \
                or not same(m.ty.shape.values[0], b * s):
            return None
        return dict(x=x, out=x, m=m, col=lo, heads=int(h), d=int(d), b=b, s=s, dtype=str(ty.dtype),
                    rope=False, scale=None)

    def _rope(self, p):
        """Extend piece p with the rotation that is the only reader of its X, if there is one."""
        x, d = p["x"], p["d"]
        users = self.users_of().get(x, [])
        if self.uses.get(x) != 3 or len(users) != 3:
            return False
        half = d // 2
        by_op = {}
        for u in users:
            v = self.bindings[u]
            if is_op(v, "relax.strided_slice"):
                args = slice_args(v)
                if args is None or args[0] not in ([3], [-1]) or args[3] != [1]:
                    return False
                lo, hi = args[1][0], args[2][0]
                by_op["hi" if lo == half and hi >= d else "lo" if lo == 0 and hi == half else "?"] = u
            elif is_op(v, "relax.multiply"):
                by_op["mul"] = u
        if set(by_op) != {"hi", "lo", "mul"} or d % 2:
            return False
        neg = self._only_user(by_op["hi"], "relax.negative")
        cat = self._only_user(neg, "relax.concat") if neg is not None else None
        if cat is None or self._only_user(by_op["lo"], "relax.concat") != cat:
            return False
        fields = self.bindings[cat].args[0]
        if not (isinstance(fields, relax.Tuple) and len(fields.fields) == 2 and fields.fields[0].same_as(neg)
                and fields.fields[1].same_as(by_op["lo"]) and int(self.bindings[cat].attrs.axis) in (-1, 3)):
            return False
        mul_r = self._only_user(cat, "relax.multiply")
        mul_x = by_op["mul"]
        if mul_r is None or self.uses.get(mul_x) != 1:
            return False
        cos = self._other(self.bindings[mul_x], x)
        sin = self._other(self.bindings[mul_r], cat)
        add = self._only_user(mul_x, "relax.add")
        if add is None or add != self._only_user(mul_r, "relax.add") or cos is None or sin is None:
            return False
        if not all(self._cos_sin_ok(t, p) for t in (cos, sin)):
            return False
        p.update(rope=True, cos=cos, sin=sin, out=add)
        scaled = self._only_user(add, "relax.multiply")
        if scaled is not None:
            c = self._other(self.bindings[scaled], add)
            if c is not None and scalar(c) is not None and str(c.ty.dtype) == p["dtype"]:
                p.update(out=scaled, scale=scalar(c))
        return True

    def _only_user(self, var, op):
        """The binding var of var's single reader if that reader is a call of op, else None."""
        users = self.users_of().get(var, [])
        if self.uses.get(var) != 1 or len(users) != 1 or not is_op(self.bindings[users[0]], op):
            return None
        return users[0]

    @staticmethod
    def _other(call, one):
        """The other argument of a two-argument call, one of whose arguments is `one`."""
        if len(call.args) != 2:
            return None
        a, b = call.args
        return b if a.same_as(one) else a if b.same_as(one) else None

    @staticmethod
    def _cos_sin_ok(t, p) -> bool:
        ty = t.ty
        if not (isinstance(ty, relax.TensorType) and ty.shape is not None and ty.ndim == 4
                and str(ty.dtype) == p["dtype"]):
            return False
        cb, one, s, d = ty.shape.values
        return (isinstance(one, tirx.IntImm) and int(one) == 1 and isinstance(d, tirx.IntImm) and int(d) == p["d"]
                and same(s, p["s"]) and ((isinstance(cb, tirx.IntImm) and int(cb) == 1) or same(cb, p["b"])))

    def plan_block(self, block):
        """Group this block's pieces by projection; keep the groups worth one kernel."""
        order = {b.var: i for i, b in enumerate(block.bindings)}
        by_m: dict = {}
        for var in order:
            p = self._piece(var)
            if p is not None:
                self._rope(p)
                by_m.setdefault(p["m"], []).append(p)
        for m, pieces in by_m.items():
            ropes = [p for p in pieces if p["rope"]]
            if not ropes or len(pieces) < 2:
                continue
            first = ropes[0]
            if not all(p["cos"].same_as(first["cos"]) and p["sin"].same_as(first["sin"]) for p in ropes):
                continue
            if not all(p["d"] == first["d"] and same(p["b"], first["b"]) and same(p["s"], first["s"])
                       for p in pieces):
                continue
            at = min(pieces, key=lambda p: order[p["out"]])["out"]  # the call goes at the first output
            inputs = [m, first["cos"], first["sin"]]
            if any(order.get(i, -1) >= order[at] for i in inputs if isinstance(i, relax.Var)):
                continue  # an input bound after that point: leave the chains
            self.groups[at] = dict(m=m, cos=first["cos"], sin=first["sin"], pieces=pieces)

    # -- rewriting --------------------------------------------------------------------------------
    def _kernel(self, g):
        m, pieces = g["m"], g["pieces"]
        n = int(m.ty.shape.values[1])
        desc = [dict(col=p["col"], heads=p["heads"], dtype=p["dtype"], rope=p["rope"], scale=p["scale"])
                for p in pieces]
        key = (n, pieces[0]["d"], str(m.ty.dtype), str(g["cos"].ty.dtype), tuple(tuple(sorted(x.items())) for x in desc))
        if key not in self.funcs:
            func = qkv_rope_func(n, pieces[0]["d"], str(m.ty.dtype), str(g["cos"].ty.dtype), desc)
            name = f"qkv_rope_n{n}_d{pieces[0]['d']}_{len(self.funcs)}"
            tag = {KERNEL_ATTR: QKV_ROPE, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque: FuseOps leaves it
            self.funcs[key] = self.builder_.add_func(func.with_attr({"global_symbol": name, **tag}), name)
        return self.funcs[key]

    def rewrite(self, value):
        g = self.groups.pop(self.current, None)
        if g is None:
            return None
        gv = self._kernel(g)
        outs = [relax.TensorType(list(p["x"].ty.shape.values), p["dtype"]) for p in g["pieces"]]
        args = [self.visit_expr(a) for a in (g["m"], g["cos"], g["sin"])]
        t = self.builder_.emit(relax.call_tir(gv, args, outs))
        mine = None
        for i, p in enumerate(g["pieces"]):
            if p["out"].same_as(self.current):
                mine = relax.TupleGetItem(t, i)
            else:
                self.pending[p["out"]] = relax.TupleGetItem(t, i)
        return mine


def fuse_qkv_rope(mod: tvm.IRModule, func_name: str | None = None):
    """Apply the rewrite to mod[func_name] (default: every entry function); returns (module, number of
    projections whose heads now come from one kernel)."""
    rw = _Fuse(mod)
    out = rewrite_main(mod, rw, func_name)
    return out, rw.count
