"""A second entry for fixed-shape decode: main with each present output cut to the new tokens' slots.

A decoder exported with past returns, per layer and K / V, present = concat(past, new) along the
cache's sequence axis. The graph decode (compiler/graph_decode.py) keeps the cache in fixed buffers
and needs only the new slots of each present, yet main copies the whole cache into present every step
(a Llama-2-7B step at 256 cached slots: ~190 us of its ~2.1 ms of kernels and 64 of its launches,
h200_generate.md). So, beside main (which stays as exported):

    def main(..., past_i, ...):
        ...
        present_i = concat((past_i, new_i), axis)      # past_i: a parameter of main
        ...
        return (logits, ..., present_i, ...)
  ==>
    def main_new_kv(..., past_i, ...):                 # the same parameters, in the same order
        ...
        return (logits, ..., new_i, ...)               # each present output: only its new slots

In main_new_kv the concats then feed only the attention, whose fused decode kernel reads (past, new)
in place (compiler/fuse_attention.py, two_source), and dead-code elimination drops them. Outputs that
are not such a concat stay as they are. Run before the other rewrites in build.prepare: they rewrite
every entry function.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_util import emit_like, is_op

ENTRY = "main_new_kv"


def _cut(value, params) -> relax.Expr | None:
    """`new` if value is concat((p, new), axis) with p a parameter of main, else None."""
    if not is_op(value, "relax.concat") or not isinstance(value.args[0], relax.Tuple):
        return None
    fields = value.args[0].fields
    if len(fields) != 2 or not any(fields[0].same_as(p) for p in params):
        return None
    return fields[1]


@mutator
class _Rebind(PyExprMutator):
    """Binds `var` (the returned tuple's var) to `value` instead, under a new var of value's type."""

    def __init__(self, mod, var, value):
        super().__init__(mod)
        self.var, self.value = var, value

    def visit_var_binding_(self, binding):
        if not binding.var.same_as(self.var):
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, self.visit_expr(self.value)))


def add_new_kv_entry(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """mod plus ENTRY (see the module docstring) when main returns present = concat(past, new) outputs;
    returns (module, number of outputs cut), the module unchanged when there are none."""
    main = relax.utils.copy_with_new_vars(mod["main"])  # an entry of its own needs its own vars
    body = main.body
    if not isinstance(body, relax.SeqExpr):
        return mod, 0
    bindings = {b.var: b.value for block in body.blocks for b in block.bindings}
    ret = body.body  # the returned tuple, or (the importers' way) a var bound to it in the dataflow block
    tup = bindings.get(ret) if isinstance(ret, relax.Var) else ret
    if not isinstance(tup, relax.Tuple):
        return mod, 0
    fields, cut = [], 0
    for f in tup.fields:
        new = _cut(bindings.get(f), main.params)
        # a tuple returned as such holds non-dataflow vars: a dataflow var there would be undefined
        if new is None or (ret.same_as(tup) and isinstance(new, relax.DataflowVar)):
            fields.append(f)
        else:
            fields.append(new)
            cut += 1
    if not cut:
        return mod, 0
    if ret.same_as(tup):
        new_body = relax.SeqExpr(body.blocks, relax.Tuple(fields))
        out = mod
    else:
        rw = _Rebind(mod, ret, relax.Tuple(fields))
        new_body = rw.visit_expr(body)
        out = rw.builder_.get()
    # ret type None: derived from the body (the present outputs' shapes changed)
    entry = relax.Function(main.params, new_body, None, main.is_pure, main.attrs)
    out[ENTRY] = entry.with_attr("global_symbol", ENTRY)
    return relax.transform.DeadCodeElimination(["main", ENTRY])(out), cut
