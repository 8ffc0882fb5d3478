"""Decode attention: one fused CUDA kernel for softmax(q K^T * c + bias) V over a KV cache.

The pass compiler/fuse_attention.py routes a model's attention here when few query rows run (decode).
Exported decoders spell attention as ~10 ops (transpose K, scale it, matmul, cast, add mask, softmax,
NaN guard, cast V, matmul); TVM's stock kernels for them re-read and re-write the whole cache several
times (a Llama-2-7B decode step spent ~1.5 ms there, h200_generate.md). This kernel reads K and V once,
at their natural [b, h, T, d] layout, with fp32 math throughout:

  * one thread block per query row (b, h, i); WARPS warps each take 32 keys at a time, one key per
    lane: the lane loads its key's row in 16-byte vectors and dots it with q (fp32, in shared memory,
    read as broadcasts, which leaves the registers to the K and V rows).
  * each iteration issues all its loads before any math: the lane's key row, then the warp's 32 value
    rows (lane t owns dims [t*DL, t*DL + DL) of the output and reads those of each row: one 256-byte
    row per warp, coalesced). K and V are in flight together: one memory latency per iteration.
  * online softmax (flash-attention style) per warp: running max m and sum l, both warp-uniform
    (butterfly shuffles), the accumulator rescaled by exp(m_old - m_new) as keys arrive; then P V with
    the warp's 32 probabilities shuffled to every lane.
  * the warps' (m, l, acc) meet in shared memory; warp 0 combines them and writes the row.
  * long caches (fuse_attention dispatches past SPLIT_FROM keys): SPLIT blocks per row, each over a
    contiguous slice of the cache, leave their (m, l, acc) in a global workspace, and a second kernel
    (one warp per row) rescales them to the common max and sums them in a fixed order
    (flash-decoding). One block per row left the GPU mostly idle at T = 4096.
  * the cache as one tensor per K / V, or (two_source) as the cached part and the new one, walked by two
    loops that carry the running softmax across; the output as [b, h, s, d] or, out_layout "bshd", in
    token order [b, s, h, d] (compiler/fuse_attention.py picks both).
  * early_loads (the cached K/V are the entry's inputs): the first iteration's K and V loads go out
    before the kernel waits for the previous one (template.GRID_WAIT); in a decode graph with
    programmatic edges they overlap that kernel (H200, 16 layers: 0.04 ms a token, h200_generate.md).
Semantics match the exported graph's, including its NaN guard: a row whose keys are all masked
(bias -inf) gives 0, as where(isnan(softmax), 0, .) does (a chain without that guard would give NaN
there; the kernel gives 0 either way). Keys past T and masked keys get weight 0.
Tuning: `nibble tune` searches warps (and, for the split kernel, blocks per row) per kernel (SPACE,
SPLIT_SPACE); a record's config rebuilds the kernel from the arguments kept in its ARGS_ATTR (`rebuild`).
Limits: head dim a multiple of 32 (64, 128, 256); q and K/V heads equal (a GQA export repeats K/V
before attention, which the pass sees as a plain tensor).
"""
from __future__ import annotations

import dataclasses
from string import Template

from .template import GRID_WAIT, indent

ATTENTION = "attention"  # the "nibble.kernel" tag of these kernels


@dataclasses.dataclass(frozen=True)
class Config:
    warps: int = 8  # warps per block: 32 * warps keys per loop iteration
    splits: int = 1  # thread blocks per query row, each over a contiguous 1/splits of the cache


DEFAULT = Config()
# The long-cache variant (fuse_attention dispatches to it past SPLIT_FROM keys): 8 blocks per row, so
# 32 heads x 1 row make 256 blocks, and each walks 1/8 of the cache. H200, 32 heads x 128, GPU us per
# call with the combine kernel (h200_attention_splits.md): 8 blocks of 4 warps beat 16 of 4 at every T
# from 128 to 4096 (7.62 vs 9.12 at 512, 9.41 vs 10.98 at 1024, 25.66 vs 29.73 at 4096) and the one-block
# kernel from 384 (7.33 vs 9.31); at 256 they tie (7.23 vs 7.07), so up to 256 keys the one-block kernel runs.
SPLIT = Config(warps=4, splits=8)
SPLIT_FROM = 256  # keys (T) above which the split variant runs

# -- tuning (compiler/tuning.py): each kernel is rebuilt from its arguments (ARGS_ATTR) with the Config
VERSION = 1  # bump when the kernel changes meaning: tuning records of other versions are ignored
ARGS_ATTR = "nibble.attention"  # PrimFunc attr: attention_func's arguments, Config fields included
SPACE = {"warps": (2, 4, 8, 16), "splits": (1,)}  # the one-block kernel (T <= SPLIT_FROM)
SPLIT_SPACE = {"warps": (2, 4, 8, 16), "splits": (2, 4, 8, 16)}  # the split kernel (T > SPLIT_FROM)
# keys a candidate is timed at (its score: the sum): for the one-block kernel (1..256 keys) 64 and its
# bound; for the split kernel its first T and a 2048-token context
TUNE_KEYS = {False: (64, SPLIT_FROM), True: (SPLIT_FROM + 1, 2048)}
ROTATE = ("k", "v", "kp", "vp")  # the cache params: timed with copies rotated past the L2, like weights


def _args(func) -> dict:
    """attention_func's keyword arguments that built func (its ARGS_ATTR), as Python values."""
    py = lambda v: v.value if hasattr(v, "value") else str(v) if isinstance(v, str) else v  # noqa: E731
    a = func.attrs[ARGS_ATTR]
    return {"heads": int(a["heads"]), "head_dim": int(a["head_dim"]), "scale": float(a["scale"]),
            "dtypes": {str(k): str(v) for k, v in a["dtypes"].items()},
            "bias_dims": tuple(int(d) if not isinstance(d, str) else str(d) for d in map(py, a["bias_dims"])),
            "two_source": bool(a["two_source"]), "out_layout": str(a["out_layout"]),
            "early_loads": bool(a["early_loads"]), "cfg": Config(int(a["warps"]), int(a["splits"]))}


def is_split(func) -> bool:
    return _args(func)["cfg"].splits > 1


def space_for(func) -> dict:
    return SPLIT_SPACE if is_split(func) else SPACE


def default_config(target, func) -> Config:
    """The untuned Config of a kernel: the one it was built with by compiler/fuse_attention.py."""
    return _args(func)["cfg"]


def rebuild(func, config: dict, sizes: dict | None = None):
    """func built again with `config`'s Config fields, its attrs kept (sizes: see attention_func)."""
    args = _args(func)
    cfg = dataclasses.replace(args.pop("cfg"), **{k: v for k, v in config.items() if k in SPACE})
    new = attention_func(**args, cfg=cfg, sizes=sizes)
    keep = {k: v for k, v in func.attrs.items() if k != ARGS_ATTR}
    return new.with_attrs(keep) if keep else new


def sizes(keys: int) -> dict:
    """The symbolic dims at one decode step over `keys` keys: one sequence, one query row, one new entry."""
    return {"b": 1, "s": 1, "nn": 1, "np_": keys - 1, "n": keys}

_KERNEL = Template('''
@T.prim_func
def attention(q_h: T.handle, $KV_PARAMS, bias_h: T.handle, o_h: T.handle):
    T.func_attr({"tirx.noalias": True})
    b = T.int64()
    s = T.int64()
    q = T.match_buffer(q_h, (b, T.int64($H), s, T.int64($D)), "$QD")
$KV_BUFFERS
    bias = T.match_buffer(bias_h, ($BSHAPE, n), "$BD")
    o = T.match_buffer(o_h, $OSHAPE, "$OD")
$WORKSPACE
    for row in T.thread_binding(b * T.int64($H) * s, thread="blockIdx.x"):
        for sp in T.thread_binding($S, thread="blockIdx.y"):
            for ty in T.thread_binding($W, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    kr = T.alloc_buffer(($D,), "$KD", scope="local")
                    vr = T.alloc_buffer((32, $DL), "$KD", scope="local")
                    acc = T.alloc_buffer(($DL,), "float32", scope="local")
                    dot = T.alloc_buffer((4,), "float32", scope="local")
                    # st: 0 running max, 1 running sum, 2 this lane's score, 3 its weight, 4 new max, 5 scratch
                    st = T.alloc_buffer((6,), "float32", scope="local")
                    sm_q = T.alloc_buffer(($D,), "float32", scope="shared")
                    sm_m = T.alloc_buffer(($W,), "float32", scope="shared")
                    sm_l = T.alloc_buffer(($W,), "float32", scope="shared")
                    sm_o = T.alloc_buffer(($W, $D), "float32", scope="shared")
                    ix = T.alloc_buffer((4,), "int64", scope="local")
                    ix[0] = row // s  # b * H + h: one division per thread, not one per access
                    ix[1] = row % s
                    # this block's keys [ix[2], ix[3]): 1/S of the cache, in whole iterations of $KB
                    ix[2] = T.int64(sp) * ((n + T.int64($S * $KB - 1)) // T.int64($S * $KB) * T.int64($KB))
                    ix[3] = T.min(n, ix[2] + (n + T.int64($S * $KB - 1)) // T.int64($S * $KB) * T.int64($KB))
                    bi = T.meta_var(ix[0] // T.int64($H))
                    hi = T.meta_var(ix[0] % T.int64($H))
                    qi = T.meta_var(ix[1])
$PRELOAD
                    $WAIT
                    # q in shared memory (fp32), read back as broadcasts: registers go to K and V rows
                    if ty == 0:
                        for e in T.unroll($DL):
                            sm_q[tx * $DL + e] = T.Cast("float32", q[bi, hi, qi, tx * $DL + e])
                    for e in T.unroll($DL):
                        acc[e] = T.float32(0)
                    st[0] = T.float32("-inf")
                    st[1] = T.float32(0)
$LOOPS
                    for e in T.unroll($DL):
                        sm_o[ty, tx * $DL + e] = acc[e]
                    if tx == 0:
                        sm_m[ty] = st[0]
                        sm_l[ty] = st[1]
                    if ty == 0:
                        st[4] = T.float32("-inf")
                        for w in T.unroll($W):
                            st[4] = T.max(st[4], sm_m[w])
                        st[1] = T.float32(0)
                        for e in T.unroll($DL):
                            acc[e] = T.float32(0)
                        for w in T.unroll($W):
                            st[5] = T.if_then_else(sm_m[w] == T.float32("-inf"), T.float32(0), T.exp(sm_m[w] - st[4]))
                            st[1] = st[1] + sm_l[w] * st[5]
                            for e in T.unroll($DL):
                                acc[e] = acc[e] + sm_o[w, tx * $DL + e] * st[5]
$STORE
$COMBINE''')

# The cache as one tensor per K and V (n keys), or as two (two_source): the cached keys (np) and the new
# ones (nn) that the model's concat(past, new) would join; key j < np is past's row j, else new's j - np.
# Reading the two in place is what lets the new-key/value entry (compiler/new_kv_entry.py) drop the
# concat, which copied the whole cache every decode step.
_ONE = dict(
    KV_PARAMS="k_h: T.handle, v_h: T.handle",
    KV_BUFFERS='''    n = T.int64()
    k = T.match_buffer(k_h, (b, T.int64($H), n, T.int64($D)), "$KD")
    v = T.match_buffer(v_h, (b, T.int64($H), n, T.int64($D)), "$KD")''')
_TWO = dict(
    KV_PARAMS="kp_h: T.handle, kn_h: T.handle, vp_h: T.handle, vn_h: T.handle",
    KV_BUFFERS='''    np_ = T.int64()
    nn = T.int64()
    kp = T.match_buffer(kp_h, (b, T.int64($H), np_, T.int64($D)), "$KD")
    kn = T.match_buffer(kn_h, (b, T.int64($H), nn, T.int64($D)), "$KD")
    vp = T.match_buffer(vp_h, (b, T.int64($H), np_, T.int64($D)), "$KD")
    vn = T.match_buffer(vn_h, (b, T.int64($H), nn, T.int64($D)), "$KD")
    n = T.meta_var(np_ + nn)''')

# The walk over keys [LO, HI) of KBUF / VBUF (key j is row j - OFF): one source walks [ix[2], ix[3]) of
# k / v; two walk the cached keys of the block's range, then the new ones, with the running softmax
# carried across. (One loop reading either source by a per-row branch ran 3.5x slower on the H200:
# the branches kept the 32 value-row loads from going out together.)
_LOOP = Template('''                    for g in T.serial(($HI - $LO + T.int64($KB - 1)) // T.int64($KB)):
                        j = T.meta_var($LO + g * T.int64($KB) + T.Cast("int64", ty * 32 + tx))  # this lane's key
$LOADS
                        st[2] = T.float32("-inf")
                        if j < $HI:
                            for p in T.unroll(4):
                                dot[p] = T.float32(0)
                            for d in T.unroll($D):
                                dot[d % 4] = dot[d % 4] + sm_q[d] * T.Cast("float32", kr[d])
                            st[2] = (dot[0] + dot[1] + dot[2] + dot[3]) * T.float32($SCALE) + T.Cast(
                                "float32", bias[$BINDEX, j])
                        st[4] = st[2]
                        for f in T.unroll(5):
                            st[4] = T.max(st[4], T.tvm_warp_shuffle(
                                T.uint32(0xFFFFFFFF), st[4], T.bitwise_xor(tx, 16 >> f), 32, 32))
                        st[4] = T.max(st[4], st[0])
                        # all-masked so far (new max -inf): weights 0, nothing to rescale
                        st[5] = T.if_then_else(st[4] == T.float32("-inf"), T.float32(1), T.exp(st[0] - st[4]))
                        st[1] = st[1] * st[5]
                        for e in T.unroll($DL):
                            acc[e] = acc[e] * st[5]
                        st[3] = T.if_then_else(st[4] == T.float32("-inf"), T.float32(0), T.exp(st[2] - st[4]))
                        st[0] = st[4]
                        st[5] = st[3]
                        for f in T.unroll(5):
                            st[5] = st[5] + T.tvm_warp_shuffle(
                                T.uint32(0xFFFFFFFF), st[5], T.bitwise_xor(tx, 16 >> f), 32, 32)
                        st[1] = st[1] + st[5]
                        # P V: lane r's weight to every lane, times its value row
                        for r in T.unroll(32):
                            st[5] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), st[3], r, 32, 32)
                            for e in T.unroll($DL):
                                acc[e] = acc[e] + st[5] * T.Cast("float32", vr[r, e])''')
# The loads of iteration G of a walk (fields as in _LOOP): every load of the iteration first, this lane's
# key row, then the warp's 32 value rows (a key past the range reads its last row, weight 0): K and V in
# flight together. With early loads the first walk's iteration 0 is issued before the kernel waits for
# the previous one (its K and V are the entry's inputs, which no kernel of the call writes), and the
# loop issues its own loads from iteration 1 on.
_LOADS = Template('''
key = T.meta_var($LO + $G * T.int64($KB) + T.Cast("int64", ty * 32 + tx))  # this lane's key
if key < $HI:
    for c in T.unroll($D // $VK):
        for e in T.vectorized($VK):
            kr[c * $VK + e] = $KBUF[bi, hi, key - $OFF, c * $VK + e]
for r in T.unroll(32):
    for e in T.vectorized($DL):
        vr[r, e] = $VBUF[bi, hi, T.min($LO + $G * T.int64($KB) + T.Cast("int64", ty * 32 + r),
                                      $HI - T.int64(1)) - $OFF, tx * $DL + e]''')
_ONE_LOOPS = [dict(LO="ix[2]", HI="ix[3]", OFF="T.int64(0)", KBUF="k", VBUF="v")]
_TWO_LOOPS = [dict(LO="ix[2]", HI="T.min(ix[3], np_)", OFF="T.int64(0)", KBUF="kp", VBUF="vp"),
              dict(LO="T.max(ix[2], np_)", HI="ix[3]", OFF="np_", KBUF="kn", VBUF="vn")]

# one block: normalize and write the row
_STORE_ROW = '''
                        for e in T.unroll($DL):
                            o[$OINDEX, tx * $DL + e] = T.Cast("$OD", T.if_then_else(
                                st[1] > T.float32(0), acc[e] / st[1], T.float32(0)))'''
# splits: each block leaves its (max, sum, unnormalized acc) for the combine kernel
_STORE_PART = '''
                        for e in T.unroll($DL):
                            ws_o[row, sp, tx * $DL + e] = acc[e]
                        if tx == 0:
                            ws_ml[row, sp, 0] = st[4]
                            ws_ml[row, sp, 1] = st[1]'''
_WORKSPACE = '''
    ws_o = T.alloc_buffer((b * T.int64($H) * s, $S, $D), "float32", scope="global")
    ws_ml = T.alloc_buffer((b * T.int64($H) * s, $S, 2), "float32", scope="global")'''
# a second kernel, one warp per row: the splits' partials rescaled to the common max and summed in a
# fixed order (deterministic), then normalized as the one-block kernel does
_COMBINE = '''
    for row in T.thread_binding(b * T.int64($H) * s, thread="blockIdx.x"):
        for tx in T.thread_binding(32, thread="threadIdx.x"):
            acc = T.alloc_buffer(($DL,), "float32", scope="local")
            st = T.alloc_buffer((3,), "float32", scope="local")
            ix = T.alloc_buffer((2,), "int64", scope="local")
            ix[0] = row // s
            ix[1] = row % s
            $WAIT
            st[0] = T.float32("-inf")
            for i in T.unroll($S):
                st[0] = T.max(st[0], ws_ml[row, i, 0])
            st[1] = T.float32(0)
            for e in T.unroll($DL):
                acc[e] = T.float32(0)
            for i in T.unroll($S):
                st[2] = T.if_then_else(ws_ml[row, i, 0] == T.float32("-inf"), T.float32(0),
                                       T.exp(ws_ml[row, i, 0] - st[0]))
                st[1] = st[1] + ws_ml[row, i, 1] * st[2]
                for e in T.unroll($DL):
                    acc[e] = acc[e] + ws_o[row, i, tx * $DL + e] * st[2]
            for e in T.unroll($DL):
                o[$OINDEX_C, tx * $DL + e] = T.Cast("$OD", T.if_then_else(
                    st[1] > T.float32(0), acc[e] / st[1], T.float32(0)))'''


def attention_func(heads: int, head_dim: int, scale: float, dtypes: dict, bias_dims: tuple,
                   cfg: Config = DEFAULT, two_source: bool = False, out_layout: str = "bhsd",
                   early_loads: bool = False, sizes: dict | None = None):
    """The kernel PrimFunc, or None for a head dim it does not take. Its attr ARGS_ATTR records the
    arguments (the Config's fields among them), for the tuner to rebuild it with another Config.

    dtypes: {"q", "kv", "bias", "out"}; bias_dims: for the bias's first three dims, which broadcast:
    e.g. ("b", 1, "s") for a [b, 1, s, T] mask shared by all heads. cfg.splits > 1: the long-cache
    variant (blocks over slices of the cache, then a combine kernel). two_source: K and V each as
    (past, new), params (q, kp, kn, vp, vn, bias, o). out_layout "bshd": o is [b, s, h, d] (what the
    model's transpose back to tokens makes of [b, h, s, d]: compiler/fuse_attention.py folds it).
    early_loads: the first walk's first K/V loads go out before the wait for the previous kernel
    (griddepcontrol.wait): only where those tensors (K, or two_source's past K and V) are inputs of the
    entry that no kernel of the call writes. sizes ({"b": 1, ...}): these symbolic dims fixed, for the
    tuner's static workload (rebuild)."""
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the template's T)

    if head_dim % 32 or str(dtypes["kv"]) not in ("float16", "float32"):
        return None
    shape = {"b": "b", "h": f"T.int64({heads})", "s": "s", 1: "T.int64(1)"}
    index = {"b": "bi", "h": "hi", "s": "qi", 1: "T.int64(0)"}
    vk = 8 if str(dtypes["kv"]) == "float16" else 4  # 16-byte vectors
    split = cfg.splits > 1
    fields = dict(
        H=heads, D=head_dim, DL=head_dim // 32, VK=vk, W=cfg.warps, KB=32 * cfg.warps, S=cfg.splits,
        SCALE=repr(float(scale)), QD=dtypes["q"], KD=dtypes["kv"], BD=dtypes["bias"], OD=dtypes["out"],
        WAIT=GRID_WAIT, BSHAPE=", ".join(shape[d] for d in bias_dims), BINDEX=", ".join(index[d] for d in bias_dims))
    order = ("b", "s", "h") if out_layout == "bshd" else ("b", "h", "s")
    combine = {"b": f"ix[0] // T.int64({heads})", "h": f"ix[0] % T.int64({heads})", "s": "ix[1]"}  # _COMBINE's
    fields.update(OSHAPE=f"({', '.join(shape[d] for d in order)}, T.int64({head_dim}))",
                  OINDEX=", ".join(index[d] for d in order), OINDEX_C=", ".join(combine[d] for d in order))
    fill = lambda t: Template(t).substitute(fields) if t else ""
    kv = {key: fill(t) for key, t in (_TWO if two_source else _ONE).items()}
    loops = _TWO_LOOPS if two_source else _ONE_LOOPS
    walks = []
    for i, loop in enumerate(loops):
        body = _LOADS.substitute(fields, **loop, G="g")
        if early_loads and i == 0:  # iteration 0's loads were issued before the wait (PRELOAD)
            body = "if g > T.int64(0):\n" + indent(body, 4)
        walks.append(_LOOP.substitute(fields, **loop, LOADS=indent(body, 24)))
    kv["LOOPS"] = "\n".join(walks)
    first = loops[0]
    kv["PRELOAD"] = ""
    if early_loads:
        kv["PRELOAD"] = indent(f'if {first["HI"]} > {first["LO"]}:\n' + indent(
            _LOADS.substitute(fields, **first, G="T.int64(0)"), 4), 20)
    src = _KERNEL.substitute(fields, **kv, WORKSPACE=fill(_WORKSPACE if split else ""),
                             STORE=fill(_STORE_PART if split else _STORE_ROW), COMBINE=fill(_COMBINE if split else ""))
    for name, value in (sizes or {}).items():  # "b = T.int64()" -> a constant (meta_var: no let binding)
        src = src.replace(f"    {name} = T.int64()\n", f"    {name} = T.meta_var(T.int64({int(value)}))\n")
    args = {"heads": heads, "head_dim": head_dim, "scale": float(scale),
            "dtypes": {k: str(v) for k, v in dtypes.items()},
            "bias_dims": list(bias_dims), "two_source": two_source, "out_layout": out_layout,
            "early_loads": early_loads, "warps": cfg.warps, "splits": cfg.splits}
    return tvm.script.from_source(src).with_attr(ARGS_ATTR, args)
