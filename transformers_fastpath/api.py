"""Functions of the public API that act on a model or build a pipeline."""

from __future__ import annotations

from typing import Any

from .hardware import Hardware
from .passes.runner import apply_plan, plan_of, revert_model
from .plan import Plan
from .policy import PolicyLike
from .resolution import resolve

__all__ = ["apply", "revert", "plan_of", "pipeline"]


def apply(model: Any, policy_or_plan: PolicyLike | Plan = None, *, task: str | None = None,
          hardware: Hardware | None = None) -> Any:
    """Apply fastpath's passes to a model loaded some other way; returns the same model.

    Load-time settings (dtype, attention implementation, quantization, placement) need
    ``from_pretrained(..., fastpath=...)``; on a loaded model only the passes run. The plan,
    with each pass's outcome, is then available from :func:`plan_of`.
    """
    plan = policy_or_plan if isinstance(policy_or_plan, Plan) else resolve(
        model, task=task, policy=policy_or_plan, hardware=hardware)
    apply_plan(model, plan)
    return model


def revert(model: Any) -> Any:
    """Undo every reversible pass fastpath applied to ``model`` (or a pipeline's model)."""
    target = getattr(model, "model", model) if plan_of(model) is not None and not hasattr(model, "config") else model
    revert_model(target)
    return model


def pipeline(*args: Any, fastpath: Any = True, **kwargs: Any) -> Any:
    """``transformers.pipeline`` with fastpath on (``fastpath=`` takes a policy, path or dict too)."""
    from .interception import patches

    patches.patch_all()
    import transformers.pipelines

    return transformers.pipelines.pipeline(*args, fastpath=fastpath, **kwargs)
