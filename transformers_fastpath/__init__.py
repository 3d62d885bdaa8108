"""transformers-fastpath: make Hugging Face transformers models fast without rewriting code.

Three ways in::

    import transformers_fastpath as fp
    fp.install()                                        # every load in the process
    with fp.enabled(policy="fastpath.toml"): ...        # a scope (thread/task-local)
    transformers.pipeline(task, model=..., fastpath=True)  # one call, no import needed

``fp.resolve(...)`` / ``transformers-fastpath explain`` show what would happen and why.

The package's top level is imported at every interpreter start-up (by the ``.pth``
bootstrap), so names are loaded lazily: importing it costs no torch or transformers import.

Layout, one job per folder (docs/architecture.md draws the data flow through them)::

    planning/      policy/, hardware, model_info, tasks, resolution (resolve), plan (Plan)
    loading/       placement, quantization: the plan -> from_pretrained arguments
    passes/        the optimizations on a loaded model (fused_encoder/, generation/, sdpa_backends),
                   their runner and the transactional apply/revert
    pipelines/     the pipeline runtime: batching, resilience, outputs, replicas, replica_workers
    builtin/       the built-in plugins: each hooks one of the above into the hook specs
    interception/  the only code that replaces transformers' functions (from_pretrained, pipeline,
                   save_pretrained) and the .pth start-up bootstrap
    bench/         ``transformers-fastpath bench``; cli, doctor, api, trainer: the entry points

Import rules (tests/test_architecture.py checks them): no import circle between modules or
between folders; ``planning`` imports neither torch nor transformers at module import and
nothing but ``errors``, ``plugins`` and ``hookspecs`` outside itself; ``passes`` never import
``interception``, ``cli`` or ``bench``; only ``interception`` assigns to transformers' modules
and classes. Folders depend one way: ``builtin`` and ``bench`` on everything below them;
``pipelines`` on ``api`` and ``interception.state`` (a replica worker rebuilds its pipeline from the
call fastpath's wrapper kept) and ``planning``;
``api`` and ``interception`` on ``passes``, ``loading`` and ``planning``; ``loading`` on
``planning``; ``passes``, ``planning`` only on ``plugins``, ``hookspecs``, ``errors`` (and
``verify``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import apply, pipeline, plan_of, revert
    from .errors import FastpathError, PassSkipped, PolicyError, RollbackError, StrictModeError
    from .hookspecs import hookimpl
    from .interception.install import enabled, install, is_installed, uninstall
    from .planning.hardware import Hardware
    from .planning.model_info import ModelInfo
    from .planning.plan import Decision, PassStatus, Plan
    from .planning.policy import Policy, load_policy
    from .planning.resolution import resolve
    from .generate_many import generate_many
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
    "generate_many": "generate_many",
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
