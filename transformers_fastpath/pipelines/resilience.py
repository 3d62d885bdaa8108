"""Pipelines created with fastpath never lose inputs: out-of-memory batches are split, bad inputs isolated.

``enable_resilience(pipe)`` changes only ``pipe.__call__`` for *lists* (a subclass swap, as
:mod:`transformers_fastpath.pipelines.batching` does; ``isinstance`` holds). The list is run in chunks of
the batch size, each chunk one call of the pipeline's own ``__call__`` -- so batches are made
of exactly the inputs transformers would put together, and a failure costs only its chunk. With
batched processing on (:mod:`transformers_fastpath.pipelines.batched`) a chunk is several batches,
so that consecutive batches can overlap; a failing chunk is run again batch by batch, each batch as
a chunk of its own.

Out of memory (``torch.OutOfMemoryError``, CUDA/MPS/XPU "out of memory" RuntimeErrors, a CPU
allocator failure, ``MemoryError``): the chunk is split in halves and each half retried (with
the batch size halved), down to one input per batch; the rest of that call keeps the smaller
batch size. Logged once per pipeline (warning; later splits at debug level). An input that runs
out of memory even alone is an error of that input (below); but when a second input does too
before any input has completed, nothing fits: the first ``OutOfMemoryError`` is raised at once,
with a note.

Inputs that fail on their own: inputs whose type differs from the others' (a ``None`` or an int
among strings) are run one by one, after the rest; a chunk that raises is bisected until the
failing inputs are isolated. Every other input completes. Then, with ``input_errors = "raise"``
(the default), the first failed input's *original* exception is raised -- the type
transformers raises -- with a note naming the failed indices (PEP 678 ``add_note``; appended to
the message before Python 3.11) and these attributes:

* ``exc.fastpath_results``: one entry per input in the caller's order, the exception in place
  of each failed input;
* ``exc.fastpath_failed_indices``: the failed inputs' indices;
* ``exc.fastpath_errors``: ``{index: exception}``.

With ``input_errors = "return"`` the exception object is returned in place of the failed
input's result (logged once per pipeline).

Errors that are not about one input propagate at once, unmasked and without retrying input by
input: fastpath's own errors, ``ImportError``, ``SyntaxError``, ``RecursionError``,
``SystemError``, ``KeyboardInterrupt``; and any error that two disjoint groups of inputs both
raise (same type and message; any out-of-memory counts as the same) before a single input has
completed -- a broken model, a bug -- unless one more input, the last of the list (with length
sorting the shortest), then runs alone: it is raised as it was first raised, after at most
three extra calls (the two halves of the first batch and that one input; with batched processing,
where a call holds several batches, the first batch alone comes before its halves: four). Errors
of pipeline creation (a missing model directory, an unknown task) happen before any of this.

Not changed: single inputs, generators, datasets, chats (a list of messages is one input), and
pipelines whose ``__call__`` does not return one result per input of a list (detected on the
first chunk: that list is run again whole, once, and the pipeline is left alone after).
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import FastpathError, is_out_of_memory
from .batched import batches_per_call
from .batching import is_message
from .batching import CALLER_INDICES, input_length, override_subclass

__all__ = ["INPUT_ERRORS", "disable_resilience", "enable_resilience", "gather_shards", "resilience_of"]

logger = logging.getLogger(__name__)

INPUT_ERRORS = ("raise", "return")
_STATE_ATTR = "_fastpath_resilience"
_MARKER = "_fastpath_resilient_base"

# Errors that are never about one input: raised at once, never retried input by input.
_NEVER_PER_INPUT: tuple[type[BaseException], ...] = (FastpathError, ImportError, SyntaxError, RecursionError,
                                                     SystemError)


@dataclass
class ResilienceState:
    """Per-pipeline settings and log-once flags (shared by shallow copies, e.g. replicas)."""

    input_errors: str = "raise"
    oom_logged: bool = False
    errors_logged: bool = False
    passthrough: bool = False  # this pipeline does not return one result per list input


# -- enabling ----------------------------------------------------------------------------

def enable_resilience(pipeline: Any, input_errors: str = "raise") -> None:
    """Make ``pipeline(list)`` split out-of-memory batches and isolate failing inputs (see module doc).

    Call it before :func:`~transformers_fastpath.pipelines.batching.enable_length_sorting` and replicas
    (the built-in pipeline plugin does), so it sits below them; idempotent (updates the mode).
    """
    if input_errors not in INPUT_ERRORS:
        raise ValueError(f"input_errors must be one of {', '.join(INPUT_ERRORS)}, got {input_errors!r}")
    state = resilience_of(pipeline)
    if state is not None:
        state.input_errors = input_errors
        return
    object.__setattr__(pipeline, _STATE_ATTR, ResilienceState(input_errors))
    pipeline.__class__ = override_subclass(type(pipeline), _MARKER, __call__=_resilient_call)


def disable_resilience(pipeline: Any) -> None:
    """Undo :func:`enable_resilience` (only when it is the outermost class swap)."""
    base = type(pipeline).__dict__.get(_MARKER)
    if base is not None:
        pipeline.__class__ = base
        vars(pipeline).pop(_STATE_ATTR, None)


def resilience_of(pipeline: Any) -> ResilienceState | None:
    """The resilience settings of ``pipeline``, or None when it is off."""
    if getattr(type(pipeline), _MARKER, None) is None:
        return None
    return vars(pipeline).get(_STATE_ATTR)


# -- the call ------------------------------------------------------------------------------

def _resilient_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    base_call: Callable[..., Any] = type(self)._fastpath_resilient_base.__call__
    order = CALLER_INDICES.get()
    token = CALLER_INDICES.set(None)  # for this call only, not for pipelines it may call
    try:
        state = vars(self).get(_STATE_ATTR)
        # One positional list only: keyword-only calls (question=..., table=...) and extra
        # positional arguments mean something else to some pipelines, and pass through.
        if state is None or state.passthrough or len(args) != 1 or not _splittable(args[0]):
            return base_call(self, *args, **kwargs)
        inputs = args[0]
        caller = list(order) if order is not None and len(order) == len(inputs) else list(range(len(inputs)))
        return _Run(self, base_call, inputs, kwargs, state, caller).run()
    finally:
        CALLER_INDICES.reset(token)


def _splittable(inputs: Any) -> bool:
    """A list of independent inputs (not empty, not one chat given as a list of messages)."""
    return isinstance(inputs, list) and bool(inputs) and not is_message(inputs[0])


class _NotPerInput(Exception):
    """The pipeline returned something other than one result per input of a chunk."""


_PENDING = object()


class _Run:
    """One list call: chunks, splits and bisection; results by position (see the module docstring)."""

    def __init__(self, pipe: Any, base_call: Callable[..., Any], inputs: list[Any], kwargs: dict[str, Any],
                 state: ResilienceState, caller: list[int]) -> None:
        self.pipe = pipe
        self.base_call = base_call
        self.inputs = inputs
        self.kwargs = dict(kwargs)
        self.batch_size = self._batch_size(self.kwargs.pop("batch_size", None))
        self.state = state
        self.caller = caller
        self.results: list[Any] = [_PENDING] * len(inputs)
        self.errors: dict[int, BaseException] = {}
        self.succeeded = False
        self.unexplained: list[tuple[frozenset[int], tuple[type, str], BaseException]] = []
        self.cap = self.batch_size
        self.good: list[int] = []
        self.canary_tried = False
        self.wide: set[frozenset[int]] = set()  # failed groups of several batches
        self.calls = 0
        self.call_count = getattr(pipe, "call_count", None)
        self.chunked = _is_chunk_pipeline(pipe)  # one input may make several model batches (spans, labels)
        self.per_call = batches_per_call(pipe)  # batched processing overlaps consecutive batches of one call

    def _batch_size(self, given: Any) -> int:
        size = given if given is not None else getattr(self.pipe, "_batch_size", None)
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else 1

    # -- driving ----------------------------------------------------------------------
    def run(self) -> list[Any]:
        suspects = _suspects(self.inputs)
        good = [i for i in range(len(self.inputs)) if i not in suspects]
        self.good = good
        try:
            cursor = 0
            while cursor < len(good):
                chunk = good[cursor:cursor + self.cap * self.per_call]
                cursor += len(chunk)
                chunk = [i for i in chunk if self.results[i] is _PENDING]  # the canary may have run already
                if chunk:
                    self._settle(chunk, min(self.cap, self.batch_size))
            for index in sorted(suspects):
                self._settle([index], 1, suspect=True)
        except _NotPerInput as mismatch:
            return self._give_up(mismatch.args[0])
        finally:
            if self.call_count is not None:
                self.pipe.call_count = self.call_count + 1
        results = self._finish()
        if len(self.inputs) == 1 and _unwraps_one_item_lists(self.pipe):
            return results[0]  # what the pipeline itself returns for a one-item list
        return results

    def _give_up(self, whole: Any) -> Any:
        """The pipeline does not return one result per input: leave it alone from now on."""
        self.state.passthrough = True
        if self.calls == 1 and len(self.inputs) <= self.batch_size * self.per_call and whole is not _PENDING:
            return whole  # that one call was the whole list, exactly as transformers would run it
        logger.warning("fastpath: %s does not return one result per input of a list, so fastpath cannot keep "
                       "inputs apart; this list runs again whole, and the pipeline is left as transformers made "
                       "it from now on.", type(self.pipe).__name__)
        return self.base_call(self.pipe, self.inputs, batch_size=self.batch_size, **self.kwargs)

    def _attempt(self, positions: Sequence[int], batch_size: int) -> BaseException | None:
        """Run ``positions`` as one pipeline call; None on success (results stored), else the exception."""
        items = [self.inputs[i] for i in positions]
        if self.call_count is not None:
            self.pipe.call_count = self.call_count  # one user call counts once (transformers warns past 10)
        self.calls += 1
        try:
            out = self.base_call(self.pipe, items, batch_size=batch_size, **self.kwargs)
        except Exception as exc:
            if isinstance(exc, _NEVER_PER_INPUT):
                raise
            return exc
        if len(items) == 1 and _unwraps_one_item_lists(self.pipe):
            out = [out]  # fill-mask returns a one-item list's only result unwrapped
        if not isinstance(out, list) or len(out) != len(items):
            raise _NotPerInput(out if len(positions) == len(self.inputs) else _PENDING)
        for index, result in zip(positions, out):
            self.results[index] = result
        self.succeeded = True
        return None

    def _settle(self, positions: list[int], batch_size: int, *, suspect: bool = False) -> None:
        error = self._attempt(positions, batch_size)
        if error is not None:
            self._failed(positions, batch_size, error, suspect=suspect)

    def _failed(self, positions: list[int], batch_size: int, error: BaseException, *, suspect: bool = False,
                checked: bool = False) -> None:
        if is_out_of_memory(error):
            self._out_of_memory(positions, batch_size, error)
            return
        if len(positions) > batch_size:  # a call of several batches (batched processing)
            self.wide.add(frozenset(positions))  # it says nothing about which batch: no reason to skip a canary
            if not suspect and not checked:
                self._check_general(positions, error)
            for start in range(0, len(positions), batch_size):  # each batch as its own chunk, as without it
                part = [i for i in positions[start:start + batch_size] if self.results[i] is _PENDING]
                if part:
                    self._settle(part, batch_size)
            return
        if not suspect and not checked:
            self._check_general(positions, error)
        if len(positions) == 1:
            self._input_failed(positions[0], error)
            return
        half = math.ceil(len(positions) / 2)
        parts = [positions[:half], positions[half:]]
        errors = []
        for part in parts:  # both halves before going deeper: a general error shows at once
            part_error = self._attempt(part, batch_size)
            if part_error is not None and not is_out_of_memory(part_error):
                self._check_general(part, part_error)
            errors.append(part_error)
        for part, part_error in zip(parts, errors):
            if part_error is not None:
                self._failed(part, batch_size, part_error, checked=True)

    def _out_of_memory(self, positions: list[int], batch_size: int, error: BaseException) -> None:
        if not self.chunked:  # one model batch holds at most len(positions) inputs
            batch_size = min(batch_size, len(positions))
        if len(positions) == 1 and batch_size <= 1:
            # Its frames hold tensors; the message says what happened.
            error.__traceback__ = error.__context__ = error.__cause__ = None
            self._check_general(positions, error)  # two inputs out of memory alone before any completed: raised
            _add_note(error, f"fastpath: input {self.caller[positions[0]]} ran out of memory even alone (batch size "
                             "1); nothing smaller to try. Truncate it (truncation=True, max_length=...) or free "
                             "device memory.")
            self._input_failed(positions[0], error)
            return
        # Its frames hold the failed batch's tensors: let them go before retrying.
        error.__traceback__ = error.__context__ = error.__cause__ = None
        _free_device_memory()
        if len(positions) == 1:
            parts, smaller = [positions], max(1, batch_size // 2)  # one input of several model batches
        elif len(positions) > batch_size:  # a call of several batches (batched processing): one of them failed
            smaller = max(1, batch_size // 2)  # each batch of the halved size alone, so halving goes on as below
            parts = [positions[i:i + smaller] for i in range(0, len(positions), smaller)]
        else:
            half = math.ceil(len(positions) / 2)
            parts, smaller = [positions[:half], positions[half:]], max(1, min(batch_size, half))
        self.cap = min(self.cap, smaller)
        self._log_oom(len(positions), batch_size, smaller, error)
        del error
        for part in parts:
            self._settle(part, smaller)

    def _check_general(self, positions: Sequence[int], error: BaseException) -> None:
        """Raise ``error``'s first occurrence when two disjoint groups failed alike before any success."""
        if self.succeeded:
            return
        oom = is_out_of_memory(error)
        signature = (MemoryError, "") if oom else (type(error), str(error))  # OOM messages differ in sizes
        group = frozenset(positions)
        alike = [(other, first) for other, other_signature, first in self.unexplained if other_signature == signature]
        if any(other.isdisjoint(group) for other, _ in alike) and not self._canary_runs(group):
            logger.debug("fastpath: %s failed alike on disjoint inputs before any completed; not an input error, "
                         "raised as it was first raised", type(self.pipe).__name__)
            first = alike[0][1]
            if oom:
                _add_note(first, f"fastpath: inputs {self.caller[min(alike[0][0])]} and {self.caller[min(group)]} "
                                 "each ran out of memory alone (batch size 1) before any input completed: nothing "
                                 "fits. Free device memory, load the model in a smaller dtype, or truncate long "
                                 "inputs (truncation=True, max_length=...).")
            raise first
        self.unexplained.append((group, signature, error))

    def _canary_runs(self, failing: frozenset[int]) -> bool:
        """Once per call, before calling an error general: does one input that has not failed yet run
        alone? (The last one: with length sorting, the shortest.) True means the failures so far are
        inputs' own -- several bad inputs can sit together at the front of a sorted list."""
        if self.canary_tried:
            return False
        self.canary_tried = True
        tried = failing.union(*(group for group, _, _ in self.unexplained if group not in self.wide))
        canary = next((i for i in reversed(self.good) if i not in tried and self.results[i] is _PENDING), None)
        return canary is not None and self._attempt([canary], 1) is None

    def _input_failed(self, position: int, error: BaseException) -> None:
        self.errors[position] = error
        self.results[position] = error

    # -- ending -----------------------------------------------------------------------------
    def _finish(self) -> list[Any]:
        if not self.errors:
            return self.results
        failed = sorted(self.errors, key=lambda p: self.caller[p])
        indices = [self.caller[p] for p in failed]
        total = len(self.inputs)
        if self.state.input_errors == "return":
            level = logging.DEBUG if self.state.errors_logged else logging.WARNING
            self.state.errors_logged = True
            logger.log(level, "fastpath: %d of %d %s inputs failed (%s); each one's exception is in the results in "
                       "its place (input_errors = \"return\")", len(failed), total, type(self.pipe).__name__,
                       _describe(indices, [self.errors[p] for p in failed]))
            return self.results
        first = self.errors[failed[0]]
        done = total - len(failed)
        _add_note(first, (
            f"fastpath: {len(failed)} of {total} pipeline inputs failed "
            f"({_describe(indices, [self.errors[p] for p in failed])}); the other {done} completed. "
            "exc.fastpath_results holds every result in input order, with the exception in place of each failed "
            "input. Set input_errors = \"return\" in the fastpath policy to get that list returned instead."))
        first.fastpath_results = list(self.results)  # type: ignore[attr-defined]
        first.fastpath_failed_indices = indices  # type: ignore[attr-defined]
        first.fastpath_errors = {self.caller[p]: self.errors[p] for p in failed}  # type: ignore[attr-defined]
        raise first

    def _log_oom(self, size: int, batch_size: int, smaller: int, error: BaseException) -> None:
        level = logging.DEBUG if self.state.oom_logged else logging.WARNING
        self.state.oom_logged = True
        logger.log(level, "fastpath: %s ran out of memory on a batch of %d input(s) (batch size %d: %s); splitting "
                   "it in halves and retrying with batch size %d, down to one input per batch. Later splits of this "
                   "pipeline are logged at debug level.", type(self.pipe).__name__, size, batch_size,
                   _first_line(error), smaller)


# -- replicas ---------------------------------------------------------------------------------

def gather_shards(shards: Sequence[Sequence[int]], outcomes: Sequence[Any], total: int) -> list[Any]:
    """Merge per-shard outcomes (a result list, or an exception raised by a shard) into one list.

    For callers that split one list over several pipelines (replicas): a shard that raised with
    ``fastpath_results`` attached contributes those results; the first such exception (by input
    index) is raised again with the whole list attached and the indices made global. Any other
    exception is raised as is.
    """
    merged: list[Any] = [None] * total
    raised: list[BaseException] = []
    for shard, outcome in zip(shards, outcomes):
        if isinstance(outcome, BaseException):
            results = getattr(outcome, "fastpath_results", None)
            if not isinstance(results, list) or len(results) != len(shard):
                raise outcome
            raised.append(outcome)
            local = outcome.fastpath_failed_indices  # type: ignore[attr-defined]
            outcome.fastpath_failed_indices = [shard[i] for i in local]  # type: ignore[attr-defined]
            outcome.fastpath_errors = {shard[i]: e for i, e in outcome.fastpath_errors.items()}  # type: ignore[attr-defined]
        else:
            results = outcome
        for index, result in zip(shard, results):
            merged[index] = result
    if not raised:
        return merged
    first = min(raised, key=lambda e: e.fastpath_failed_indices[0])  # type: ignore[attr-defined]
    first.fastpath_results = merged  # type: ignore[attr-defined]
    first.fastpath_failed_indices = sorted(i for e in raised for i in e.fastpath_failed_indices)  # type: ignore[attr-defined]
    first.fastpath_errors = {i: err for e in raised for i, err in e.fastpath_errors.items()}  # type: ignore[attr-defined]
    _add_note(first, f"fastpath: shard input indices above are local to their shard; the failed inputs of the "
                     f"whole list are {first.fastpath_failed_indices}.")  # type: ignore[attr-defined]
    raise first


# -- helpers ---------------------------------------------------------------------------------

def _is_chunk_pipeline(pipe: Any) -> bool:
    try:
        from transformers.pipelines.base import ChunkPipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(pipe, ChunkPipeline)


def _unwraps_one_item_lists(pipe: Any) -> bool:
    """Pipelines whose ``__call__`` returns ``outputs[0]`` for a list of one input."""
    names = {klass.__name__ for klass in type(pipe).__mro__}
    return bool(names & {"FillMaskPipeline", "DepthEstimationPipeline"})


def _suspects(inputs: Sequence[Any]) -> set[int]:
    """Inputs whose kind differs from the most common one (``None`` always): run them one by one."""
    kinds = [_kind(x) for x in inputs]
    counts = Counter(k for k in kinds if k is not None)
    if not counts:
        return set(range(len(inputs)))
    major = counts.most_common(1)[0][0]
    return {i for i, k in enumerate(kinds) if k != major}


def _kind(item: Any) -> str | None:
    if item is None:
        return None
    if input_length(item) is not None:
        return "text"
    if isinstance(item, (bool, int, float)):
        return "number"
    return type(item).__qualname__


def _describe(indices: list[int], errors: list[BaseException]) -> str:
    shown = [f"{i}: {type(e).__name__}: {_first_line(e)}" for i, e in zip(indices[:5], errors[:5])]
    more = f"; and {len(indices) - 5} more" if len(indices) > 5 else ""
    return "; ".join(shown) + more


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


def _add_note(error: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        error.add_note(note)
    elif error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])
    else:
        error.args = (*error.args, note)


def _free_device_memory() -> None:
    """Give cached blocks back after an out-of-memory error, so a smaller batch can fit."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        if mps is not None and torch.backends.mps.is_available():
            mps.empty_cache()
    except Exception:  # freeing is best effort
        logger.debug("fastpath: emptying the device cache failed", exc_info=True)
