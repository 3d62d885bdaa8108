"""Length-sorted batching for pipelines fed lists: batches pad little, results keep the caller's order.

The sorting ``__call__`` hands the sorted list to the class below it -- the one from
:mod:`transformers_fastpath.pipelines.resilience` when that is on -- and tells it, through
:data:`CALLER_INDICES`, which caller index each sorted position has, so errors name the
caller's indices; results attached to such an error (``exc.fastpath_results``) are put back in
the caller's order here, like the returned results.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CALLER_INDICES", "disable_length_sorting", "enable_length_sorting",
           "input_length", "is_message", "override_subclass", "restore_attached_order", "sorted_order"]

CALLER_INDICES: contextvars.ContextVar[Sequence[int] | None] = contextvars.ContextVar(
    "fastpath_caller_indices", default=None)
"""Set by an outer ``__call__`` that reorders a list: ``value[i]`` is the caller's index of the
i-th input the inner ``__call__`` receives. Read (and cleared) by the inner one."""


def input_length(item: Any) -> int | None:
    """A cheap proxy of an input's token count: characters of its text (a chat's: of its messages),
    or None when not text."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, dict) and item and all(isinstance(v, str) for v in item.values()):
        return sum(len(v) for v in item.values())  # question-answering {"question", "context"}
    if isinstance(item, (list, tuple)) and item and all(isinstance(v, str) for v in item):
        return sum(len(v) for v in item)  # text pairs
    messages = getattr(item, "messages", item)  # a chat (a list of messages, or transformers' Chat)
    if isinstance(messages, (list, tuple)) and messages and all(
            is_message(m) and isinstance(m.get("content"), str) for m in messages):
        return sum(len(m["content"]) for m in messages)
    return None


def is_message(item: Any) -> bool:
    """Whether ``item`` is one chat message (a list of them is one chat, one input)."""
    return isinstance(item, dict) and "role" in item and ("content" in item or "tool_calls" in item)


def sorted_order(inputs: Sequence[Any]) -> list[int] | None:
    """Indices of ``inputs`` longest first (so an out-of-memory shows on the first batch),
    or None when some input has no length."""
    lengths = [input_length(x) for x in inputs]
    if any(n is None for n in lengths):
        return None
    return sorted(range(len(inputs)), key=lambda i: -lengths[i])  # type: ignore[operator]


def restore_attached_order(exc: BaseException, order: Sequence[int]) -> None:
    """Put ``exc.fastpath_results`` (attached by pipeline_resilience, in ``order``) back in the caller's order."""
    results = getattr(exc, "fastpath_results", None)
    if not isinstance(results, list) or len(results) != len(order):
        return
    restored: list[Any] = [None] * len(order)
    for position, index in enumerate(order):
        restored[index] = results[position]
    exc.fastpath_results = restored  # type: ignore[attr-defined]


def _sorted_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    base = type(self)._fastpath_base_class
    inputs = args[0] if len(args) == 1 else None  # keyword-only calls (question=..., table=...) pass through
    if not isinstance(inputs, list) or len(inputs) < 2 or is_message(inputs[0]):  # a chat is one input
        return base.__call__(self, *args, **kwargs)
    order = sorted_order(inputs)
    if order is None or order == list(range(len(inputs))):
        return base.__call__(self, *args, **kwargs)
    token = CALLER_INDICES.set(order)
    try:
        outputs = base.__call__(self, [inputs[i] for i in order], **kwargs)
    except Exception as exc:
        restore_attached_order(exc, order)
        raise
    finally:
        CALLER_INDICES.reset(token)
    if not isinstance(outputs, list) or len(outputs) != len(inputs):
        raise RuntimeError(
            f"{type(self).__name__} returned {type(outputs).__name__} of length "
            f"{len(outputs) if hasattr(outputs, '__len__') else '?'} for {len(inputs)} inputs; "
            "cannot restore the input order. Set length_bucketing = false in the fastpath policy."
        )
    restored: list[Any] = [None] * len(inputs)
    for position, index in enumerate(order):
        restored[index] = outputs[position]
    return restored


@functools.cache
def override_subclass(cls: type, marker: str, **methods: Callable[..., Any]) -> type:
    """A subclass of pipeline class ``cls`` that differs only in ``methods`` (``__call__=...``).

    ``isinstance`` keeps holding for the pipeline's own class; ``marker`` names the class
    attribute that keeps ``cls``, so the swap can be detected and undone. Cached: one subclass per
    (class, marker, methods), so swapping classes never piles up types.
    """
    return type(cls.__name__, (cls,), {
        **methods,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        marker: cls,
    })


def _sorting_subclass(cls: type) -> type:
    return override_subclass(cls, "_fastpath_base_class", __call__=_sorted_call)


def enable_length_sorting(pipeline: Any) -> None:
    """Make ``pipeline(list_of_texts)`` run its inputs longest-first and return them in order."""
    cls = type(pipeline)
    if getattr(cls, "_fastpath_base_class", None) is not None:
        return
    pipeline.__class__ = _sorting_subclass(cls)


def disable_length_sorting(pipeline: Any) -> None:
    base = getattr(type(pipeline), "_fastpath_base_class", None)
    if base is not None:
        pipeline.__class__ = base
