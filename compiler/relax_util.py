"""What the Relax rewrite passes share: op tests on bindings, scalar constants, applying a mutator to main."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator


def is_op(expr, name: str) -> bool:
    """expr is a call of the Relax op `name` (e.g. "relax.matmul")."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def scalar(expr) -> float | None:
    """The value of a one-element constant, else None."""
    if isinstance(expr, tvm.ir.GenericConst) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def emit_like(builder, var, value):
    """Bind value to a new var named like `var`. Where `var` was a dataflow block's output (a plain Var
    in a dataflow block), the new one is emitted as an output too: emitted as a local DataflowVar it
    would be undefined outside the block, and the VM fails ("Var gv is not defined")."""
    if builder.current_block_is_dataflow() and not isinstance(var, relax.DataflowVar):
        return builder.emit_output(value, name_hint=var.name)
    return builder.emit(value, name_hint=var.name)


def rewrite_main(mod: tvm.IRModule, rewriter, func_name: str = "main") -> tvm.IRModule:
    """mod with mod[func_name]'s body visited by `rewriter` (a PyExprMutator over mod whose builder holds
    any functions it added, counting its rewrites in `.count`); dead code dropped if it rewrote any."""
    func = mod[func_name]
    body = rewriter.visit_expr(func.body)
    out = rewriter.builder_.get()
    out[func_name] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return relax.transform.DeadCodeElimination([func_name])(out) if rewriter.count else out


class BindingRewriter(PyExprMutator):
    """Base of a pass that replaces single bindings `v = value`: subclasses implement rewrite(value) ->
    new expression or None (and decorate themselves with relax.expr_functor.mutator). Every dataflow
    block's bindings are recorded first, so a match can look back through vars with bound()."""

    def __init__(self, mod):
        super().__init__(mod)
        self.bindings: dict = {}
        self.count = 0  # bindings rewritten

    def bound(self, expr, name: str):
        """expr's value (looking through one var) if it is a call of op `name`, else None."""
        value = self.bindings.get(expr, expr)
        return value if is_op(value, name) else None

    def rewrite(self, value):
        raise NotImplementedError

    def visit_dataflow_block_(self, block):
        for b in block.bindings:
            self.bindings[b.var] = b.value
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        new = self.rewrite(binding.value)
        if new is None:
            return super().visit_var_binding_(binding)
        self.count += 1
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))
