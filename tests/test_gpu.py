"""The same artifacts on a CUDA GPU (run on the H200 through the device tool; skipped without a GPU)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import nibble
from compiler.quantize import QuantConfig
from tests import models
from tests.conftest import gpu_arch, rel_err
from tests.test_numerics import mlp_reference

pytestmark = pytest.mark.gpu


def test_tiny_gpt_on_cuda_seq_1_and_37(tiny_gpt, tiny_gpt_onnx, tmp_path):
    from nibble.example import with_int4_weights

    art = nibble.compile_model(tiny_gpt_onnx, target="cuda", output=tmp_path / "g.nibble", log=print)
    assert nibble.load(art).manifest["target"]["arch"] == gpu_arch()
    m = nibble.load(art, device="cuda")
    ref_q = with_int4_weights(tiny_gpt)
    for shape in ((1, 1), (2, 37)):  # one artifact, two sequence lengths
        ids = torch.randint(0, 96, shape)
        with torch.no_grad():
            ref = ref_q(ids).numpy()
        y_np = m(input_ids=ids.numpy())  # numpy in -> numpy out
        y_t = m(input_ids=ids.cuda())  # torch in -> torch out, on the GPU, no copy
        assert isinstance(y_np, np.ndarray) and y_t.is_cuda and tuple(y_t.shape) == shape + (96,)
        np.testing.assert_array_equal(y_t.cpu().numpy(), y_np)
        assert rel_err(y_np, ref) < 5e-3, rel_err(y_np, ref)


@pytest.mark.parametrize("group,symmetric", [(128, True), (32, False)])
def test_mlp_on_cuda_matches_reference(tmp_path, group, symmetric):
    k, hidden = 64, 128
    w = models.onnx_mlp(tmp_path / "mlp.onnx", k=k, hidden=hidden)
    art = nibble.compile_model(tmp_path / "mlp.onnx", target="cuda", output=tmp_path / "m.nibble",
                               group_size=group, symmetric=symmetric, log=print)
    m = nibble.load(art)
    rng = np.random.default_rng(0)
    for shape in ((1, 1, k), (3, 37, k), (2, 300, k)):
        x = rng.standard_normal(shape).astype(np.float32)
        y, gram = m(x)
        ref_y, _ = mlp_reference(x, w, art, QuantConfig(group, symmetric), k, hidden)
        assert rel_err(y, ref_y) < 2e-3


@pytest.mark.skipif(not os.environ.get("NIBBLE_PREBUILT"), reason="set NIBBLE_PREBUILT to a folder of "
                    "artifacts built on the CPU-only machine")
def test_artifact_built_without_gpu_runs_here():
    """The deployment path: compiled where there is no GPU (nvcc cubins), run where there is one."""
    art = Path(os.environ["NIBBLE_PREBUILT"]) / "tiny_gpt.nibble"
    m = nibble.load(art)
    ids = np.random.default_rng(0).integers(0, 512, (2, 37))
    y = m(input_ids=ids)
    assert y.shape == (2, 37, 512) and np.isfinite(y).all()
    ref = np.load(Path(os.environ["NIBBLE_PREBUILT"]) / "ref_logits.npy")
    ref_ids = np.load(Path(os.environ["NIBBLE_PREBUILT"]) / "ref_ids.npy")
    assert rel_err(m(input_ids=ref_ids), ref) < 5e-3


def test_wrong_arch_is_refused(tmp_path):
    import json
    import shutil

    models.onnx_gemm(tmp_path / "g.onnx")
    art = nibble.compile_model(tmp_path / "g.onnx", target="cuda", output=tmp_path / "g.nibble", log=print)
    other = tmp_path / "other.nibble"
    shutil.copytree(art, other)
    meta = json.loads((other / "manifest.json").read_text())
    meta["target"]["arch"] = "sm_80"
    (other / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(nibble.NibbleError, match=f"holds machine code for sm_80, this GPU .* is {gpu_arch()}"):
        nibble.load(other)


def test_cubin_loads_as_machine_code(tmp_path):
    """An independent check of compiler.cuda.cubin_archs: the CUDA driver loads the embedded cubin."""
    import shutil
    import struct
    import subprocess
    models.onnx_gemm(tmp_path / "g.onnx")
    art = nibble.compile_model(tmp_path / "g.onnx", target="cuda", output=tmp_path / "g.nibble", log=print)
    blob = (art / "lib.so").read_bytes()
    pos = blob.find(b"\x7fELF", 1)
    while pos != -1 and struct.unpack_from("<H", blob, pos + 18)[0] != 190:
        pos = blob.find(b"\x7fELF", pos + 4)
    assert pos != -1
    # the ELF's extent: the furthest of its section data, section headers and program headers
    phoff, shoff = struct.unpack_from("<QQ", blob, pos + 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", blob, pos + 54)
    end = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    for i in range(shnum):
        sh = pos + shoff + i * shentsize
        sh_type, = struct.unpack_from("<I", blob, sh + 4)
        off, size = struct.unpack_from("<QQ", blob, sh + 24)
        if sh_type != 8:  # SHT_NOBITS occupies no file bytes
            end = max(end, off + size)
    cubin = blob[pos:pos + end]
    # the driver loads it as machine code for this GPU (an ELF is never JIT-compiled PTX), and it holds
    # our kernels
    import ctypes
    import re

    torch.zeros(1, device="cuda")  # a current context
    cuda = ctypes.CDLL("libcuda.so.1")
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    assert cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(cubin)) == 0
    names = set(re.findall(rb"(int4_matmul\w*?_kernel)\x00", cubin))
    assert names
    for name in names:
        assert cuda.cuModuleGetFunction(ctypes.byref(fn), mod, name) == 0, name
    if shutil.which("cuobjdump"):  # for the log: what the disassembler says
        (tmp_path / "k.cubin").write_bytes(cubin)
        r = subprocess.run(["cuobjdump", "--dump-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True)
        print(r.stdout[:2000], r.stderr[:500])


def test_generate_on_cuda_matches_torch_greedy(tmp_path):
    from nibble.example import export_onnx_with_past, tiny_gpt_with_past
    from tests.test_generate import torch_greedy

    model = tiny_gpt_with_past(layers=2, d=64, heads=2, vocab=96)
    export_onnx_with_past(model, tmp_path / "p.onnx")
    art = nibble.compile_model(tmp_path / "p.onnx", target="cuda", quantize=False, output=tmp_path / "p.nibble",
                               log=print)
    prompt = np.random.default_rng(0).integers(0, 96, (2, 7))
    g = nibble.load(art).generate(prompt, max_new_tokens=12)
    np.testing.assert_array_equal(g.tokens, torch_greedy(model, prompt, 12))
    print(f"prefill {g.prefill_ms:.2f} ms, decode {g.decode_ms_per_token:.3f} ms/token")


def test_graph_decode_on_cuda_equals_transformers(tmp_path):
    """transformers' Llama exported with position_ids: the padded-cache decode replayed from a CUDA graph
    (compiler/graph_decode.py) gives transformers' greedy tokens, as does the growing-cache decode."""
    pytest.importorskip("transformers")
    model = models.hf_llama_with_past(tmp_path / "llama.onnx")
    art = nibble.compile_model(tmp_path / "llama.onnx", target="cuda", quantize=False, output=tmp_path / "l.nibble",
                               log=print)
    prompt = np.random.default_rng(0).integers(0, 128, (2, 9))
    m = nibble.load(art)
    graphed = [m.generate(prompt, max_new_tokens=12) for _ in range(2)]  # the second replays the capture
    assert m._generator._decoders, "the CUDA-graph decode ran"
    m._generator.graphs = False
    plain = m.generate(prompt, max_new_tokens=12)
    for g in graphed:
        np.testing.assert_array_equal(g.tokens, plain.tokens)
    # against transformers, teacher-forced on nibble's tokens: each one is torch's argmax, or within fp32
    # noise of it (a random tiny model has near-ties that GPU accumulation order may break otherwise)
    seq = torch.from_numpy(np.concatenate([prompt, plain.tokens], 1))
    with torch.no_grad():
        logits = model(seq).logits[:, prompt.shape[1] - 1:-1].double()
    top = logits.max(-1).values
    picked = logits.gather(-1, torch.from_numpy(plain.tokens)[..., None])[..., 0]
    gap = (top - picked) / top.abs().clamp_min(1e-6)
    exact = (gap == 0).float().mean().item()
    print(f"decode {graphed[1].decode_ms_per_token:.3f} ms/token with the graph, "
          f"{plain.decode_ms_per_token:.3f} without; {exact:.0%} of tokens are torch's exact argmax, "
          f"largest relative logit gap {gap.max().item():.1e}")
    assert gap.max().item() < 1e-4


def test_tune_on_cuda_and_compile_applies_records(tmp_path, capsys):
    import json

    from nibble.cli import main

    models.onnx_gemm(tmp_path / "g.onnx", k=256, n1=256, n2=128)
    log = tmp_path / "sm.jsonl"
    assert main(["tune", str(tmp_path / "g.onnx"), "--target", "cuda", "--trials", "6", "--log", str(log)]) == 0
    lines = log.read_text().splitlines()
    assert len(lines) >= 6  # (every task gets at least its template default measured)
    assert all(json.loads(l)["arch"] == gpu_arch() for l in lines)
    assert main(["compile", str(tmp_path / "g.onnx"), "--target", "cuda", "--tuning-log", str(log),
                 "-o", str(tmp_path / "g.nibble")]) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"\b[1-9]\d* of \d+ kernels tuned", out), out
    m = nibble.load(tmp_path / "g.nibble")
    assert any(v["tuned"] for v in m.manifest["kernels"].values())
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    assert np.isfinite(m(x)).all()
