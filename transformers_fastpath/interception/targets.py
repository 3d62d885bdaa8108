"""The transformers module objects fastpath's wrappers (and the start-up guard) are put on."""

from __future__ import annotations

import gc
import sys
from types import ModuleType

__all__ = ["transformers_module_objects"]


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
