"""Functions of the public API that act on a model or build a pipeline."""

from __future__ import annotations

from typing import Any

from .passes.runner import apply_plan, plan_of, revert_model
from .planning.hardware import Hardware
from .planning.plan import Plan
from .planning.policy import PolicyLike
from .planning.resolution import resolve

__all__ = ["apply", "revert", "plan_of", "pipeline"]


def apply(model: Any, policy_or_plan: PolicyLike | Plan = None, *, task: str | None = None,
          hardware: Hardware | None = None) -> Any:
    """Apply fastpath's passes to a model loaded some other way; returns the same model.

    Load-time settings (dtype, attention implementation, quantization, placement) need
    ``from_pretrained(..., fastpath=...)``; on a loaded model only the passes run. The plan,
    with each pass's outcome, is then available from :func:`plan_of`.
    """
    if _is_pipeline(model):
        raise TypeError(f"fp.apply() takes a model, got a pipeline ({type(model).__name__}); pass its model, "
                        "fp.apply(pipe.model), or create the pipeline with fastpath: pipeline(..., fastpath=True) "
                        "(that also sets its batch size and length bucketing)")
    _require_module(model, "apply")
    plan = policy_or_plan if isinstance(policy_or_plan, Plan) else resolve(
        model, task=task, policy=policy_or_plan, hardware=hardware)
    apply_plan(model, plan)
    return model


def revert(model: Any) -> Any:
    """Undo every reversible pass fastpath applied to ``model`` (or a pipeline's model)."""
    if _is_pipeline(model):
        revert_model(model.model)
        return model
    _require_module(model, "revert")
    revert_model(model)
    return model


def _is_pipeline(obj: Any) -> bool:
    """A transformers pipeline (or anything holding a model the same way), without importing transformers."""
    import torch

    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "model", None), torch.nn.Module)


def _require_module(model: Any, name: str) -> None:
    """``fp.apply("path")`` is a TypeError that says what to do, not an AttributeError deep inside."""
    import os

    import torch

    if isinstance(model, torch.nn.Module):
        return
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"fp.{name}() takes a loaded model, got the {type(model).__name__} {os.fspath(model)!r}; "
                        "load it with fastpath instead: AutoModel.from_pretrained(path, fastpath=True) (or the Auto "
                        f"class of its task), or load it and pass the model: fp.{name}(model)")
    raise TypeError(f"fp.{name}() takes a loaded model (a torch.nn.Module such as a transformers PreTrainedModel) or "
                    f"a pipeline, got {type(model).__name__}; load the model with from_pretrained(..., fastpath=True), "
                    f"or pass the loaded model: fp.{name}(model)")


def pipeline(*args: Any, fastpath: Any = True, **kwargs: Any) -> Any:
    """``transformers.pipeline`` with fastpath on (``fastpath=`` takes a policy, path or dict too)."""
    from .interception import patches

    patches.patch_all()  # takes away the start-up guard too: an explicit opt-in wins
    import transformers.pipelines

    return transformers.pipelines.pipeline(*args, fastpath=fastpath, **kwargs)
