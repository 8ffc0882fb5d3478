"""The transformers zoo (tests/test_zoo.py) on a CUDA GPU, from artifacts prebuilt on the CPU machine.

The GPU machine has no transformers, so tests/prebuild_zoo_for_gpu.py does everything that needs it
here: it exports every zoo case, builds the fp32 (--no-quantize) and int4 artifacts for sm_90, and
saves each case's inputs at the zoo's two shapes with the references test_zoo uses (onnxruntime or
torch eager for fp32; the dequantized-weights and fp32 torch models for int4). This module only
needs numpy and nibble's runtime:

    python tests/prebuild_zoo_for_gpu.py .zoo-prebuilt            # CPU machine (nvcc, transformers)
    NIBBLE_PREBUILT_ZOO=.zoo-prebuilt python -m pytest -m gpu tests/test_zoo_gpu.py -s    # on the GPU
    python tests/test_zoo_gpu.py .zoo-prebuilt --dry-run          # anywhere: checks the folder's format
    python tests/test_zoo_gpu.py .zoo-prebuilt                    # on the GPU, without pytest

Bounds as in test_zoo: fp32 rel. L2 <= 1e-4 on every output (the GPU kernels accumulate fp32 in
another order than onnxruntime / torch on the CPU; the bound is kept and every error is printed); int4 <= 1e-3 against the dequantized-weights reference on the first output (the logits),
and < 0.5 against the fp32 model (not garbage).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

INDEX = "index.json"
FORMAT, VERSION = "nibble-zoo-prebuilt", 1
FOLDER = os.environ.get("NIBBLE_PREBUILT_ZOO")


# -- the folder's format (written by tests/prebuild_zoo_for_gpu.py) ---------------------------------
#   index.json  {"format", "version", "target", "tolerances", "cases": [case...], "skipped": {id: why}}
#   case        {"id", "model", "exporter", "decode", "shapes", "input_names", "data": "<id>.npz",
#                "artifacts": {"fp32": "<id>.fp32.nibble", "int4": "<id>.int4.nibble"}}
#   <id>.npz    fp32_s{i}_in{j} / int4_s{i}_in{j}: input j at shape i (each check has its own seed),
#               fp32_s{i}_ref{k}: reference output k, int4_s{i}_deq{k} / int4_s{i}_fp{k}: outputs k
#               of the dequantized-weights and fp32 torch models

def npz_key(kind: str, shape: int, what: str, j: int) -> str:
    return f"{kind}_s{shape}_{what}{j}"


def read_index(folder) -> dict:
    index = json.loads((Path(folder) / INDEX).read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{folder}/{INDEX}: not a {FORMAT} v{VERSION} index")
    return index


def _take(data, kind: str, shape: int, what: str) -> list[np.ndarray]:
    out, j = [], 0
    while npz_key(kind, shape, what, j) in data:
        out.append(data[npz_key(kind, shape, what, j)])
        j += 1
    return out


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _dry_load(path: Path, inputs_per_shape: list[list[np.ndarray]]) -> None:
    """What nibble.load checks short of the device: manifest, library checksum, weights present, and
    the saved inputs accepted by the runtime's input check at every shape."""
    from safetensors.numpy import load_file

    from compiler import artifact
    from compiler.runtime import CompiledModel

    meta = artifact.read_manifest(path)
    artifact.verify_library(path, meta)
    weights = load_file(str(path / artifact.WEIGHTS))
    missing = [n for n in meta["params"] if n not in weights]
    assert not missing, f"{path}: weights lack {missing[:3]}"
    checker = CompiledModel.__new__(CompiledModel)  # only the input check, no device
    checker.inputs = meta["inputs"]
    for x in inputs_per_shape:
        checker._check(x)


def check_case(folder, case: dict, tolerances: dict, device: str | None = "cuda") -> list[str]:
    """Run one case's two artifacts at both shapes on `device` (None: dry run, format checks only).
    Prints every error; returns the failures."""
    import nibble

    folder = Path(folder)
    data = np.load(folder / case["data"])
    failures = []
    for kind in ("fp32", "int4"):
        path = folder / case["artifacts"][kind]
        xs = [_take(data, kind, i, "in") for i in range(len(case["shapes"]))]
        assert all(len(x) == len(case["input_names"]) for x in xs), (case["id"], kind)
        if device is None:
            _dry_load(path, xs)
            assert all(_take(data, kind, i, what) for i in range(len(xs))
                       for what in (("ref",) if kind == "fp32" else ("deq", "fp")))
            print(f"{case['id']} {kind}: artifact, inputs and references in order (dry run)")
            continue
        m = nibble.load(path, device=device)
        for i, (shape, x) in enumerate(zip(case["shapes"], xs)):
            got = m(*x)
            got = list(got) if isinstance(got, tuple) else [got]
            if kind == "fp32":
                want = _take(data, kind, i, "ref")
                if len(got) != len(want):
                    failures.append(f"{case['id']} fp32 {shape}: {len(got)} outputs, expected {len(want)}")
                for k, (g, w) in enumerate(zip(got, want)):
                    err = rel_l2(g, w) if g.shape == w.shape else float("inf")
                    print(f"{case['id']} fp32 {shape} out{k}: rel L2 {err:.2e}")
                    if not err <= tolerances["fp32"]:
                        failures.append(f"{case['id']} fp32 {shape} out{k}: rel L2 {err:.2e} "
                                        f"(shape {g.shape} vs {w.shape})")
            else:
                deq, fp = _take(data, kind, i, "deq")[0], _take(data, kind, i, "fp")[0]
                e_deq, e_fp = rel_l2(got[0], deq), rel_l2(got[0], fp)
                print(f"{case['id']} int4 {shape}: rel L2 vs dequantized ref {e_deq:.2e}, vs fp32 {e_fp:.2e}")
                if not e_deq <= tolerances["int4"]:
                    failures.append(f"{case['id']} int4 {shape}: rel L2 vs dequantized ref {e_deq:.2e}")
                if not e_fp < tolerances["int4_vs_fp32"]:
                    failures.append(f"{case['id']} int4 {shape}: rel L2 vs fp32 {e_fp:.2e}")
    return failures


def check_folder(folder, device: str | None = "cuda") -> list[str]:
    index = read_index(folder)
    for cid, why in index.get("skipped", {}).items():
        print(f"{cid}: not prebuilt ({why})")
    failures = []
    for case in index["cases"]:
        failures += check_case(folder, case, index["tolerances"], device)
    return failures


def _params():
    if not FOLDER:
        return [pytest.param(None, id="no-prebuilt-folder",
                             marks=pytest.mark.skip(reason="set NIBBLE_PREBUILT_ZOO to a folder made by "
                                                           "tests/prebuild_zoo_for_gpu.py"))]
    return [pytest.param(c, id=c["id"]) for c in read_index(FOLDER)["cases"]]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params())
def test_prebuilt_zoo_case_on_cuda(case):
    failures = check_case(FOLDER, case, read_index(FOLDER)["tolerances"], device="cuda")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import argparse

    ap = argparse.ArgumentParser(description="check a folder made by tests/prebuild_zoo_for_gpu.py")
    ap.add_argument("folder")
    ap.add_argument("--dry-run", action="store_true", help="format checks only, no device needed")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a folder built with --target llvm")
    args = ap.parse_args()
    bad = check_folder(args.folder, device=None if args.dry_run else args.device)
    print("\n".join(bad) if bad else "all cases passed")
    sys.exit(1 if bad else 0)
