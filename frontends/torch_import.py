"""PyTorch into Relax through torch.export and TVM's from_exported_program, weights as parameters."""
from __future__ import annotations

from pathlib import Path

from compiler.errors import NibbleError

from . import Imported, split_params


def _export(module, example_inputs, dynamic: bool):
    import torch

    if example_inputs is None:
        raise NibbleError("compiling a torch.nn.Module needs example_inputs (a tuple of tensors)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    dyn = None
    if dynamic:
        # dims may vary unless the model pins them (torch.export specializes those, and size-1 example
        # dims: give examples with sizes >= 2 to keep a dim dynamic)
        names = list(__import__("inspect").signature(module.forward).parameters)[:len(example_inputs)]
        # (token ids: every dim; float features: all but the last)
        ndyn = lambda t: t.dim() if not t.is_floating_point() else t.dim() - 1
        dyn = {n: {d: torch.export.Dim.AUTO for d in range(ndyn(t))} for n, t in zip(names, example_inputs)}
    try:
        return torch.export.export(module.eval(), tuple(example_inputs), dynamic_shapes=dyn)
    except Exception as e:
        raise NibbleError(f"torch.export failed: {str(e).strip().splitlines()[0]}") from None


def from_torch(source, example_inputs=None, shapes=None, dynamic: bool = True) -> Imported:
    import torch

    ep = source if isinstance(source, torch.export.ExportedProgram) else _export(source, example_inputs, dynamic)
    return from_exported_program(ep, type(source).__name__)


def from_pt2_file(path: Path, shapes=None) -> Imported:
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise NibbleError(f"{path}: not a readable torch.export program ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return from_exported_program(ep, str(path))


def from_exported_program(ep, source: str) -> Imported:
    """ExportedProgram -> Relax: decompose (views made reshapes, frontends/torch_fixes.py), check every
    op has a converter (else NibbleError naming op and node), convert with our extra converters. When
    torch's decomposition itself fails, the program is converted as exported (no decomposition)."""
    from tvm.relax.frontend.torch import from_exported_program as tvm_from_ep

    from . import torch_fixes

    try:
        prog, decomposed = torch_fixes.decompose(ep), True
    except Exception:
        prog, decomposed = ep, False
    missing = torch_fixes.unsupported_ops(prog)
    if missing:
        op, node = missing[0]
        more = f" (and {len(missing) - 1} more: {sorted({m[0] for m in missing[1:]})})" if len(missing) > 1 else ""
        raise NibbleError(f"{source}: op {op} at node {node!r} is not supported by the torch importer"
                          f"{'' if decomposed else ' (torch decomposition failed, converted as exported)'}"
                          f"{more}")
    try:
        mod = tvm_from_ep(prog, keep_params_as_input=True, unwrap_unit_return_tuple=False,
                          custom_convert_map=torch_fixes.CONVERTERS, run_ep_decomposition=False)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise NibbleError(f"{source}: TVM's torch importer failed: {msg[-1] if msg else type(e).__name__}") from None
    mod, params = split_params(mod, source)
    n_out = len(ep.graph_signature.user_outputs)
    return Imported(mod, params, [f"output{i}" for i in range(n_out)], source)
