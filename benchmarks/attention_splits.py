"""Decode attention's split variant (schedules/attention.py Config.splits / warps) against the one-block kernel.

    python benchmarks/attention_splits.py [--out DIR]

The same torch-SDPA ONNX model as bench_attention.py (32 heads x 128, fp16, batch 1, one query row, a
quarter of the keys masked), compiled once per variant with compiler.fuse_attention's SPLIT / SPLIT_FROM
patched so the variant runs at every T (`base`: the one-block kernel at every T). GPU us per call from
torch.profiler, the combine kernel included; each output is checked against `base`'s (rel. difference).
This set schedules/attention.py's SPLIT and SPLIT_FROM. Writes attention_splits.json to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LENGTHS = (128, 256, 384, 512, 768, 1024, 2048, 4096)
VARIANTS = {f"s{s}w{w}": (s, w) for s, w in ((2, 4), (4, 2), (4, 4), (4, 8), (8, 1), (8, 2), (8, 4), (16, 4))}


def main():
    import torch

    import compiler.fuse_attention as fa
    import nibble
    from bench_attention import DIM, HEADS, decode_inputs, gpu_us
    from schedules.attention import Config
    from tests import models

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    work = ROOT / ".bench" / "attention_splits"
    work.mkdir(parents=True, exist_ok=True)
    models.onnx_sdpa(work / "sdpa.onnx", heads=HEADS, head_dim=DIM)
    keep, loaded = (fa.SPLIT_FROM, fa.SPLIT), {}
    variants = {"base": (1 << 30, fa.SPLIT)} | {n: (0, Config(warps=w, splits=s)) for n, (s, w) in VARIANTS.items()}
    for name, (sf, cfg) in variants.items():
        fa.SPLIT_FROM, fa.SPLIT = sf, cfg
        try:
            loaded[name] = nibble.load(nibble.compile_model(work / "sdpa.onnx", target="cuda",
                                                            output=work / f"{name}.nibble", log=lambda *a: None))
        finally:
            fa.SPLIT_FROM, fa.SPLIT = keep
    rows = []
    for t in LENGTHS:
        q, k, v, mask = decode_inputs(t)
        ref = loaded["base"](q=q, k=k, v=v, mask=mask).float()
        row = {"T": t}
        for name, m in loaded.items():
            out = m(q=q, k=k, v=v, mask=mask).float()
            row[name] = {"us": gpu_us(lambda m=m: m(q=q, k=k, v=v, mask=mask)),
                         "diff": float((out - ref).norm() / ref.norm())}
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        row["torch_sdpa"] = {"us": gpu_us(sdpa)}
        rows.append(row)
        print(t, {n: round(r["us"], 2) for n, r in row.items() if n != "T"}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_splits.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                           "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
