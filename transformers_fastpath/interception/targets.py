"""Where fastpath's wrappers (and the start-up guard) go on transformers, and what was there before."""

from __future__ import annotations

import gc
import sys
from types import ModuleType
from typing import Any

__all__ = ["ABSENT", "AttributeSwaps", "transformers_module_objects"]

ABSENT: Any = object()
"""Recorded as what was found when the owner's own ``__dict__`` had no such attribute."""


class AttributeSwaps:
    """Objects put in place on other libraries' modules and classes, and what each replaced.

    ``found`` maps ``(id(owner), attribute)`` to ``(owner, the object found in its __dict__)``
    (:data:`ABSENT` when it had none: a lazy module, an inherited attribute). Not thread-safe by
    itself: its users hold their own lock.
    """

    def __init__(self) -> None:
        self.found: dict[tuple[int, str], tuple[Any, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.found)

    def holds(self, owner: Any, attr: str) -> bool:
        """Whether ``owner.attr`` was replaced (and not restored since)."""
        return (id(owner), attr) in self.found

    def replace(self, owner: Any, attr: str, new: Any, found: Any = ABSENT) -> None:
        """Put ``new`` at ``owner.attr``, remembering ``found`` (default: what ``owner.__dict__`` has);
        an attribute already replaced is left alone."""
        key = (id(owner), attr)
        if key in self.found:
            return
        if found is ABSENT:
            found = getattr(owner, "__dict__", {}).get(attr, ABSENT)
        self.found[key] = (owner, found)
        setattr(owner, attr, new)

    def original(self, owner: Any, attr: str) -> Any:
        """What ``owner.attr`` was before it was replaced (:data:`ABSENT` when unknown or not replaced)."""
        entry = self.found.get((id(owner), attr))
        return ABSENT if entry is None else entry[1]

    def restore_all(self) -> None:
        """Put every replaced attribute back as it was found (deleting it where there was none)."""
        for (_, attr), (owner, found) in list(self.found.items()):
            if found is not ABSENT:
                setattr(owner, attr, found)
            elif attr in getattr(owner, "__dict__", {}):
                delattr(owner, attr)
        self.found.clear()


def transformers_module_objects() -> list[ModuleType]:
    """Every live ``transformers`` top-level module object.

    transformers re-executes its ``__init__`` while importing ``processing_utils``
    (``direct_transformers_import``), so ``sys.modules["transformers"]`` can be a different lazy
    module from the one the user imported; both must expose the wrapped ``pipeline``.
    """
    current = sys.modules.get("transformers")
    if current is None:
        return []
    found = {id(current): current}
    for obj in gc.get_referrers(type(current)):  # instances of a Python class refer to it
        if isinstance(obj, ModuleType) and obj.__name__ == "transformers":
            found[id(obj)] = obj
    return list(found.values())
