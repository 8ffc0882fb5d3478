"""What our template rules share: take one tagged copy of the int4 kernel, emit a hand-written kernel.

The dispatch pass (compiler/dispatch.py) tags copies of each int4 PrimFunc "nibble.kernel" = "gemv" |
"mma" | "gemm" | "wgmma"; a template rule takes the copies of its kind on CUDA, builds its kernel for them (or declines
with None, leaving the function to dlight) and keeps the original's attrs (global_symbol, nibble.*).
"""
from __future__ import annotations

from string import Template

from tvm.s_tir.dlight.base import ScheduleRule

ATTR = "nibble.int4"  # = compiler.int4_kernel.ATTR (not imported: schedules must not need compiler/)
KERNEL_ATTR = "nibble.kernel"  # "mma" | "gemv" | "gemm" | "wgmma", set by compiler/dispatch.py on its copies
ROWS_ATTR = "nibble.rows"  # = compiler.dispatch.ROWS_ATTR: the token bucket R a copy serves (m <= R)

# Programmatic dependent launch (Hopper, sm_90+). In a CUDA graph whose edge into a kernel is
# programmatic (compiler/cuda_graph.py), the kernel's blocks may start while the kernel before it still
# runs, and `griddepcontrol.wait` blocks until that kernel has finished with its writes visible. So a
# kernel calls it before its first read of anything an earlier kernel writes, and before its first
# write: what comes before may read only what no kernel of the same call writes, the weights and the
# entry's inputs (a GEMV's weights, a decode step's past K and V, which it thus fetches while the
# previous kernel runs). Launched any other way (the VM, no graph, older GPUs) the wait returns at once.
GRID_WAIT_SRC = r"""
__forceinline__ __device__ void nb_grid_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
"""
GRID_WAIT = f'T.evaluate(T.cuda.func_call("nb_grid_wait", source_code={GRID_WAIT_SRC!r}))'  # TVMScript
GRID_WAIT_CALL = "nb_grid_wait()"  # its call in the CUDA source: compiler/cuda_graph.py finds the kernels by it


def is_swiglu(spec) -> bool:
    """Whether an int4 spec (the ATTR dict) computes SwiGLU of its two output halves (compiler/fuse_swiglu.py;
    compiler/int4_kernel.py sets the key only then)."""
    return "swiglu" in spec and bool(spec["swiglu"])


def indent(text: str, n: int) -> str:
    """text without its surrounding blank lines, every non-blank line indented by n spaces (for
    splicing generated TVMScript into a template)."""
    return "\n".join(" " * n + line if line.strip() else line for line in text.strip("\n").split("\n"))


def signature(name: str, attrs: dict, n_out: int | None = None) -> str:
    """The TVMScript head every template kernel shares, for one int4 spec (the "nibble.int4" attr): the
    int4 PrimFunc's parameters (x, qweight, scales[, zeros][, bias], y; compiler/int4_kernel.py), its
    symbolic token count m, and x and y bound to m (y: n_out features, default N). The kernel's body
    follows, indented 4 spaces."""
    n, k, g, xd = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"]), str(attrs["x_dtype"])
    extra = ""
    if not attrs["symmetric"]:
        extra += f' zeros: T.Buffer((T.int64({n}), T.int64({k // g})), "float16"),'
    if attrs["has_bias"]:
        extra += f' bias: T.Buffer((T.int64({n}),), "{xd}"),'
    return "\n".join([
        "@T.prim_func",
        f'def {name}(x_h: T.handle, qweight: T.Buffer((T.int64({n}), T.int64({k // 8})), "uint32"),',
        f'{" " * (len(name) + 5)}scales: T.Buffer((T.int64({n}), T.int64({k // g})), "float16"),{extra} y_h: T.handle):',
        '    T.func_attr({"tirx.noalias": True})',
        "    m = T.int64()",
        f'    x = T.match_buffer(x_h, (m, T.int64({k})), "{xd}")',
        f'    y = T.match_buffer(y_h, (m, T.int64({n_out or n})), "{xd}")'])


# The split-K reduction: one thread per 4 outputs, the S fp32 partials summed in slice order (all S
# loads issued before the adds), + bias, rounded to fp16 once. Reads ws[m, S, N] from L2 (just written;
# the S partials of one output sit N floats apart, so one base address serves all S vector loads).
_REDUCE = Template('''
for rb in T.thread_binding((m * T.int64($NV) + T.int64(255)) // T.int64(256), thread="blockIdx.x"):
    for rt in T.thread_binding(256, thread="threadIdx.x"):
        part = T.alloc_buffer(($SPLIT, 4), "float32", scope="local")
        e = T.meta_var(rb * T.int64(256) + T.Cast("int64", rt))  # this thread's 4-output chunk
        if e < m * T.int64($NV):
            for z in T.unroll($SPLIT):
                for v in T.vectorized(4):
                    part[z, v] = ws[e // T.int64($NV), z, e % T.int64($NV) * T.int64(4) + T.Cast("int64", v)]
            for z in T.unroll(1, $SPLIT):
                for v in T.vectorized(4):
                    part[0, v] = part[0, v] + part[z, v]
            for v in T.vectorized(4):
                y[e // T.int64($NV), e % T.int64($NV) * T.int64(4) + T.Cast("int64", v)] = T.Cast("float16", $VAL)
''')


def split_k_reduce(n: int, split: int, bias: bool) -> tuple[str, str]:
    """TVMScript of a split-K kernel's fp32 workspace ws[m, split, N] (a "global" T.alloc_buffer: TVM
    allocates it per call from its device workspace pool, sized by the symbolic m) and of the reduction
    kernel that follows the GEMM launch in the same PrimFunc: (alloc line, reduction launch)."""
    val = "part[0, v]"
    if bias:
        val += f' + T.Cast("float32", bias[e % T.int64({n // 4}) * T.int64(4) + T.Cast("int64", v)])'
    return (f'ws = T.alloc_buffer((m, {split}, T.int64({n})), "float32", scope="global")',
            _REDUCE.substitute(SPLIT=split, NV=n // 4, VAL=val).strip("\n"))


class TemplateRule(ScheduleRule):
    kind = ""  # the "nibble.kernel" tag this rule takes
    swiglu = False  # whether build() takes SwiGLU specs (compiler/fuse_swiglu.py: y is half of N wide)

    def build(self, func, attrs, target):
        """The replacement PrimFunc for `func`, or None to decline."""
        raise NotImplementedError

    def apply(self, func, target, tunable):
        import tvm

        attrs = func.attrs
        if attrs is None or ATTR not in attrs or KERNEL_ATTR not in attrs:
            return None
        if str(attrs[KERNEL_ATTR]) != self.kind or target.kind.name != "cuda":
            return None
        if is_swiglu(attrs[ATTR]) and not self.swiglu:
            return None
        kernel = self.build(func, attrs, target)
        if kernel is None:
            return None
        return tvm.s_tir.Schedule(kernel.with_attr({str(key): val for key, val in attrs.items()}))

    def is_target_available(self, target) -> bool:
        return target.kind.name == "cuda"
