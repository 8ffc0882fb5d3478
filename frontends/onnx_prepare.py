"""Prepare an exported ONNX graph for TVM's importer with ONNX's own tools, before any conversion.

1. The onnxscript optimizer (onnx-ir based; what torch.onnx's dynamo exporter runs on its own output):
   constant folding, including the shape subgraphs whose inputs are static (Shape of a tensor with a
   static dim -> Gather -> Unsqueeze -> Concat becomes a constant), dead-node removal, inlining of
   local functions. Named dynamic dims stay symbolic: folding only uses what is known statically.
   The TorchScript exporter does not run it, so its graphs keep such subgraphs otherwise.
2. ONNX shape inference with data propagation, so the optimizer's output carries value_info (it is
   also the check that the optimized graph is still well typed).
3. Integer / bool initializers and scalar initializers become Constant nodes. TVM imports every
   initializer as a function parameter when weights are kept as inputs (what nibble does, so the
   int4 pass can find them), and a reshape target, an axes list or a Range step that is a parameter
   is unknown at import time: converters that need it constant then fail or lose the shape. The
   weights (float tensors) stay parameters.

Every step is best effort: a tool that fails on a graph leaves the graph as it was (the import then
reports what it cannot handle).
"""
from __future__ import annotations

import warnings

from .onnx_weights import is_weight


def optimize(model):
    """onnxscript's optimizer (constant folding of static shape subgraphs, DCE); model unchanged on failure."""
    try:
        import onnxscript.optimizer
    except ImportError:
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnxscript.optimizer.optimize(model)
    except Exception:  # an optimizer bug must not make an importable graph fail
        return model


def infer_shapes(model):
    """onnx shape inference with data propagation; model unchanged where inference fails."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return model


def inline_non_weights(model):
    """Turn integer/bool and scalar initializers into Constant nodes at the front of the graph."""
    import onnx

    graph = model.graph
    keep, consts = [], []
    for init in graph.initializer:
        if is_weight(init):
            keep.append(init)
        else:
            t = onnx.TensorProto()
            t.CopyFrom(init)
            consts.append(onnx.helper.make_node("Constant", [], [init.name], value=t,
                                                name=f"nibble_const_{len(consts)}"))
    if not consts:
        return model
    inputs = [i for i in graph.input if i.name not in {c.output[0] for c in consts}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = consts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def prepare(model):
    """All of the above, in order; returns the prepared ModelProto."""
    model = optimize(model)
    model = infer_shapes(model)
    return inline_non_weights(model)
