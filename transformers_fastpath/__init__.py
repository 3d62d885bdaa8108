"""transformers-fastpath: make Hugging Face transformers models fast without rewriting code.

Three ways in::

    import transformers_fastpath as fp
    fp.install()                                        # every load in the process
    with fp.enabled(policy="fastpath.toml"): ...        # a scope (thread/task-local)
    transformers.pipeline(task, model=..., fastpath=True)  # one call, no import needed

``fp.resolve(...)`` / ``transformers-fastpath explain`` show what would happen and why.

The package's top level is imported at every interpreter start-up (by the ``.pth``
bootstrap), so names are loaded lazily: importing it costs no torch or transformers import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import apply, pipeline, plan_of, revert
    from .errors import FastpathError, PassSkipped, PolicyError, RollbackError, StrictModeError
    from .planning.hardware import Hardware
    from .hookspecs import hookimpl
    from .interception.install import enabled, install, is_installed, uninstall
    from .planning.model_info import ModelInfo
    from .planning.plan import Decision, PassStatus, Plan
    from .planning.policy import Policy, load_policy
    from .planning.resolution import resolve
    from .trainer import FastpathCallback

_LAZY: dict[str, str] = {
    "install": "interception.install",
    "uninstall": "interception.install",
    "enabled": "interception.install",
    "is_installed": "interception.install",
    "load_policy": "planning.policy",
    "Policy": "planning.policy",
    "PolicyError": "errors",
    "FastpathError": "errors",
    "PassSkipped": "errors",
    "StrictModeError": "errors",
    "RollbackError": "errors",
    "Hardware": "planning.hardware",
    "ModelInfo": "planning.model_info",
    "resolve": "planning.resolution",
    "Plan": "planning.plan",
    "Decision": "planning.plan",
    "PassStatus": "planning.plan",
    "apply": "api",
    "revert": "api",
    "plan_of": "api",
    "pipeline": "api",
    "hookimpl": "hookspecs",
    "FastpathCallback": "trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'transformers_fastpath' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
