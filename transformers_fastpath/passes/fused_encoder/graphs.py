"""CUDA graphs for small batches: the dense route replayed from a graph captured per bucketed shape.

A small batch on a GPU is launch-bound: BERT-base at 8x128 computes in well under a millisecond,
while launching its ~200 kernels one by one from Python takes several. A CUDA graph launches them
all at once. A graph has fixed shapes and fixed memory, so each call is padded up to a bucket:

* rows to the next power of two (extra rows are zeros, all real tokens: finite, and ignored),
* length to a multiple of 16 up to 64, then of 64 (extra positions are masked keys),

copied into the graph's static input, replayed, and the ``(B, T)`` result copied out. Real tokens
see exactly the keys they see without the graph (the extra positions are masked), so outputs on
real tokens equal the eager dense route's up to the rounding of another kernel shape.

A bucket is captured on its second call (a shape seen once is not worth a capture), at most
:data:`MAX_GRAPHS` are kept (least recently used dropped), and all of one model's graphs share
one memory pool: only their static inputs and outputs stay allocated between calls. Replays of
one model are serialized on the GPU (each waits for the previous one's event), so two threads on
two streams never use the pool at once.

What a graph reads is fixed at capture: the weights' memory. In-place changes of the weights
are seen by the next replay; a replaced tensor (``p.data = ...``, a new Parameter) changes the
cache key, so the next call captures again. The packed q/k/v weight is concatenated inside the
graph, so ``cache_qkv`` is not used with graphs (it would freeze a copy).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import is_out_of_memory
from .layers import BoundLayer
from .routes import run_dense

__all__ = ["GRAPH_MAX_TOKENS", "MAX_GRAPHS", "GraphCache", "bucket_batch", "bucket_length"]

logger = logging.getLogger(__name__)

GRAPH_MAX_TOKENS = 8192
"""Largest bucketed ``rows x length`` replayed from a graph; larger batches are compute-bound."""
MAX_GRAPHS = 32
"""Graphs kept per model (each holds its static input and output; the working memory is shared)."""
_SEEN_LIMIT = 4096  # distinct keys remembered before the first-sighting counter starts over
# torch captures one graph at a time per process (every model's captures, every thread's).
_CAPTURE_LOCK = threading.Lock()


def bucket_batch(batch: int) -> int:
    """Rows of the graph for ``batch`` rows: the next power of two."""
    return 1 << max(0, batch - 1).bit_length()


def bucket_length(length: int) -> int:
    """Length of the graph for ``length`` tokens: a multiple of 16 up to 64, then of 64."""
    step = 16 if length <= 64 else 64
    return -(-length // step) * step


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    x: torch.Tensor  # (Bb, Tb, E) static input
    keep: torch.Tensor | None  # (Bb, Tb) True at real tokens; None for a graph without a mask
    out: torch.Tensor  # (Bb, Tb, E) static output


class GraphCache:
    """One model's captured graphs (see the module docstring). Safe to share between threads.

    Attributes:
        disabled: why graphs stopped being used on this model (a capture failed), or None.
        stats: ``captures``, ``replays``, ``evictions``.
    """

    def __init__(self, max_tokens: int = GRAPH_MAX_TOKENS, max_graphs: int = MAX_GRAPHS) -> None:
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.disabled: str | None = None
        self.stats: Counter[str] = Counter()
        self._reset()

    def _reset(self) -> None:
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._seen: Counter[tuple[Any, ...]] = Counter()
        self._pool: Any = None
        self._stream: Any = None  # the side stream every warm-up and capture of this cache runs on
        self._weights: dict[int, tuple[int, ...]] = {}  # per converted forward: the weights' memory its graphs read
        self._last: Any = None  # torch.cuda.Event after the latest replay's copy-out
        self._lock = threading.Lock()

    # A deep copy or pickle of the model gets an empty cache: graphs point at this model's memory.
    def __getstate__(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "max_graphs": self.max_graphs, "disabled": self.disabled,
                "stats": Counter()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def clear(self) -> None:
        """Drop every graph and its memory pool (revert, or weights gone)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._last is not None:
            self._last.synchronize()  # a replay still running must not have its buffers handed out again
        self._graphs.clear()
        self._seen.clear()
        self._weights.clear()
        self._pool = None
        self._last = None

    def _drop_slot(self, slot: int) -> None:
        if self._last is not None:
            self._last.synchronize()
        for key in [k for k in self._graphs if k[0] == slot]:
            del self._graphs[key]
        for key in [k for k in self._seen if k[0] == slot]:
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._graphs)

    def __bool__(self) -> bool:  # an empty cache is still a cache
        return True

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (``(B, T, E)``) is a batch this cache would replay: CUDA, small, not inside
        someone else's capture."""
        batch, length, _ = x.shape
        return (self.disabled is None and x.is_cuda
                and bucket_batch(batch) * bucket_length(length) <= self.max_tokens
                and not torch.cuda.is_current_stream_capturing())

    def run(self, x: torch.Tensor, keep: torch.Tensor | None, layers: Sequence[BoundLayer]) -> torch.Tensor | None:
        """The dense route's output for ``x``, computed on its bucket: replayed from a graph, or
        eagerly on the padded bucket (its first call, or after a failed capture), so every call of
        a bucket computes the same shapes with the same kernels. None: graphs are disabled."""
        batch, length, _ = x.shape
        rows, size = bucket_batch(batch), bucket_length(length)
        masked = keep is not None or size != length  # extra rows are whole rows of zeros: no mask needed
        weights = tuple(t.data_ptr() for layer in layers for t in layer.w if t is not None)
        slot = id(layers[0].parts)  # which converted forward (the encoder, or one layer of a layer-level model)
        key = (slot, x.device, x.dtype, rows, size, masked)
        # Static buffers are ordinary tensors (not inference tensors), so calls under no_grad and
        # under inference_mode can share a graph.
        with self._lock, torch.inference_mode(False), torch.no_grad():
            if self.disabled is not None:
                return None
            if self._weights.get(slot, weights) != weights:  # new weights (replaced, moved): their old graphs go
                self._drop_slot(slot)
            self._weights[slot] = weights
            graph = self._graphs.get(key)
            if graph is None:
                self._seen[key] += 1
                if self._seen[key] >= 2:
                    graph = self._capture(key, x, rows, size, masked, layers)
                if graph is None and len(self._seen) > _SEEN_LIMIT:
                    self._seen.clear()
            else:
                self._graphs.move_to_end(key)
            if graph is not None:
                return self._replay(graph, x, keep)
        with torch.inference_mode(False), torch.no_grad():  # eager, outside the lock: no shared buffers
            padded, padded_keep = _buffers(x, rows, size, masked)
            _fill(padded, padded_keep, x, keep)
            return run_dense(padded, padded_keep, layers)[:batch, :length].clone()

    def _capture(self, key: tuple[Any, ...], x: torch.Tensor, rows: int, size: int, masked: bool,
                 layers: Sequence[BoundLayer]) -> _Graph | None:
        """Capture the bucket's graph on this cache's side stream, or None (this call runs eagerly)."""
        device = x.device
        static_x, static_keep = _buffers(x, rows, size, masked)
        with _CAPTURE_LOCK, torch.cuda.device(device):
            if self._stream is None or self._stream.device != device:
                self._stream = torch.cuda.Stream(device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side, caller = self._stream, torch.cuda.current_stream(device)
            side.wait_stream(caller)
            graph = torch.cuda.CUDAGraph()
            try:
                # The outer stream context restores the caller's stream even if the capture raises.
                with torch.cuda.stream(side):
                    run_dense(static_x, static_keep, layers)  # warm-up: cuBLAS state for this stream, outside the capture
                    with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                        static_out = run_dense(static_x, static_keep, layers)
            except Exception as exc:  # noqa: BLE001 - decided below: this call runs eagerly either way
                caller.wait_stream(side)
                if is_out_of_memory(exc):  # memory short now, maybe not later: try this bucket again later
                    self._seen[key] = 0
                    self.stats["captures out of memory"] += 1
                    return None
                cause = exc.__context__ if exc.__context__ is not None else exc  # the error inside the capture
                self.disabled = f"capturing a CUDA graph failed ({type(cause).__name__}: {str(cause).strip()[:200]})"
                self._drop()
                logger.warning("fastpath: %s; the fused encoder runs without CUDA graphs on this model "
                               "(set cuda_graphs = false in the policy to skip the attempt)", self.disabled)
                return None
            caller.wait_stream(side)
        entry = _Graph(graph, static_x, static_keep, static_out)
        self._graphs[key] = entry
        self.stats["captures"] += 1
        while len(self._graphs) > self.max_graphs:
            evicted, _ = self._graphs.popitem(last=False)
            self._seen.pop(evicted, None)  # it must be seen twice again before another capture
            self.stats["evictions"] += 1
        logger.debug("fused encoder: captured a CUDA graph for %dx%d (%s, %s)", rows, size, x.dtype,
                     "masked" if masked else "no mask")
        return entry

    def _replay(self, graph: _Graph, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        stream = torch.cuda.current_stream(x.device)
        if self._last is not None:
            stream.wait_event(self._last)  # the previous replay (maybe on another stream) is done with the pool
        _fill(graph.x, graph.keep, x, keep)
        graph.graph.replay()
        out = graph.out[:batch, :length].clone()
        event = torch.cuda.Event()
        event.record(stream)
        self._last = event
        self.stats["replays"] += 1
        return out


def _buffers(x: torch.Tensor, rows: int, size: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A bucket's input buffers: ``(rows, size, E)`` zeros and, when masked, ``(rows, size)`` keep flags."""
    static_x = torch.zeros(rows, size, x.shape[-1], dtype=x.dtype, device=x.device)
    return static_x, torch.ones(rows, size, dtype=torch.bool, device=x.device) if masked else None


def _fill(static_x: torch.Tensor, static_keep: torch.Tensor | None, x: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Copy a batch into its bucket: real rows first, the rest zeros; extra positions are masked keys,
    extra rows all "real" (finite, and cut off afterwards)."""
    batch, length, _ = x.shape
    static_x[:batch, :length].copy_(x)
    if length < static_x.shape[1]:
        static_x[:batch, length:].zero_()
    if batch < static_x.shape[0]:
        static_x[batch:].zero_()
    if static_keep is not None:
        if keep is None:
            static_keep[:batch, :length].fill_(True)
        else:
            static_keep[:batch, :length].copy_(keep)
        static_keep[:batch, length:].fill_(False)
        static_keep[batch:].fill_(True)
