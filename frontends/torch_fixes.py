"""Fixes around TVM 0.27's `from_exported_program` for what torch.export produces from real models.

- view -> reshape before decomposition. `ExportedProgram.run_decompositions()` re-traces the graph
  with fake tensors, and `aten.view` re-checks strides symbolically: GPT-2's Conv1D does
  `x.view(-1, x.size(-1))` on the output of a symbolic reshape of a transposed tensor, which the
  tracer cannot prove viewable ("Cannot view a tensor with shape [s0, s1, 32] and strides
  (32, 32*s0, 1)"), although it ran in eager. The exported graph is functional (no aliasing is
  observable), so `aten.reshape` has the same meaning and is legal for any strides.
- converters TVM lacks, through `custom_convert_map` (see CONVERTERS):
  `to.device` / `to.other` / `to.dtype_layout`-style casts appear when decomposition is skipped
  (TVM refuses `to.device`); a device move is the identity in a compiled graph, a dtype in the
  arguments is an astype.
- `cat` with an empty 1-D input: HF's DynamicCache starts each layer's keys/values as an empty
  `torch.tensor([])` and concatenates the past onto it (GPT-2 decode). torch's cat skips 1-D tensors
  of size 0 whatever the others' rank (legacy rule); relax.concat requires one rank ("Concat expects
  all input tensors to have same ndim"). The converter drops statically empty 1-D inputs.
- `slice` with a symbolic end that torch proved in bounds: BERT slices its position ids [1, 64] to
  [:, 0:seq]. torch knows seq <= 32 from the program's range constraints, so the slice is [1, seq];
  TVM clamps the end (strided_slice, assume_inbound=False) and the dim becomes min(seq, 64), which
  it cannot prove equal to seq, so the add with the [batch, seq, d] embeddings loses its shape and
  cannot be lowered ("CodeGenVM cannot emit R.add"). When torch's own output size of the node is
  exactly end - start, the converter emits the slice with assume_inbound=True (dim end - start);
  any other slice goes to TVM's converter.
- `unsupported_ops` names every call the importer has no converter for, so the caller can fail
  with the op and node instead of TVM's assertion.
"""
from __future__ import annotations


def _dtype_arg(node):
    """The dtype a to.* call converts to, or None (a device-only move)."""
    import torch

    for a in list(node.args[1:]) + [node.kwargs.get("dtype")]:
        if isinstance(a, torch.dtype):
            return a
    return None


def _to_any(node, importer):
    """aten.to.{device,other,...}: identity unless it also changes the dtype (then astype)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dtype = _dtype_arg(node)
    if node.target.__name__ == "to.other" and len(node.args) > 1 and node.args[1] in importer.env:
        other = importer.env[node.args[1]]
        return importer.block_builder.emit(relax.op.astype(x, other.ty.dtype))
    if dtype is None:
        return x
    return importer.block_builder.emit(relax.op.astype(x, importer._convert_data_type(dtype, importer.env)))


def _cat(node, importer):
    """aten.cat / concat: inputs of static shape [0] dropped (torch skips them), then relax.concat."""
    from tvm import relax, tirx

    tensors = importer.retrieve_args(node)[0]
    axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    def empty_1d(t):
        dims = getattr(t.ty, "shape", None)
        return dims is not None and len(dims) == 1 and isinstance(dims[0], tirx.IntImm) and int(dims[0]) == 0

    kept = [t for t in tensors if not empty_1d(t)] or list(tensors)
    if len(kept) == 1:
        return kept[0]
    return importer.block_builder.emit(relax.op.concat(kept, axis=axis))


def _sym_expr(v):
    """The sympy expression (or int) of a slice bound: an int, or an fx node whose value is a SymInt."""
    import torch

    v = v.meta.get("val") if hasattr(v, "meta") else v
    if isinstance(v, torch.SymInt):
        return v.node.expr
    return v if isinstance(v, int) else None


def _slice_args(node):
    """(x, dim, start, end, step) of aten.slice.Tensor, defaults filled in (end None: to the end)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    return x, 0 if dim is None else dim, 0 if start is None else start, end, 1 if step is None else step


def _proven_in_bounds(node) -> bool:
    """aten.slice.Tensor(x, dim, start, end[, 1]) with a symbolic bound whose output size torch's shape
    analysis (range constraints included) found to be exactly end - start: no clamping can occur."""
    import sympy

    _, dim, start, end, step = _slice_args(node)
    if step != 1 or end is None:
        return False
    if not any(hasattr(b, "meta") for b in (start, end)):
        return False  # static bounds: TVM's shapes are exact
    val = node.meta.get("val")
    lo, hi = _sym_expr(start), _sym_expr(end)
    if val is None or lo is None or hi is None or (isinstance(lo, int) and lo < 0):
        return False
    size = val.shape[dim]
    size = size.node.expr if hasattr(size, "node") else size
    return sympy.simplify(sympy.sympify(size) - (sympy.sympify(hi) - sympy.sympify(lo))) == 0


def _slice(node, importer):
    """aten.slice.Tensor: assume_inbound=True where torch proved the bounds, else TVM's converter."""
    from tvm import relax

    if not _proven_in_bounds(node):
        return importer._slice(node)
    x, dim, start, end, _ = _slice_args(node)
    x = importer.env[x]
    start, end = (importer.env[b] if hasattr(b, "meta") else b for b in (start, end))
    return importer.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [end], [1],
                                                              assume_inbound=True))


CONVERTERS = {"to.device": _to_any, "to.other": _to_any, "to.prim_device": _to_any,
              "cat.default": _cat, "concat.default": _cat, "slice.Tensor": _slice}


def views_to_reshapes(ep):
    """Replace aten.view.default by aten.reshape.default in ep's graph (in place); returns ep."""
    import torch

    changed = False
    for node in ep.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.view.default,
                                                          torch.ops.aten._unsafe_view.default):
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        ep.graph_module.recompile()
    return ep


def decompose(ep):
    """ep.run_decompositions() after views_to_reshapes (on a copy of the graph module)."""
    import copy

    import torch

    gm = copy.deepcopy(ep.graph_module)
    ep = torch.export.ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=ep.graph_signature,
        state_dict=ep.state_dict, range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph, example_inputs=ep.example_inputs,
        constants=ep.constants, verifiers=ep.verifiers)
    return views_to_reshapes(ep).run_decompositions()


def unsupported_ops(ep) -> list[tuple[str, str]]:
    """(op name, node name) of each call_function node TVM's importer cannot convert."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().create_convert_map()) | set(CONVERTERS)
    out = []
    for node in ep.graph_module.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if name not in known:
                out.append((name, node.name))
    return out
