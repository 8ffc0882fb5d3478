"""The built-in example: a small GPT-style decoder (generated in code, random weights, fixed seed).

Token embedding, N pre-norm blocks (causal self-attention with a fused QKV projection, GELU MLP),
final norm and an LM head: every projection is an nn.Linear, the attention matmuls are activation x
activation (the int4 pass must leave those alone).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        s = s.masked_fill(torch.ones_like(s).triu(1) > 0, float("-inf"))  # causal
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def tiny_gpt(seed: int = 0, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**kw).eval()


def export_onnx(model: nn.Module, path, seq: int = 8) -> None:
    """ONNX export with named dynamic batch and sequence dims."""
    ids = torch.zeros(1, seq, dtype=torch.int64)
    torch.onnx.export(model, (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                      dynamo=False)


def with_int4_weights(model: nn.Module, cfg=None) -> nn.Module:
    """A copy of `model` whose nn.Linear weights are replaced by their int4 round trip (the same
    quantizer the compiler uses): the reference that isolates kernel error from quantization error."""
    import copy

    from compiler.quantize import QuantConfig, dequantize, quantize

    cfg = cfg or QuantConfig()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight.detach().float().numpy()
                deq = dequantize(quantize(w, cfg), w.shape[1], cfg)
                mod.weight.copy_(torch.from_numpy(deq))
    return ref
