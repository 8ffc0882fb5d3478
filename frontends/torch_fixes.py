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


CONVERTERS = {"to.device": _to_any, "to.other": _to_any, "to.prim_device": _to_any}


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
