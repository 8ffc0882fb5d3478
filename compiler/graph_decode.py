"""Decode steps with fixed shapes, replayed from one CUDA graph per cache length.

A decoder exported with past grows its cache every step (present = concat(past, new)), so each step
has new shapes and the VM launches its ~1000 kernels one by one from the host (a Llama-2-7B step:
~4.8 ms of kernels, ~7.2 ms of wall time). When the model also takes position_ids, the cache can stay
at a fixed length P instead, padded on the right and masked out:

    past [b, h, P, d]  (slots 0..n-1 hold the n cached tokens, n..P-1 padding: attention_mask 0 there)
      -> model(input_ids [b, 1], attention_mask [b, P + 1], position_ids [b, 1] = n, past)
      -> present [b, h, P + 1, d]  (the new token's keys/values in its last slot, P)
      -> present[..., P, :] copied into past slot n (index_copy_ with n on the device; all layers'
         caches are views of one tensor, so that is one stack and one index_copy_ per step)

(Artifacts with the main_new_kv entry, compiler/new_kv_entry.py, return that slot alone as present
[b, h, 1, d]: the model then never copies the whole cache into a present output.)

so every step has the same shapes. The step (the VM call plus the one-slot copies back into the input
buffers) is captured once into a CUDA graph (torch.cuda.graph; TVM launches on torch's capture stream
through tvm_ffi.use_torch_stream) and replayed: the host only writes the new token, its position
(which is also the slot index) and one mask column. P is the prompt plus the new tokens rounded up to
BUCKET, so one capture serves a whole generation and later ones of similar length. Before the graph is
instantiated, the edges into our kernels that wait for their predecessor become programmatic
(compiler/cuda_graph.py): they launch early and a GEMV's weights stream while the kernel before runs.
Padding changes nothing the model computes for real tokens (masked keys get zero weight, positions
come from position_ids, the query is the last key so the causal part masks nothing), which
tests/test_generate.py checks token for token; without a GPU the same padded steps run uncaptured.
(The cache was left-padded until 2026-11-24 and every step shifted all of it down one slot: 64 copies
of the whole cache per Llama-2-7B step, where one slot per layer and tensor is new.)
"""
from __future__ import annotations

import warnings

import numpy as np

BUCKET = 128  # cache lengths are multiples of this (one capture per length and batch)


def padded_length(length: int) -> int:
    """The fixed cache length P serving `length` tokens (prompt + new)."""
    return -(-length // BUCKET) * BUCKET


class PaddedDecode:
    """Fixed-shape decode for a Generator (compiler/generate.py) whose model takes position_ids."""

    def __init__(self, gen, batch: int, length: int, capture: bool):
        import torch

        self.gen, self.model = gen, gen.model
        self.P = padded_length(length)
        dev = "cuda" if capture else "cpu"
        spec = {i["name"]: i for i in self.model.inputs}
        self.ids = torch.zeros((batch, 1), dtype=getattr(torch, gen.ids["dtype"]), device=dev)
        self.mask = torch.zeros((batch, self.P + 1), dtype=getattr(torch, gen.mask["dtype"]), device=dev)
        self.pos = torch.zeros((batch, 1), dtype=getattr(torch, gen.positions["dtype"]), device=dev)
        # the caches of one shape and dtype (in the decoders we know: all of them) are views of one
        # tensor, so a step writes their new slots with one stack and one index_copy_ (2 kernels), not
        # one index_copy_ per cache (64 for Llama-2-7B)
        groups: dict = {}
        for i, p in enumerate(gen.past):
            shape = tuple(batch if a == 0 else self.P if a == gen.axis else d for a, d in enumerate(p["shape"]))
            groups.setdefault((shape, p["dtype"]), []).append(i)
        self.past = [None] * len(gen.past)
        self.caches = []  # (tensor [len(members), *shape], member indices into past)
        for (shape, dtype), members in groups.items():
            cache = torch.zeros((len(members), *shape), dtype=getattr(torch, dtype), device=dev)
            for i, view in zip(members, cache.unbind(0)):  # contiguous views: the model's inputs
                self.past[i] = view
            self.caches.append((cache, members))
        # the slot index_copy_ writes: n, as position_ids holds (int64 rows are all n: reuse its first)
        self.slot = (self.pos[0] if self.pos.dtype == torch.int64 else
                     torch.zeros((1,), dtype=torch.int64, device=dev))
        self.feed = {gen.ids["name"]: self.ids, gen.mask["name"]: self.mask, gen.positions["name"]: self.pos}
        self.feed.update({p["name"]: t for p, t in zip(gen.past, self.past)})
        assert set(self.feed) == set(spec), (sorted(self.feed), sorted(spec))
        self.capture, self.graph, self.out = capture, None, None
        self.programmatic = 0  # edges made programmatic in the captured graph (compiler/cuda_graph.py)
        self.n = 0

    def start(self, present: list, n: int) -> None:
        """Take the prefill's caches (length n) as slots 0..n-1 of the padded cache."""
        import torch

        if n >= self.P:
            raise ValueError(f"cache of {n} does not fit the padded length {self.P}")
        self.mask.zero_()
        self.mask[:, :n] = 1  # the n cached tokens
        self.mask[:, self.P] = 1  # and (last column) the token being fed
        for t, src in zip(self.past, present):
            t.zero_()
            t.narrow(self.gen.axis, 0, n).copy_(torch.from_dlpack(src))
        self.n = n

    def _run(self):
        """One model call on the static buffers, then the new token's slot copied into the past buffers."""
        import torch
        import tvm

        args = [tvm.runtime.from_dlpack(self.feed[i["name"]]) for i in self.model.inputs]
        if self.model._new_kv is not None:  # presents of the new slot alone: no copy of the whole cache
            out = self.model._new_kv(*args, *self.model.params)
            new = [torch.from_dlpack(out[i]) for i in self.gen.present_index]
        else:
            out = self.model._main(*args, *self.model.params)
            new = [torch.from_dlpack(out[i]).narrow(self.gen.axis, self.P, 1) for i in self.gen.present_index]
        for cache, members in self.caches:
            cache.index_copy_(self.gen.axis + 1, self.slot, torch.stack([new[i] for i in members]))
        return out, torch.from_dlpack(out[self.gen.logits_index])

    def _capture(self):
        import torch
        import tvm_ffi

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        keep = [t.clone() for t in self.past]  # warm-up steps must not advance the real cache
        with tvm_ffi.use_torch_stream(torch.cuda.stream(side)):
            for _ in range(2):  # fills the VM's memory pool so the capture allocates nothing
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        for t, k in zip(self.past, keep):
            t.copy_(k)
        waiting = self.model.manifest.get("graph_wait_kernels", []) if self.gen.pdl else []
        try:
            self._record(waiting)
        except RuntimeError as e:  # the driver refused an edge edit: that graph is dropped, never run
            warnings.warn(f"decode graph without programmatic edges: {e}")
            self._record([])
        # The step's intermediates went back to the VM's pool, and later VM calls (the next prefill)
        # may use that memory between replays. That is safe because a replay rewrites all of them
        # before reading, and what outlives a replay (self.out, the torch input buffers) is not pooled.

    def _record(self, waiting: list) -> None:
        """Capture the step into self.graph; with `waiting` (kernel names), the edges into those kernels
        are made programmatic (compiler/cuda_graph.py) before the graph is instantiated."""
        import torch
        import tvm_ffi

        self.programmatic = 0
        if waiting:
            try:
                self.graph = torch.cuda.CUDAGraph(keep_graph=True)  # edited before it is instantiated
            except TypeError:  # a torch without keep_graph: stream-order edges
                waiting = []
        if not waiting:
            self.graph = torch.cuda.CUDAGraph()
        # "relaxed": should the VM's pool still need a cudaMalloc, it may (the memory outlives the graph)
        with tvm_ffi.use_torch_stream(torch.cuda.graph(self.graph, capture_error_mode="relaxed")):
            self.out = self._run()  # the outputs live at the captured addresses: keep them
        if waiting:
            from .cuda_graph import make_programmatic

            self.programmatic = make_programmatic(self.graph.raw_cuda_graph(), waiting)
            self.graph.instantiate()

    def step(self, tok: np.ndarray) -> np.ndarray:
        """Feed one token per sequence; returns the next logits [b, vocab] (float32, host)."""
        if self.n + 1 > self.P:
            raise ValueError("padded cache is full")
        self.ids.copy_(self._host(tok[:, None], self.ids))
        self.pos.fill_(self.n)
        if self.slot.data_ptr() != self.pos.data_ptr():
            self.slot.fill_(self.n)
        if self.capture:
            if self.graph is None:
                self._capture()  # records the step without running it
            self.graph.replay()
            logits = self.out[1]
        else:
            logits = self._run()[1]
        self.mask[:, self.n] = 1  # this step's token now sits in slot n
        self.n += 1
        return logits[:, -1, :].float().cpu().numpy()

    @staticmethod
    def _host(a: np.ndarray, like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(like.dtype)
