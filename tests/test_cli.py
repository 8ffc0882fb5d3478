"""The CLI end to end, and every bad input named in issue 2: one line, names the problem, exit != 0."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nibble.cli import main
from tests import models
from tests.conftest import gpu_arch


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    models.onnx_mlp(d / "mlp.onnx")
    assert main(["compile", str(d / "mlp.onnx"), "--target", "llvm", "--group-size", "32",
                 "-o", str(d / "mlp.nibble")]) == 0
    return d / "mlp.nibble"


def test_compile_run_inspect_round_trip(mlp_artifact, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((2, 37, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, "run", mlp_artifact, "--input", f"x={tmp_path / 'x.npy'}",
                             "--save", tmp_path / "out.npz")
    assert code == 0, err
    assert "y: shape [2, 37, 32] float32" in out and "gram: shape [2, 37, 37]" in out
    saved = np.load(tmp_path / "out.npz")
    import nibble

    np.testing.assert_array_equal(saved["y"], nibble.load(mlp_artifact)(x)[0])
    code, out, _ = run_cli(capsys, "inspect", mlp_artifact)
    assert code == 0
    assert "x: [batch, seq, 64] float32" in out  # symbolic dims keep their ONNX names
    assert "2 of 2 linear layers" in out and "int4 group 32" in out and "target: llvm" in out
    code, out, _ = run_cli(capsys, "inspect", mlp_artifact, "--json")
    assert json.loads(out)["quantization"]["group_size"] == 32


def test_console_script_exit_code_and_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nibble", "compile", str(tmp_path / "nope.onnx"), "--target", "llvm"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"nibble compile: error: {tmp_path / 'nope.onnx'}: no such file"]


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--group-size" in out and "--no-quantize" in out and "--shape" in out


# -- bad input at compile time ---------------------------------------------------------------------

def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", tmp_path / "missing.onnx", "--target", "llvm")
    assert code == 1 and "missing.onnx: no such file" in err and "Traceback" not in err


def test_truncated_onnx(capsys, tmp_path):
    models.onnx_mlp(tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "compile", tmp_path / "t.onnx", "--target", "llvm")
    assert code == 1 and "t.onnx" in err and ("not a readable ONNX" in err or "invalid ONNX" in err)


def test_garbage_onnx(capsys, tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\x00\xffthis is not protobuf" * 10)
    code, _, err = run_cli(capsys, "compile", tmp_path / "g.onnx", "--target", "llvm")
    assert code == 1 and "g.onnx" in err and "ONNX" in err


def test_unsupported_op_names_op_and_node(capsys, tmp_path):
    models.onnx_unsupported_op(tmp_path / "u.onnx")
    code, _, err = run_cli(capsys, "compile", tmp_path / "u.onnx", "--target", "llvm")
    assert code == 1 and "FancyOp" in err and "my_fancy_node" in err


def test_no_linear_layers_compiles_and_says_so(capsys, tmp_path):
    models.onnx_no_linear(tmp_path / "n.onnx")
    code, out, err = run_cli(capsys, "compile", tmp_path / "n.onnx", "--target", "llvm", "-o", tmp_path / "n.nibble")
    assert code == 0, err
    assert "0 of 0 linear layers quantized" in out


def test_k_not_divisible_by_group_says_how(capsys, tmp_path):
    models.onnx_mlp(tmp_path / "k.onnx", k=100)
    code, out, err = run_cli(capsys, "compile", tmp_path / "k.onnx", "--target", "llvm", "--group-size", "64",
                             "-o", tmp_path / "k.nibble")
    assert code == 0, err
    assert "K=100 not divisible by group 64: last group partial (36 columns)" in out


@pytest.mark.skipif(gpu_arch() is not None, reason="this machine has a GPU")
def test_cuda_without_gpu_or_arch(capsys, tmp_path):
    models.onnx_mlp(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "--target", "cuda")
    assert code == 1 and "no GPU found" in err and "--arch" in err


@pytest.mark.parametrize("argv,msg", [
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--target", "cuda", "--arch", "ampere"], "--arch 'ampere' is not a CUDA arch"),
    (["--shape", "x=1xbig"], "dim 'big'"),
    (["--shape", "nope=1x2x64"], "--shape names input 'nope'"),
    (["--shape", "x=1x2"], "rank 2 given"),
    (["--group-size", "12"], "group_size must be a positive multiple of 8"),
])
def test_bad_options(capsys, tmp_path, argv, msg):
    models.onnx_mlp(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "--target", "llvm", *argv)
    assert code == 1 and msg in err, err


# -- bad input at run time -------------------------------------------------------------------------

@pytest.mark.parametrize("make,msg", [
    (lambda: {"z": np.zeros((1, 2, 64), np.float32)}, "unknown input 'z'; the model's inputs are ['x']"),
    (lambda: {"x": np.zeros((2, 64), np.float32)}, "input 'x': expected rank 3 [batch, seq, 64], got rank 2"),
    (lambda: {"x": np.zeros((1, 2, 64), np.float64)}, "input 'x': expected dtype float32, got float64"),
    (lambda: {"x": np.zeros((1, 2, 65), np.float32)}, "input 'x': dim 2 is pinned to 64, got 65"),
    (lambda: {}, "missing input(s) ['x']"),
])
def test_bad_run_inputs(mlp_artifact, make, msg):
    import nibble

    with pytest.raises(nibble.NibbleError) as e:
        nibble.load(mlp_artifact)(**make())
    assert msg in str(e.value)


def test_run_input_errors_from_cli(mlp_artifact, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", mlp_artifact, "--input", f"x={tmp_path / 'none.npy'}")
    assert code == 1 and "none.npy: no such file" in err
    np.save(tmp_path / "bad.npy", np.zeros((1, 2, 64), np.int32))
    code, _, err = run_cli(capsys, "run", mlp_artifact, "--input", f"x={tmp_path / 'bad.npy'}")
    assert code == 1 and "expected dtype float32, got int32" in err


# -- bad artifacts ---------------------------------------------------------------------------------

def _copy(src, tmp_path):
    dst = tmp_path / "copy.nibble"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,msg", [
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json: not a nibble artifact, or a half-written one"),
    (lambda p: (p / "manifest.json").write_text("{ trunc"), "corrupt manifest"),
    (lambda p: (p / "lib.so").unlink(), "lib.so is missing"),
    (lambda p: (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:100]),
     "weights.safetensors: 100 bytes, the manifest says"),
])
def test_corrupt_artifact(mlp_artifact, tmp_path, capsys, damage, msg):
    art = _copy(mlp_artifact, tmp_path)
    damage(art)
    code, _, err = run_cli(capsys, "inspect", art)
    assert code == 1 and msg in err, err


def test_corrupt_library_is_caught_at_load(mlp_artifact, tmp_path):
    import nibble

    art = _copy(mlp_artifact, tmp_path)
    (art / "lib.so").write_bytes(b"\0" * (art / "lib.so").stat().st_size)  # same size, other bytes
    with pytest.raises(nibble.NibbleError, match="checksum differs from the manifest"):
        nibble.load(art)


def test_wrong_device_for_artifact(mlp_artifact):
    import nibble

    with pytest.raises(nibble.NibbleError, match="was built for llvm, cannot run on device 'cuda'"):
        nibble.load(mlp_artifact, device="cuda")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """An error during the write leaves no artifact and no temp folder behind."""
    import compiler.artifact as artifact
    import nibble

    models.onnx_mlp(tmp_path / "m.onnx")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        nibble.compile_model(tmp_path / "m.onnx", target="llvm", output=tmp_path / "m.nibble", log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_pt2_file_and_pinned_shape(tiny_gpt, tmp_path, capsys):
    import torch

    import nibble

    ids = torch.zeros(2, 8, dtype=torch.int64)
    ep = torch.export.export(tiny_gpt, (ids,), dynamic_shapes={"input_ids": {0: torch.export.Dim.AUTO,
                                                                             1: torch.export.Dim.AUTO}})
    torch.export.save(ep, str(tmp_path / "g.pt2"))
    code, out, err = run_cli(capsys, "compile", tmp_path / "g.pt2", "--target", "llvm", "-o", tmp_path / "g.nibble")
    assert code == 0, err
    assert "5 of 5 linear layers quantized" in out
    m = nibble.load(tmp_path / "g.nibble")
    assert m(input_ids=np.zeros((3, 5), np.int64)).shape == (3, 5, 96)


def test_shape_pins_a_dim(tmp_path, capsys):
    import nibble

    models.onnx_mlp(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "--target", "llvm", "--shape", "x=1x?x64",
                           "-o", tmp_path / "m.nibble")
    assert code == 0, err
    m = nibble.load(tmp_path / "m.nibble")
    assert m.inputs[0]["shape"] == [1, "seq", 64]
    assert m(x=np.ones((1, 7, 64), np.float32))[0].shape == (1, 7, 32)
    with pytest.raises(nibble.NibbleError, match="dim 0 is pinned to 1, got 2"):
        m(x=np.ones((2, 7, 64), np.float32))


def test_runtime_needs_no_frontends(mlp_artifact):
    """Loading and running an artifact imports neither the frontends nor onnx nor the compiler.
    (torch may be there: tvm-ffi imports it when installed, for DLPack.)"""
    code = (f"import sys, numpy as np, nibble; m = nibble.load({str(mlp_artifact)!r}); "
            "m(np.ones((1, 2, 64), np.float32)); "
            "bad = [k for k in ('frontends', 'onnx', 'compiler.build', 'compiler.int4_pass') if k in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_onnx_with_external_data(tmp_path, capsys):
    """Weights in a side file (how >2 GB models ship) are read from beside the model."""
    import onnx

    import nibble

    w = models.onnx_mlp(tmp_path / "src.onnx")
    model = onnx.load(str(tmp_path / "src.onnx"))
    (tmp_path / "ext").mkdir()
    onnx.save_model(model, str(tmp_path / "ext" / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    assert (tmp_path / "ext" / "m.weights").stat().st_size > 40000
    assert (tmp_path / "ext" / "m.onnx").stat().st_size < 5000
    code, out, err = run_cli(capsys, "compile", tmp_path / "ext" / "m.onnx", "--target", "llvm",
                             "-o", tmp_path / "m.nibble")
    assert code == 0, err
    x = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    y = nibble.load(tmp_path / "m.nibble")(x)[0]
    fp32 = np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"]
    assert np.linalg.norm(y - fp32) / np.linalg.norm(fp32) < 0.4  # int4 of these weights, not garbage
    (tmp_path / "ext" / "m.weights").unlink()
    code, _, err = run_cli(capsys, "compile", tmp_path / "ext" / "m.onnx", "--target", "llvm")
    assert code == 1 and "m.onnx" in err


# -- more error paths: each names what is wrong ----------------------------------------------------

@pytest.mark.parametrize("make,msg", [
    (lambda p: (p / "m.pt2").write_bytes(b"not a zip"), "m.pt2: not a readable torch.export program"),
    (lambda p: (p / "m.tflite").write_bytes(b"x"), "unknown model format '.tflite'"),
    (lambda p: (p / "m.onnx").mkdir(), "is a directory"),
])
def test_bad_model_files(tmp_path, capsys, make, msg):
    make(tmp_path)
    name = next(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(capsys, "compile", tmp_path / name, "--target", "llvm")
    assert code == 1 and msg in err, err


def test_missing_tuning_log(tmp_path, capsys):
    models.onnx_mlp(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "--target", "llvm", "--tuning-log",
                           tmp_path / "none.jsonl")
    assert code == 1 and "--tuning-log" in err and "none.jsonl: no such file" in err


@pytest.mark.skipif(gpu_arch() is not None, reason="this machine has a GPU")
def test_tune_for_cuda_needs_that_gpu(tmp_path, capsys):
    models.onnx_mlp(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "tune", tmp_path / "m.onnx", "--target", "cuda", "--arch", "sm_90")
    assert code == 1 and "tuning measures on the GPU: this machine has no GPU, not sm_90" in err


def test_output_folder_that_is_not_an_artifact_is_kept(tmp_path, capsys):
    models.onnx_mlp(tmp_path / "m.onnx")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("mine")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "--target", "llvm", "-o", tmp_path / "taken")
    assert code == 1 and "exists and is not a nibble artifact; not overwriting it" in err
    assert (tmp_path / "taken" / "precious.txt").read_text() == "mine"


def test_recompile_replaces_an_artifact(mlp_artifact, tmp_path, capsys):
    import nibble

    art = _copy(mlp_artifact, tmp_path)
    models.onnx_mlp(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "--target", "llvm", "--group-size", "64",
                           "-o", art)
    assert code == 0, err
    assert nibble.load(art).manifest["quantization"]["group_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.nibble", "m.onnx"]  # no temp or backup left


def test_artifact_for_another_cpu_is_refused(mlp_artifact, monkeypatch):
    import compiler.target
    import nibble

    monkeypatch.setattr(compiler.target, "_host_cpu", lambda: {})
    with pytest.raises(nibble.NibbleError, match="built for CPUs with x86-64-v3"):
        nibble.load(mlp_artifact)


@pytest.mark.parametrize("argv,msg", [
    (["--input", "x"], "--input 'x': expected NAME=FILE.npy"),
])
def test_bad_run_arguments(mlp_artifact, capsys, argv, msg):
    code, _, err = run_cli(capsys, "run", mlp_artifact, *argv)
    assert code == 1 and msg in err, err
