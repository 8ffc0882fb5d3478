"""`nibble bench`: the int4 linear sweep on this machine's GPU, against cuBLAS fp16 and torch's int4
kernel in the same run, with a roofline PNG.

For each K -> N linear (default: Llama-2-7B's four, issue 3's sweep) nibble compiles an fp16
nn.Linear exactly as `nibble compile` would: int4 weights (group 128), one module whose token-count
dispatch runs the GEMV buckets, the split-K GEMMs and the large GEMM. Then for each token count M:

  nibble       the compiled module's main (the VM call: dispatch + kernel, as a model runs it)
  cuBLAS fp16  torch.matmul(x, W^T) with the fp16 weight
  torch int4   torch._weight_int4pack_mm (tinygemm) with the same integers and scales (bf16, as it needs)
  copy         a device copy moving the bytes nibble must move (read + write counted = qweight + scales
               + x + y): the memory floor, as benchmarks/bench_linear.py measures it

Each is timed by compiler.timing.graph_time (launches captured in one CUDA graph, median of replays)
over enough weight copies to exceed ROTATE_BYTES, so weights come from HBM, not the 60 MiB L2.
Reported: us, GB/s of weights + activations, TFLOP/s, nibble's time over the copy's, cuBLAS's time
over nibble's, and nibble's relative error against fp32 x @ dequantized W^T (fp32 accumulation
should keep it near 2e-4). Writes bench.json, bench.md and roofline.png to --out.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from compiler.errors import NibbleError

SHAPES = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))  # K -> N
MS = (1, 2, 4, 8, 16, 32, 200, 2048)
GROUP = 128
ROTATE_BYTES = 256 << 20  # weight copies per timed graph: > 4x an H200's L2
MAX_COPIES = 48


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x12288,11008x4096' -> [(K, N), ...]."""
    out = []
    for item in text.split(","):
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise NibbleError(f"--shapes: {item!r} is not KxN (e.g. 4096x12288)") from None
        if k <= 0 or n <= 0 or k % GROUP:
            raise NibbleError(f"--shapes: {item!r}: K and N must be positive and K a multiple of {GROUP}")
        out.append((k, n))
    return out


def parse_ms(text: str) -> list[int]:
    try:
        ms = [int(v) for v in text.split(",")]
    except ValueError:
        raise NibbleError(f"--ms: {text!r} is not a comma-separated list of token counts") from None
    if not ms or min(ms) < 1:
        raise NibbleError(f"--ms: token counts must be >= 1, got {text!r}")
    return ms


def _copies(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def device_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, fp16 matmul TFLOP/s) measured here: the roofline's ceilings."""
    import torch

    a = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    x = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    out = []
    for fn, work in ((lambda: b.copy_(a), 2 * a.numel() / 1e9), (lambda: x @ x, 2 * 8192 ** 3 / 1e12)):
        for _ in range(3):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            fn()
        e.record()
        e.synchronize()
        out.append(work * 10 / (s.elapsed_time(e) * 1e-3))
    return out[0], out[1]


def _compile_linear(k: int, n: int, out: Path, arch, log):
    """nibble's artifact for an fp16 nn.Linear(k, n) with seeded random weights; (model, fp16 W)."""
    import torch

    import nibble

    torch.manual_seed(k * 100003 + n)
    lin = torch.nn.Linear(k, n, bias=False).to(torch.float16)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
    t0 = time.perf_counter()
    art = nibble.compile_model(lin, (torch.zeros(2, k, dtype=torch.float16),), target="cuda", arch=arch,
                               output=out / f"linear_{k}x{n}.nibble", log=lambda *a: None)
    log(f"compiled {k}->{n} in {time.perf_counter() - t0:.0f} s")
    return nibble.load(art, device="cuda"), lin.weight.detach()


def tinygemm_weight(w, group: int = GROUP, device: str = "cuda"):
    """torch's int4 weight (torch._weight_int4pack_mm's packed ints, bf16 scales-and-zeros) for w [N, K]
    with the integers and scales nibble's quantizer gives it: the same int4 weights in torch's kernel.
    Raises where this torch has no such kernel."""
    import torch

    from compiler.quantize import QuantConfig, quantize, unpack_int4

    parts = quantize(w.detach().float().cpu().numpy(), QuantConfig(group_size=group))
    nib = torch.from_numpy(unpack_int4(parts["qweight"], w.shape[1]).astype("int32")).to(device)
    packed = torch._convert_weight_to_int4pack(((nib[:, ::2] << 4) | nib[:, 1::2]).to(torch.uint8), 8)
    s = torch.from_numpy(parts["scales"]).to(device).to(torch.bfloat16).t().contiguous()
    return packed, torch.stack([s, torch.zeros_like(s)], 2)  # w = (q - 8) * s + 0


def _tinygemm(w16, group: int):
    """tinygemm_weight, or None where this torch or GPU lacks the kernel (the column then reads n/a)."""
    try:
        return tinygemm_weight(w16, group)
    except (RuntimeError, AttributeError):
        return None


def bench_shape(k: int, n: int, ms, out: Path, arch, log) -> list[dict]:
    import torch
    import tvm

    from compiler.dispatch import kernel_for, routes_for
    from compiler.quantize import QuantConfig, dequantize, quantize
    from compiler.timing import graph_time

    model, w16 = _compile_linear(k, n, out, arch, log)
    cfg = QuantConfig(group_size=GROUP)
    w_deq = torch.from_numpy(dequantize(quantize(w16.float().numpy(), cfg), k, cfg)).cuda()
    wbytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in model.params)
    # weight copies so that one timed graph reads more than the L2 holds
    params = [model.params] + [[p.copyto(p.device) for p in model.params] for _ in range(_copies(wbytes) - 1)]
    w16c = [w16.cuda().contiguous() for _ in range(_copies(2 * n * k))]
    tiny = _tinygemm(w16, GROUP)
    tinys = [tiny] + [tuple(t.clone() for t in tiny) for _ in range(_copies(wbytes) - 1)] if tiny else []
    routes = routes_for({"n": n, "k": k, "group_size": GROUP, "x_dtype": "float16"}, arch)
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        xt = tvm.runtime.tensor(x.cpu().numpy(), model.device)  # the same values, TVM's own copy
        y = _output(model._main(xt, *model.params)).numpy().astype(np.float64)
        ref = (x.float() @ w_deq.t()).double().cpu().numpy()
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        t_nib = graph_time([lambda p=p: model._main(xt, *p) for p in params])
        t_cub = graph_time([lambda w=w: torch.matmul(x, w.t()) for w in w16c])
        t_tiny = None
        if tinys:
            xb = x.to(torch.bfloat16)
            t_tiny = graph_time([lambda t=t: torch._weight_int4pack_mm(xb, t[0], GROUP, t[1]) for t in tinys])
        moved = wbytes + 2 * m * (k + n)  # int4 weights + scales, x and y in fp16
        # the floor: a copy whose read + write traffic is those bytes (as benchmarks/bench_linear.py)
        src = [torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in range(_copies(moved))]
        dst = [torch.empty_like(t) for t in src]
        copy_s = graph_time([lambda a=a, b=b: b.copy_(a) for a, b in zip(src, dst)])
        del src, dst
        flop = 2 * m * n * k
        row = {"k": k, "n": n, "m": m, "kernel": kernel_for(m, routes), "nibble_us": t_nib * 1e6,
               "nibble_GBps": moved / t_nib / 1e9, "nibble_TFLOPs": flop / t_nib / 1e12,
               "intensity_int4": flop / moved, "intensity_fp16": flop / (2 * n * k + 2 * m * (k + n)),
               "copy_us": copy_s * 1e6, "x_copy": t_nib / copy_s,
               "cublas_us": t_cub * 1e6, "cublas_TFLOPs": flop / t_cub / 1e12, "cublas_over_nibble": t_cub / t_nib,
               "torch_int4_us": None if t_tiny is None else t_tiny * 1e6,
               "torch_int4_TFLOPs": None if t_tiny is None else flop / t_tiny / 1e12, "rel_err": err}
        rows.append(row)
        log(_line(row))
    return rows


def _output(out):
    """main's result: a tensor, or the one-tensor tuple a torch.export program returns."""
    return out if hasattr(out, "numpy") else out[0]


def _line(r: dict) -> str:
    tiny = "   n/a" if r["torch_int4_us"] is None else f"{r['torch_int4_us']:8.1f}"
    return (f"{r['k']:>6}->{r['n']:<6} M={r['m']:<5} {r['kernel']:>7} nibble {r['nibble_us']:8.1f} us "
            f"{r['nibble_GBps']:6.0f} GB/s {r['nibble_TFLOPs']:6.1f} TFLOP/s  {r['x_copy']:5.2f}x copy  "
            f"cuBLAS {r['cublas_us']:8.1f} us ({r['cublas_over_nibble']:4.2f}x)  torch int4 {tiny} us  "
            f"err {r['rel_err']:.1e}")


def run(shapes=SHAPES, ms=MS, out=Path("nibble-bench"), arch=None, log=print) -> dict:
    """The sweep; writes out/bench.json, bench.md, roofline.png and returns the results."""
    try:
        import torch
    except ImportError:
        raise NibbleError("nibble bench needs torch (with CUDA) to time the baselines") from None
    if not torch.cuda.is_available():
        raise NibbleError("nibble bench needs a CUDA GPU: torch.cuda.is_available() is False here")
    from compiler.target import resolve

    arch = resolve("cuda", arch)["arch"]  # the local GPU's unless given
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bw, peak = device_ceilings()
    log(f"{torch.cuda.get_device_name()} ({arch}): copy {bw:.0f} GB/s, fp16 matmul {peak:.0f} TFLOP/s")
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, ms, out, arch, log)
    import tvm

    res = {"device": torch.cuda.get_device_name(), "arch": arch, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "versions": f"python {platform.python_version()}, torch {torch.__version__}, tvm {tvm.__version__}",
           "copy_GBps": bw, "fp16_peak_TFLOPs": peak, "group_size": GROUP, "rows": rows}
    _write(out, res)
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'roofline.png'}")
    return res


def _write(out: Path, res: dict) -> None:
    from .plot import roofline_png

    rows = res["rows"]
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "bench.json")
    lines = [f"# nibble bench: int4 linears (g{res['group_size']}) on {res['device']}", "",
             f"{res['date']}; {res['versions']}; copy {res['copy_GBps']:.0f} GB/s, fp16 matmul "
             f"{res['fp16_peak_TFLOPs']:.0f} TFLOP/s", "",
             "| K->N | M | kernel | nibble us | GB/s | TFLOP/s | x copy | cuBLAS fp16 us | cuBLAS/nibble "
             "| torch int4 us | rel. err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiny = "n/a" if r["torch_int4_us"] is None else f"{r['torch_int4_us']:.1f}"
        lines.append(f"| {r['k']}->{r['n']} | {r['m']} | {r['kernel']} | {r['nibble_us']:.1f} | "
                     f"{r['nibble_GBps']:.0f} | {r['nibble_TFLOPs']:.1f} | {r['x_copy']:.2f} | {r['cublas_us']:.1f} | "
                     f"{r['cublas_over_nibble']:.2f} | {tiny} | {r['rel_err']:.1e} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    series = [("NIBBLE INT4", [(r["intensity_int4"], r["nibble_TFLOPs"]) for r in rows]),
              ("CUBLAS FP16", [(r["intensity_fp16"], r["cublas_TFLOPs"]) for r in rows]),
              ("TORCH INT4", [(r["intensity_int4"], r["torch_int4_TFLOPs"]) for r in rows if r["torch_int4_TFLOPs"]])]
    roofline_png(out / "roofline.png.tmp", series, res["copy_GBps"], res["fp16_peak_TFLOPs"],
                 f"INT4 LINEARS, {res['device']}")
    (out / "roofline.png.tmp").replace(out / "roofline.png")
