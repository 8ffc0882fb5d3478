"""nibble: int4 weight-only (W4A16) compilation of linear-heavy networks with Apache TVM.

    import nibble
    path = nibble.compile_model("model.onnx", target="cuda", arch="sm_90")   # -> model.nibble/
    m = nibble.load(path)                                                  # TVM runtime only
    y = m(x)
"""
__version__ = "0.1.0"


def load(path, device=None):
    """Load a compiled artifact folder; device "cuda" or "cpu" (default: what it was built for)."""
    from compiler.runtime import load as _load

    return _load(path, device)


def compile_model(source, example_inputs=None, output=None, **options):
    """Compile an .onnx/.pt2 path, torch.nn.Module (+ example_inputs) or ExportedProgram.

    options: target ("cuda" | "llvm"), arch ("sm_90"), quantize (bool), group_size (32/64/128, -1 =
    per channel), symmetric (bool), skip (name patterns), min_size, shapes ({input: dims}).
    Returns the artifact's path.
    """
    from compiler.build import compile_model as _compile

    return _compile(source, example_inputs, output, **options)


from compiler.errors import NibbleError  # noqa: E402  (cheap; users catch it)

__all__ = ["load", "compile_model", "NibbleError", "__version__"]
