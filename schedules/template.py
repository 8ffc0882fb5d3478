"""What our template rules share: take one tagged copy of the int4 kernel, emit a hand-written kernel.

The dispatch pass (compiler/dispatch.py) tags copies of each int4 PrimFunc "nibble.kernel" = "gemv" |
"gemm"; a template rule takes the copies of its kind on CUDA, builds its kernel for them (or declines
with None, leaving the function to dlight) and keeps the original's attrs (global_symbol, nibble.*).
"""
from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

ATTR = "nibble.int4"  # = compiler.int4_kernel.ATTR (not imported: schedules must not need compiler/)
KERNEL_ATTR = "nibble.kernel"  # "mma" | "gemv" | "gemm", set by compiler/dispatch.py on its copies
ROWS_ATTR = "nibble.rows"  # = compiler.dispatch.ROWS_ATTR: the token bucket R a copy serves (m <= R)


def indent(text: str, n: int) -> str:
    """text without its surrounding blank lines, every non-blank line indented by n spaces (for
    splicing generated TVMScript into a template)."""
    return "\n".join(" " * n + line if line.strip() else line for line in text.strip("\n").split("\n"))


def signature(name: str, attrs: dict) -> str:
    """The TVMScript head every template kernel shares, for one int4 spec (the "nibble.int4" attr): the
    int4 PrimFunc's parameters (x, qweight, scales[, zeros][, bias], y; compiler/int4_kernel.py), its
    symbolic token count m, and x and y bound to m. The kernel's body follows, indented 4 spaces."""
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
        f'    y = T.match_buffer(y_h, (m, T.int64({n})), "{xd}")'])


class TemplateRule(ScheduleRule):
    kind = ""  # the "nibble.kernel" tag this rule takes

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
        kernel = self.build(func, attrs, target)
        if kernel is None:
            return None
        return tvm.s_tir.Schedule(kernel.with_attr({str(key): val for key, val in attrs.items()}))

    def is_target_available(self, target) -> bool:
        return target.kind.name == "cuda"
