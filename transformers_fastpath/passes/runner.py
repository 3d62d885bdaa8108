"""Apply a plan's passes to a loaded model, revert them, and keep saves canonical.

Each pass is applied on its own: when one declines (:class:`PassSkipped`) or fails, it is
reverted, the reason lands in the plan, and the others still run (strict mode raises instead).

Canonical state dicts: while a pass with ``changes_state_dict = True`` is applied, the model
carries ``state_dict`` and ``load_state_dict`` hooks (public ``torch.nn.Module`` hook API) that
revert such passes for the duration of the call and re-apply them after. So every reader of
the weights sees canonical keys and tensors, not only ``save_pretrained``: Trainer checkpoints
of models that are not ``PreTrainedModel`` (``safetensors.save_file(model.state_dict())``), a
``state_dict=`` taken beforehand and handed to ``save_pretrained``, and the Trainer's loads
(resume, ``load_best_model_at_end``). (peft's ``save_pretrained`` also walks the live module
tree; ``FastpathCallback`` makes a PEFT model save inside :func:`canonical_for_save`.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import PassSkipped, StrictModeError
from ..plugins import get_passes

if TYPE_CHECKING:
    from torch import nn

    from ..plan import Plan
    from .base import Pass

__all__ = ["PLAN_ATTR", "apply_plan", "canonical_for_save", "plan_of", "revert_model"]

logger = logging.getLogger(__name__)

PLAN_ATTR = "_fastpath_plan"
APPLIED_ATTR = "_fastpath_applied"
# Canonical-view bookkeeping (see the module docstring): nesting depth of "canonical" sections
# (save_pretrained, state_dict, load_state_dict), the passes reverted for the outermost one, and
# whether the state_dict hooks are registered on the model.
_CANONICAL_DEPTH_ATTR = "_fastpath_canonical_depth"
_REVERTED_ATTR = "_fastpath_reverted_for_canonical"
_HOOKED_ATTR = "_fastpath_state_dict_hooked"


def plan_of(model: Any) -> Plan | None:
    """The plan fastpath applied to ``model`` (or to a pipeline's model), or None."""
    inner = getattr(model, "model", None)
    if getattr(model, PLAN_ATTR, None) is None and inner is not None and hasattr(inner, "config"):
        model = inner
    return getattr(model, PLAN_ATTR, None)


def _passes_by_name() -> dict[str, Pass]:
    return {p.name: p for p in get_passes()}


def apply_plan(model: nn.Module, plan: Plan) -> Plan:
    """Run every planned pass on ``model`` and attach the resulting plan to it.

    Returns the plan with each pass's outcome (applied / skipped / failed).
    """
    registry = _passes_by_name()
    applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    for status in plan.passes:
        if status.status == "skipped" and plan.strict and plan.get(_setting_of(registry, status.name)) is True:
            raise StrictModeError(f"pass {status.name!r} was requested (true) but cannot run: {status.reason}")
        if status.status != "planned" or status.name in applied:
            continue
        pass_ = registry.get(status.name)
        if pass_ is None:
            plan = plan.with_pass_status(status.name, "skipped", "no plugin registers this pass any more")
            continue
        try:
            pass_.apply(model, plan)
        except PassSkipped as skip:
            _safe_revert(pass_, model)
            plan = plan.with_pass_status(pass_.name, "skipped", skip.reason)
            logger.info("fastpath: %s skipped: %s", pass_.name, skip.reason)
            if plan.strict:
                raise StrictModeError(f"pass {pass_.name!r} skipped in strict mode: {skip.reason}") from skip
            continue
        except Exception as exc:
            _safe_revert(pass_, model)
            reason = f"{type(exc).__name__}: {exc}"
            plan = plan.with_pass_status(pass_.name, "failed", reason)
            if plan.strict:
                raise StrictModeError(f"pass {pass_.name!r} failed in strict mode: {reason}") from exc
            logger.warning("fastpath: pass %s failed and was rolled back; continuing without it (%s)",
                           pass_.name, reason)
            continue
        applied.append(pass_.name)
        plan = plan.with_pass_status(pass_.name, "applied")
    # Attributes on the module (not a registry keyed by id) follow the model through copies.
    object.__setattr__(model, APPLIED_ATTR, applied)
    object.__setattr__(model, PLAN_ATTR, plan)
    if any(name in registry and registry[name].changes_state_dict for name in applied):
        _install_state_dict_hooks(model)
    return plan


def revert_model(model: nn.Module) -> nn.Module:
    """Undo every applied pass, newest first. The plan stays attached with status ``reverted``."""
    registry = _passes_by_name()
    applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    for name in reversed(applied):
        pass_ = registry.get(name)
        if pass_ is not None:
            pass_.revert(model)
        if plan is not None:
            plan = plan.with_pass_status(name, "reverted")
    object.__setattr__(model, APPLIED_ATTR, [])
    if plan is not None:
        object.__setattr__(model, PLAN_ATTR, plan)
    return model


@contextlib.contextmanager
def canonical_for_save(model: nn.Module, save_directory: str) -> Iterator[None]:
    """Inside the block the model's state_dict is canonical; passes that change it are re-applied after."""
    from ..plugins import get_plugin_manager

    if getattr(model, PLAN_ATTR, None) is None:
        yield
        return
    hook = get_plugin_manager().hook
    _enter_canonical(model)
    try:
        hook.fastpath_before_save(model=model, save_directory=save_directory)
        yield
    finally:
        try:
            hook.fastpath_after_save(model=model, save_directory=save_directory)
        finally:
            _exit_canonical(model)


def _enter_canonical(model: nn.Module) -> None:
    """Revert the applied passes that change the state_dict (newest first), unless already done.

    Sections nest (``save_pretrained`` calls ``state_dict``): only the outermost one reverts.
    """
    depth = getattr(model, _CANONICAL_DEPTH_ATTR, 0)
    object.__setattr__(model, _CANONICAL_DEPTH_ATTR, depth + 1)
    if depth:
        return
    registry = _passes_by_name()
    applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    reverted = [n for n in reversed(applied) if n in registry and registry[n].changes_state_dict]
    object.__setattr__(model, _REVERTED_ATTR, reverted)
    for name in reverted:
        registry[name].revert(model)


def _exit_canonical(model: nn.Module) -> None:
    """Leave a canonical section; the outermost one re-applies what it reverted (oldest first)."""
    depth = getattr(model, _CANONICAL_DEPTH_ATTR, 0)
    if depth > 1:
        object.__setattr__(model, _CANONICAL_DEPTH_ATTR, depth - 1)
        return
    try:  # the depth stays 1 while re-applying, so a state_dict() inside apply() reverts nothing
        registry = _passes_by_name()
        plan: Plan | None = getattr(model, PLAN_ATTR, None)
        for name in reversed(getattr(model, _REVERTED_ATTR, ())):
            if name in registry:
                registry[name].apply(model, plan)
    finally:
        object.__setattr__(model, _REVERTED_ATTR, [])
        object.__setattr__(model, _CANONICAL_DEPTH_ATTR, 0)


def _install_state_dict_hooks(model: nn.Module) -> None:
    """Make ``state_dict()`` / ``load_state_dict()`` canonical on a model whose passes change them.

    The hooks also fire when the model is a submodule of the one whose ``state_dict`` is taken
    (a PEFT wrapper, a user's container): torch calls them on every module it recurses into.
    They stay registered after :func:`revert_model` and do nothing when no such pass is applied.
    """
    if getattr(model, _HOOKED_ATTR, False):
        return
    model.register_state_dict_pre_hook(_state_dict_pre_hook)
    # public since torch 2.4-ish; the older private spelling takes the same hook (ours returns None)
    register_post = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
    register_post(_state_dict_post_hook)
    model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    model.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    object.__setattr__(model, _HOOKED_ATTR, True)


def _state_dict_pre_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    _enter_canonical(module)


def _state_dict_post_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                          local_metadata: dict[str, Any]) -> None:
    _exit_canonical(module)


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
    _enter_canonical(module)


def _load_state_dict_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    _exit_canonical(module)


def _setting_of(registry: dict[str, Pass], name: str) -> str:
    pass_ = registry.get(name)
    return pass_.setting if pass_ is not None else name


def _safe_revert(pass_: Pass, model: nn.Module) -> None:
    try:
        pass_.revert(model)
    except Exception:  # the original error matters more; log this one
        logger.exception("fastpath: reverting %s after a failed apply raised too", pass_.name)
