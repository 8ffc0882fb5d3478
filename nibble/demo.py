"""`nibble demo`: the main job on the built-in example, end to end, with accuracy and speed printed.

Exports the small GPT-style model (nibble/example.py) to ONNX with dynamic batch and sequence, compiles
it with int4 weights, loads the artifact, runs it at two sequence lengths and compares with torch:
against the fp32 original (the int4 quantization error) and against torch running the same int4 round
trip weights (the compiler's own error: fp16 activations, fp32 accumulation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _rel(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def run_demo(target: str | None, arch: str | None, out_dir: Path) -> int:
    import torch

    import nibble
    from compiler.target import local_gpu_arch

    from .example import export_onnx, tiny_gpt, with_int4_weights

    if target is None:
        target = "cuda" if (arch or local_gpu_arch()) else "llvm"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_gpt()
    onnx_path = out_dir / "tiny_gpt.onnx"
    export_onnx(model, onnx_path)
    print(f"exported {onnx_path} (TinyGPT: 2 blocks, d=256, vocab 512, dynamic batch and seq)")
    path = nibble.compile_model(onnx_path, target=target, arch=arch, output=out_dir / "tiny_gpt.nibble")
    runnable = target != "cuda" or local_gpu_arch() is not None
    if not runnable:
        print(f"built for {arch}; no GPU here to run it: copy {path} to one and `nibble run` it")
        return 0
    m = nibble.load(path)
    ref_q = with_int4_weights(model)
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, seq in ((1, 1), (2, 37)):
        ids = rng.integers(0, 512, (batch, seq), dtype=np.int64)
        y = m(input_ids=ids)
        with torch.no_grad():
            y32 = model(torch.from_numpy(ids)).double().numpy()
            yq = ref_q(torch.from_numpy(ids)).double().numpy()
        e_q, e_k = _rel(y, y32), _rel(y, yq)
        worst = max(worst, e_k)
        ms = m.benchmark(input_ids=ids) * 1e3
        print(f"batch {batch} seq {seq:>2}: logits {list(y.shape)}  rel. error vs fp32 torch {e_q:.2e} "
              f"(int4 quantization)  vs torch with the same int4 weights {e_k:.2e}  {ms:.3f} ms/call")
    ok = worst < 1e-2
    print("demo " + ("passed" if ok else f"FAILED: compiled model differs from its reference by {worst:.2e}"))
    return 0 if ok else 1
