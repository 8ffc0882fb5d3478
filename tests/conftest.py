import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def gpu_arch():
    """sm_XX of the local GPU or None (the `gpu` marker's tests skip without one)."""
    from compiler.target import local_gpu_arch

    return local_gpu_arch()


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and gpu_arch() is None:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def tiny_gpt():
    from nibble.example import tiny_gpt as make

    return make(layers=1, d=64, heads=2, vocab=96)


@pytest.fixture(scope="session")
def tiny_gpt_onnx(tiny_gpt, tmp_path_factory):
    """TinyGPT exported with the TorchScript ONNX exporter (dynamic batch and seq)."""
    from nibble.example import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "tiny_gpt.onnx"
    export_onnx(tiny_gpt, path)
    return path
