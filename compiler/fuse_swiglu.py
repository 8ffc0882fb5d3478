"""SwiGLU after a merged gate/up projection -> the projection's decode GEMV writes silu(gate) * up.

After compiler/merge_linears.py an exported Llama MLP reads (fp16; F the FFN width):

    gu = call_tir(int4_matmul_n2F, [x, qweight, scales])                          [m, 2F]
    g  = reshape*(strided_slice(gu, columns [0, F)))        (any number of reshapes)
    u  = reshape*(strided_slice(gu, columns [F, 2F)))
    h  = multiply(multiply(g, sigmoid(g)), u)               (either operand order)
  ==>
    h  = reshape(swiglu_dispatch(x, qweight, scales))                              [m, F]

    @R.function(private=True)
    def int4_matmul_n2F_..._swiglu_dispatch(x, qweight, scales):
        if m <= 8:    y = call_tir(<int4>_swiglu_mma8, ...)    the tensor-core GEMV (schedules/gemv_mma.py)
        elif m <= 16: y = call_tir(<int4>_swiglu_mma16, ...)   pairs the gate and up rows in one block
        else:         y = <int4>_swiglu_prefill(x, ...)        the chain above, unchanged (FuseOps fuses it)
        return y

In a Llama-2-7B decode step TVM runs the SwiGLU as a kernel of its own per layer (32 launches, 36 us,
h200_generate.md), and that kernel does not wait programmatically (it is TVM's), so both its edges are
full ones. The GEMV copies compute every gate and up output exactly as the unfused copy does (same
chunk order, same fp32 sums, rounded to fp16), then the graph's fp16 SwiGLU (int4_kernel.silu_times):
decode gives the unfused build's bits. No weight re-layout: a block reads the gate rows and the up rows
of the same 8 outputs (schedules/gemv_mma.py _row).
Taken: fp16, symmetric, no bias, where the tensor-core GEMV takes the shape (sm_80+). Not matched:
torch.export's SiLU, which its decomposition computes in fp32 (casts around the sigmoid). CUDA only
(build.py's prepare), before the token-count dispatch (compiler/dispatch.py), which gives the prefill
chain's int4 call its own dispatch.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from .dispatch import DECODE, bucket_copy, copy_name, dispatch_function, relax_params
from .int4_kernel import ATTR, int4_matmul_func
from .merge_linears import _int4_spec
from .quantize import QuantConfig
from .relax_util import BindingRewriter, is_op, rewrite_main, same


def _takes(spec: dict, arch: str | None) -> bool:
    from schedules.gemv_mma import takes

    return takes(spec, arch) and bool(spec["symmetric"]) and not bool(spec["has_bias"])


@mutator
class _Fuse(BindingRewriter):
    def __init__(self, mod, arch):
        super().__init__(mod)
        self.mod, self.arch = mod, arch
        self.plans: dict = {}  # the product's var -> the projection call_tir whose SwiGLU it is
        self.funcs: dict = {}  # the projection's PrimFunc GlobalVar -> its swiglu dispatch GlobalVar

    # -- matching ---------------------------------------------------------------------------------
    def _only(self, var, n: int = 1) -> bool:
        return self.uses.get(var) == n

    def _silu_of(self, a):
        """g where a = multiply(g, sigmoid(g)) (either order), all of it single-use; else None."""
        value = self.bindings.get(a)
        if not self._only(a) or not is_op(value, "relax.multiply"):
            return None
        for g, s in (value.args, value.args[::-1]):
            sig = self.bindings.get(s)
            if is_op(sig, "relax.sigmoid") and sig.args[0].same_as(g) and self._only(s) and self._only(g, 2):
                return g
        return None

    def _plan(self, h):
        value = self.bindings.get(h)
        if not is_op(value, "relax.multiply") or str(h.ty.dtype) != "float16":
            return None
        for a, u in (value.args, value.args[::-1]):
            g = self._silu_of(a)
            if g is None or not self._only(u):
                continue
            gate, up = self.column_slice(g, 2), self.column_slice(u)  # g: read by the sigmoid and the multiply
            if gate is None or up is None or not gate[0].same_as(up[0]):
                continue
            m, f = gate[0], gate[2] - gate[1]
            call = self.bindings.get(m)
            if not (self._only(m, 2) and gate[1] == 0 and up[1:] == (f, 2 * f)):
                continue
            spec = _int4_spec(self.mod, call)
            if spec is None or int(spec["n"]) != 2 * f or not _takes(spec, self.arch):
                continue
            rows = m.ty.shape.values[0]
            hs = h.ty.shape.values
            if not (isinstance(hs[-1], tirx.IntImm) and int(hs[-1]) == f):
                continue
            count = hs[0]
            for d in hs[1:-1]:
                count = count * d
            if same(count, rows):
                return call
        return None

    def plan_block(self, block):
        for b in block.bindings:
            call = self._plan(b.var)
            if call is not None:
                self.plans[b.var] = call

    # -- rewriting --------------------------------------------------------------------------------
    def _dispatch(self, gv):
        """The swiglu dispatch function of projection kernel gv (made once per kernel)."""
        if gv in self.funcs:
            return self.funcs[gv]
        spec = self.mod[gv].attrs[ATTR]
        n, k, g, xd = int(spec["n"]), int(spec["k"]), int(spec["group_size"]), str(spec["x_dtype"])
        f = n // 2
        add = self.builder_.add_func
        sw = int4_matmul_func(n, k, QuantConfig(g), xd, swiglu=True)
        name = str(sw.attrs["global_symbol"])
        copies = []
        for rows, kind in DECODE:
            copy = f"{name}_{copy_name(rows, kind)}"
            copies.append((rows, add(bucket_copy(sw, copy, rows, kind), copy)))

        m = tirx.Var("m", "int64")
        ps = relax_params(sw, m)
        bb = relax.BlockBuilder()
        with bb.function("prefill", ps, pure=True, private=True):
            with bb.dataflow():
                y = bb.emit(relax.call_tir(gv, ps, relax.TensorType([m, n], xd)))
                gate = bb.emit(relax.op.strided_slice(y, [1], [0], [f]))
                up = bb.emit(relax.op.strided_slice(y, [1], [f], [n]))
                act = bb.emit(relax.op.multiply(gate, relax.op.sigmoid(gate)))
                out = bb.emit_output(relax.op.multiply(act, up))
            bb.emit_func_output(out)
        prefill = add(bb.get()["prefill"], f"{name}_prefill")
        last = lambda params, _out: relax.Call(prefill, params)  # noqa: E731
        self.funcs[gv] = add(dispatch_function(sw, copies, last), f"{name}_dispatch")
        return self.funcs[gv]

    def rewrite(self, value):
        call = self.plans.pop(self.current, None)
        if call is None:
            return None
        args = [self.visit_expr(a) for a in call.args[1].fields]
        y = self.builder_.emit(relax.Call(self._dispatch(call.args[0]), args))
        shape = self.current.ty.shape
        return y if len(shape.values) == 2 else relax.op.reshape(y, shape)


def fuse_swiglu(mod: tvm.IRModule, arch: str | None, func_name: str | None = None):
    """Apply the rewrite to mod[func_name] (default: every entry function) for GPU arch ("sm_90");
    returns (module, number of SwiGLUs now computed by their projection's decode GEMV)."""
    rw = _Fuse(mod, arch)
    out = rewrite_main(mod, rw, func_name)
    return out, rw.count
