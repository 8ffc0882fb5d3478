"""The artifact: one folder holding everything needed to run a compiled model.

    model.nibble/
      manifest.json        inputs/outputs (dtypes, symbolic dims), target + arch, quantization, layers,
                           versions, file sizes and the library's sha256
      lib.so               the TVM VM executable (host code + embedded cubins for CUDA)
      weights.safetensors  the parameters in call order: int4 qweight (uint32), fp16 scales, the rest

It is written into a temp folder beside the destination and renamed into place, so a crash never leaves
a half-written artifact under the final name. Reading checks what writing recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import NibbleError

FORMAT, FORMAT_VERSION = "nibble-artifact", 1
LIB, WEIGHTS, MANIFEST = "lib.so", "weights.safetensors", "manifest.json"


def _dims(ty) -> list:
    """Shape of a Relax tensor type as ints and symbol names (strings)."""
    out = []
    for d in ty.shape.values:
        try:
            out.append(int(d))
        except TypeError:
            out.append(str(d))
    return out


def describe_inputs(mod, names: list[str] | None = None) -> list[dict]:
    """The model inputs (main's first num_input params); `names` overrides the importer's renamings."""
    func = mod["main"]
    params = func.params[: int(func.attrs["num_input"])]
    names = names if names is not None and len(names) == len(params) else [p.name for p in params]
    return [{"name": nm, "shape": _dims(p.ty), "dtype": str(p.ty.dtype)} for nm, p in zip(names, params)]


def _describe_outputs(mod, names: list[str]) -> list[dict]:
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(names) != len(fields):
        names = [f"output{i}" for i in range(len(fields))]
    return [{"name": nm, "shape": _dims(t), "dtype": str(t.dtype)} for nm, t in zip(names, fields)]


def manifest(imp, mod, spec: dict, opts, report, inputs) -> dict:
    import tvm

    from nibble import __version__

    q = report.quantized
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "nibble_version": __version__, "tvm_version": tvm.__version__,
        "source": imp.source,
        "target": {k: spec[k] for k in ("kind", "arch", "mcpu") if k in spec},
        "inputs": inputs,
        "outputs": _describe_outputs(mod, imp.output_names),
        "params": [p.name for p in mod["main"].params[len(inputs):]],
        "quantization": ({"bits": 4, "group_size": opts.quant.group_size, "symmetric": opts.quant.symmetric,
                          "skip": list(opts.skip), "min_size": opts.min_size} if opts.quantize else None),
        "layers": [{"name": l.name, "n": l.n, "k": l.k, "quantized": l.quantized, "note": l.why}
                   for l in report.layers],
        "weight_bytes": {"linear_fp16": sum(l.bytes_before for l in q),
                         "linear_int4": sum(l.bytes_after for l in q)},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(dest: Path, executable, params: dict[str, np.ndarray], meta: dict) -> Path:
    """Write the artifact folder atomically (temp folder + rename); returns dest."""
    import safetensors.numpy

    dest = Path(dest)
    if dest.exists() and not (dest / MANIFEST).exists() and any(dest.iterdir()):
        raise NibbleError(f"{dest}: exists and is not a nibble artifact; not overwriting it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        executable.export_library(str(tmp / LIB))
        if meta["target"]["kind"] == "cuda":
            from .cuda import cubin_archs

            archs = cubin_archs((tmp / LIB).read_bytes())
            if meta["target"]["arch"] not in archs:
                raise NibbleError(f"the CUDA build holds no {meta['target']['arch']} machine code "
                                  f"(found {archs or 'none'}): refusing to write an artifact that would "
                                  "compile at load time")
            meta["cubins"] = archs
        ordered = {name: np.ascontiguousarray(params[name]) for name in meta["params"]}
        safetensors.numpy.save_file(ordered, str(tmp / WEIGHTS))
        meta["files"] = {LIB: {"bytes": (tmp / LIB).stat().st_size, "sha256": _sha256(tmp / LIB)},
                         WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size}}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an artifact is an ordinary folder
        for f in tmp.iterdir():  # durable before it becomes visible
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_manifest(path: Path) -> dict:
    """The manifest, after checking the folder is a whole artifact."""
    path = Path(path)
    if not path.exists():
        raise NibbleError(f"{path}: no such artifact")
    if not path.is_dir():
        raise NibbleError(f"{path}: not an artifact folder (compile a model with `nibble compile` first)")
    mf = path / MANIFEST
    if not mf.exists():
        raise NibbleError(f"{path}: no {MANIFEST}: not a nibble artifact, or a half-written one")
    try:
        meta = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NibbleError(f"{mf}: corrupt manifest ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NibbleError(f"{mf}: not a nibble manifest")
    if meta.get("format_version") != FORMAT_VERSION:
        raise NibbleError(f"{mf}: artifact format version {meta.get('format_version')}, this nibble reads "
                          f"version {FORMAT_VERSION}; recompile the model")
    for name, info in meta.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise NibbleError(f"{path}: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise NibbleError(f"{f}: {f.stat().st_size} bytes, the manifest says {info['bytes']}: "
                              "truncated or corrupt")
    if LIB not in meta.get("files", {}):
        raise NibbleError(f"{mf}: lists no {LIB}")
    return meta


def verify_library(path: Path, meta: dict) -> None:
    lib = Path(path) / LIB
    if _sha256(lib) != meta["files"][LIB]["sha256"]:
        raise NibbleError(f"{lib}: checksum differs from the manifest: corrupt library")
