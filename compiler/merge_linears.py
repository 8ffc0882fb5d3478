"""Horizontal fusion of int4 linears that read the same activation (MLC-LLM's fused qkv / gate_up).

Rewrite (in every dataflow block of "main", after compiler/int4_pass.py's quantize_linears):

    a = call_tir(int4_matmul_nA_kK_gG, [x2,  Wa.qweight, Wa.scales(, Wa.zeros)(, ba)], [M, A])
    b = call_tir(int4_matmul_nB_kK_gG, [x2', Wb.qweight, Wb.scales(, Wb.zeros)(, bb)], [M, B])
    c = call_tir(int4_matmul_nC_kK_gG, [x2'', Wc.qweight, ...], [M, C])
  ==>
    y = call_tir(int4_matmul_n(A+B+C)_kK_gG, [x2, W.qweight, W.scales(, W.zeros)(, b)], [M, A+B+C])
    a, b, c = strided_slice(y, [1], [0], [A]), ...[A, A + B], ...[A + B, A + B + C]

where x2, x2', x2'' are one activation: the same Relax var, or reshapes of the same var to the same
[M, K] (the int4 pass emits one reshape per linear). Members of a group share K, group size (and
per-channel or not), symmetric/zero-point mode, activation dtype and bias presence; the merged call sits
where the group's first call was, so everything downstream is unchanged. N is axis 0 of every int4
tensor (qweight [N, K/8], scales and zeros [N, K/G], bias [N]: compiler/quantize.py), so the merged
W.qweight/scales/zeros/bias are the members' arrays concatenated along axis 0, in new parameters
"<first member>_merged_qweight", "..._scales" ("..._zeros", "..._bias"); the members' own parameters are
dropped when nothing else uses them. The merged weights are the members' quantized weights bit for bit
(groups run along K within a row), so results equal the unmerged build's up to the fp32 summation order
the schedule picks for the new N (a GPU split-K plan may differ; on llvm they are equal). The merged
kernel is an ordinary int4 kernel of the new N: token-count dispatch (compiler/dispatch.py), schedules
and tuning treat it like any other (Llama-2-7B's qkv and gate_up give N = 12288 and 22016, the shapes
benchmarks/tune_llama.py tunes). On CUDA each slice fuses into the kernel that consumes it (a split
would be a copy kernel per output: 5 launches per Llama layer).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm_ffi import structural_equal

from .int4_kernel import ATTR, int4_matmul_func, kernel_name
from .quantize import QuantConfig
from .relax_util import emit_like

_PARTS = ("qweight", "scales", "zeros", "bias")


def _int4_spec(mod, call):
    """The "nibble.int4" attrs of the kernel `call` runs, if it is a plain call_tir of one."""
    if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
        return None
    if len(call.args) != 2 or not isinstance(call.args[0], tvm.ir.GlobalVar):
        return None
    gv = call.args[0]
    if gv not in mod.get_global_vars():
        return None
    func = mod[gv]
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or ATTR not in func.attrs:
        return None
    return func.attrs[ATTR]


def _quant_config(spec, name: str) -> QuantConfig | None:
    """The QuantConfig the kernel `name` was made with (group G, or per-channel "pc"); None if the name
    is not one compiler.int4_kernel gives (a kernel the merge then leaves alone)."""
    k, g, sym = int(spec["k"]), int(spec["group_size"]), bool(spec["symmetric"])
    for size in (g, -1):
        try:
            cfg = QuantConfig(size, sym)
        except ValueError:
            continue
        if kernel_name(int(spec["n"]), k, cfg, str(spec["x_dtype"]), bool(spec["has_bias"])) == name:
            return cfg
    return None


def int4_calls(mod: tvm.IRModule, func_name: str = "main") -> int:
    """How many call_tir of int4 kernels mod[func_name] makes."""
    count = [0]

    def visit(e):
        if _int4_spec(mod, e) is not None:
            count[0] += 1

    relax.analysis.post_order_visit(mod[func_name].body, visit)
    return count[0]


class _Member:
    def __init__(self, var, call, spec, cfg, weights):
        self.var, self.call, self.spec, self.cfg = var, call, spec, cfg
        self.weights = weights  # part -> a relax.Var parameter or a constant
        self.n = int(spec["n"])


@mutator
class _Merger(PyExprMutator):
    def __init__(self, mod, params: dict, param_vars: set, taken: set):
        super().__init__(mod)
        self.mod, self.params, self.param_vars, self.taken = mod, params, param_vars, taken
        self.bindings: dict = {}  # var -> bound value, of the blocks seen so far
        self.first: dict = {}  # first member's var -> its group (a list of _Member)
        self.rest: set = set()  # the other members' vars
        self.groups: list[list[_Member]] = []
        self.new_params: list[relax.Var] = []
        self.new_values: dict[str, np.ndarray] = {}
        self.kernels: dict[str, tvm.ir.GlobalVar] = {gv.name_hint: gv for gv in mod.get_global_vars()}

    # -- analysis ------------------------------------------------------------------------------
    def _activation(self, x2):
        """(root var, [M, K] shape) that identifies x2's value: x2 itself, or what it reshapes and casts
        (the int4 pass emits one reshape per linear; exporters may add casts; the group key holds the
        dtype, so equal roots and shapes mean equal values)."""
        root, looks = x2, (tvm.ir.Op.get("relax.reshape"), tvm.ir.Op.get("relax.astype"))
        while True:
            bound = self.bindings.get(root)
            if not (isinstance(bound, relax.Call) and any(bound.op.same_as(op) for op in looks)
                    and isinstance(bound.args[0], relax.Var)):
                return root, x2.ty.shape
            root = bound.args[0]

    def _weights(self, call, spec):
        """part -> weight expr, if every weight argument is a known parameter or a constant."""
        parts = ["qweight", "scales"] + ([] if bool(spec["symmetric"]) else ["zeros"])
        parts += ["bias"] if bool(spec["has_bias"]) else []
        if not isinstance(call.args[1], relax.Tuple):
            return None
        args = list(call.args[1].fields)
        if len(args) != 1 + len(parts) or not isinstance(args[0], relax.Var):
            return None
        out = {}
        for part, w in zip(parts, args[1:]):
            if isinstance(w, tvm.ir.GenericConst):
                pass
            elif not (isinstance(w, relax.Var) and w in self.param_vars and w.name in self.params):
                return None
            out[part] = w
        return out

    def _scan(self, block):
        """Group this block's int4 calls by (activation, kernel spec)."""
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                self.bindings[b.var] = b.value
        groups = []  # [(root, shape, key, [members])]
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            spec = _int4_spec(self.mod, b.value)
            if spec is None:
                continue
            weights = self._weights(b.value, spec)
            if weights is None:
                continue
            gv = b.value.args[0]
            cfg = _quant_config(spec, gv.name_hint)
            if cfg is None:
                continue
            key = (int(spec["k"]), cfg.group_size, cfg.symmetric, str(spec["x_dtype"]), bool(spec["has_bias"]))
            root, shape = self._activation(b.value.args[1].fields[0])
            member = _Member(b.var, b.value, spec, cfg, weights)
            for g_root, g_shape, g_key, members in groups:
                if (g_root.same_as(root) and g_key == key and structural_equal(g_shape, shape)
                        and not any(m.weights["qweight"].same_as(weights["qweight"]) for m in members)):
                    members.append(member)
                    break
            else:
                groups.append((root, shape, key, [member]))
        for *_, members in groups:
            if len(members) > 1:
                self.groups.append(members)
                self.first[members[0].var] = members
                self.rest.update(m.var for m in members[1:])

    # -- rewrite -------------------------------------------------------------------------------
    def visit_dataflow_block_(self, block):
        self._scan(block)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.rest:
            return  # emitted with its group's first member
        if var not in self.first:
            return super().visit_var_binding_(binding)
        members = self.first[var]
        y = self.builder_.emit(self._merged_call(members), name_hint=f"{var.name}_merged")
        offsets = [int(o) for o in np.cumsum([m.n for m in members])[:-1]]
        # a strided_slice per member, not one split: a split is a copy kernel per output on CUDA, a slice
        # fuses into its consumer (RoPE, SiLU*mul) through the reshape that follows it, which
        # compiler/unfuse_scalars.py lets FuseOps fuse
        bounds = [0] + offsets + [sum(m.n for m in members)]
        for i, m in enumerate(members):
            item = relax.op.strided_slice(y, axes=[1], begin=[bounds[i]], end=[bounds[i + 1]])
            self.set_var_remap(m.var, emit_like(self.builder_, m.var, item))

    def _merged_call(self, members):
        first = members[0]
        spec, cfg = first.spec, first.cfg
        n, k, x_dtype, bias = sum(m.n for m in members), int(spec["k"]), str(spec["x_dtype"]), bool(spec["has_bias"])
        name = kernel_name(n, k, cfg, x_dtype, bias)
        if name not in self.kernels:
            self.kernels[name] = self.builder_.add_func(int4_matmul_func(n, k, cfg, x_dtype, bias), name)
        stem = _stem(first.weights["qweight"])
        prefix = f"{stem}_merged"
        i = 1
        while any(f"{prefix}_{p}" in self.taken for p in _PARTS):
            i += 1
            prefix = f"{stem}_merged{i}"
        args = [self.visit_expr(first.call.args[1].fields[0])]
        for part in first.weights:
            value = np.concatenate([self._value(m.weights[part]) for m in members], axis=0)
            v = relax.Var(f"{prefix}_{part}", relax.TensorType(value.shape, str(value.dtype)))
            self.taken.add(v.name)
            self.new_params.append(v)
            self.new_values[v.name] = value
            args.append(v)
        out = first.call.ty  # [M, N_first]: the merged one has the same M and dtype
        m_dim = out.shape.values[0]
        return relax.call_tir(self.kernels[name], args, relax.TensorType([m_dim, n], x_dtype))

    def _value(self, w):
        return w.value.numpy() if isinstance(w, tvm.ir.GenericConst) else np.asarray(self.params[w.name])


def _stem(w) -> str:
    name = w.name if isinstance(w, relax.Var) else "const"
    return name[: -len("_qweight")] if name.endswith("_qweight") else name


def merge_linears(mod: tvm.IRModule, params: dict[str, np.ndarray], report=None, func_name: str = "main"):
    """Apply the rewrite to mod[func_name] whose trailing parameters are the weights in `params`.

    Returns (new module, new params dict in the new function's weight order, n_merged): n_merged is how
    many int4 calls went into merged calls (0: the module is returned as it was). `report`, the
    int4 pass's PassReport, gets a note on each merged layer (the layers stay quantized as they were).
    """
    func = mod[func_name]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    weight_params = list(func.params[num_input:])
    mg = _Merger(mod, params, set(weight_params), {p.name for p in func.params} | set(params))
    body = mg.visit_expr(func.body)
    if not mg.groups:
        return mod, params, 0
    out_mod = mg.builder_.get()
    every = list(func.params) + mg.new_params
    out_mod[func_name] = relax.Function(every, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    out_mod = relax.transform.DeadCodeElimination([func_name])(out_mod)  # dead reshapes and kernels
    dce = out_mod[func_name]
    used = {v.name for v in relax.analysis.free_vars(dce.body)}
    new_params = list(dce.params[:num_input]) + [p for p in dce.params[num_input:] if p.name in used]
    out_mod[func_name] = relax.Function(new_params, dce.body, dce.ret_ty, dce.is_pure, dce.attrs, dce.span)
    out_mod = _drop_unused_kernels(out_mod)
    values = {p.name: (mg.new_values[p.name] if p.name in mg.new_values else params[p.name])
              for p in new_params[num_input:]}
    if report is not None:
        _annotate(report, mg.groups)
    return out_mod, values, sum(len(g) for g in mg.groups)


def _drop_unused_kernels(mod):
    """Remove int4 PrimFuncs no Relax function calls any more (DCE keeps them: they have a
    global_symbol), so nothing builds or dispatches kernels that never run."""
    called = set()
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(
                f, lambda e: called.add(e.name_hint) if isinstance(e, tvm.ir.GlobalVar) else None)
    for gv, f in list(mod.functions_items()):
        if (isinstance(f, tirx.PrimFunc) and f.attrs is not None and ATTR in f.attrs
                and gv.name_hint not in called):
            del mod[gv]
    return mod


def _annotate(report, groups):
    by_name = {l.name: l for l in report.layers}
    for members in groups:
        names = [_stem(m.weights["qweight"]) for m in members]
        n = sum(m.n for m in members)
        for name in names:
            layer = by_name.get(name)
            if layer is None:
                continue
            others = ", ".join(x for x in names if x != name)
            note = f"merged with {others} (same input) into one N={n} kernel"
            layer.why = f"{layer.why}; {note}" if layer.why else note
