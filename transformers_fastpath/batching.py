"""Length-sorted batching for pipelines fed lists: batches pad little, results keep the caller's order."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["enable_length_sorting", "disable_length_sorting", "input_length", "sorted_order"]


def input_length(item: Any) -> int | None:
    """A cheap proxy of an input's token count: characters of its text, or None when not text."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, dict) and item and all(isinstance(v, str) for v in item.values()):
        return sum(len(v) for v in item.values())  # question-answering {"question", "context"}
    if isinstance(item, (list, tuple)) and item and all(isinstance(v, str) for v in item):
        return sum(len(v) for v in item)  # text pairs
    return None


def sorted_order(inputs: Sequence[Any]) -> list[int] | None:
    """Indices of ``inputs`` longest first (so an out-of-memory shows on the first batch),
    or None when some input has no length."""
    lengths = [input_length(x) for x in inputs]
    if any(n is None for n in lengths):
        return None
    return sorted(range(len(inputs)), key=lambda i: -lengths[i])  # type: ignore[operator]


def _sorted_call(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    base_call = super(type(self), self).__call__
    if not isinstance(inputs, list) or len(inputs) < 2:
        return base_call(inputs, *args, **kwargs)
    order = sorted_order(inputs)
    if order is None or order == list(range(len(inputs))):
        return base_call(inputs, *args, **kwargs)
    outputs = base_call([inputs[i] for i in order], *args, **kwargs)
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
def call_override_subclass(cls: type, call: Callable[..., Any], marker: str) -> type:
    """A subclass of pipeline class ``cls`` that differs only in ``__call__``.

    ``isinstance`` keeps holding for the pipeline's own class; ``marker`` names the class
    attribute that keeps ``cls``, so the swap can be detected and undone.
    """
    return type(cls.__name__, (cls,), {
        "__call__": call,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        marker: cls,
    })


def _sorting_subclass(cls: type) -> type:
    return call_override_subclass(cls, _sorted_call, "_fastpath_base_class")


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
