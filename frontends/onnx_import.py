"""ONNX files into Relax with TVM's ONNX frontend, weights kept as parameters, dim_params symbolic.

The graph is first prepared with ONNX's own tools (frontends/onnx_prepare.py), then converted by
TVM's importer with nibble's fixed converters (frontends/onnx_converters.py) swapped in for this
import only.
"""
from __future__ import annotations

from pathlib import Path

from compiler.errors import NibbleError

from . import Imported, identifier, split_params
from .onnx_weights import detach_weights


def _load(path: Path):
    import onnx

    try:
        # the graph only: weights stay in their external data files (frontends/onnx_weights.py)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, truncated files, missing external data
        raise NibbleError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    try:
        onnx.checker.check_model(str(path))  # by path: also works past protobuf's 2 GB limit
    except Exception as e:
        raise NibbleError(f"{path}: invalid ONNX model: {str(e).splitlines()[0]}") from None
    return model


def _check_ops(model, path: Path) -> None:
    """Name the first node whose op TVM has no converter for (its own error does not)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            where = f"node {node.name!r}" if node.name else f"node #{list(model.graph.node).index(node)}"
            dom = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""
            raise NibbleError(f"{path}: op {node.op_type}{dom} at {where} is not supported by the "
                              "ONNX importer")


def input_specs(model) -> dict[str, tuple[list, str]]:
    """{graph input name: ([dim int or dim_param str or None], dtype)} for the real (non-weight) inputs."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[inp.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name)
    return out


def _importer_class():
    """TVM's graph importer, converting with frontends.onnx_converters.convert_map()."""
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    from .onnx_converters import convert_map

    relax, tirx = tvm_onnx.relax, tvm_onnx.tirx

    class Importer(tvm_onnx.ONNXGraphImporter):
        """Converts with our map; recovers the dims of outputs whose shape the converter lost.

        Shape recovery: an output known only by its rank or an opaque shape var (e.g. broadcast of dims TVM cannot prove
        equal, a reshape to a run-time shape) is match_cast to the dims ONNX shape inference wrote
        for it (frontends/onnx_prepare.py): integer dims and the input's named dims as they are
        (match_cast checks them at run time), any other dim as a fresh symbolic var. Downstream
        converters and nibble's int4 pass then see a ShapeExpr instead of an opaque shape.
        """

        value_dims: dict = {}

        def _check_for_unsupported_ops(self, graph):
            pass  # _check_ops did it, naming the node

        def _convert_operator(self, op_name, inputs, attrs, opset):
            table = convert_map()
            if op_name not in table:
                raise NotImplementedError(f"Operator {op_name} not implemented.")
            sym = table[op_name].get_converter(opset)(self.bb, inputs, attrs, [self._nodes, self._params])
            if not isinstance(sym, relax.Expr):
                return sym
            sym = self.bb.normalize(sym)
            ty = sym.ty
            if isinstance(ty, relax.TensorType) and ty.ndim > 0 and not isinstance(ty.shape, relax.ShapeExpr):
                sym = self._recover_shape(sym, attrs["tvm_custom"]["name"])
            return sym

        def _recover_shape(self, sym, node_name):
            known = self.value_dims.get(node_name)
            ndim = sym.ty.ndim
            if known is None or len(known) != ndim:
                known = [None] * ndim
            named = {}
            for inp in self._inputs.values():
                if isinstance(getattr(inp, "ty", None), relax.TensorType) and inp.ty.shape is not None:
                    for d in inp.ty.shape.values:
                        if isinstance(d, tirx.Var):
                            named[d.name] = d
            dims = []
            for i, d in enumerate(known):
                if isinstance(d, int) and d >= 0:
                    dims.append(d)
                elif isinstance(d, str) and d in named:
                    dims.append(named[d])
                else:
                    dims.append(tirx.Var(f"{node_name or 'v'}_dim{i}".replace("/", "_").strip("_"), "int64"))
            var = self.bb.emit(sym) if not isinstance(sym, relax.Var) else sym
            return self.bb.match_cast(var, relax.TensorType(dims, str(sym.ty.dtype)))

    return Importer


def _inferred_dims(model) -> dict:
    """{node name: [int | dim_param str | None per dim]} of single-output nodes, from value_info."""
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    out = {}
    for node in model.graph.node:
        if len(node.output) != 1 or node.output[0] not in infos:
            continue
        tt = infos[node.output[0]].type.tensor_type
        if tt.HasField("shape"):
            out[node.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in tt.shape.dim]
    return out


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _convert(model, shape_dict, dtype_dict):
    """TVM's from_onnx (keep_params_in_input=True) with our converter map."""
    importer = _importer_class()(shape_dict, dtype_dict, keep_params_in_input=True, sanitize=True)
    importer.value_dims = _inferred_dims(model)
    mod = importer.from_onnx(model.graph, _opset(model))
    return mod, {name: var.name for name, var in importer._inputs.items()}  # ONNX name -> param name


def from_onnx_file(path: Path, shapes: dict[str, tuple] | None = None) -> Imported:
    import tvm

    from .onnx_prepare import prepare

    model = _load(path)
    _check_ops(model, path)
    specs = input_specs(model)
    shapes = shapes or {}
    for name in shapes:
        if name not in specs:
            raise NibbleError(f"--shape names input {name!r}, but {path} has inputs {sorted(specs)}")
    shape_dict, dtype_dict = {}, {}
    for name, (dims, dtype) in specs.items():
        dtype_dict[name] = dtype
        pinned = shapes.get(name)
        if pinned is None:
            continue  # the importer keeps dim_params as symbolic vars of the same name
        if len(pinned) != len(dims):
            raise NibbleError(f"--shape {name}: rank {len(pinned)} given, the model's input has rank "
                              f"{len(dims)} {dims}")
        # TVM takes a shape_dict entry whole: pinned dims as ints, the rest as their tir vars
        shape_dict[name] = [p if p is not None else (d if isinstance(d, int) else tvm.tirx.Var(d or f"{name}_dim{i}", "int64"))
                            for i, (p, d) in enumerate(zip(pinned, dims))]
    try:
        weights = detach_weights(model, path.parent)
    except (OSError, ValueError) as e:  # a missing or short external data file
        raise NibbleError(f"{path}: cannot read its weights: {e}") from None
    for name, value in weights:
        dtype_dict[name] = value.dtype.name
    model = prepare(model)
    try:
        mod, var_names = _convert(model, shape_dict, dtype_dict)
    except NibbleError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise NibbleError(f"{path}: TVM's ONNX importer failed: {msg[-1] if msg else type(e).__name__}") from None
    mod, params = split_params(mod, str(path))
    if weights:  # they came in as inputs right after the model's own: make them weight parameters again
        mod["main"] = mod["main"].with_attr("num_input", len(specs))
        params.update({identifier(var_names[name]): value for name, value in weights})
    # TVM renames inputs into identifiers (past_key_values.0.key -> past_key_values_0_key); users and
    # the manifest keep the model's own names
    return Imported(mod, params, [o.name for o in model.graph.output], str(path), input_names=list(specs))
