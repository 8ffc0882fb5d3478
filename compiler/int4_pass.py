"""The int4 weight-only pass: every linear layer of a Relax graph becomes one fused int4 kernel call.

Rewrite (in every dataflow block of "main"):

    w' = permute_dims(W)            # W: [N, K] parameter or constant (aten.linear, ONNX Gemm transB=1)
    y  = matmul(x, w')              # or matmul(x, W') with W': [K, N] (ONNX MatMul / Gemm transB=0)
    z  = add(y, b)                  # optional, b: [N] parameter or constant, y used only here
  ==>
    x2 = reshape(x, [M, K])         # M = product of x's leading dims (symbolic), skipped for 2-D x
    z  = call_tir(int4_matmul_nN_kK_gG, [x2, W.qweight, W.scales(, W.zeros)(, b)], [M, N])
    z  = reshape(z, [..., N])

For activations that are not fp16 the call is wrapped as astype(call(astype(x2, fp16)), x.dtype), the
bias an fp16 copy (KERNEL_DTYPE below). W is quantized with compiler.quantize (host side, numpy) and
replaced by new function parameters "<W>_qweight", "<W>_scales" (and "<W>_zeros"); the values go into
the returned params dict. A weight
still used elsewhere (tied embeddings) keeps its original parameter too. Activation x activation
matmuls, 3-D weights and weights not known at compile time are left alone.
Eligible layers can be skipped by name pattern (fnmatch on the weight's name) or minimum size.
"""
from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .int4_kernel import int4_matmul_func, kernel_name
from .quantize import QuantConfig, quantize, quantized_bytes
from .relax_util import emit_like

_FLOATS = ("float16", "float32", "bfloat16")
# The dtype of every int4 kernel's activations, bias and output. The kernel computes in it anyway (x
# rounded to fp16, fp32 sums, + bias, rounded to fp16: what torch.autocast's fp16 linear does), so a model
# in another dtype gets astype(x, fp16) before the call and astype(y, dtype) after it, in main, where
# FuseOps merges them into the producer's and consumer's kernels; its bias becomes an fp16 parameter.
# Then only fp16 kernels exist, the ones schedules/gemv.py and gemm.py take (an fp32-activation copy went
# to dlight: Llama's fp32 o_proj GEMM took 450 us at 200 tokens on the H200, 14.5 of a 33 ms prefill).
KERNEL_DTYPE = "float16"


@dataclasses.dataclass
class LayerReport:
    name: str
    n: int
    k: int
    quantized: bool
    why: str = ""  # why not, or a note (partial last group)
    bytes_before: int = 0
    bytes_after: int = 0


@dataclasses.dataclass
class PassReport:
    layers: list[LayerReport] = dataclasses.field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        return [l for l in self.layers if l.quantized]

    def summary(self) -> str:
        q = self.quantized
        before = sum(l.bytes_before for l in q)
        after = sum(l.bytes_after for l in q)
        s = f"{len(q)} of {len(self.layers)} linear layers quantized to int4"
        if q:
            s += f" ({before / 1e6:.2f} MB -> {after / 1e6:.2f} MB of weights)"
        return s


def _static_shape(expr) -> tuple[int, ...] | None:
    si = expr.ty
    if not isinstance(si, relax.TensorType) or si.shape is None:
        return None
    try:
        return tuple(int(d) for d in si.shape.values)
    except (TypeError, AttributeError):
        return None


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


@mutator
class _Int4Rewriter(PyExprMutator):
    def __init__(self, mod, weights: dict, cfg: QuantConfig, skip: tuple[str, ...], min_size: int):
        super().__init__(mod)
        self.weights = weights  # relax.Var or tvm.ir.GenericConst -> (name, numpy array or None)
        self.cfg, self.skip, self.min_size = cfg, skip, min_size
        self.report = PassReport()
        self.new_params: list[relax.Var] = []
        self.new_values: dict[str, np.ndarray] = {}
        self.quantized: dict[str, dict[str, relax.Var]] = {}  # weight name -> its new param vars
        self.biases: dict[str, relax.Var] = {}  # "<bias>_fp16" -> its new param var
        self.kernels: dict[str, tvm.ir.GlobalVar] = {}
        self.bindings: dict[relax.Var, relax.Expr] = {}
        self.uses: dict[relax.Var, int] = {}
        self.fold_bias: dict[relax.Var, relax.Expr] = {}  # add's var -> bias, for matmuls folded into it
        self.folded: set = set()  # matmul vars emitted inside the add that follows them

    # -- analysis ------------------------------------------------------------------------------
    def _weight_of(self, expr):
        """(name, array, transposed, param) if expr is a known weight W' [K, N], permute_dims of a
        known W [N, K], or either with leading batch dims added (broadcast_to / expand_dims / reshape):
        torch.export's decomposition of a 3-D aten.matmul is matmul(x[b, s, K], broadcast_to(W', [b, K, N]))."""
        if isinstance(expr, relax.Var) and expr in self.bindings:
            bound = self.bindings[expr]
            if any(_is_op(bound, op) for op in ("relax.broadcast_to", "relax.expand_dims", "relax.reshape")):
                inner = bound.args[0]
                if _trailing2(inner) is not None and _trailing2(inner) == _trailing2(bound) and (
                        not _is_op(bound, "relax.reshape") or _numel(inner) == _numel(bound)):
                    return self._weight_of(inner)  # only leading (batch) dims added: the same matrix
                return None
            if _is_op(bound, "relax.permute_dims"):
                axes = bound.attrs.axes
                if axes is None or [int(a) for a in axes] == [1, 0]:
                    inner = bound.args[0]
                    if inner in self.weights:
                        return (*self.weights[inner], True, inner)
            return None
        if expr in self.weights:
            return (*self.weights[expr], False, expr)
        return None

    def _linear(self, call):
        """(name, array, transposed, param) if call is matmul(activation, 2-D known float weight)."""
        if not _is_op(call, "relax.matmul"):
            return None
        x, w = call.args
        info = self._weight_of(w)
        if info is None or info[1] is None or x in self.weights:
            return None
        array, param = info[1], info[3]
        if np.ndim(array) != 2 or str(param.ty.dtype) not in _FLOATS:
            return None
        xs = x.ty
        if not isinstance(xs, relax.TensorType) or xs.ndim < 1 or str(xs.dtype) not in _FLOATS:
            return None
        k = array.shape[1] if info[2] else array.shape[0]
        if xs.shape is None or _int(xs.shape.values[-1]) != k:
            return None
        return info

    def _eligible(self, call):
        """_linear's answer if the layer is to be quantized; records the layers it declines."""
        info = self._linear(call)
        if info is None:
            return None
        name, array = info[0], info[1]
        n, k = (array.shape if info[2] else array.shape[::-1])
        why = ("skipped by pattern" if any(fnmatch.fnmatch(name, p) for p in self.skip) else
               f"smaller than --min-size ({n * k} < {self.min_size} weights)" if n * k < self.min_size else "")
        if why:
            if name not in {l.name for l in self.report.layers}:
                self.report.layers.append(LayerReport(name, n, k, False, why))
            return None
        return info

    def _scan(self, block):
        """Record bindings and use counts; pick the matmuls whose only use is "+ bias[N]"."""
        for b in block.bindings:
            self.bindings[b.var] = b.value
            relax.analysis.post_order_visit(
                b.value, lambda e: self.uses.__setitem__(e, self.uses.get(e, 0) + 1)
                if isinstance(e, relax.Var) else None)
        for b in block.bindings:
            v = b.value
            if not _is_op(v, "relax.add"):
                continue
            for mm, bias in ((v.args[0], v.args[1]), (v.args[1], v.args[0])):
                call = self.bindings.get(mm)
                if (call is not None and self.uses.get(mm, 0) == 1 and _is_op(call, "relax.matmul")
                        and bias in self.weights and self.weights[bias][1] is not None
                        and _static_shape(bias) == (self._out_features(call),)
                        and bias.ty.dtype == b.var.ty.dtype
                        and self._eligible(call)):
                    self.fold_bias[b.var] = (mm, bias)
                    self.folded.add(mm)
                    break

    def _out_features(self, call):
        info = self._linear(call)
        return None if info is None else (info[1].shape[0] if info[2] else info[1].shape[1])

    # -- rewrite -------------------------------------------------------------------------------
    def visit_dataflow_block_(self, block):
        self._scan(block)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if var in self.folded:
            return  # emitted as part of the add that follows
        if var in self.fold_bias:
            mm, bias = self.fold_bias[var]
            new = self._rewrite(self.bindings[mm], bias)
        elif self._eligible(value):
            new = self._rewrite(value, None)
        else:
            return super().visit_var_binding_(binding)
        self.set_var_remap(var, emit_like(self.builder_, var, new))

    def _rewrite(self, call, bias):
        name, array, transposed, _ = self._linear(call)
        x = self.visit_expr(call.args[0])
        w_nk = np.asarray(array) if transposed else np.asarray(array).T
        n, k = w_nk.shape
        if name not in self.quantized:
            parts = quantize(w_nk, self.cfg)
            vars_ = {}
            for part, value in parts.items():
                v = relax.Var(f"{name}_{part}", relax.TensorType(value.shape, str(value.dtype)))
                self.new_params.append(v)
                self.new_values[v.name] = value
                vars_[part] = v
            self.quantized[name] = vars_
            g = self.cfg.group(k)
            note = f"K={k} not divisible by group {g}: last group partial ({k % g} columns)" if k % g else ""
            self.report.layers.append(LayerReport(name, n, k, True, note, n * k * 2,
                                                  quantized_bytes(n, k, self.cfg)))
        x_dtype = str(x.ty.dtype)
        key = kernel_name(n, k, self.cfg, KERNEL_DTYPE, bias is not None)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(
                int4_matmul_func(n, k, self.cfg, KERNEL_DTYPE, bias is not None), key)
        lead = list(x.ty.shape.values[:-1])
        x2 = x if len(lead) == 1 else self.builder_.emit(relax.op.reshape(x, [_prod(lead), k]))
        if x_dtype != KERNEL_DTYPE:
            x2 = self.builder_.emit(relax.op.astype(x2, KERNEL_DTYPE))
        vs = self.quantized[name]
        args = [x2, vs["qweight"], vs["scales"]] + ([vs["zeros"]] if "zeros" in vs else [])
        args += [self._bias16(bias)] if bias is not None else []
        m = x2.ty.shape.values[0]
        y = relax.call_tir(self.kernels[key], args, relax.TensorType([m, n], KERNEL_DTYPE))
        if x_dtype != KERNEL_DTYPE:
            y = relax.op.astype(self.builder_.emit(y), x_dtype)
        if len(lead) == 1:
            return y
        return relax.op.reshape(self.builder_.emit(y), lead + [n])

    def _bias16(self, bias):
        """The bias as the fp16 kernel takes it: an fp16 copy of a non-fp16 bias, a new parameter."""
        if str(bias.ty.dtype) == KERNEL_DTYPE:
            return self.visit_expr(bias)
        name, value = self.weights[bias]
        key = f"{name}_fp16"
        if key not in self.biases:
            v = relax.Var(key, relax.TensorType(value.shape, KERNEL_DTYPE))
            self.new_params.append(v)
            self.new_values[key] = np.asarray(value).astype(np.float16)
            self.biases[key] = v
        return self.biases[key]


def _trailing2(expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim < 2:
        return None
    dims = tuple(_int(d) for d in ty.shape.values[-2:])
    return None if None in dims else dims


def _numel(expr):
    dims = [_int(d) for d in expr.ty.shape.values]
    return None if None in dims else int(np.prod(dims))


def _int(d):
    try:
        return int(d)
    except TypeError:
        return None


def _prod(dims):
    out = dims[0]
    for d in dims[1:]:
        out = out * d
    return out


def quantize_linears(mod: tvm.IRModule, params: dict[str, np.ndarray], cfg: QuantConfig = QuantConfig(),
                     skip: tuple[str, ...] = (), min_size: int = 0, func_name: str = "main"):
    """Apply the rewrite to mod[func_name] whose trailing parameters are the weights in `params`.

    Returns (new module, new params dict in the new function's weight order, PassReport). The function
    keeps its "num_input" leading inputs; its weight parameters become: the original weights still
    used, then the new int4 tensors.
    """
    func = mod[func_name]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    weights = {p: (p.name, params.get(p.name)) for p in func.params[num_input:]}
    # constants in the graph are weights too (ONNX initializers the frontend left inline)
    for c in _constants(func):
        weights[c] = (f"const{len(weights)}", c.value.numpy())
    rw = _Int4Rewriter(mod, weights, cfg, tuple(skip), min_size)
    body = rw.visit_expr(func.body)
    out_mod = rw.builder_.get()
    every = list(func.params) + rw.new_params
    out_mod[func_name] = relax.Function(every, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    out_mod = relax.transform.DeadCodeElimination([func_name])(out_mod)  # the dead permute_dims(W)
    dce = out_mod[func_name]
    used = {v.name for v in relax.analysis.free_vars(dce.body)}
    kept = [p for p in func.params[num_input:] if p.name in used]
    new_params = list(dce.params[:num_input]) + [p for p in dce.params[num_input:] if p.name in used]
    out_mod[func_name] = relax.Function(new_params, dce.body, dce.ret_ty, dce.is_pure, dce.attrs, dce.span)
    values = {p.name: params[p.name] for p in kept}
    values.update(rw.new_values)
    return out_mod, values, rw.report


def _constants(func):
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, tvm.ir.GenericConst) else None)
    return found
