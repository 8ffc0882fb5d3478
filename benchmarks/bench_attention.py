"""Decode attention on the GPU: nibble's fused kernel (schedules/attention.py) against the exported op
chain it replaces (TVM's stock kernels) and torch's scaled_dot_product_attention, same inputs.

Llama-2-7B attention (32 heads, head dim 128, fp16 cache), batch 1, one query row, cache lengths T.
The model is torch SDPA with a boolean mask exported to ONNX (tests/models.py onnx_sdpa), compiled
twice: fused (default) and with compiler.fuse_attention.DECODE_ROWS = 0 (the chain everywhere).
GPU time per call is summed over the call's kernels from torch.profiler (host launch time excluded:
decode runs from a CUDA graph); the floor is K + V bytes at the copy bandwidth measured here.
Then prefill: s = T query rows under a causal mask, the chain against the fused kernel forced at every
row count (a third compile) and torch SDPA, to show whether prefill should take the kernel too.
Writes benchmarks/results/h200_attention.{json,md}.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS, DIM = 32, 128
LENGTHS = (128, 256, 1024, 4096)
PREFILL = (200, 1024)  # causal prompts: s = T


def gpu_us(fn, steps=20):
    """Median over steps of the summed device time of fn's kernels (us)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        per.append(sum(e.device_time_total for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA))
    per.sort()
    return per[len(per) // 2]


def decode_inputs(t: int):
    """q [1, H, 1, D], K and V [1, H, t, D] fp16 (seeded by t) and a [1, 1, 1, t] mask with its first
    quarter masked (left padding, as the padded decode cache has)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(1, HEADS, 1, DIM, dtype=torch.float16, device="cuda", generator=g)
    k = torch.randn(1, HEADS, t, DIM, dtype=torch.float16, device="cuda", generator=g)
    v = torch.randn(1, HEADS, t, DIM, dtype=torch.float16, device="cuda", generator=g)
    mask = torch.ones(1, 1, 1, t, dtype=torch.bool, device="cuda")
    mask[..., : t // 4] = False
    return q, k, v, mask


def copy_gbps():
    import torch

    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 2 * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def measure(q, k, v, mask, fused, chain, causal: bool = False) -> dict:
    """{name: {"us", "rel_err"}} of the two compiled models and torch SDPA against float64; SDPA gets
    the mask, or is_causal=True (its flash kernel) where the mask is the causal one."""
    import numpy as np
    import torch

    from tests import models

    ref = models.sdpa_reference(q.cpu().numpy(), k.cpu().numpy(), v.cpu().numpy(), mask.cpu().numpy())
    err = lambda y: float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    out = {}
    for name, m in (("nibble_fused", fused), ("tvm_chain", chain)):
        out[name] = {"us": gpu_us(lambda: m(q=q, k=k, v=v, mask=mask)),
                     "rel_err": err(m(q=q, k=k, v=v, mask=mask).cpu().numpy())}
    kw = {"is_causal": True} if causal else {"attn_mask": mask}
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    out["torch_sdpa"] = {"us": gpu_us(sdpa), "rel_err": err(sdpa().float().cpu().numpy())}
    return out


def main():
    import torch

    import compiler.fuse_attention as fa
    import nibble
    from tests import models

    work = ROOT / ".bench" / "attention"
    work.mkdir(parents=True, exist_ok=True)
    models.onnx_sdpa(work / "sdpa.onnx", heads=HEADS, head_dim=DIM)
    fused = nibble.load(nibble.compile_model(work / "sdpa.onnx", target="cuda", output=work / "fused.nibble"))
    default, fa.DECODE_ROWS = fa.DECODE_ROWS, 0
    try:
        chain = nibble.load(nibble.compile_model(work / "sdpa.onnx", target="cuda", output=work / "chain.nibble"))
        fa.DECODE_ROWS = 1 << 20  # the fused kernel at every row count: is it worth it for prefill?
        fused_all = nibble.load(nibble.compile_model(work / "sdpa.onnx", target="cuda", output=work / "all.nibble"))
    finally:
        fa.DECODE_ROWS = default
    bw = copy_gbps()
    rows = []
    for t in LENGTHS:
        q, k, v, mask = decode_inputs(t)
        out = measure(q, k, v, mask, fused, chain)
        floor_us = 2 * k.numel() * 2 / (bw * 1e3)
        rows.append({"T": t, "floor_us": floor_us, **out})
        print(f"T={t:5d}  floor {floor_us:6.2f} us  " + "  ".join(
            f"{n} {r['us']:7.2f} us ({r['us'] / floor_us:4.1f}x floor, err {r['rel_err']:.1e})" for n, r in out.items()),
            flush=True)
    prefill = []
    for t in PREFILL:  # a causal prompt: s = T rows, row i sees keys 0..i
        g = torch.Generator(device="cuda").manual_seed(t)
        q, k, v = (torch.randn(1, HEADS, t, DIM, dtype=torch.float16, device="cuda", generator=g) for _ in range(3))
        mask = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()[None, None]
        out = measure(q, k, v, mask, fused_all, chain, causal=True)
        prefill.append({"T": t, **out})
        print(f"prefill s=T={t:5d}  " + "  ".join(f"{n} {r['us']:8.2f} us (err {r['rel_err']:.1e})"
                                             for n, r in out.items()), flush=True)
    res = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "versions": f"python {platform.python_version()}, torch {torch.__version__}", "copy_GBps": bw,
           "heads": HEADS, "head_dim": DIM, "rows": rows, "prefill": prefill}
    out_dir = ROOT / "benchmarks" / "results"
    (out_dir / "h200_attention.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Decode attention, {HEADS} heads x {DIM}, batch 1, one query row", "",
             f"{res['device']}; {res['versions']}; {res['date']}; copy {bw:.0f} GB/s", "",
             "GPU us per call (kernels summed, torch.profiler); x = times the K+V read floor", "",
             "| T | floor us | nibble fused | TVM op chain | torch SDPA |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['floor_us']:.2f} | " + " | ".join(
            f"{r[n]['us']:.2f} ({r[n]['us'] / r['floor_us']:.1f}x)" for n in ("nibble_fused", "tvm_chain", "torch_sdpa"))
            + " |")
    lines += ["", f"Prefill: s = T query rows with a causal mask, GPU us per call (nibble fused: the kernel forced"
              " at every row count, which compiler.fuse_attention.DECODE_ROWS does not do by default)", "",
              "| s = T | nibble fused | TVM op chain | torch SDPA (flash) |", "|---|---|---|---|"]
    for r in prefill:
        lines.append(f"| {r['T']} | " + " | ".join(f"{r[n]['us']:.1f}" for n in ("nibble_fused", "tvm_chain", "torch_sdpa"))
                     + " |")
    (out_dir / "h200_attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
