"""Programmatic edges in a captured decode-step CUDA graph (Hopper's programmatic dependent launch).

A stream capture chains every kernel to the one before it with a full edge: kernel B launches only
after kernel A has finished and its writes are flushed, so each of a Llama decode step's ~380 kernels
pays a launch latency on the critical path, and a GEMV starts streaming its weights only then.

Our kernels that call `nb_grid_wait()` before their first read of an earlier kernel's output
(schedules/template.py GRID_WAIT: the decode GEMVs, attention, add + RMSNorm) can take a
*programmatic* edge instead. With the LAUNCH_ORDER port, B's blocks launch as soon as all of A's blocks
have started; B then waits in `griddepcontrol.wait` until A has finished with its writes visible. What
B does before the wait (a GEMV's first weight loads) overlaps A.

Safe because every kernel behind a programmatic edge waits before reading or writing anything another
kernel touches, and A finishing implies all kernels before A have finished (A's own edge is either
full, or programmatic and A waited). Edges into other kernels stay full.

This is CUDA driver API (libcuda, via ctypes) on the graph torch captured with keep_graph=True, before
it is instantiated. `waiting_kernels` finds the waiting kernels in a built module's CUDA source; the
artifact's manifest lists them ("graph_wait_kernels"), so the runtime needs no compiler.
"""
from __future__ import annotations

import ctypes
import re

WAIT_CALL = "nb_grid_wait()"  # = schedules.template.GRID_WAIT_CALL (the runtime must not need schedules/)
NODE_KERNEL = 0  # CU_GRAPH_NODE_TYPE_KERNEL
PORT_LAUNCH_ORDER = 2  # CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER: fires when all the upstream's blocks have begun
DEPENDENCY_PROGRAMMATIC = 1  # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC


def waiting_kernels(executable) -> list[str]:
    """Names of the kernels in a built VM executable's CUDA modules that call nb_grid_wait()."""
    todo, names = [executable.mod], set()
    while todo:
        m = todo.pop()
        todo.extend(m.imports)
        if m.kind != "cuda":
            continue
        src = m.inspect_source()
        # kernels are the `extern "C" __global__` definitions; a body runs to the next one
        parts = re.split(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src)
        for name, body in zip(parts[1::2], parts[2::2]):
            if WAIT_CALL in body:
                names.add(name)
    return sorted(names)


class _EdgeData(ctypes.Structure):  # CUgraphEdgeData
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class _KernelParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p)] + [(f, ctypes.c_uint) for f in (
        "gx", "gy", "gz", "bx", "by", "bz", "smem")] + [
        ("params", ctypes.c_void_p), ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


def _driver():
    cu = ctypes.CDLL("libcuda.so.1")

    def call(name, *args):
        rc = getattr(cu, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name} failed with CUresult {rc}")

    return call


def make_programmatic(graph: int, kernels) -> int:
    """Turn each full edge kernel -> waiting kernel of the (uninstantiated) CUDA graph `graph` into a
    programmatic one; `kernels`: the names of the kernels that wait. Returns how many edges changed.
    Raises RuntimeError if the driver refuses a call; if that happens after the first edge changed, the
    graph misses a dependency and must not be instantiated."""
    call, kernels = _driver(), set(kernels)
    if not kernels:
        return 0
    n = ctypes.c_size_t(0)
    call("cuGraphGetNodes", ctypes.c_void_p(graph), None, ctypes.byref(n))
    nodes = (ctypes.c_void_p * n.value)()
    call("cuGraphGetNodes", ctypes.c_void_p(graph), nodes, ctypes.byref(n))

    def kernel_name(node) -> str | None:
        kind = ctypes.c_int(-1)
        call("cuGraphNodeGetType", ctypes.c_void_p(node), ctypes.byref(kind))
        if kind.value != NODE_KERNEL:
            return None
        p = _KernelParams()
        call("cuGraphKernelNodeGetParams_v2", ctypes.c_void_p(node), ctypes.byref(p))
        if not p.func:  # launched by CUkernel (library) handle: not one of ours
            return None
        name = ctypes.c_char_p()
        call("cuFuncGetName", ctypes.byref(name), ctypes.c_void_p(p.func))
        return name.value.decode()

    plan = []  # (upstream, node, its edge data): read everything before changing anything
    for node in nodes:
        if kernel_name(node) not in kernels:
            continue
        k = ctypes.c_size_t(0)
        call("cuGraphNodeGetDependencies_v2", ctypes.c_void_p(node), None, None, ctypes.byref(k))
        if k.value != 1:  # a stream capture chains one predecessor; anything else is left as it is
            continue
        dep, data = (ctypes.c_void_p * 1)(), (_EdgeData * 1)()
        call("cuGraphNodeGetDependencies_v2", ctypes.c_void_p(node), dep, data, ctypes.byref(k))
        if data[0].type == 0 and kernel_name(dep[0]) is not None:  # only kernel -> kernel edges qualify
            plan.append((dep, (ctypes.c_void_p * 1)(node), data))
    prog = (_EdgeData * 1)()
    prog[0].from_port, prog[0].type = PORT_LAUNCH_ORDER, DEPENDENCY_PROGRAMMATIC
    for dep, to, data in plan:  # a failure here leaves the graph unusable: the caller must drop it
        call("cuGraphRemoveDependencies_v2", ctypes.c_void_p(graph), dep, to, data, ctypes.c_size_t(1))
        call("cuGraphAddDependencies_v2", ctypes.c_void_p(graph), dep, to, prog, ctypes.c_size_t(1))
    return len(plan)
