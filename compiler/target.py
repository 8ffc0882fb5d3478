"""Targets as users name them ("cuda", "llvm"/"cpu", optional arch) -> TVM 0.27 JSON-dict targets."""
from __future__ import annotations

import re

from .errors import NibbleError

# Meta-schedule refuses a CUDA target without these three; 48 KiB is the static shared-memory limit
# every CUDA GPU guarantees (kernels wanting more must opt in, and dlight's rules do not).
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152, "thread_warp_size": 32}


def local_gpu_arch() -> str | None:
    """sm_XX of GPU 0 here, or None when there is no usable GPU."""
    try:
        import tvm

        from .runtime import _load_cuda_runtime_lib

        _load_cuda_runtime_lib()  # a runtime-only TVM does not load its CUDA runtime by itself
        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + dev.compute_version.replace(".", "")
    except Exception:
        pass
    return None


def _host_cpu() -> dict:
    """x86-64-v3 (AVX2, FMA, F16C) where this machine has it: without F16C every fp16<->fp32
    conversion in the int4 kernel is a library call, 12x slower. The manifest records the choice."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    return {"mcpu": "x86-64-v3"} if all(f in flags for f in (" avx2", " fma", " f16c")) else {}


def resolve(target, arch: str | None = None) -> dict:
    """{"kind": "cuda", "arch": "sm_90", ...} or {"kind": "llvm"}; the dict that goes in the manifest.
    `target` is a name ("cuda", "llvm", "cpu") or a TVM-style dict such as {"kind": "cuda", "arch": "sm_90"}."""
    if isinstance(target, dict):
        unknown = set(target) - {"kind", "arch"}
        if "kind" not in target or unknown:
            raise NibbleError(f"target dict {target}: nibble takes {{'kind': 'cuda'|'llvm', 'arch': 'sm_XX'}}"
                              + (f", not {sorted(unknown)}" if unknown else ""))
        if arch and target.get("arch") and arch != target["arch"]:
            raise NibbleError(f"target arch {target['arch']} and --arch {arch} disagree")
        target, arch = target["kind"], arch or target.get("arch")
    kind = {"cpu": "llvm", "gpu": "cuda"}.get(target, target)
    if kind == "llvm":
        if arch:
            raise NibbleError(f"--arch {arch} is for --target cuda, not {target}")
        return {"kind": "llvm", **_host_cpu()}
    if kind != "cuda":
        raise NibbleError(f"unknown target {target!r}: use 'cuda' or 'llvm' (cpu)")
    if arch is None:
        arch = local_gpu_arch()
        if arch is None:
            raise NibbleError("--target cuda: no GPU found on this machine; name the GPU to build for "
                              "with --arch (e.g. --arch sm_90 for H100/H200)")
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise NibbleError(f"--arch {arch!r} is not a CUDA arch like sm_80 or sm_90")
    # dlight's version checks do not know "sm_90a" (its GEMM then silently drops tensor cores):
    # the arch-specific suffix is only for the nvcc call, never the TVM target.
    return {"kind": "cuda", "arch": arch.rstrip("a"), **_CUDA_LIMITS}


def tvm_target(spec: dict):
    import tvm

    if spec["kind"] == "cuda":
        return tvm.target.Target(spec, host={"kind": "llvm"})
    return tvm.target.Target(spec)
