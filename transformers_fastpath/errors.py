"""Exceptions raised by transformers-fastpath.

Every error names the thing that is wrong, where it is, and how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["FastpathError", "PassSkipped", "PluginError", "PolicyError", "RollbackError", "StrictModeError",
           "is_out_of_memory"]


class FastpathError(Exception):
    """Base class of every error transformers-fastpath raises on purpose."""


class PolicyError(FastpathError, ValueError):
    """A policy (file, dict or object) is invalid.

    The message names the source (file or ``<dict>``), the rule (index and name) when the
    problem is inside a rule, the key, the bad value and the allowed values.  Nothing is
    applied when a policy is invalid.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str = "<policy>",
        rule: tuple[int, str | None] | None = None,
        key: str | None = None,
        value: Any = None,
        allowed: Iterable[Any] | str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.rule = rule
        self.key = key
        self.value = value
        self.allowed = allowed
        where = source
        if rule is not None:
            index, name = rule
            where += f", rule #{index}" + (f" ({name!r})" if name else "")
        if key is not None:
            where += f", key {key!r}"
        message = f"{where}: {problem}"
        if value is not None:
            message += f" (got {value!r})"
        if allowed is not None:
            shown = allowed if isinstance(allowed, str) else ", ".join(repr(a) for a in allowed)
            message += f"; allowed: {shown}"
        super().__init__(message)


class PassSkipped(FastpathError):
    """Raised by a pass's ``apply`` when it finds, on the real model, that it cannot run.

    The runner records the reason in the plan and carries on without the pass
    (or raises :class:`StrictModeError` in strict mode).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StrictModeError(FastpathError, RuntimeError):
    """An optimization was skipped or failed while the policy asked for ``strict = true``."""


class PluginError(StrictModeError):
    """A third-party plugin's hook raised while the plan asked for ``strict = true``.

    Attributes:
        plugin: the plugin's name (its entry point or registered name).
        hook: the hook that raised (``fastpath_resolve_plan``...).
    """

    def __init__(self, message: str, *, plugin: str, hook: str) -> None:
        self.plugin, self.hook = plugin, hook
        super().__init__(message)


class RollbackError(FastpathError, RuntimeError):
    """A pass failed after writing into the model's weights in place, and those values could not be
    restored (the pass did not declare ``mutates_weights = True``, so no copy was kept).

    Raised whatever ``strict`` says: carrying on would use weights that are no longer the loaded
    ones. Everything else (modules, parameters, hooks, attributes) has been restored.

    Attributes:
        pass_name: the pass that failed.
        weights: names of the weights whose values changed.
    """

    def __init__(self, message: str, *, pass_name: str, weights: list[str]) -> None:
        self.pass_name = pass_name
        self.weights = list(weights)
        super().__init__(message)


# -- classifying other libraries' errors ------------------------------------------------------

_OOM_MESSAGE = re.compile(r"out of memory|can't allocate memory|not enough memory|failed to allocate", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    """``torch.OutOfMemoryError``, ``MemoryError``, or a RuntimeError that says a device ran out of memory
    (also when it is the cause or context of ``error``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return True
        if isinstance(current, RuntimeError) and _OOM_MESSAGE.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False
