"""Group-wise int4 weight quantization, done offline in numpy.

Layout (what the fused kernel in compiler/int4_kernel.py reads):

    weight  W[N, K] float            N = out features, K = in features (the reduction dim)
    qweight uint32 [N, ceil(K / 8)]  8 nibbles per word along K; nibble j of word w is column 8*w + j,
                                     stored in bits 4*j .. 4*j+3 (little-endian nibble order)
    scales  float16 [N, ceil(K / G)] one per group of G consecutive columns of a row
    zeros   float16 [N, ceil(K / G)] asymmetric only; integers 0..15 stored exactly in fp16

    symmetric:   q = clip(round(W / s), -8, 7) stored as q + 8,  s = max|W_group| / 7
                 W ~= (nibble - 8) * s
    asymmetric:  s = (max - min) / 15, z = clip(round(-min / s), 0, 15), q = clip(round(W / s) + z, 0, 15)
                 W ~= (nibble - z) * s

K not divisible by G: the last group is partial (it covers the K % G leftover columns; its scale is
computed over those columns only). K not divisible by 8: the last word is padded with nibbles that the
kernel never reads (its reduction stops at K). So no activation padding is ever needed.
Rounding is numpy's round-half-to-even, done in float32; scales are rounded to fp16 *before* the
weights are divided by them, so dequantization with the stored fp16 scale is exactly what was rounded.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme as data (cf. MLC-LLM's quantization schemes)."""

    group_size: int = 128  # columns of K per scale; -1 = per output channel (one group of K)
    symmetric: bool = True  # False: fp16 zero point per group
    bits: int = 4  # only 4 is implemented; kept so manifests say what they hold

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError(f"only 4-bit weights are supported, got bits={self.bits}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8 or -1 (per-channel), "
                             f"got {self.group_size}")

    def group(self, k: int) -> int:
        """The group size used for a reduction dim of length k."""
        return k if self.group_size == -1 else self.group_size

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def pack_int4(nibbles: np.ndarray) -> np.ndarray:
    """[N, K] integers in 0..15 -> uint32 [N, ceil(K/8)] (nibble j of a word = column 8w+j)."""
    n, k = nibbles.shape
    if nibbles.min(initial=0) < 0 or nibbles.max(initial=0) > 15:
        raise ValueError("pack_int4 takes values in 0..15")
    kp = -(-k // 8) * 8
    padded = np.zeros((n, kp), dtype=np.uint32)
    padded[:, :k] = nibbles
    padded = padded.reshape(n, kp // 8, 8)
    out = padded[:, :, 0].copy()
    for j in range(1, 8):
        out |= padded[:, :, j] << np.uint32(4 * j)
    return out


def unpack_int4(packed: np.ndarray, k: int) -> np.ndarray:
    """uint32 [N, ceil(K/8)] -> uint8 [N, K] nibbles; inverse of pack_int4."""
    shifts = (np.arange(8, dtype=np.uint32) * 4)
    nib = (packed[:, :, None] >> shifts) & np.uint32(0xF)
    return nib.reshape(packed.shape[0], -1)[:, :k].astype(np.uint8)


def _group_view(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad K up to a multiple of g with NaN and view as [N, groups, g]; NaNs mark absent columns
    (absent is None when K is a multiple of g)."""
    n, k = w.shape
    ng = math.ceil(k / g)
    if k == ng * g:  # whole groups (the usual case): no padding, nothing absent
        return w.reshape(n, ng, g), None
    padded = np.full((n, ng * g), np.nan, dtype=np.float32)
    padded[:, :k] = w
    return padded.reshape(n, ng, g), np.isnan(padded.reshape(n, ng, g))


_ROWS_PER_TASK = 256  # rows of W per thread task: big weights are quantized by all cores


def quantize(w: np.ndarray, cfg: QuantConfig) -> dict[str, np.ndarray]:
    """W[N, K] -> {"qweight", "scales"[, "zeros"]} in the layout documented above."""
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [N, K] weight, got shape {w.shape}")
    n, k = w.shape
    if n <= _ROWS_PER_TASK or n * k < 1 << 22:
        return _quantize_rows(w, cfg)
    # rows are independent and numpy releases the GIL in its loops: threads give ~#cores speedup
    # (a Llama-2-7B export has 13 GB of weights); the result is the same as in one piece
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor() as pool:
        parts = list(pool.map(lambda r: _quantize_rows(w[r:r + _ROWS_PER_TASK], cfg),
                              range(0, n, _ROWS_PER_TASK)))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _quantize_rows(w: np.ndarray, cfg: QuantConfig) -> dict[str, np.ndarray]:
    n, k = w.shape
    g = cfg.group(k)
    wg, absent = _group_view(np.asarray(w, dtype=np.float32), g)
    vmax, vmin = (np.max, np.min) if absent is None else (np.nanmax, np.nanmin)
    with np.errstate(all="ignore"):
        if cfg.symmetric:
            amax = vmax(np.abs(wg), axis=2)
            scale = (amax / 7.0).astype(np.float16)
            s32 = scale.astype(np.float32)
            s32[s32 == 0] = 1.0  # an all-zero group: any scale gives q = 0
            q = np.clip(np.round(wg / s32[:, :, None]), -8, 7) + 8
            zeros = None
        else:
            lo = np.minimum(vmin(wg, axis=2), 0.0)  # the range always holds 0, so 0 is exact
            hi = np.maximum(vmax(wg, axis=2), 0.0)
            scale = ((hi - lo) / 15.0).astype(np.float16)
            s32 = scale.astype(np.float32)
            s32[s32 == 0] = 1.0
            zeros = np.clip(np.round(-lo / s32), 0, 15).astype(np.float16)
            q = np.clip(np.round(wg / s32[:, :, None]) + zeros.astype(np.float32)[:, :, None], 0, 15)
    if absent is not None:
        q = np.where(absent, 0, q)
    q = q.reshape(n, -1)[:, :k].astype(np.uint8)
    out = {"qweight": pack_int4(q), "scales": scale}
    if zeros is not None:
        out["zeros"] = zeros
    return out


def dequantize(parts: dict[str, np.ndarray], k: int, cfg: QuantConfig) -> np.ndarray:
    """The fp32 weight W[N, K] that the kernel multiplies by (fp16 scale * integer, exact in fp32)."""
    q = unpack_int4(parts["qweight"], k).astype(np.float32)
    g = cfg.group(k)
    cols = np.arange(k) // g
    s = parts["scales"].astype(np.float32)[:, cols]
    z = parts["zeros"].astype(np.float32)[:, cols] if "zeros" in parts else 8.0
    return (q - z) * s


def quantized_bytes(n: int, k: int, cfg: QuantConfig) -> int:
    """Bytes of the int4 weight plus its scales (and zeros)."""
    groups = math.ceil(k / cfg.group(k))
    return n * math.ceil(k / 8) * 4 + n * groups * 2 * (1 if cfg.symmetric else 2)
