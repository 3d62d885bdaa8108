"""Loads fastpath handles run alone; plain loads run alongside each other, never alongside them.

transformers builds a model under process-wide state -- ``torch.set_default_dtype`` above all --
so two threads loading at once with different dtypes (which per-thread fastpath policies make
ordinary) get models with mixed float32/bfloat16 parameters. A fastpath load therefore takes the
lock *exclusively*; a load with fastpath off takes it *shared*: plain loads still run in parallel
with each other, exactly as without fastpath installed, but never while a fastpath load builds
its model. Both are re-entrant within a thread (a model whose code loads another model).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["LoadLock"]


class LoadLock:
    """A shared/exclusive lock for ``from_pretrained``, re-entrant per thread in both modes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared: dict[int, int] = {}  # thread id -> depth of its shared holds
        self._owner: int | None = None  # thread holding it exclusively
        self._depth = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:  # inside our own exclusive hold: nothing to wait for
                while self._owner is not None:
                    self._cond.wait()
            self._shared[me] = self._shared.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._shared[me] -= 1
                if not self._shared[me]:
                    del self._shared[me]
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:  # other threads' shared holds must end; this thread's own may stay
                while self._owner is not None or any(tid != me for tid in self._shared):
                    self._cond.wait()
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()
