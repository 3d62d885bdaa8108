"""Apply a plan's passes to a loaded model, revert them, and keep saves canonical.

Each pass is applied on its own: when one declines (:class:`PassSkipped`) or fails, it is
reverted, the reason lands in the plan, and the others still run (strict mode raises instead).
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

__all__ = ["apply_plan", "revert_model", "plan_of", "canonical_for_save", "PLAN_ATTR"]

logger = logging.getLogger(__name__)

PLAN_ATTR = "_fastpath_plan"
APPLIED_ATTR = "_fastpath_applied"


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

    applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    if plan is None:
        yield
        return
    registry = _passes_by_name()
    reverted = [n for n in reversed(applied) if n in registry and registry[n].changes_state_dict]
    for name in reverted:
        registry[name].revert(model)
    hook = get_plugin_manager().hook
    try:
        hook.fastpath_before_save(model=model, save_directory=save_directory)
        yield
    finally:
        try:
            hook.fastpath_after_save(model=model, save_directory=save_directory)
        finally:
            for name in reversed(reverted):
                registry[name].apply(model, plan)


def _setting_of(registry: dict[str, Pass], name: str) -> str:
    pass_ = registry.get(name)
    return pass_.setting if pass_ is not None else name


def _safe_revert(pass_: Pass, model: nn.Module) -> None:
    try:
        pass_.revert(model)
    except Exception:  # the original error matters more; log this one
        logger.exception("fastpath: reverting %s after a failed apply raised too", pass_.name)
