"""Q, K and V heads out of one merged projection: sliced, rotated (RoPE) and transposed in one kernel.

compiler/fuse_qkv_rope.py routes here the chains an exported attention runs on the merged q/k/v
projection's output M [b*s, N] (compiler/merge_linears.py): per head group i, the columns
[col_i, col_i + H_i * d) as [b, H_i, s, d], and for q and k the rotary embedding

    rope(X) = X * C + concat(-X[..., d/2:], X[..., :d/2]) * S       C, S: [b|1, 1, s, d]

(times the attention's scale on q, where the exporter put one there). TVM fuses each chain into a
kernel of its own: three small launches per layer in a decode step. Here one block per (token, head
of any group) and one thread per rotation pair (t, t + d/2), so a thread reads both elements it needs
once and writes both outputs. The arithmetic is the graph's, op for op in the graph's dtype (fp16
products and sums rounded as the unfused kernels round them), so the outputs are the same numbers.
"""
from __future__ import annotations

from string import Template

from .template import GRID_WAIT

QKV_ROPE = "qkv_rope"  # the "nibble.kernel" tag of these kernels

_KERNEL = Template('''
@T.prim_func
def qkv_rope(m_h: T.handle, c_h: T.handle, s_h: T.handle, $OUT_PARAMS):
    T.func_attr({"tirx.noalias": True})
    b = T.int64()
    s = T.int64()
    r = T.int64()
    cb = T.int64()
    src = T.match_buffer(m_h, (r, T.int64($N)), "$MD")
    cos = T.match_buffer(c_h, (cb, T.int64(1), s, T.int64($D)), "$CD")
    sin = T.match_buffer(s_h, (cb, T.int64(1), s, T.int64($D)), "$CD")
$OUT_BUFFERS
    for row in T.thread_binding(b * s, thread="blockIdx.x"):
        for slot in T.thread_binding($SLOTS, thread="blockIdx.y"):
            for t in T.thread_binding($HALF, thread="threadIdx.x"):
                ix = T.alloc_buffer((3,), "int64", scope="local")
                ix[0] = row // s  # the batch index, its row of C and S, the token: one division per thread
                ix[1] = T.min(ix[0], cb - T.int64(1))
                ix[2] = row % s
                $WAIT
$PIECES''')

# One head group: slots [LO, LO + H) of blockIdx.y are its heads. $-fields as in _KERNEL plus I (output
# index), LO, H, COL (first column in M), XD (the chain's dtype), and BODY.
_PIECE = Template('''
                if slot >= $LO and slot < $LO + $H:
                    a = T.meta_var(T.Cast("$XD", src[row, $COL + (slot - $LO) * $D + t]))
                    z = T.meta_var(T.Cast("$XD", src[row, $COL + (slot - $LO) * $D + t + $HALF]))
$BODY''')
# the plain copy (V) and the rotation (Q, K)
_COPY = '''                    o$I[ix[0], slot - $LO, ix[2], t] = a
                    o$I[ix[0], slot - $LO, ix[2], t + $HALF] = z'''
_ROTATE = '''                    o$I[ix[0], slot - $LO, ix[2], t] = $SCALE_L(
                        a * cos[ix[1], 0, ix[2], t] + (T.$XD(0) - z) * sin[ix[1], 0, ix[2], t])$SCALE_R
                    o$I[ix[0], slot - $LO, ix[2], t + $HALF] = $SCALE_L(
                        z * cos[ix[1], 0, ix[2], t + $HALF] + a * sin[ix[1], 0, ix[2], t + $HALF])$SCALE_R'''


def qkv_rope_func(n: int, head_dim: int, m_dtype: str, cs_dtype: str, pieces: list):
    """The kernel PrimFunc: params (M [r, n], C, S [cb, 1, s, d], then one [b, H, s, d] output per piece).

    pieces: dicts with "col" (first column in M), "heads", "dtype" (the chain's and the output's),
    "rope" (bool) and "scale" (a multiplier after the rotation, or None). None for an odd head dim."""
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the template's T)

    if head_dim % 2:
        return None
    half = head_dim // 2
    params, buffers, bodies, lo = [], [], [], 0
    for i, p in enumerate(pieces):
        params.append(f"o{i}_h: T.handle")
        buffers.append(f'    o{i} = T.match_buffer(o{i}_h, (b, T.int64({p["heads"]}), s, T.int64({head_dim})), '
                       f'"{p["dtype"]}")')
        scale = p.get("scale")
        fields = dict(I=i, LO=lo, H=p["heads"], COL=p["col"], D=head_dim, HALF=half, XD=p["dtype"],
                      SCALE_L="(" if scale is not None else "",
                      SCALE_R=f') * T.{p["dtype"]}({float(scale)!r})' if scale is not None else "")
        body = Template(_ROTATE if p["rope"] else _COPY).substitute(fields)
        bodies.append(_PIECE.substitute(fields, BODY=body))
        lo += p["heads"]
    src = _KERNEL.substitute(OUT_PARAMS=", ".join(params), OUT_BUFFERS="\n".join(buffers), N=n, D=head_dim,
                             MD=m_dtype, CD=cs_dtype, SLOTS=lo, HALF=half, WAIT=GRID_WAIT,
                             PIECES="\n".join(bodies))
    return tvm.script.from_source(src)
