"""What the start-up bootstrap leaves in place when fastpath is off for the whole process.

When the ``.pth`` bootstrap does not patch transformers -- ``TRANSFORMERS_FASTPATH=0``, a value
it cannot use, an invalid policy, a transformers outside the supported range, a wrapper that
failed -- code written with ``fastpath=`` must still run, and whoever asked for fastpath must
learn that it is off, and why. The guard wraps only ``PreTrainedModel.from_pretrained`` and
``transformers.pipeline``: it removes the ``fastpath`` keyword, warns once per process
(``UserWarning``) with the reason and the fix, and calls transformers' own function with the
other arguments, unchanged. It never plans, loads or patches anything else. Without the guard,
``from_pretrained(..., fastpath=True)`` raises a bare ``TypeError`` while ``pipeline(...,
fastpath=True)`` is silently ignored by some tasks.

``fp.install()``, ``fp.enabled()`` and ``fp.pipeline()`` take the guard away before they patch
(code that opts in explicitly wins over the start-up state). ``fp.uninstall()`` takes it away too:
transformers' original function objects are back, as the public contract says, and ``fastpath=``
is transformers' business from then on (docs/troubleshooting.md).

Imported only when one of transformers' modules is imported (never at interpreter start-up).
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

from .targets import AttributeSwaps, transformers_module_objects

__all__ = ["protect", "remove", "is_active"]

_lock = threading.RLock()
_UNSET: Any = object()  # no fastpath= argument in the call
_swaps = AttributeSwaps()  # the guard's wrappers and what they replaced
_reason = ""
_fix = ""
_warned = False
_MARK = "__transformers_fastpath_guard__"


def is_active() -> bool:
    return bool(_swaps)


def is_guard(obj: Any) -> bool:
    return getattr(getattr(obj, "__func__", obj), _MARK, False) is True


def protect(module: ModuleType, reason: str, fix: str) -> None:
    """Guard ``module`` (``transformers.modeling_utils`` or ``transformers.pipelines``); never raises.

    ``reason``: why fastpath is off in this process; ``fix``: what to do about it. Idempotent.
    """
    global _reason, _fix, _warned
    with _lock:
        if (reason, fix) != (_reason, _fix):
            _reason, _fix, _warned = reason, fix, False
        try:
            if module.__name__ == "transformers.modeling_utils":
                _guard_modeling(module)
            elif module.__name__ == "transformers.pipelines":
                _guard_pipelines(module)
        except Exception:  # noqa: BLE001 - an unexpected transformers layout: no guard, never a broken import
            pass


def remove() -> None:
    """Put transformers' original objects back where the guard found them."""
    with _lock:
        _swaps.restore_all()


def _guard_modeling(modeling_utils: ModuleType) -> None:
    cls = modeling_utils.PreTrainedModel
    found = cls.__dict__["from_pretrained"]
    if _swaps.holds(cls, "from_pretrained") or is_guard(found) or not isinstance(found, classmethod):
        return
    original = found.__func__

    @functools.wraps(original)
    def from_pretrained(cls: type, *args: Any, fastpath: Any = _UNSET, **kwargs: Any) -> Any:
        if fastpath is not _UNSET:
            _ignored("from_pretrained", fastpath)
        return original(cls, *args, **kwargs)

    setattr(from_pretrained, _MARK, True)
    _swaps.replace(cls, "from_pretrained", classmethod(from_pretrained))


def _guard_pipelines(pipelines: ModuleType) -> None:
    found = pipelines.__dict__["pipeline"]
    if _swaps.holds(pipelines, "pipeline") or is_guard(found):
        return

    @functools.wraps(found)
    def pipeline(*args: Any, fastpath: Any = _UNSET, **kwargs: Any) -> Any:
        if fastpath is not _UNSET:
            _ignored("pipeline", fastpath)
        return found(*args, **kwargs)

    setattr(pipeline, _MARK, True)
    _swaps.replace(pipelines, "pipeline", pipeline)
    for transformers in transformers_module_objects():  # the lazy top-level name too (see targets.py)
        _swaps.replace(transformers, "pipeline", pipeline)


def _ignored(entry: str, value: Any) -> None:
    """Warn, once per process, that a ``fastpath=`` argument was dropped (``None``/``False`` ask for nothing)."""
    global _warned
    if value is None or value is False or _warned:
        return
    _warned = True
    shown = repr(value) if len(repr(value)) <= 80 else f"{type(value).__name__}(...)"
    warnings.warn(f"transformers-fastpath: fastpath={shown} ignored in {entry}(), and in every later call of this "
                  f"process: fastpath is off here ({_reason}); the call runs as plain transformers. {_fix}",
                  UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside transformers and this package (the caller's line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "transformers" or name.startswith(("transformers.", "transformers_fastpath"))):
            return level
        frame, level = frame.f_back, level + 1
    return 1
