"""Every hook transformers-fastpath calls. Built-in optimizations implement them like any plugin.

Write a plugin as a module (or object) with functions decorated by :data:`hookimpl` and named
after these specs, then expose it through the ``transformers_fastpath`` entry-point group::

    [project.entry-points.transformers_fastpath]
    my_plugin = "my_package.fastpath_plugin"

``docs/hooks.md`` documents each hook; a test fails when one is missing there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .passes.base import Pass
    from .planning.hardware import Hardware
    from .planning.plan import Plan, PlanBuilder

PROJECT_NAME = "transformers_fastpath"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["hookimpl", "hookspec", "PROJECT_NAME"]


@hookspec
def fastpath_policy_defaults(hardware: Hardware) -> Mapping[str, Any] | None:
    """Contribute default settings for this hardware.

    Called once per plan resolution, before any rule. Every returned mapping is validated like a
    policy's ``[defaults]`` table; settings from later-called implementations override earlier
    ones, and the policy file and call arguments override them all.

    :param hardware: the hardware the plan is resolved for.
    :return: a mapping of setting -> value, or None to contribute nothing.
    """


@hookspec
def fastpath_policy_rules(hardware: Hardware) -> Sequence[Mapping[str, Any]] | None:
    """Contribute policy rules, shaped like the TOML ``[[rules]]`` entries.

    Called once per plan resolution. Plugin rules apply after the plugin defaults and before
    the policy file, in the order the hooks return them.

    :param hardware: the hardware the plan is resolved for.
    :return: a list of rule tables (``{"name": ..., "match": {...}, <setting>: <value>}``), or None.
    """


@hookspec
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    """Adjust the plan after the policy layers are merged.

    Called once per resolution with a mutable :class:`~transformers_fastpath.planning.plan.PlanBuilder`.
    Built-in plugins resolve ``"auto"`` values here (they are marked ``tryfirst``, so
    third-party implementations see concrete values). Use ``plan.set(key, value, reason=...,
    source="plugin NAME")`` to change a setting and ``plan.skip(pass_name, reason)`` to veto a
    pass. Return value ignored.

    :param plan: the plan being resolved; ``plan.model``, ``plan.hardware``, ``plan.policy``.
    """


@hookspec
def fastpath_register_passes() -> Sequence[Pass] | None:
    """Register conversion passes (objects following :class:`~transformers_fastpath.passes.base.Pass`).

    Called once, when the plugin manager is first built; passes from all plugins are applied in
    the order they are registered. A pass runs when its ``setting`` is not False and its
    ``supports`` returns None.

    :return: a list of pass objects, or None.
    """


@hookspec
def fastpath_load_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    """Add or change keyword arguments for ``from_pretrained`` before the model is loaded.

    Called once per resolution, after the plan is final; mutate ``kwargs`` in place (keys such
    as ``dtype``, ``attn_implementation``, ``device_map``, ``quantization_config``). Arguments
    the caller passed to ``from_pretrained`` always win over what the hooks put here.

    :param plan: the resolved plan.
    :param kwargs: the keyword arguments fastpath will add to the caller's.
    """


@hookspec
def fastpath_pipeline_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    """Add or change keyword arguments of ``transformers.pipeline`` (``device``, ``batch_size``...).

    Called once per ``pipeline(..., fastpath=...)`` call, before the pipeline is built; mutate
    ``kwargs`` in place. Arguments the caller passed always win.

    :param plan: the resolved plan (its ``model.task`` is the pipeline task).
    :param kwargs: the keyword arguments fastpath will add to the caller's.
    """


@hookspec
def fastpath_pipeline_created(plan: Plan, pipeline: Any) -> None:
    """Adjust a freshly built pipeline (pipeline-level steps such as length-sorted batching).

    Called once per ``pipeline(..., fastpath=...)`` call, after transformers built the pipeline
    and the model's passes ran. Mutate ``pipeline`` in place; return value ignored.

    :param plan: the plan attached to the pipeline's model.
    :param pipeline: the ``transformers.Pipeline`` instance.
    """


@hookspec
def fastpath_before_save(model: nn.Module, save_directory: str) -> None:
    """Called inside ``save_pretrained`` of a model fastpath converted, before any weight is written.

    Passes with ``changes_state_dict = True`` have already been reverted at this point, so the
    model is canonical. Return value ignored.

    :param model: the model being saved.
    :param save_directory: where it is saved.
    """


@hookspec
def fastpath_after_save(model: nn.Module, save_directory: str) -> None:
    """Called after ``save_pretrained`` wrote a fastpath-converted model (also when saving failed).

    Passes reverted for the save are re-applied after this hook. Return value ignored.

    :param model: the model that was saved.
    :param save_directory: where it was saved.
    """
