"""Decode steps replayed from a CUDA graph: the answer to a decode step bound by the host.

An eager ``Transformer.decode`` launches ~460 kernels from Python per step of the 3-layer V4-Flash
slice (~25 ms of host time on an H100 against ~2.2 ms of GPU time). ``DecodeGraph(model, seq_ids)``
captures one decode step of a fixed batch of sequences and replays it; per step the host only checks
the tokens, reserves pages, mirrors new page ids into fixed-width block tables, copies one small
input tensor and launches the graph.

What makes the step capturable: no op of the decode path synchronizes with the host (value checks
that would read device memory are skipped while a stream captures), every shape follows from the
batch size, and the attention split plan follows from host ints. The inputs live in static device
buffers: ``[tokens, positions]`` int64 [2, B] is the one copy per step; the int32 positions, lengths
and the rest of the batch are computed inside the graph. Block tables are as wide as a sequence at
``max_context`` (``CacheManager.max_pages``) and updated in place when a sequence gains a page.

Valid while its sequences stay allocated: ``step`` raises once one of them was released (even if its
id was allocated again); build a new DecodeGraph for a new set of sequences. Eager ``decode`` /
``prefill`` calls on the same sequences between steps are fine (the block tables follow). The
logits ``step`` returns are a fresh tensor. ``capture=False`` (the only choice on a CPU) runs the
same static-buffer step eagerly, which the CPU tests compare with ``Transformer.decode``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .model import Batch, Transformer


class DecodeGraph:
    """One decode step of ``seq_ids`` (each must be allocated, with at least one token), captured."""

    def __init__(self, model: Transformer, seq_ids: Sequence[int], capture: Optional[bool] = None):
        if not isinstance(model, Transformer):
            raise TypeError(f"model: expected a model_ref Transformer, got {type(model).__name__}")
        if model.numerics != "reference":
            raise ValueError(f"model: DecodeGraph needs numerics 'reference' (paged caches), got {model.numerics!r}")
        seq_ids = _ints("seq_ids", seq_ids)
        if not seq_ids:
            raise ValueError("seq_ids: expected at least one sequence, got none")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids: expected distinct sequences, got {seq_ids}")
        caches = model.caches
        for s in seq_ids:
            if caches.allocation_id(s) is None:
                raise ValueError(f"seq_ids: sequence {s} is not allocated (Transformer.new_sequence)")
            if caches.length(s) == 0:
                raise ValueError(f"seq_ids: sequence {s} has no tokens yet (prefill it before decoding)")
        on_cuda = model.device.type == "cuda"
        capture = on_cuda if capture is None else bool(capture)
        if capture and not on_cuda:
            raise ValueError(f"capture: CUDA graphs need a model on a CUDA device, got {model.device}")
        self.model, self.seq_ids, self.capture = model, seq_ids, capture
        B, dev = len(seq_ids), model.device
        self._alloc = [caches.allocation_id(s) for s in seq_ids]
        self._inputs = torch.zeros(2, B, dtype=torch.int64, device=dev)  # tokens, positions
        self._host = torch.zeros(2, B, dtype=torch.int64, pin_memory=on_cuda)
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if on_cuda else None  # the last input copy has read _host
        self._slots = torch.tensor([caches.slot(s) for s in seq_ids], dtype=torch.int32, device=dev)
        n_layers = len(model.cfg.compress_ratios)
        self._tables: List[Dict[str, torch.Tensor]] = []  # per layer {cache: int32 [B, max pages]}
        self._known: List[Dict[str, List[int]]] = []  # pages mirrored so far, per layer, cache, sequence
        self._versions: List[Dict[str, int]] = []
        for lid in range(n_layers):
            widths = caches.max_pages(lid)
            self._tables.append({k: torch.full((B, w), -1, dtype=torch.int32, device=dev) for k, w in widths.items()})
            self._known.append({k: [0] * B for k in widths})
            self._versions.append({k: -1 for k in widths})
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._logits: Optional[torch.Tensor] = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens[b]`` to sequence ``seq_ids[b]``; fp32 logits [B, vocab] (a new tensor)."""
        m, B = self.model, len(self.seq_ids)
        tokens = _ints("tokens", tokens)
        if len(tokens) != B:
            raise ValueError(f"tokens: expected one token per sequence ({B}), got {len(tokens)}")
        for s, a in zip(self.seq_ids, self._alloc):
            if m.caches.allocation_id(s) != a:
                raise RuntimeError(f"DecodeGraph: sequence {s} was released after this graph was built; "
                                   f"build a new DecodeGraph for the current sequences")
        starts, _, toks = m.reserve_batch(self.seq_ids, [[t] for t in tokens])
        self._mirror_pages()
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy is done with the pinned buffer
        self._host_np[0, :] = toks
        self._host_np[1, :] = starts
        self._inputs.copy_(self._host, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()
        if not self.capture:
            return m.forward(self._batch())
        if self._graph is None:
            return self._first_step()
        self._graph.replay()
        return self._logits.clone()

    # ------------------------------------------------------------------ internals
    def _batch(self) -> Batch:
        """The decode batch on the static buffers (recorded into the graph when capturing)."""
        B, dev = len(self.seq_ids), self.model.device
        pos = self._inputs[1].to(torch.int32)
        rows = torch.arange(B + 1, dtype=torch.int32, device=dev)
        return Batch(self.seq_ids, [], [1] * B, self._inputs[0], rows, pos + 1, pos, pos, rows[:B], self._slots,
                     True, self._tables)

    def _first_step(self) -> torch.Tensor:
        """Run this step eagerly on a side stream (compiles the Triton kernels, warms cuBLAS and the
        allocator: capture needs all that done) and return its logits; then capture the same step.
        Capturing runs nothing, so the caches advance once."""
        m = self.model
        timer_on, m.timer.enabled = m.timer.enabled, False  # the timer synchronizes: not while capturing
        try:
            side = torch.cuda.Stream(device=m.device)
            side.wait_stream(torch.cuda.current_stream(m.device))
            with torch.cuda.stream(side):
                logits = m.forward(self._batch())
            torch.cuda.current_stream(m.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits = m.forward(self._batch())
            self._graph = graph
        finally:
            m.timer.enabled = timer_on
        return logits

    def _mirror_pages(self) -> None:
        """Write the page ids the sequences gained since the last step into the static block tables."""
        caches = self.model.caches
        for lid, known in enumerate(self._known):
            for name, cache in caches.paged(lid).items():
                if cache.version == self._versions[lid][name]:
                    continue  # no sequence of this cache gained a page
                self._versions[lid][name] = cache.version
                table, seen = self._tables[lid][name], known[name]
                for b, s in enumerate(self.seq_ids):
                    n = cache.page_count(s)
                    if n > seen[b]:
                        new = torch.tensor(cache.pages_of(s, seen[b]), dtype=torch.int32)
                        table[b, seen[b]:n].copy_(new)
                        seen[b] = n


def _ints(name: str, values) -> List[int]:
    """A list of ints from a sequence (or 1-D tensor) of integers; TypeError naming ``name`` otherwise."""
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError, RuntimeError):
        out = None
    if out is None or any(isinstance(v, float) for v in values):
        raise TypeError(f"{name}: expected a sequence of ints, got {values!r:.80}")
    return out
