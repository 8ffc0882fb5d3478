"""Build, on the CPU-only machine, the artifact that test_gpu.py's deployment test runs on the GPU.

    python tests/prebuild_for_gpu.py .gpu-prebuilt     # then carry .gpu-prebuilt and set NIBBLE_PREBUILT
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibble  # noqa: E402
from nibble.example import export_onnx, tiny_gpt, with_int4_weights  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
model = tiny_gpt(d=128)
export_onnx(model, out / "tiny_gpt.onnx")
nibble.compile_model(out / "tiny_gpt.onnx", target="cuda", arch="sm_90", output=out / "tiny_gpt.nibble")
(out / "tiny_gpt.onnx").unlink()
ids = np.random.default_rng(1).integers(0, 512, (2, 37))
with torch.no_grad():
    np.save(out / "ref_logits.npy", with_int4_weights(model)(torch.from_numpy(ids)).numpy())
np.save(out / "ref_ids.npy", ids)
