"""Pipelines that tokenize, run and post-process whole batches, host work overlapping the GPU.

transformers' pipelines do everything around the model one input at a time: tokenize one text,
collate, slice each output back into one ``ModelOutput`` per input, post-process each. On a GPU
that machinery, not the model, takes most of a pipeline's time. With batched processing on, the
pipeline's ``get_iterator`` (what ``__call__`` runs for lists, generators and datasets, after
transformers has resolved every argument) is replaced for the tasks that have a
:class:`~transformers_fastpath.pipelines.batched_tasks.Batcher`:

* each batch is tokenized in one call of the fast tokenizer and padded as transformers pads;
* on a GPU, inputs go over from pinned memory without blocking, the few output tensors the
  results need come back the same way (one copy per batch), and batch ``k + 1`` is tokenized and
  launched before batch ``k``'s results are made, so host work runs while the GPU computes;
* results are made per batch (:meth:`Batcher.decode`), each exactly the structure the task's own
  ``postprocess`` returns, and handed back in the caller's order.

Lazy inputs (generators, datasets) stay lazy: they are read in windows that start at one input
and double up to :data:`BATCHES_PER_CALL` batches, so the first result comes back after one
input's work and memory stays bounded; inputs are sorted by length inside each window (when
length sorting is on) and results come back in input order. A window's results are yielded when
the whole window is done.

What a batcher declines (another pipeline class, tokenizer arguments it does not reproduce,
an input of another kind, batch size 1) runs transformers' own ``get_iterator``, unchanged.
Errors propagate as they arise; for lists, the resilience layer above
(:mod:`transformers_fastpath.pipelines.resilience`) splits and isolates as always, handing this
layer :func:`batches_per_call` batches per call so consecutive batches can overlap.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

from .batched_tasks import BatchDeclined, Batcher, Encoded, batcher_for
from .batching import override_subclass, sorted_order

__all__ = ["BATCHES_PER_CALL", "BatchedState", "batched_processing_of", "batches_per_call",
           "disable_batched_processing", "enable_batched_processing"]

logger = logging.getLogger(__name__)

BATCHES_PER_CALL = 8
"""Batches one list call hands this layer (enough for the GPU to always have the next one queued)."""

_MARKER = "_fastpath_batched_base"
_STATE_ATTR = "_fastpath_batched"


@dataclass
class BatchedState:
    """Per-pipeline settings and counters (shared by shallow copies, e.g. replicas)."""

    sort_windows: bool = True
    # Fill a short last batch up to the batch size (the batcher decides how: Batcher.filled), so a
    # compiled step (generate's static cache) sees one batch shape instead of compiling another.
    fill_batches: bool = False
    batches: int = 0  # batches run by this layer
    declined: dict[str, int] = field(default_factory=dict)  # reason -> calls that went to transformers' path


def enable_batched_processing(pipeline: Any, *, sort_windows: bool = True, fill_batches: bool = False) -> str | None:
    """Batch ``pipeline``'s pre- and post-processing (see module doc); idempotent.

    Returns None when on, else why not (the pipeline is then left unchanged).
    ``sort_windows``: sort lazy inputs by length inside each window. ``fill_batches``: fill a short
    last batch up to the batch size where the batcher can (text-generation with a static cache).
    """
    if batcher_for(pipeline) is None:
        task = getattr(pipeline, "task", None)
        return f"{task}: no batched pre- and post-processing for {type(pipeline).__name__}"
    state = batched_processing_of(pipeline)
    if state is not None:
        state.sort_windows = sort_windows
        state.fill_batches = fill_batches
        return None
    object.__setattr__(pipeline, _STATE_ATTR, BatchedState(sort_windows, fill_batches))
    pipeline.__class__ = override_subclass(type(pipeline), _MARKER, get_iterator=_batched_get_iterator)
    return None


def disable_batched_processing(pipeline: Any) -> None:
    """Undo :func:`enable_batched_processing` (only when it is the outermost class swap)."""
    base = type(pipeline).__dict__.get(_MARKER)
    if base is not None:
        pipeline.__class__ = base
        vars(pipeline).pop(_STATE_ATTR, None)


def batched_processing_of(pipeline: Any) -> BatchedState | None:
    """The batched-processing state of ``pipeline``, or None when it is off."""
    if getattr(type(pipeline), _MARKER, None) is None:
        return None
    return vars(pipeline).get(_STATE_ATTR)


def batches_per_call(pipeline: Any) -> int:
    """How many batches a list call should hand ``pipeline`` at once: :data:`BATCHES_PER_CALL` when
    batched processing is on, else 1."""
    return BATCHES_PER_CALL if batched_processing_of(pipeline) is not None else 1


# -- the iterator ----------------------------------------------------------------------------

def _batched_get_iterator(self: Any, inputs: Any, num_workers: int, batch_size: int, preprocess_params: dict[str, Any],
                          forward_params: dict[str, Any], postprocess_params: dict[str, Any]) -> Any:
    base = type(self)._fastpath_batched_base
    state = batched_processing_of(self)
    batcher = batcher_for(self)
    reason = _declined(self, state, batcher, batch_size, preprocess_params, forward_params, postprocess_params)
    if reason is not None:
        if state is not None:
            if reason not in state.declined:
                logger.debug("fastpath: %s runs transformers' per-input processing for this call: %s",
                             type(self).__name__, reason)
            state.declined[reason] = state.declined.get(reason, 0) + 1
        if batcher is not None and batcher.declined_batch_size is not None:
            batch_size = batcher.declined_batch_size
        return base.get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params,
                                 postprocess_params)
    assert state is not None and batcher is not None
    run = _BatchedRun(self, base, batcher, state, batch_size, num_workers,
                      (preprocess_params, forward_params, postprocess_params))
    return _Results(run.results(inputs), len(inputs) if isinstance(inputs, Sized) else None)


def _declined(pipe: Any, state: BatchedState | None, batcher: Batcher | None, batch_size: int,
              preprocess_params: dict[str, Any], forward_params: dict[str, Any],
              postprocess_params: dict[str, Any]) -> str | None:
    if state is None or batcher is None:
        return "not a pipeline class fastpath batches"
    if not isinstance(batch_size, int) or batch_size <= 1:
        return "batch size 1"
    reason = batcher.unsupported(pipe, preprocess_params, postprocess_params) or \
        batcher.unsupported_forward(pipe, forward_params)
    if reason is None and batcher.rows(preprocess_params) > batch_size:
        return "more model rows per input than the batch size"  # transformers splits such an input over forwards
    return reason


class _Results:
    """The iterator handed back to ``Pipeline.__call__`` (``len()`` works when the input has one, as
    for transformers' own iterator)."""

    def __init__(self, results: Iterator[Any], length: int | None) -> None:
        self._results = results
        self._length = length

    def __iter__(self) -> _Results:
        return self

    def __next__(self) -> Any:
        return next(self._results)

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("this pipeline's input has no length")
        return self._length


@dataclass
class _Flight:
    """One batch launched: its positions in the window, its encoding, and its outputs on the way to the host
    (no encoding: the batcher declined it, and transformers' path runs it when it is finished)."""

    positions: list[int]
    encoded: Encoded | None = None
    host: dict[str, Any] = field(default_factory=dict)
    copied: list[Any] = field(default_factory=list)  # CUDA events recorded after the copies


class _BatchedRun:
    """One ``get_iterator`` call: windows of the input, batches of each window, in flight two at a time."""

    def __init__(self, pipe: Any, base: type, batcher: Batcher, state: BatchedState, batch_size: int,
                 num_workers: int, params: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]) -> None:
        self.pipe = pipe
        self.base = base
        self.batcher = batcher
        self.state = state
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.preprocess_params, self.forward_params, self.postprocess_params = params

    def results(self, inputs: Any) -> Iterator[Any]:
        if isinstance(inputs, (list, tuple)):  # in memory already (resilience hands a few batches per call)
            yield from self._run_window(list(inputs))
            return
        for window, source_error in self._windows(inputs):
            try:
                results = list(self._run_window(window))
            except Exception:  # noqa: BLE001 - rerun one input at a time: the results before the failing
                results = None  # input come back, then its error is raised (as a batch-1 pipeline yields them)
            if results is None:
                yield from self._transformers_path(window, batch_size=1)
            else:
                yield from results
            if source_error is not None:
                raise source_error

    def _windows(self, inputs: Any) -> Iterator[tuple[list[Any], BaseException | None]]:
        """Windows of a lazy input, with the error its source raised while the window was read (the
        inputs read before it are run first, as transformers runs each input it gets)."""
        items: Iterable[Any] = inputs
        if isinstance(inputs, Sized) and hasattr(inputs, "__getitem__"):  # a torch Dataset (e.g. KeyDataset)
            items = (inputs[i] for i in range(len(inputs)))
        iterator = iter(items)
        size, largest = 1, self.batch_size * BATCHES_PER_CALL
        while True:
            window: list[Any] = []
            try:
                window.extend(itertools.islice(iterator, size))
            except Exception as exc:  # noqa: BLE001 - raised again after this window's results
                yield window, exc
                return
            if not window:
                return
            yield window, None
            size = min(size * 2, largest)

    def _transformers_path(self, items: list[Any], batch_size: int | None = None) -> Iterator[Any]:
        batch_size = batch_size or self.batcher.declined_batch_size or self.batch_size
        return iter(self.base.get_iterator(self.pipe, items, self.num_workers, batch_size,
                                           self.preprocess_params, self.forward_params, self.postprocess_params))

    def _run_window(self, window: list[Any]) -> Iterator[Any]:
        if not all(self.batcher.accepts(item) for item in window):
            # another kind of input among them: transformers' path, which raises or copes as it does
            yield from self._transformers_path(window)
            return
        order = (sorted_order(window) if self.state.sort_windows else None) or list(range(len(window)))
        size = max(1, self.batch_size // self.batcher.rows(self.preprocess_params))  # inputs per model batch
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        results: list[Any] = [None] * len(window)
        pending: _Flight | None = None
        for positions in batches:
            flight = self._launch(window, positions, size)  # queued on the GPU before the previous batch is read
            if pending is not None:
                self._finish(pending, results, window)
            pending = flight
        if pending is not None:
            self._finish(pending, results, window)
        yield from results

    def _launch(self, window: list[Any], positions: list[int], size: int) -> _Flight:
        pipe = self.pipe
        items = [window[p] for p in positions]
        try:
            encoded = self.batcher.encode(pipe, items, self.preprocess_params)
        except BatchDeclined as declined:
            return self._declined_batch(positions, declined)
        if self.state.fill_batches and len(items) < size:
            encoded = self.batcher.filled(encoded, size)
        with pipe.device_placement(), pipe.get_inference_context()():
            model_inputs = _to_device(encoded.inputs, pipe.device)
            try:
                outputs = self.batcher.forward(pipe, model_inputs, self.forward_params)
            except BatchDeclined as declined:  # a batcher that runs such a batch input by input
                return self._declined_batch(positions, declined)
            selected = self.batcher.select(pipe, outputs, encoded, self.postprocess_params)
            host, copied = _to_host(selected)
        self.state.batches += 1
        return _Flight(positions, encoded, host, copied)

    def _declined_batch(self, positions: list[int], declined: BatchDeclined) -> _Flight:
        reason = f"{type(self.pipe).__name__}: {declined}"
        if reason not in self.state.declined:
            logger.debug("fastpath: a batch runs transformers' per-input processing: %s", reason)
        self.state.declined[reason] = self.state.declined.get(reason, 0) + 1
        return _Flight(positions)

    def _finish(self, flight: _Flight, results: list[Any], window: list[Any]) -> None:
        for event in flight.copied:
            event.synchronize()
        decoded: list[Any] | None = None
        if flight.encoded is not None:
            try:
                decoded = self.batcher.decode(self.pipe, flight.host, flight.encoded, self.postprocess_params)
            except BatchDeclined as declined:
                self._declined_batch(flight.positions, declined)
        if decoded is None:  # declined: one input at a time (inputs the batcher cannot stack, as images of
            # different sizes, transformers' collation could not stack either)
            decoded = list(self._transformers_path([window[p] for p in flight.positions], batch_size=1))
        if len(decoded) != len(flight.positions):
            raise RuntimeError(f"fastpath: {type(self.batcher).__name__} made {len(decoded)} results for "
                               f"{len(flight.positions)} inputs; set batched_processing = false and report it")
        for position, result in zip(flight.positions, decoded):
            results[position] = result


def _to_device(inputs: dict[str, Any], device: Any) -> dict[str, Any]:
    """Model inputs on ``device``; to a GPU from pinned memory, without blocking the host."""
    if getattr(device, "type", None) != "cuda":
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if hasattr(v, "pin_memory") else v
            for k, v in inputs.items()}


def _to_host(selected: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """``selected`` on the host, and the CUDA events that mark the copies done (one per source GPU:
    a copy from another GPU than the current one, as with a ``device_map`` model, runs on that GPU's stream)."""
    import torch

    host: dict[str, Any] = {}
    sources: set[torch.device] = set()
    for key, value in selected.items():
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            with torch.cuda.device(value.device):
                buffer.copy_(value, non_blocking=True)
            host[key] = buffer
            sources.add(value.device)
        elif isinstance(value, torch.Tensor):
            host[key] = value.detach().cpu()
        else:
            host[key] = value
    events = []
    for device in sources:
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()
            events.append(event)
    return host, events
