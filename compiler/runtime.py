"""Load an artifact and call it with numpy arrays or torch tensors. Needs only TVM's runtime.

    m = nibble.load("model.nibble", device="cuda")
    y = m(x)                  # or m(input_ids=x); numpy in -> numpy out, torch in -> torch out (DLPack)

Inputs are checked against the manifest before anything runs: names, rank, dtype, pinned dims, and
that a symbolic dim shared by several inputs has one value.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from . import artifact
from .errors import NibbleError


def _device(kind: str):
    import tvm

    if kind in ("cuda", "gpu"):
        _load_cuda_runtime_lib()  # a runtime-only TVM cannot even see the GPU before this
        dev = tvm.runtime.cuda(0)
        if not dev.exist:
            raise NibbleError("device 'cuda' requested but no CUDA GPU is visible on this machine")
        return dev
    if kind in ("cpu", "llvm"):
        return tvm.runtime.cpu(0)
    raise NibbleError(f"unknown device {kind!r}: use 'cuda' or 'cpu'")


def _load_cuda_runtime_lib():
    """A runtime-only TVM does not load its CUDA runtime library by itself."""
    import tvm
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise NibbleError(f"cannot load TVM's CUDA runtime ({lib}): {e}") from None


class CompiledModel:
    """A loaded artifact; call it like the model it was compiled from."""

    def __init__(self, path, device: str | None = None):
        import tvm
        from safetensors.numpy import load_file

        self.path = Path(path)
        self.manifest = meta = artifact.read_manifest(self.path)
        kind = meta["target"]["kind"]
        device = device or ("cuda" if kind == "cuda" else "cpu")
        want = "cuda" if device in ("cuda", "gpu") else "llvm" if device in ("cpu", "llvm") else device
        if want != kind:
            raise NibbleError(f"{self.path} was built for {kind}"
                              f"{' ' + meta['target'].get('arch', '') if kind == 'cuda' else ''}, "
                              f"cannot run on device {device!r}; recompile with --target "
                              f"{'cuda' if want == 'cuda' else 'llvm'}")
        self.device = _device(device)
        if kind == "llvm" and meta["target"].get("mcpu"):
            from .target import _host_cpu

            if _host_cpu().get("mcpu") != meta["target"]["mcpu"]:
                raise NibbleError(f"{self.path} was built for CPUs with {meta['target']['mcpu']} "
                                  "(AVX2/FMA/F16C), which this CPU lacks; recompile it here")
        if kind == "cuda":
            got = "sm_" + self.device.compute_version.replace(".", "")
            if got != meta["target"]["arch"]:
                raise NibbleError(f"{self.path} holds machine code for {meta['target']['arch']}, this GPU "
                                  f"({self.device.device_name}) is {got}; recompile with --arch {got}")
        artifact.verify_library(self.path, meta)
        lib = tvm.runtime.load_module(str(self.path / artifact.LIB))
        from tvm.runtime.vm import VirtualMachine  # not imported by a runtime-only `import tvm`

        self.vm = VirtualMachine(lib, self.device)
        try:
            values = load_file(str(self.path / artifact.WEIGHTS))
        except Exception as e:
            raise NibbleError(f"{self.path / artifact.WEIGHTS}: unreadable weights ({e})") from None
        missing = [n for n in meta["params"] if n not in values]
        if missing:
            raise NibbleError(f"{self.path / artifact.WEIGHTS}: lacks {missing[:3]}")
        self.params = [tvm.runtime.tensor(values[n], self.device) for n in meta["params"]]
        self.inputs, self.outputs = meta["inputs"], meta["outputs"]
        self._main = self.vm["main"]
        # decoders with past also have an entry returning only the new cache slots (compiler/new_kv_entry.py),
        # which the graph decode calls; artifacts from before it (no "entries") have main alone
        new_kv = meta.get("entries", {}).get("new_kv")
        self._new_kv = self.vm[new_kv] if new_kv else None

    # -- input checks ---------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> list:
        names = [i["name"] for i in self.inputs]
        if len(args) > len(names):
            raise NibbleError(f"{len(args)} positional inputs given, the model takes {len(names)}: {names}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise NibbleError(f"unknown input {k!r}; the model's inputs are {names}")
            if k in given:
                raise NibbleError(f"input {k!r} given twice")
            given[k] = v
        missing = [n for n in names if n not in given]
        if missing:
            raise NibbleError(f"missing input(s) {missing}; the model's inputs are {names}")
        return [given[n] for n in names]

    def _check(self, values) -> None:
        sym: dict[str, tuple[int, str]] = {}
        for spec, v in zip(self.inputs, values):
            name, dims, dtype = spec["name"], spec["shape"], spec["dtype"]
            shape, got_dtype = tuple(v.shape), _dtype_name(v)
            if len(shape) != len(dims):
                raise NibbleError(f"input {name!r}: expected rank {len(dims)} {_fmt(dims)}, got rank "
                                  f"{len(shape)} {list(shape)}")
            if got_dtype != dtype:
                raise NibbleError(f"input {name!r}: expected dtype {dtype}, got {got_dtype}")
            for i, (d, s) in enumerate(zip(dims, shape)):
                if isinstance(d, int):
                    if d != s:
                        raise NibbleError(f"input {name!r}: dim {i} is pinned to {d}, got {s} "
                                          f"(shape {list(shape)}, expected {_fmt(dims)})")
                elif d in sym and sym[d][0] != s:
                    raise NibbleError(f"input {name!r}: dim {i} ({d}) is {s}, but {d} = {sym[d][0]} "
                                      f"in input {sym[d][1]!r}")
                else:
                    sym.setdefault(d, (s, name))

    # -- calling --------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        import tvm

        values = self._bind(args, kwargs)
        self._check(values)
        torch_in = any(_is_torch(v) for v in values)
        tvm_in = [self._to_tvm(v) for v in values]
        out = self._main(*tvm_in, *self.params)
        outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        conv = [_to_torch(o) if torch_in else o.numpy() for o in outs]
        return conv[0] if len(conv) == 1 else tuple(conv)

    def _to_tvm(self, v):
        import tvm

        if _is_torch(v):
            want = "cuda" if self.device.dlpack_device_type() == 2 else "cpu"
            if v.device.type != want:
                v = v.to(want)  # a copy only when the tensor lives elsewhere
            return tvm.runtime.from_dlpack(v.contiguous())
        return tvm.runtime.tensor(np.ascontiguousarray(v), self.device)

    def generate(self, prompt_ids, max_new_tokens: int = 20, **kw):
        """Autoregressive generation for a decoder exported with past key/values (compiler.generate)."""
        from .generate import Generator

        if not hasattr(self, "_generator"):
            self._generator = Generator(self)
        return self._generator.generate(prompt_ids, max_new_tokens, **kw)

    def benchmark(self, *args, repeat: int = 20, **kwargs) -> float:
        """Median seconds per call (inputs already on the device, synchronized)."""
        values = self._bind(args, kwargs)
        self._check(values)
        tvm_in = [self._to_tvm(v) for v in values]
        times = []
        for _ in range(repeat + 2):
            self.device.sync()
            t0 = time.perf_counter()
            self._main(*tvm_in, *self.params)
            self.device.sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times[2:]))


def _is_torch(v) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "__dlpack__")


def _dtype_name(v) -> str:
    if _is_torch(v):
        return str(v.dtype).replace("torch.", "")
    if not hasattr(v, "dtype") or not hasattr(v, "shape"):
        raise NibbleError(f"inputs must be numpy arrays or torch tensors, got {type(v).__name__}")
    return np.dtype(v.dtype).name


def _to_torch(t):
    import torch

    return torch.from_dlpack(t)


def _fmt(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def load(path, device: str | None = None) -> CompiledModel:
    """Load an artifact folder; device "cuda" or "cpu" (default: what it was built for)."""
    return CompiledModel(path, device)
