"""Autoregressive generation on a compiled decoder exported "with past".

The model is called the way torch.onnx.export / optimum write decoders:
    (input_ids[b, s], past_key_values.{i}.key/value[b, h, past, d], [attention_mask[b, past + s]],
     [position_ids[b, s]])  ->  (logits[b, s, vocab], present.{i}.key/value[b, h, past + s, d])
Prefill runs the prompt with empty caches (past = 0); each decode step feeds one token per sequence and
the previous step's present tensors as the next past. The caches never leave the device: the present
outputs are passed straight back in (the VM's pooled allocator recycles their memory, so a step does no
cudaMalloc); only the last position's logits come to the host, for sampling and stop checks.
On a GPU, models that also take position_ids decode with fixed shapes from a left-padded cache,
replayed from a CUDA graph (compiler/graph_decode.py); other models pay the VM's per-kernel launches.
"""
from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from .errors import NibbleError


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [batch, new tokens] (sequences that stopped early are padded with their stop token)
    prefill_ms: float
    decode_ms_per_token: float  # mean over decode steps (0 when only one token was generated)
    steps: int

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.decode_ms_per_token if self.decode_ms_per_token else float("nan")


def _cache_role(name: str):
    """(layer, "key"|"value") for past/present names: past_key_values.3.key, present.3.value,
    past_key_3 / present_value_3 and the like."""
    m = re.search(r"(\d+)\D*?(key|value)", name)  # layer first: past_key_values.3.value
    if m:
        return int(m.group(1)), m.group(2)
    m = re.search(r"(key|value)\D*?(\d+)", name)  # kind first: past_value_3
    return (int(m.group(2)), m.group(1)) if m else None


def _last_row(logits) -> np.ndarray:
    """logits[:, -1, :] as fp32 numpy, copying only those rows off the device: a 200-token prompt's
    whole [1, 200, 32000] logits took 0.9 ms to copy to the host on the H200, the last row ~nothing."""
    b, s, v = (int(d) for d in logits.shape)
    if s == 1:
        return logits.numpy()[:, -1, :].astype(np.float32)
    size = v * logits.dtype.itemsize
    rows = [logits._create_view((1, 1, v), logits.dtype, relative_byte_offset=(i * s + s - 1) * size).numpy()
            for i in range(b)]
    return np.concatenate(rows)[:, -1, :].astype(np.float32)


class Generator:
    """Wraps a loaded CompiledModel (compiler.runtime) whose inputs include past key/values."""

    def __init__(self, model):
        self.model = model
        ins, outs = model.inputs, model.outputs
        names = [i["name"] for i in ins]
        self.past = [i for i in ins if "past" in i["name"] and _cache_role(i["name"])]
        self.present = [o for o in outs if "present" in o["name"] and _cache_role(o["name"])]
        if not self.past or len(self.past) != len(self.present):
            raise NibbleError(f"{model.path}: generate needs a decoder exported with past key/values (inputs "
                              f"named past_key_values.N.key/value, outputs present.N.key/value); this model's "
                              f"inputs are {names} and outputs {[o['name'] for o in outs]}")
        by_role = {_cache_role(o["name"]): o for o in self.present}
        try:
            self.present_index = [outs.index(by_role[_cache_role(p["name"])]) for p in self.past]
        except KeyError as e:
            raise NibbleError(f"{model.path}: no present output matches past input {e}") from None
        self.ids = next((i for i in ins if i["name"] == "input_ids"), None)
        if self.ids is None or len(self.ids["shape"]) != 2:
            raise NibbleError(f"{model.path}: generate needs a rank-2 input named input_ids; inputs are {names}")
        self.mask = next((i for i in ins if i["name"] == "attention_mask"), None)
        self.positions = next((i for i in ins if i["name"] == "position_ids"), None)
        known = {self.ids["name"]} | {p["name"] for p in self.past} | {
            i["name"] for i in (self.mask, self.positions) if i}
        other = [n for n in names if n not in known]
        if other:
            raise NibbleError(f"{model.path}: generate does not know how to feed input(s) {other}")
        self.logits_index = next((i for i, o in enumerate(outs) if "logits" in o["name"]), 0)
        # the cache axis that grows: where the past's dim is symbolic and the present's differs
        p0, q0 = self.past[0]["shape"], by_role[_cache_role(self.past[0]["name"])]["shape"]
        self.axis = next((a for a, (x, y) in enumerate(zip(p0, q0)) if isinstance(x, str) and x != y), 2)
        self.max_length = model.manifest.get("max_length")
        # fixed-shape decode steps (compiler/graph_decode.py): None = on a GPU when the model allows,
        # True = also uncaptured on the CPU (tests), False = never
        self.graphs = None
        # programmatic edges in the captured graphs (compiler/cuda_graph.py); False: plain stream order
        self.pdl = True
        self._decoders = {}

    def _empty_past(self, batch: int):
        import tvm

        out = []
        for p in self.past:
            shape = [0 if a == self.axis else batch if a == 0 else d for a, d in enumerate(p["shape"])]
            bad = [d for d in shape if isinstance(d, str)]
            if bad:
                raise NibbleError(f"past input {p['name']!r} has dims {p['shape']}: cannot size {bad} "
                                  "for an empty cache")
            out.append(tvm.runtime.empty(shape, p["dtype"], self.model.device))
        return out

    def _step(self, ids: np.ndarray, past: list, past_len: int):
        import tvm

        dev = self.model.device
        feed = {self.ids["name"]: tvm.runtime.tensor(ids.astype(self.ids["dtype"]), dev)}
        b, s = ids.shape
        if self.mask:
            feed[self.mask["name"]] = tvm.runtime.tensor(np.ones((b, past_len + s), self.mask["dtype"]), dev)
        if self.positions:
            pos = np.broadcast_to(np.arange(past_len, past_len + s), (b, s))
            feed[self.positions["name"]] = tvm.runtime.tensor(np.ascontiguousarray(pos, self.positions["dtype"]), dev)
        for p, t in zip(self.past, past):
            feed[p["name"]] = t
        args = [feed[i["name"]] for i in self.model.inputs]
        out = self.model._main(*args, *self.model.params)
        return _last_row(out[self.logits_index]), [out[i] for i in self.present_index]

    def generate(self, prompt_ids, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens=(), seed: int | None = None,
                 max_length: int | None = None) -> Generation:
        """Greedy (default) or sampled continuation of prompt_ids [batch, prompt] (or one list)."""
        ids = np.atleast_2d(np.asarray(prompt_ids))
        if ids.dtype.kind not in "iu" or ids.size == 0:
            raise NibbleError(f"prompt ids must be a non-empty integer array, got {ids.dtype} {list(ids.shape)}")
        if max_new_tokens < 1:
            raise NibbleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = max_length or self.max_length
        if limit is not None and ids.shape[1] + max_new_tokens > limit:
            raise NibbleError(f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new exceeds the model's "
                              f"maximum length {limit}")
        for i, d in enumerate(self.ids["shape"]):
            if isinstance(d, int) and d != ids.shape[i] and not (i == 1 and d == 1):
                raise NibbleError(f"input_ids dim {i} is pinned to {d} in this artifact, prompt has {ids.shape[i]}")
        rng = np.random.default_rng(seed)
        stop = set(int(t) for t in stop_tokens)
        b = ids.shape[0]
        done = np.zeros(b, bool)
        out = []
        t0 = time.perf_counter()
        logits, past = self._step(ids, self._empty_past(b), 0)
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        padded = self._padded(b, ids.shape[1] + max_new_tokens) if max_new_tokens > 1 else None
        if padded:
            padded.start(past, ids.shape[1])
        steps = 0
        for n in range(max_new_tokens):
            tok = self._pick(logits, do_sample, temperature, top_k, top_p, rng)
            tok = np.where(done, out[-1] if out else tok, tok)
            out.append(tok)
            done |= np.isin(tok, list(stop)) if stop else False
            if done.all() or n == max_new_tokens - 1:
                break
            if padded:
                logits = padded.step(tok)
            else:
                logits, past = self._step(tok[:, None], past, ids.shape[1] + n)
            steps += 1
        decode = time.perf_counter() - t1
        return Generation(np.stack(out, 1), prefill * 1e3, decode * 1e3 / steps if steps else 0.0, steps)

    def _padded(self, batch: int, length: int):
        """The fixed-shape decode (compiler/graph_decode.py) where the model allows it: it needs
        position_ids and attention_mask inputs and torch; it is captured in a CUDA graph on a GPU."""
        if self.graphs is False or not (self.positions and self.mask):
            return None
        try:
            import torch
        except ImportError:
            return None
        from .graph_decode import PaddedDecode, padded_length

        capture = self.model.device.dlpack_device_type() == 2 and torch.cuda.is_available()
        if self.graphs is None and not capture:
            return None  # on the CPU there is no launch overhead to save
        key = (batch, padded_length(length))
        if key not in self._decoders:
            self._decoders[key] = PaddedDecode(self, batch, length, capture)
        return self._decoders[key]

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, rng) -> np.ndarray:
        if not do_sample:
            return logits.argmax(-1)
        z = logits / max(temperature, 1e-6)
        if top_k:
            kth = np.sort(z, -1)[:, -min(top_k, z.shape[-1])][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if top_p < 1.0:
            order = np.argsort(-p, -1)
            sorted_p = np.take_along_axis(p, order, -1)
            keep = np.cumsum(sorted_p, -1) - sorted_p < top_p  # the smallest set reaching top_p
            mask = np.zeros_like(p, bool)
            np.put_along_axis(mask, order, keep, -1)
            p = np.where(mask, p, 0)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])
