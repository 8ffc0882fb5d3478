"""Model importers: ONNX files and PyTorch (nn.Module / ExportedProgram / .pt2) into TVM Relax.

Every importer returns an `Imported`: a Relax module whose "main" takes the model inputs first
(`num_input` of them, named dims kept symbolic) and then the weights as parameters, plus the weight
values by parameter name, so compiler/int4_pass.py can quantize them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Imported:
    mod: "tvm.IRModule"
    params: dict[str, np.ndarray]
    output_names: list[str]
    source: str  # what it came from, for messages and the manifest
    input_names: list[str] | None = None  # the model's own input names, where the importer renamed them


def import_model(source, example_inputs=None, shapes: dict[str, tuple] | None = None,
                 dynamic: bool = True) -> Imported:
    """Dispatch on what `source` is: an .onnx path, a .pt2 path, an nn.Module or an ExportedProgram.

    shapes pins named dims of inputs, {input name: (dim or None, ...)}; None keeps a dim symbolic.
    """
    from compiler.errors import NibbleError

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise NibbleError(f"{path}: no such file")
        if path.is_dir():
            raise NibbleError(f"{path}: is a directory, expected a model file (.onnx or .pt2)")
        if path.suffix == ".onnx":
            from .onnx_import import from_onnx_file

            return from_onnx_file(path, shapes)
        if path.suffix in (".pt2", ".pt", ".ep"):
            from .torch_import import from_pt2_file

            return from_pt2_file(path, shapes)
        raise NibbleError(f"{path}: unknown model format {path.suffix!r} (expected .onnx or .pt2)")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and isinstance(source, (torch.nn.Module, torch.export.ExportedProgram)):
        from .torch_import import from_torch

        return from_torch(source, example_inputs, shapes, dynamic)
    raise NibbleError(f"cannot import a {type(source).__name__}: pass an .onnx or .pt2 path, a "
                      "torch.nn.Module with example_inputs, or a torch.export.ExportedProgram")


def split_params(mod, source: str) -> tuple["tvm.IRModule", dict[str, np.ndarray]]:
    """Take the weight values out of a frontend's module (they travel beside it, by parameter name)."""
    from tvm import relax

    mod, params = relax.frontend.detach_params(mod)
    mod = _identifier_param_names(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    names = [p.name for p in func.params[num_input:]]
    values = [v.numpy() for v in params.get("main", [])]
    if len(names) != len(values):
        raise AssertionError(f"{source}: {len(names)} weight parameters but {len(values)} values")
    return mod, dict(zip(names, values))


def identifier(name: str) -> str:
    """The C identifier a parameter named `name` gets in nibble's modules."""
    import re

    name = re.sub(r"\W", "_", name)
    return name if re.match(r"[A-Za-z_]", name) else "_" + name


def _identifier_param_names(mod):
    """Rename main's parameters whose names are not C identifiers ("/model/rotary_emb/Constant_1_output_0":
    ONNX exporters name initializers after graph paths). TIR buffers inherit these names and TVM's CUDA
    codegen writes them into the kernel signature as they are, which nvcc rejects."""
    from tvm import relax

    func = mod["main"]
    rename = {p: relax.Var(identifier(p.name), p.ty) for p in func.params if identifier(p.name) != p.name}
    if not rename:
        return mod

    @relax.expr_functor.mutator
    class _Rename(relax.PyExprMutator):
        def visit_var_(self, var):
            return rename.get(var, var)

    body = _Rename(mod).visit_expr(func.body)
    params = [rename.get(p, p) for p in func.params]
    mod = mod.clone()
    mod["main"] = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return mod
