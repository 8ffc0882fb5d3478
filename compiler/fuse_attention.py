"""Fused decode attention: a model's attention op chain -> one kernel call when few query rows run.

Exporters write scaled-dot-product attention as a chain of ops (torch.onnx's SDPA decomposition, and
eager attention the same way less the scale on K):

    kt = permute_dims(K, [0, 1, 3, 2])          K, V: [b, h, T, d]   (T: the whole cache)
    kt = multiply(kt, c)                        (optional: c a scalar constant)
    s  = matmul(q, kt)                          q: [b, h, s, d]
    s  = astype(s, f32)                         (optional)
    a  = add(s, bias)                           bias: [b|1, h|1, s|1, T] (the mask, additive)
    p  = softmax(a, axis=-1)
    p  = where(isnan(p), 0, p)                  (optional: SDPA's guard for all-masked rows)
    o  = matmul(p, astype(V, p.dtype))          (astype optional)
  ==>
    o  = attention_dispatch(q, K, V, bias)

where the private Relax function (as compiler/dispatch.py does for the int4 kernels)

    def attention_dispatch(q, K, V, bias):
        if s <= DECODE_ROWS:
            if T <= SPLIT_FROM: o = call_tir(attention_hH_dD..., [q, K, V, bias])  # schedules/attention.py
            else:               o = call_tir(attention_hH_dD..._split, ...)        # blocks over the cache
        else:                   o = attention_reference(q, K, V, bias)             # the chain above, as was
        return o

Where K and V are concat((past, new)) along the cache axis and nothing else reads the concat (in
main_new_kv, compiler/new_kv_entry.py, whose present outputs are only `new`), the call takes
(q, K past, K new, V past, V new, bias) and the kernel reads the two in place (schedules/attention.py,
two_source): the concat, which copied the whole cache every decode step, is then dead code. Where the
past K and V are the entry's parameters (no kernel of the call writes them), the kernel issues its first
K/V loads before it waits for the kernel before it (early_loads; in a decode graph with programmatic
edges they overlap that kernel's run).

When the attention's output only goes back to token order (reshapes, permute_dims [0, 2, 1, 3],
at most one astype: how exporters feed o_proj), the kernel writes [b, s, h, d] in the final dtype and
that chain becomes one reshape (a view): the transpose-and-cast kernel before o_proj is gone.

So decode runs one kernel that reads K and V once (the chain re-read and re-wrote the cache ~6 times:
transpose, scale, fp32 copy of V, ...) and prefill keeps the stock kernels. CUDA only (build.py's
prepare); the kernel is compared against the chain on the GPU (tests/test_gpu.py).
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from schedules.attention import ATTENTION, DEFAULT, SPLIT, SPLIT_FROM, attention_func

from .dispatch import KERNEL_ATTR
from .relax_util import BindingRewriter, is_op, rewrite_main, same, scalar

DECODE_ROWS = 16  # query rows (tokens per sequence) up to which the fused kernel runs




@mutator
class _Fuse(BindingRewriter):
    def __init__(self, mod, max_rows):
        super().__init__(mod)
        self.max_rows = max_rows
        self.funcs: dict = {}  # config key -> dispatch GlobalVar

    def _match(self, call):
        """The attention's parts if `call` (a matmul) ends the chain in the module docstring."""
        if not is_op(call, "relax.matmul"):
            return None
        p, v = call.args
        v_cast = self.bound(v, "relax.astype")
        if v_cast is not None:
            v = v_cast.args[0]
        where = self.bound(p, "relax.where")
        nan_guard = False
        if where is not None:
            isnan = self.bound(where.args[0], "relax.isnan")
            if isnan is None or scalar(where.args[1]) != 0.0 or not isnan.args[0].same_as(where.args[2]):
                return None
            p, nan_guard = where.args[2], True
        soft = self.bound(p, "relax.nn.softmax")
        if soft is None or int(soft.attrs.axis) not in (-1, 3):
            return None
        add = self.bound(soft.args[0], "relax.add")
        if add is None:
            return None
        for s, bias in (add.args, add.args[::-1]):
            s_cast = self.bound(s, "relax.astype")
            scores = self.bound(s_cast.args[0] if s_cast is not None else s, "relax.matmul")
            if scores is not None:
                break
        else:
            return None
        q, kt = scores.args
        scale = 1.0
        mul = self.bound(kt, "relax.multiply")
        if mul is not None:
            for t, c in (mul.args, mul.args[::-1]):
                if scalar(c) is not None:
                    kt, scale = t, scalar(c)
                    break
            else:
                return None
        perm = self.bound(kt, "relax.permute_dims")
        if perm is None or perm.attrs.axes is None or [int(a) for a in perm.attrs.axes] != [0, 1, 3, 2]:
            return None
        k = perm.args[0]
        parts = dict(q=q, k=k, v=v, bias=bias, scale=scale, nan_guard=nan_guard,
                     s_cast=None if s_cast is None else str(s_cast.attrs.dtype),
                     v_cast=None if v_cast is None else str(v_cast.attrs.dtype),
                     out=call.ty, two=self._two_source(k, v))
        return parts if self._shapes_ok(parts) else None

    def _two_source(self, k, v):
        """((past K, new K), (past V, new V)) when K and V are concat((past, new)) along the cache axis
        that only this attention reads (in main_new_kv, compiler/new_kv_entry.py), else None: the kernel
        then reads the two in place and the concat, the whole cache copied, goes away."""
        found = []
        for x in (k, v):
            cat = self.bound(x, "relax.concat")
            if (cat is None or self.uses.get(x) != 1 or not isinstance(cat.args[0], relax.Tuple)
                    or len(cat.args[0].fields) != 2 or int(cat.attrs.axis) not in (2, -2)):
                return None
            found.append(tuple(cat.args[0].fields))
        return tuple(found)

    def _shapes_ok(self, m):
        tys = [m[x].ty for x in ("q", "k", "v", "bias")]
        if not all(isinstance(t, relax.TensorType) and t.shape is not None and t.ndim == 4 for t in tys):
            return False
        (b, h, s, d), (kb, kh, n, kd), v_shape, bias_shape = (list(t.shape.values) for t in tys)
        if not all(isinstance(x, tirx.IntImm) for x in (h, d, kh, kd)) or int(h) != int(kh) or int(d) != int(kd):
            return False
        if not (same(b, kb) and all(same(x, y) for x, y in zip([kb, kh, n, kd], v_shape))):
            return False
        dims = []
        for x, name, full in zip(bias_shape[:3], ("b", "h", "s"), (b, h, s)):
            if isinstance(x, tirx.IntImm) and int(x) == 1 and not (isinstance(full, tirx.IntImm) and int(full) == 1):
                dims.append(1)
            elif same(x, full):
                dims.append(name)
            else:
                return False
        if not same(bias_shape[3], n):
            return False
        m["bias_dims"], m["heads"], m["head_dim"] = tuple(dims), int(h), int(d)
        m["dtypes"] = {"q": str(tys[0].dtype), "kv": str(tys[1].dtype), "bias": str(tys[3].dtype),
                       "out": str(m["out"].dtype)}
        return str(tys[1].dtype) == str(tys[2].dtype)

    def _output_chain(self, o, m):
        """The ops after the attention that only move it back to token order and cast it, the way
        exporters write them: reshapes to the same [b, h, s, d], permute_dims [0, 2, 1, 3], then any
        reshapes, with at most one astype anywhere. Returns (the chain's last var, its dtype) if the
        permute is there (the kernel then writes [b, s, h, d] in that dtype), else None."""
        users = self.users_of()
        shape = list(m["out"].shape.values)
        cur, dtype, permuted, cast = o, str(m["out"].dtype), False, False
        while self.uses.get(cur) == 1 and len(users.get(cur, [])) == 1:
            nxt = users[cur][0]
            value = self.bindings[nxt]
            if is_op(value, "relax.reshape") and (permuted or (
                    value.ty.shape is not None and len(value.ty.shape.values) == 4
                    and all(same(x, y) for x, y in zip(value.ty.shape.values, shape)))):
                pass
            elif (is_op(value, "relax.permute_dims") and not permuted and value.attrs.axes is not None
                  and [int(a) for a in value.attrs.axes] == [0, 2, 1, 3]):
                permuted = True
            elif is_op(value, "relax.astype") and not cast:
                cast, dtype = True, str(value.attrs.dtype)
            else:
                break
            cur = nxt
        return (cur, dtype) if permuted else None

    # -- the functions a match calls ------------------------------------------------------------
    def _dispatch(self, m):
        two, layout = m["two"] is not None, m["layout"]
        # the cached K and V are the entry's inputs (main_new_kv's past): no kernel of the call writes
        # them, so the kernel may load them before it waits for the kernel before it (template.GRID_WAIT)
        early = two and all(any(x.same_as(p) for p in self.params) for x in (m["two"][0][0], m["two"][1][0]))
        key = (m["heads"], m["head_dim"], m["scale"], m["bias_dims"], m["nan_guard"], m["s_cast"], m["v_cast"],
               tuple(sorted(m["dtypes"].items())), two, layout, early)
        if key in self.funcs:
            return self.funcs[key]
        args = (m["heads"], m["head_dim"], m["scale"], m["dtypes"], m["bias_dims"])
        kernel, split = (attention_func(*args, cfg, two_source=two, out_layout=layout, early_loads=early)
                         for cfg in (DEFAULT, SPLIT))
        if kernel is None or split is None:
            self.funcs[key] = None
            return None
        name = f"attention_h{m['heads']}_d{m['head_dim']}_{len(self.funcs)}{'_kv2' if two else ''}"
        add = self.builder_.add_func
        tag = {KERNEL_ATTR: ATTENTION, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque: FuseOps leaves it
        kernel_gv = add(kernel.with_attr({"global_symbol": name, **tag}), name)
        split_gv = add(split.with_attr({"global_symbol": f"{name}_split", **tag}), f"{name}_split")
        params, (b, s, n) = self._params(m)
        dims = [b, s, m["heads"]] if layout == "bshd" else [b, m["heads"], s]
        out = relax.TensorType(dims + [m["head_dim"]], m["dtypes"]["out"])
        ref_gv = add(self._reference(m), f"{name}_reference")
        bb = relax.BlockBuilder()
        with bb.function("dispatch", params, pure=True, private=True):
            fused = relax.If(relax.prim_value(n <= SPLIT_FROM), relax.call_tir(kernel_gv, params, out),
                             relax.call_tir(split_gv, params, out))
            y = bb.emit(relax.If(relax.prim_value(s <= self.max_rows), fused, relax.Call(ref_gv, params)))
            bb.emit_func_output(y)
        self.funcs[key] = add(bb.get()["dispatch"], f"{name}_dispatch")
        return self.funcs[key]

    @staticmethod
    def _params(m):
        """Fresh parameters (each function needs its own), (q, K, V, bias) or, two-source, (q, K past,
        K new, V past, V new, bias), and their (b, s, n) sizes (n: keys in all)."""
        b, s = (tirx.Var(x, "int64") for x in ("b", "s"))
        h, d, dt = m["heads"], m["head_dim"], m["dtypes"]
        sym = {"b": b, "h": h, "s": s, 1: 1}
        kv = lambda name, n: relax.Var(name, relax.TensorType([b, h, n, d], dt["kv"]))
        if m["two"] is None:
            n = tirx.Var("n", "int64")
            cache = [kv("k", n), kv("v", n)]
        else:
            past, new = tirx.Var("n_past", "int64"), tirx.Var("n_new", "int64")  # not "new": a C++ keyword in the kernel source
            n = past + new
            cache = [kv("k_past", past), kv("k_new", new), kv("v_past", past), kv("v_new", new)]
        bias = relax.Var("bias", relax.TensorType([sym[x] for x in m["bias_dims"]] + [n], dt["bias"]))
        return [relax.Var("q", relax.TensorType([b, h, s, d], dt["q"])), *cache, bias], (b, s, n)

    def _reference(self, m):
        """The matched chain as a private function of _params: what runs for many rows."""
        params, _ = self._params(m)
        bb = relax.BlockBuilder()
        with bb.function("reference", params, pure=True, private=True):
            with bb.dataflow():
                if m["two"] is None:
                    q, k, v, bias = params
                else:  # the concats the two-source kernel avoids
                    q, kp, kn, vp, vn, bias = params
                    k = bb.emit(relax.op.concat([kp, kn], axis=2))
                    v = bb.emit(relax.op.concat([vp, vn], axis=2))
                kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
                if m["scale"] != 1.0:
                    kt = bb.emit(relax.op.multiply(kt, relax.const(m["scale"], m["dtypes"]["kv"])))
                s = bb.emit(relax.op.matmul(q, kt))
                if m["s_cast"]:
                    s = bb.emit(relax.op.astype(s, m["s_cast"]))
                p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.add(s, bias)), axis=-1))
                if m["nan_guard"]:
                    p = bb.emit(relax.op.where(relax.op.isnan(p), relax.const(0, p.ty.dtype), p))
                if m["v_cast"]:
                    v = bb.emit(relax.op.astype(v, m["v_cast"]))
                o = relax.op.matmul(p, v)
                if m["layout"] == "bshd":  # the output chain the kernel folds (_output_chain)
                    o = relax.op.permute_dims(bb.emit(o), [0, 2, 1, 3])
                if m["dtypes"]["out"] != str(m["out"].dtype):
                    o = relax.op.astype(bb.emit(o), m["dtypes"]["out"])
                o = bb.emit_output(o)
            bb.emit_func_output(o)
        return bb.get()["reference"]

    # -- rewrite --------------------------------------------------------------------------------
    def rewrite(self, value):
        m = self._match(value)
        if m is None:
            return None
        chain = self._output_chain(self.current, m)
        m["layout"] = "bshd" if chain else "bhsd"
        if chain:
            m["dtypes"] = {**m["dtypes"], "out": chain[1]}
        gv = self._dispatch(m)
        if gv is None:
            return None
        call = self._call(gv, m)
        if chain:  # the chain's last var becomes a reshape of the [b, s, h, d] result; the rest is dead
            out = self.builder_.emit(call)
            self.pending[chain[0]] = relax.op.reshape(out, chain[0].ty.shape)
            return out
        return call

    def _call(self, gv, m):
        if m["two"] is None:
            args = [m["q"], m["k"], m["v"], m["bias"]]
        else:
            (kp, kn), (vp, vn) = m["two"]
            args = [m["q"], kp, kn, vp, vn, m["bias"]]
        return relax.Call(gv, [self.visit_expr(a) for a in args])


def fuse_decode_attention(mod: tvm.IRModule, max_rows: int | None = None, func_name: str | None = None):
    """Apply the rewrite to mod[func_name] (default: every entry function); returns (module, number of attentions fused).
    max_rows: the kernel runs for s <= max_rows query rows (default DECODE_ROWS, read at call time;
    0 keeps the chain everywhere, which is what benchmarks/bench_attention.py compares against)."""
    max_rows = DECODE_ROWS if max_rows is None else max_rows
    mod = relax.transform.FoldConstant()(mod)  # SDPA exports compute the scale from constants
    rw = _Fuse(mod, max_rows)
    out = rewrite_main(mod, rw, func_name)
    return out, rw.count
