"""Which policy is in force for the current call: argument > ``enabled()`` scope > ``install()``.

Scopes are contextvars, so threads and asyncio tasks each see their own; ``install()`` is the one
process-wide switch (as the environment variable is).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..planning.policy import Policy

__all__ = ["UNSET", "LoadContext", "pipeline_call", "remember_pipeline_call", "policy_for_call", "scoped_policy", "load_context", "pipeline_load",
           "inside_load", "loading", "set_installed_policy", "installed_policy"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

_lock = threading.RLock()
_installed: Policy | None = None
_scoped: contextvars.ContextVar[Policy | None | _Unset] = contextvars.ContextVar("fastpath_scoped", default=UNSET)
_inside_load: contextvars.ContextVar[bool] = contextvars.ContextVar("fastpath_inside_load", default=False)


@dataclass(frozen=True)
class LoadContext:
    """What a pipeline (or the pipeline loader) tells the ``from_pretrained`` it triggers."""

    task: str | None
    plan: Plan | None = None
    model_ref: Any = None  # the model argument the plan was resolved for


_load_ctx: contextvars.ContextVar[LoadContext | None] = contextvars.ContextVar("fastpath_load_ctx", default=None)


def set_installed_policy(policy: Policy | None) -> None:
    global _installed
    with _lock:
        _installed = policy


def installed_policy() -> Policy | None:
    return _installed


def policy_for_call(argument: Any = UNSET) -> Policy | None:
    """The policy for one call, or None when fastpath is off for it.

    ``fastpath=False`` is off; ``True`` is the scoped or installed policy, else the discovered
    one; a path/dict/Policy is loaded (PolicyError on a bad one); no argument defers to the
    ``enabled()`` scope, then to ``install()``.
    """
    from ..planning.policy import load_policy

    if argument is False:
        return None
    if argument is UNSET or argument is None:
        scoped = _scoped.get()
        return _installed if scoped is UNSET else scoped  # type: ignore[return-value]
    if argument is True:
        return policy_for_call(UNSET) or load_policy(None)
    return load_policy(argument)


@contextlib.contextmanager
def scoped_policy(policy: Policy | None) -> Iterator[None]:
    """Within the block, calls without a ``fastpath`` argument use ``policy`` (None = off)."""
    token = _scoped.set(policy)
    try:
        yield
    finally:
        _scoped.reset(token)


def load_context() -> LoadContext | None:
    return _load_ctx.get()


@contextlib.contextmanager
def pipeline_load(ctx: LoadContext) -> Iterator[None]:
    token = _load_ctx.set(ctx)
    try:
        yield
    finally:
        _load_ctx.reset(token)


def inside_load() -> bool:
    return _inside_load.get()


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Marks a fastpath load in progress, so nested ``from_pretrained`` calls pass straight through."""
    token = _inside_load.set(True)
    try:
        yield
    finally:
        _inside_load.reset(token)


_PIPELINE_CALL_ATTR = "_fastpath_pipeline_call"


def remember_pipeline_call(pipeline: Any, call: dict[str, Any]) -> None:
    """Keep, on a pipeline fastpath created, the arguments its ``pipeline()`` call had (a shallow
    copy), for what must rebuild it later (replica workers)."""
    try:
        pipeline.__dict__[_PIPELINE_CALL_ATTR] = dict(call)
    except AttributeError:  # a pipeline class with __slots__: rebuilt from defaults
        pass


def pipeline_call(pipeline: Any) -> dict[str, Any]:
    """The ``pipeline()`` arguments :func:`remember_pipeline_call` kept (empty when none)."""
    return dict(getattr(pipeline, _PIPELINE_CALL_ATTR, None) or {})
