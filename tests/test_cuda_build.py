"""CUDA builds on this GPU-less machine hold real sm_90 machine code (nvcc is installed; no driver)."""
import json
import shutil

import pytest

from compiler.cuda import cubin_archs
from tests import models

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def test_cuda_artifact_holds_sm90_cubin(tmp_path, capsys):
    from nibble.cli import main

    models.onnx_mlp(tmp_path / "m.onnx")
    code = main(["compile", str(tmp_path / "m.onnx"), "--target", "cuda", "--arch", "sm_90",
                 "-o", str(tmp_path / "m.nibble")])
    out, err = capsys.readouterr()
    assert code == 0, err
    lib = (tmp_path / "m.nibble" / "lib.so").read_bytes()
    archs = cubin_archs(lib)
    assert archs and set(archs) == {"sm_90"}, archs
    assert b"__global__" not in lib  # machine code, not CUDA source compiled at load time
    meta = json.loads((tmp_path / "m.nibble" / "manifest.json").read_text())
    assert meta["target"] == {"kind": "cuda", "arch": "sm_90"} and meta["cubins"]
    assert "built for cuda sm_90" in out
