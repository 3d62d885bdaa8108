"""Helpers shared by the workload modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..models import TOKENIZER_MISSING, tokenizer_path

if TYPE_CHECKING:
    from ...planning.hardware import Hardware

__all__ = ["dtype_name", "enable_fastpath_kwarg", "needs_tokenizer", "plan_summary"]


def needs_tokenizer(hardware: Hardware, options: Mapping[str, Any]) -> str | None:
    """``requires`` of the text pipelines: a tokenizer (the bundled MiniLM's, or ``--tokenizer DIR``)."""
    return None if tokenizer_path(options) else TOKENIZER_MISSING


def enable_fastpath_kwarg() -> None:
    """Patch transformers so ``fastpath=True/False`` is accepted even with the .pth bootstrap off.

    Every variant passes ``fastpath=`` explicitly, so ``TRANSFORMERS_FASTPATH=1`` in the
    environment does not turn it on for the variants that measure plain transformers.
    """
    from ...interception import patches

    patches.patch_all()


def dtype_name(obj: Any) -> str:
    """``"float16"`` for a model, a pipeline (its model) or a dtype."""
    dtype = getattr(getattr(obj, "model", obj), "dtype", obj)
    return str(dtype).replace("torch.", "")


def plan_summary(obj: Any) -> dict[str, Any] | None:
    """What fastpath did to a model or pipeline: applied and skipped passes, key settings."""
    from ...passes.runner import plan_of

    plan = plan_of(obj)
    if plan is None:
        return None
    keys = ("dtype", "attn_implementation", "device", "placement", "batch_size", "length_bucketing",
            "batched_processing", "quantization", "static_cache", "compile", "encoder_fastpath", "cuda_graphs")
    settings = {k: plan.settings[k].value for k in keys if k in plan.settings}
    return {"settings": {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                         for k, v in settings.items()},
            "applied": [p.name for p in plan.passes if p.status == "applied"],
            "not_applied": {p.name: f"{p.status}: {p.reason}" for p in plan.passes if p.status != "applied"}}
