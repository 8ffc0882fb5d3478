"""What the Relax rewrite passes share: op tests on bindings, scalar constants, applying a mutator to the
entry functions."""
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


def slice_args(call):
    """(axes, begin, end, strides) of a strided_slice call as int lists (strides [1, ...] where it has
    none), or None if any is not a constant."""
    try:
        out = [[int(getattr(v, "value", v)) for v in t.fields] for t in call.args[1:5]]
    except (AttributeError, TypeError, ValueError):
        return None
    return out + [[1] * len(out[0])] if len(out) == 3 else out


def same(a, b) -> bool:
    """Two shape values (ints or symbolic expressions) are provably equal."""
    return tvm.sym.Analyzer().can_prove_equal(a, b)


def emit_like(builder, var, value):
    """Bind value to a new var named like `var`. Where `var` was a dataflow block's output (a plain Var
    in a dataflow block), the new one is emitted as an output too: emitted as a local DataflowVar it
    would be undefined outside the block, and the VM fails ("Var gv is not defined")."""
    if builder.current_block_is_dataflow() and not isinstance(var, relax.DataflowVar):
        return builder.emit_output(value, name_hint=var.name)
    return builder.emit(value, name_hint=var.name)


def entry_names(mod: tvm.IRModule) -> list[str]:
    """The module's public Relax functions: main, and main_new_kv where compiler/new_kv_entry.py added it."""
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]


def use_counts(func) -> dict:
    """How many times each var is used (not bound) in func's body."""
    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def rewrite_main(mod: tvm.IRModule, rewriter, func_name: str | None = None) -> tvm.IRModule:
    """mod with mod[func_name]'s body (default: every entry function's) visited by `rewriter` (a
    PyExprMutator over mod whose builder holds any functions it added, counting its rewrites in
    `.count`, seeing the visited function's var use counts in `.uses` and its parameters in `.params`);
    dead code dropped if it rewrote any."""
    names = [func_name] if func_name else entry_names(mod)
    bodies = {}
    for name in names:
        func = mod[name]
        rewriter.uses = use_counts(func)
        rewriter.params = list(func.params)
        bodies[name] = (func, rewriter.visit_expr(func.body))
    out = rewriter.builder_.get()
    for name, (func, body) in bodies.items():
        out[name] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return relax.transform.DeadCodeElimination(entry_names(out))(out) if rewriter.count else out


class BindingRewriter(PyExprMutator):
    """Base of a pass that replaces single bindings `v = value`: subclasses implement rewrite(value) ->
    new expression or None (and decorate themselves with relax.expr_functor.mutator). Every dataflow
    block's bindings are recorded first, so a match can look back through vars with bound() and
    forward with users_of(); a rewrite whose result also replaces a later binding (a kernel with two
    outputs) puts that value in `pending` under the later var."""

    def __init__(self, mod):
        super().__init__(mod)
        self.bindings: dict = {}
        self.uses: dict = {}  # var -> uses in the function being visited (set by rewrite_main)
        self.params: list = []  # that function's parameters (set by rewrite_main)
        self.current = None  # the var of the binding rewrite() is looking at
        self.pending: dict = {}  # a later binding's var -> the value it gets instead (a rewrite with two outputs)
        self.count = 0  # bindings rewritten
        self._users = None

    def bound(self, expr, name: str):
        """expr's value (looking through one var) if it is a call of op `name`, else None."""
        value = self.bindings.get(expr, expr)
        return value if is_op(value, name) else None

    def users_of(self) -> dict:
        """var -> the vars of the recorded bindings whose call takes it as an argument, or as a field of
        a tuple argument (built once per dataflow block)."""
        if self._users is None:
            self._users = {}
            for var, value in self.bindings.items():
                if isinstance(value, relax.Call):
                    for arg in value.args:  # a tuple argument's fields too (concat's inputs)
                        for a in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                            if isinstance(a, relax.Var):
                                self._users.setdefault(a, []).append(var)
        return self._users

    def column_slice(self, v, uses: int = 1, casts: int = 0):
        """v (read `uses` times) back through single-use reshapes, and at most `casts` single-use
        astypes, to a single-use strided_slice of the columns [lo, hi) of a 2-D M (a merged projection's
        output): (M, lo, hi), or None."""
        while self.uses.get(v) == uses:
            value = self.bindings.get(v)
            if is_op(value, "relax.astype") and casts:
                casts -= 1
            elif not is_op(value, "relax.reshape"):
                break
            v, uses = value.args[0], 1
        value = self.bindings.get(v)
        if not (is_op(value, "relax.strided_slice") and self.uses.get(v) == uses):
            return None
        m, args = value.args[0], slice_args(value)
        if (args is None or not isinstance(m.ty, relax.TensorType) or m.ty.ndim != 2 or args[0] not in ([1], [-1])
                or args[3] != [1]):
            return None
        return m, args[1][0], args[2][0]

    def rewrite(self, value):
        raise NotImplementedError

    def plan_block(self, block):
        """Called once per dataflow block, its bindings recorded, before any of them is visited: a
        subclass that decides over the whole block (which bindings to rewrite together) does it here."""

    def visit_dataflow_block_(self, block):
        for b in block.bindings:
            self.bindings[b.var] = b.value
        self._users = None
        self.plan_block(block)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        if binding.var in self.pending:  # given its value by an earlier rewrite
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, self.pending.pop(binding.var)))
            return
        self.current = binding.var
        new = self.rewrite(binding.value)
        if new is None:
            return super().visit_var_binding_(binding)
        self.count += 1
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))
