"""GPU kernel timing that measures the GPU, not the host: launches captured in one CUDA graph.

A TVM function called from Python costs tens of microseconds of host time per call, more than a
decode GEMV runs, so host-timed loops of launches measure the host. Capturing the launches in a CUDA
graph (torch's; TVM launches on torch's stream through tvm_ffi) and timing replays with events leaves
only GPU time. Callers rotate weight copies across the captured launches so reads come from HBM.
"""
from __future__ import annotations

import numpy as np


def graph_time(fn_list, reps: int = 15) -> float:
    """Median seconds per launch: capture len(fn_list) launches in one CUDA graph, replay `reps` times."""
    import torch
    import tvm_ffi

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), tvm_ffi.use_torch_stream():
        for fn in fn_list[:3]:
            fn()  # warm up (module load, handles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), tvm_ffi.use_torch_stream():
        for fn in fn_list:
            fn()
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) * 1e-3 / len(fn_list))
    return float(np.median(times))


def kernel_times(call, steps: int, warmup: int = 2, cpu: bool = False) -> dict[str, tuple[int, float]]:
    """Per GPU kernel name, (launches, GPU us) per call of `call`, averaged over `steps` calls after
    `warmup` more, from torch.profiler (CUPTI sees TVM's launches in this process; cpu: also record host
    activity, as a caller that wants launches correlated with host ops does)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # no GPU: no kernels
    for _ in range(warmup):
        call()
    sync()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            call()
        sync()
    total: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = total.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return {name: (n // steps, us / steps) for name, (n, us) in total.items()}
