"""compiler/merge_linears.py: int4 linears reading the same input become one call (fused qkv / gate_up),
merged exactly where they should, with results equal to the unmerged build's."""
import json

import numpy as np
import pytest
import torch

import nibble
from compiler.dispatch import dispatch_small_m
from compiler.int4_pass import quantize_linears
from compiler.merge_linears import int4_calls, merge_linears
from compiler.quantize import QuantConfig
from frontends import import_model
from tests import models

K = 64


class Fan(torch.nn.Module):
    """q, k, v read x (biases per `bias`); o reads relu(x): same K, another input."""

    def __init__(self, bias: str):
        super().__init__()
        torch.manual_seed(0)
        with_bias = {"none": (0, 0, 0), "all": (1, 1, 1), "mixed": (1, 1, 0)}[bias]
        self.q = torch.nn.Linear(K, 64, bias=bool(with_bias[0]))
        self.k = torch.nn.Linear(K, 32, bias=bool(with_bias[1]))
        self.v = torch.nn.Linear(K, 32, bias=bool(with_bias[2]))
        self.o = torch.nn.Linear(K, 48)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x), self.o(torch.relu(x))


# (bias, symmetric, group size, input rank): 2-D x is the very var every call reads, 3-D x is reshaped
# once per linear by the int4 pass
CASES = [("none", True, 32, 3), ("all", False, 32, 3), ("mixed", True, -1, 2), ("mixed", False, 32, 3),
         ("all", True, 32, 2)]


def _input(rank):
    x = np.random.default_rng(1).standard_normal((2, 5, K) if rank == 3 else (7, K)).astype(np.float32)
    return x


@pytest.mark.parametrize("bias,symmetric,group,rank", CASES)
def test_merges_exactly_the_linears_sharing_an_input(bias, symmetric, group, rank):
    imp = import_model(Fan(bias), (torch.from_numpy(_input(rank)),))
    mod, params, report = quantize_linears(imp.mod, imp.params, QuantConfig(group, symmetric))
    assert int4_calls(mod) == 4
    merged_mod, merged, n = merge_linears(mod, params, report)
    # q, k, v -> one call; with mixed biases only q, k (v has no bias: another kernel); o stays alone
    want = 2 if bias == "mixed" else 3
    assert n == want and int4_calls(merged_mod) == 4 - want + 1
    new = sorted(set(merged) - set(params))
    parts = ["qweight", "scales"] + ([] if symmetric else ["zeros"]) + ([] if bias == "none" else ["bias"])
    assert sorted(p.split("_merged_")[1] for p in new) == sorted(parts)
    qnames = [l.name for l in report.quantized if l.n != 48][:want]  # q, k(, v) in graph order
    for part in parts:
        name = next(p for p in new if p.endswith(f"_merged_{part}"))
        # an fp32 model's bias goes into the fp16 kernel as its fp16 copy "<bias>_fp16" (compiler/int4_pass.py)
        own = [q.replace("_weight", "_bias_fp16") if part == "bias" else f"{q}_{part}" for q in qnames]
        np.testing.assert_array_equal(merged[name], np.concatenate([params[o] for o in own]))  # N: axis 0
        assert not any(o in merged for o in own)  # the members' own params are gone
    assert set(p.name for p in merged_mod["main"].params[1:]) == set(merged)
    assert sum("merged with" in l.why for l in report.layers) == want
    assert all(l.quantized for l in report.layers)
    text = merged_mod["main"].script()
    assert text.count("R.strided_slice(") == want  # one slice per member: fuses into its consumer
    # the merged kernel (N = 64 + 32 (+ 32)) is an ordinary int4 kernel to the token-count dispatch
    n_total = 96 if bias == "mixed" else 128
    names = {gv.name_hint for gv in dispatch_small_m(merged_mod, arch="sm_90").get_global_vars()}
    assert any(f"_n{n_total}_k{K}_" in nm and nm.endswith("_gemv1") for nm in names)
    if bias != "mixed":
        assert not any("_n32_" in nm for nm in names)  # k/v's own kernel is gone with them


@pytest.mark.parametrize("bias,symmetric,group,rank", CASES[:3])
def test_merged_build_equals_unmerged(bias, symmetric, group, rank, tmp_path):
    x = _input(rank)
    model = Fan(bias)
    logs = []
    arts = [nibble.compile_model(model, (torch.from_numpy(x),), target="llvm", group_size=group,
                                 symmetric=symmetric, merge=merge, output=tmp_path / f"m{merge}.nibble",
                                 log=logs.append)
            for merge in (False, True)]
    assert any(s.startswith("merged ") for s in logs)
    outs = [nibble.load(a)(x) for a in arts]
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    layers = json.loads((arts[1] / "manifest.json").read_text())["layers"]
    assert len(layers) == 4 and all(l["quantized"] for l in layers)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("llama")
    models.hf_llama_with_past(d / "llama.onnx")
    return d


def test_llama_generate_unchanged_by_merge(llama):
    """transformers' tiny Llama: q/k/v and gate/up of both layers merge (15 int4 calls -> 9), and greedy
    tokens and logits equal the unmerged build's."""
    logs = []
    arts = [nibble.compile_model(llama / "llama.onnx", target="llvm", merge=merge, output=llama / f"{merge}.nibble",
                                 log=logs.append) for merge in (False, True)]
    assert "merged 10 int4 linears that share an input into 4 calls (15 -> 9 int4 calls)" in logs
    prompt = np.array([[3, 17, 42, 9, 100], [5, 6, 7, 8, 9]])
    loaded = [nibble.load(a) for a in arts]
    gens = [m.generate(prompt, max_new_tokens=8).tokens for m in loaded]
    np.testing.assert_array_equal(gens[1], gens[0])
    feed = {"input_ids": prompt, "attention_mask": np.ones_like(prompt), "position_ids": np.tile(np.arange(5), (2, 1))}
    feed.update({f"past_key_values.{i}.{kv}": np.zeros((2, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")})
    outs = [m(**feed) for m in loaded]
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    meta = json.loads((arts[1] / "manifest.json").read_text())
    assert sum("_merged_" in p for p in meta["params"]) == 8  # 4 groups x (qweight, scales)
    assert len(meta["layers"]) == 15 and all(l["quantized"] for l in meta["layers"])
