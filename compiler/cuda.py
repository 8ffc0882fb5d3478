"""CUDA build support: real sm_XX machine code even on a machine with no GPU driver.

Two TVM behaviours make a naive `tvm.compile(..., target="cuda")` on a GPU-less build machine silently
wrong: libtvm_runtime_cuda.so links libcuda.so.1 (the driver), fails to load without it, and TVM then
exports CUDA *source* that is only compiled at load time on the GPU; and its default compile callback
uses NVRTC (needs cuda-bindings). So before a CUDA build we
  1. make sure TVM's CUDA runtime library is loaded; where no driver exists, first load a stub
     libcuda.so.1 (9 driver entry points, all answering CUDA_ERROR_NO_DEVICE) built here with the C
     compiler: compiling never calls the driver, it only needs the library to link;
  2. register our own `tvm_callback_cuda_compile` that runs nvcc to a cubin for exactly the target's arch
     and fails loudly;
and after export we read the cubins back out of the library (has_machine_code) to prove they are there.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from .errors import NibbleError

_STUB_SYMBOLS = ["cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                 "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                 "cuTensorMapEncodeTiled"]
EM_CUDA = 190  # ELF e_machine of CUDA cubins


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _build_stub() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nibble"
    out = cache / "libcuda_stub.so.1"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise NibbleError("building for CUDA without a GPU driver needs a C compiler (cc) for the "
                          "driver stub; none found")
    src = "".join(f"int {s}(){{return 100;}}\n" for s in _STUB_SYMBOLS)  # 100 = CUDA_ERROR_NO_DEVICE
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp, "stub.c")
        c.write_text(src)
        so = Path(tmp, "libcuda.so.1")
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(so), str(c)],
                       check=True, capture_output=True)
        tmp_out = out.with_suffix(f".{os.getpid()}")
        shutil.copy(so, tmp_out)
        os.replace(tmp_out, out)  # atomic: concurrent builds never see half a library
    return out


def ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library (with a stub driver if there is no real one)."""
    import tvm
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    if not _driver_present():
        ctypes.CDLL(str(_build_stub()), mode=ctypes.RTLD_GLOBAL)
    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise NibbleError(f"loaded {lib} but TVM's CUDA module loader did not register")


def nvcc_path() -> str:
    for cand in (os.environ.get("NIBBLE_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    raise NibbleError("--target cuda needs nvcc (the CUDA toolkit) on PATH to make GPU machine code")


def register_nvcc_callback(arch: str) -> None:
    """Make TVM compile every CUDA kernel with nvcc to a cubin for `arch` (e.g. sm_90)."""
    import tvm_ffi

    nvcc = nvcc_path()
    # sm_90 -> sm_90a: Hopper's wgmma (schedules/gemm_wgmma.py) exists only in the arch-specific
    # variant; its cubin runs on exactly the GPUs an sm_90 cubin runs on (H100/H200). The -gencode
    # spelling: some nvcc versions also run a plain sm_90 pass for -arch=sm_90a, which rejects wgmma.
    flags = ["-gencode=arch=compute_90a,code=sm_90a"] if arch == "sm_90" else [f"-arch={arch}"]

    def compile_cuda(code: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="nibble-nvcc-") as tmp:
            cu, cubin = Path(tmp, "k.cu"), Path(tmp, "k.cubin")
            cu.write_text(code)
            cmd = [nvcc, "--cubin", "-O3", *flags, "-o", str(cubin), str(cu)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                # TVM's generated code draws hundreds of unused-variable warnings: show the errors
                lines = r.stderr.splitlines()
                errs = [" | ".join(lines[i:i + 2]) for i, ln in enumerate(lines) if " error" in ln]
                raise NibbleError(f"nvcc failed for {arch}:\n"
                                  + "\n".join(errs[:12] or lines[-20:]))
            return bytearray(cubin.read_bytes())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def cubin_archs(blob: bytes) -> list[str]:
    """The sm_XX of every CUDA ELF (cubin) embedded in a file's bytes."""
    archs, pos = [], 0
    while (pos := blob.find(b"\x7fELF", pos)) != -1:
        hdr = blob[pos:pos + 64]
        if len(hdr) == 64 and hdr[4] == 2 and struct.unpack_from("<H", hdr, 18)[0] == EM_CUDA:
            flags = struct.unpack_from("<I", hdr, 48)[0]
            # e_flags holds the SM: bits 8..15 in the CUDA 12+ ABI (v8 and later), bits 0..7 before
            sm = (flags >> 8) & 0xFF if (hdr[7] >= 8 or (flags & 0xFF) == 0) else flags & 0xFF
            archs.append(f"sm_{sm}")
        pos += 4
    return archs
