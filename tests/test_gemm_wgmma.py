"""schedules/gemm_wgmma.py: the Hopper wgmma GEMM (int4 weight as the A operand, from registers). CUDA
code for sm_90a is built here without a GPU; numerics need one (the `gpu` test)."""
import numpy as np
import pytest

from compiler.dispatch import KERNEL_ATTR
from compiler.int4_kernel import ATTR
from compiler.quantize import QuantConfig, dequantize, quantize
from tests.test_gemv import _build, _target, tagged_copy


def _copy(n, k, cfg=QuantConfig(), bias=False, **config):
    return tagged_copy("wgmma", n, k, None, cfg, bias, **config)


def test_takes_only_what_it_tiles():
    from schedules.gemm_wgmma import Config, takes

    spec = lambda n, k, g=128, xd="float16": {"n": n, "k": k, "group_size": g, "x_dtype": xd}  # noqa: E731
    assert takes(spec(4096, 11008), "sm_90") and takes(spec(22016, 4096), "sm_90")
    assert not takes(spec(4096, 4096), "sm_80")  # wgmma is sm_90a-only
    assert not takes(spec(4096, 4096, g=32), "sm_90")  # a 64-k ring stage must lie in one group
    assert not takes(spec(4096, 4032), "sm_90")  # k % 128: the pipeline runs 64-k blocks in pairs
    assert takes(spec(4160, 4096), "sm_90") and not takes(spec(4160, 4096), "sm_90", Config())  # 4160 % 128
    assert not takes(spec(4096 + 32, 4096), "sm_90")  # whole 64-row warpgroup tiles
    assert not takes(spec(4096, 4096, xd="float32"), "sm_90")
    assert Config(tokens=100).check() and Config(tokens=264).check() and Config(stages=2).check()
    assert Config(tokens=24).check() and Config(split_k=0).check()  # the epilogue stores 16 tokens at a time
    for bad in (24, 512):  # TMA x boxes: whole 1 KiB swizzle atoms, at most 256 rows
        assert "x_rows must be a multiple of 16 up to 256" in Config(x_rows=bad).check()
    assert Config(x_rows=24, tma=False).check() is None  # cp.async staging has no boxes
    assert "split_k must be 1" in Config(stream_k=1, split_k=2).check()  # stream-K splits K itself
    assert "stream_k (blocks per SM) must be 0..7" in Config(stream_k=8).check()
    assert Config(tokens=128, warpgroups=1, stream_k=3).label() == "t128w1m1s4sk3"
    assert Config(tokens=208, x_rows=32).x_box == 16 and Config(x_rows=64).x_box == 64  # boxes stay in the tile
    assert takes(spec(4096, 512), "sm_90", Config(split_k=2)) and not takes(spec(4096, 512), "sm_90", Config(split_k=4))


def test_default_tile_by_bucket_and_n():
    """N <= 4096 takes 128-row tiles with K split so that the grid at m = R holds about one block per SM
    (at least the table's split: 4 to m = 256); wider N 64-row tiles, split 2 at m <= 32, unsplit to
    m = 256; the unbounded copy the 256-token x 128-row tile; a shape the default's rows do not divide
    falls back to one warpgroup."""
    from schedules.gemm_wgmma import Config, default_config

    def cfg(n, rows=None, k=4096):
        return default_config(_target(), tagged_copy("wgmma", n, k, rows))

    assert cfg(4096, 64) == Config(tokens=64, split_k=4)  # 32 blocks of 128 rows
    assert cfg(4096, 128) == Config(tokens=128, split_k=4) and cfg(4096, 256) == Config(tokens=128, split_k=4)
    assert cfg(12288, 32) == Config(tokens=32, warpgroups=1, split_k=2)  # the table's floor over the rule's 1
    assert cfg(12288, 64) == Config(tokens=64, warpgroups=1) and cfg(4096, 200) == Config(tokens=128, split_k=4)
    assert cfg(22016, 256) == cfg(22016, 200) == Config(stream_k=1)  # one block per SM: no split rule
    assert cfg(12288, 200) == Config()  # 96 blocks: one wave
    assert cfg(12288, 128) == cfg(22016, 128) == Config(tokens=128)  # 96 / 172 blocks: unsplit
    assert cfg(4096, 1024) == Config(tokens=128) and cfg(22016, 1024) == Config()
    assert cfg(4096) == cfg(22016) == Config()
    assert cfg(4096, 64, k=384) == Config(tokens=64)  # 3 pairs of 64-k blocks: too short to split 4 ways
    assert cfg(4160) == Config(warpgroups=1)  # 4160 % 128 != 0


@pytest.mark.parametrize("n", [256, 4096, 11008, 12288, 22016, 32000])
def test_no_bounded_copy_has_a_token_tile_wider_than_its_bound(n):
    """No bounded copy's default token tile is wider than the copy's bound R: the 65-128-token copy ran the
    129-256 bucket's 256-token tiles, half padding, 1.16-1.27x slower (h200_wgmma_128.md)."""
    from compiler.dispatch import ROUTES
    from schedules.gemm_wgmma import default_config

    for rows in [r for r, kind in ROUTES if kind == "wgmma" and r is not None]:
        c = default_config(_target(), tagged_copy("wgmma", n, 4096, rows))
        assert c.tokens <= rows, (rows, c)


@pytest.mark.parametrize("n,k,cfg,bias,config", [
    (256, 4096, QuantConfig(), False, {}),
    (128, 512, QuantConfig(64, symmetric=False), True, {"tokens": 208, "warpgroups": 1, "stages": 3}),
    (128, 1024, QuantConfig(), True, {"tokens": 64, "warpgroups": 1, "split_k": 2}),
    (256, 1024, QuantConfig(), False, {"tma": False}),
    (256, 1024, QuantConfig(), True, {"tokens": 128, "stream_k": 1}),
])
def test_rule_emits_wgmma_kernel(n, k, cfg, bias, config):
    import tvm

    from schedules.gemm_wgmma import GEMMWGMMA

    func = _copy(n, k, cfg, bias, **config)
    sch = GEMMWGMMA().apply(func, _target(), False)
    assert sch is not None and sch.mod["main"].attrs[KERNEL_ATTR] == "wgmma"
    assert sch.mod["main"].attrs[ATTR]["n"] == n  # the spec attrs survive for dispatch/tuning/inspect
    _, src = _build({"k": func})
    n_tok = config.get("tokens", 256)
    assert f"wgmma.mma_async.sync.aligned.m64n{n_tok}k16.f32.f16.f16" in src  # built for sm_90a by nvcc
    assert "cp.async.cg.shared.global" in src and "fence.proxy.async.shared::cta" in src
    # TMA: x (two box sizes) and W tensor maps encoded on the host, passed as kernel parameters
    assert src.count("__grid_constant__ CUtensorMap") == (6 if config.get("tma", True) else 0)  # decl + def
    split = config.get("split_k", 1) > 1  # fp32 partials over blockIdx.z, then the reduction kernel
    assert ("stmatrix.sync.aligned.m8n8.x4.trans" in src) != split and ("blockIdx.z" in src) == split
    # stream-K: a grid of one block per SM (132 on the H200) after a one-block kernel zeroing its flags
    sk = config.get("stream_k", False)
    assert ("constexpr int SKP = 132;" in src) == sk and ("__launch_bounds__(133)" in src) == sk
    assert GEMMWGMMA().apply(func, tvm.target.Target("llvm"), False) is None
    assert GEMMWGMMA().apply(func.with_attr({KERNEL_ATTR: "gemm"}), _target(), False) is None  # not ours
    sm80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert GEMMWGMMA().apply(func, sm80, False) is None


@pytest.mark.gpu
@pytest.mark.parametrize("k,cfg,bias,config", [
    (4096, QuantConfig(), False, {}),
    (1024, QuantConfig(128, symmetric=False), True, {}),
    (512, QuantConfig(64), True, {"tokens": 208, "warpgroups": 1, "stages": 3}),  # 6 token rows per lane
    (1024, QuantConfig(-1), False, {"tokens": 64, "warpgroups": 2, "stages": 5}),  # per-channel scales
    (1024, QuantConfig(128, symmetric=False), True, {"tokens": 128, "warpgroups": 2, "m_tiles": 2}),
    (4096, QuantConfig(), True, {"tokens": 128, "split_k": 4}),
    # slices of 3 / 3 / 2 pairs: the last two start inside a 256-k group (its scales loaded at the start)
    (1024, QuantConfig(256, symmetric=False), True, {"tokens": 64, "warpgroups": 1, "split_k": 3}),
    (1024, QuantConfig(128, symmetric=False), True, {"tma": False}),  # cp.async staging
    (1024, QuantConfig(), False, {"tokens": 128, "warpgroups": 1, "x_rows": 16}),  # up to 6 small x boxes
    (512, QuantConfig(), True, {"tokens": 16, "warpgroups": 4, "m_tiles": 2}),  # 512 W rows: two TMA boxes
    # stream-K: at m = 1 half the 132 blocks have no pairs, the rest one; at m = 600 tiles span 2 blocks
    (4096, QuantConfig(), False, {"stream_k": 1}),
    # 8 pairs per tile, ~2.4 per block: tiles finished from 3-4 blocks' partials
    (1024, QuantConfig(128, symmetric=False), True, {"tokens": 64, "warpgroups": 1, "stream_k": 1}),
    # pieces that start inside a 256-k group; cp.async staging across a block's pieces
    (1024, QuantConfig(256, symmetric=False), True, {"tokens": 208, "stream_k": 1}),
    (1024, QuantConfig(), True, {"tokens": 128, "tma": False, "stream_k": 1}),
    (1024, QuantConfig(), False, {"tokens": 64, "warpgroups": 1, "stream_k": 3}),  # 396 blocks, 3 per SM
])
def test_wgmma_numerics_on_gpu(k, cfg, bias, config):
    """m from 1 past several token tiles (partial last tiles: x in one box or in small ones, rows past m
    zero-filled, their outputs unstored) against numpy with the dequantized weights: rel. error <= 2e-3."""
    import tvm

    from schedules.gemm_wgmma import Config

    n = max(256, Config(**config).rows)
    rng = np.random.default_rng(0)
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, cfg)
    w = dequantize(parts, k, cfg)
    b = rng.standard_normal(n).astype(np.float16) if bias else None
    ex, _ = _build({"g": _copy(n, k, cfg, bias, **config)})
    dev = tvm.cuda(0)
    ws = [tvm.runtime.tensor(parts[p], device=dev) for p in ("qweight", "scales", "zeros") if p in parts]
    if bias:
        ws.append(tvm.runtime.tensor(b, device=dev))
    for m in (1, 7, 64, 200, 256, 257, 600):
        x = rng.standard_normal((m, k)).astype(np.float16)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float16), device=dev)
        ex["g"](tvm.runtime.tensor(x, device=dev), *ws, y)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b.astype(np.float64) if bias else 0)
        got = y.numpy().astype(np.float64)
        assert np.isfinite(got).all(), m
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= 2e-3, (m, err)


@pytest.mark.parametrize("config", ["t256w2m1s4cp", "t208w2m1s4sk"])
def test_ablation_edits_find_their_kernel_text(config):
    """benchmarks/wgmma_ablation.py removes parts of the kernel by editing its CUDA text: every edit must
    still find what it edits (else the ablation times the full kernel under another name)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import wgmma_ablation

    from schedules.gemm_wgmma import kernel_source

    cfg = wgmma_ablation.parse_config(config)
    assert cfg.label() == config
    _, src = kernel_source({"n": 4096, "k": 4096, "group_size": 128, "symmetric": True, "has_bias": False}, cfg)
    for name, edit in wgmma_ablation.ABLATIONS.items():
        if name != "full" and (cfg.stream_k or name not in ("no_fixup", "no_partial")):
            assert edit(src) != src, name
