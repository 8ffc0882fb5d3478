"""Weights out of the ONNX graph before anything else touches it, read lazily from where they lie.

    initializer W (float, > 1 element, inline or external data)
 => graph input W (same name, dims, dtype), appended after the model's own inputs,
    and its value as a numpy array: a read-only np.memmap of the external data file, or the
    decoded inline tensor.

Why: every tool that rewrites a ModelProto (onnxscript's optimizer, shape inference, TVM's importer)
copies initializer bytes, and ONNX shape inference refuses models over protobuf's 2 GB outright. On a
2 GB export the weight copies took 80% of a 2-minute import; a Llama-2-7B export (13.5 GB) would
not get shape inference at all. Without its weights the graph is a few MB. TVM's importer then makes
the weight inputs the trailing parameters of main, exactly where it puts initializers when weights
are kept as inputs, and the compiler reads each value once, when it quantizes or saves it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def is_weight(init) -> bool:
    """Float initializers with more than one element are weights; the rest are graph constants."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.DOUBLE)
    return init.data_type in floats and int(np.prod(init.dims, dtype=np.int64)) > 1


def _external(init) -> dict | None:
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in init.external_data}


def _value(init, base: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    ext = _external(init)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    if ext is None:
        return numpy_helper.to_array(init)
    if init.data_type == onnx.TensorProto.BFLOAT16:  # no numpy dtype to map it with: read it whole
        onnx.external_data_helper.load_external_data_for_tensor(init, str(base))
        return numpy_helper.to_array(init)
    offset = int(ext.get("offset", 0))
    shape = tuple(int(d) for d in init.dims)
    return np.memmap(base / ext["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


def detach_weights(model, base: Path) -> list[tuple[str, np.ndarray]]:
    """Move weight initializers to trailing graph inputs (in place); returns [(name, value)] in input
    order. Non-weight initializers stored as external data are loaded into the graph (they are small)."""
    import onnx

    graph = model.graph
    weights, keep = [], []
    for init in graph.initializer:
        if is_weight(init):
            weights.append((init.name, _value(init, base), init))
        else:
            if _external(init) is not None:
                onnx.external_data_helper.load_external_data_for_tensor(init, str(base))
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
            keep.append(init)
    if not weights:
        return []
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {w[0] for w in weights}
    inputs = [i for i in graph.input if i.name not in names]  # old exporters list initializers as inputs too
    del graph.input[:]
    graph.input.extend(inputs)
    graph.input.extend(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims))
                       for name, _, init in weights)
    return [(name, value) for name, value, _ in weights]
