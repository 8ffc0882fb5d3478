"""The int4 quantizer against a plain per-element numpy reference, bit for bit."""
import math

import numpy as np
import pytest

from compiler.quantize import QuantConfig, dequantize, pack_int4, quantize, quantized_bytes, unpack_int4


def reference_quantize(w, group, symmetric):
    """Loops over rows and groups; the definition in compiler/quantize.py's docstring, written plainly."""
    n, k = w.shape
    g = k if group == -1 else group
    ng = math.ceil(k / g)
    q = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, ng), np.float16)
    zeros = np.zeros((n, ng), np.float16)
    for r in range(n):
        for gi in range(ng):
            seg = w[r, gi * g:(gi + 1) * g].astype(np.float32)
            if symmetric:
                s = np.float16(np.max(np.abs(seg)) / np.float32(7.0))
                s32 = np.float32(s) if s != 0 else np.float32(1.0)
                q[r, gi * g:gi * g + len(seg)] = np.clip(np.round(seg / s32), -8, 7) + 8
            else:
                lo, hi = min(seg.min(), np.float32(0)), max(seg.max(), np.float32(0))
                s = np.float16((hi - lo) / np.float32(15.0))
                s32 = np.float32(s) if s != 0 else np.float32(1.0)
                z = np.clip(np.round(-lo / s32), 0, 15)
                zeros[r, gi] = z
                q[r, gi * g:gi * g + len(seg)] = np.clip(np.round(seg / s32) + np.float32(z), 0, 15)
            scales[r, gi] = s
    return q, scales, zeros


@pytest.mark.parametrize("n,k", [(8, 8), (3, 100), (16, 256), (5, 37)])
def test_pack_unpack_round_trip(n, k):
    rng = np.random.default_rng(k)
    nib = rng.integers(0, 16, (n, k), dtype=np.uint8)
    packed = pack_int4(nib)
    assert packed.dtype == np.uint32 and packed.shape == (n, math.ceil(k / 8))
    assert np.array_equal(unpack_int4(packed, k), nib)
    # documented nibble order: column 8w + j sits in bits 4j..4j+3 of word w
    assert (packed[0, 0] >> 4) & 0xF == nib[0, 1]


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [256, 200])  # 200: the last group is partial for every group size
def test_quantize_matches_reference_bit_for_bit(group, symmetric, k):
    rng = np.random.default_rng(group + k)
    w = rng.standard_normal((12, k)).astype(np.float32) * rng.uniform(0.01, 3, (12, 1)).astype(np.float32)
    w[0, :40] = 0  # an all-zero group
    cfg = QuantConfig(group, symmetric)
    parts = quantize(w, cfg)
    q, s, z = reference_quantize(w, group, symmetric)
    assert np.array_equal(unpack_int4(parts["qweight"], k), q)
    assert np.array_equal(parts["scales"].view(np.uint16), s.view(np.uint16))
    if not symmetric:
        assert np.array_equal(parts["zeros"], z)
    else:
        assert "zeros" not in parts
    # and the error is what int4 can give: at most half a step per element
    deq = dequantize(parts, k, cfg)
    g = k if group == -1 else group
    step = np.repeat(parts["scales"].astype(np.float32), g, axis=1)[:, :k]
    assert np.all(np.abs(deq - w) <= step * 0.5 + 1e-3 * step + 1e-6)


def test_quantized_bytes_counts_scales():
    assert quantized_bytes(4096, 4096, QuantConfig(128)) == 4096 * 4096 // 2 + 4096 * 32 * 2
    assert quantized_bytes(10, 100, QuantConfig(32, symmetric=False)) == 10 * 13 * 4 + 10 * 4 * 4


@pytest.mark.parametrize("bad", [dict(group_size=0), dict(group_size=12), dict(bits=8)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        QuantConfig(**bad)
