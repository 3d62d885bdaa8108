"""Built-in plugin: pipeline-level steps (device, dtype, batch size, output shapes, batched processing,
resilience, length-sorted batching)."""

from __future__ import annotations

import logging
from typing import Any

from ..hookspecs import hookimpl
from ..planning.plan import Plan

logger = logging.getLogger(__name__)


@hookimpl(tryfirst=True)
def fastpath_pipeline_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    device = plan.get("device")
    if device not in (None, "auto", "keep", "cpu"):
        kwargs["device"] = device
    batch_size = plan.get("batch_size")
    if isinstance(batch_size, int):
        kwargs["batch_size"] = batch_size
    dtype = plan.get("dtype")
    if dtype in ("float32", "float16", "bfloat16"):
        import torch

        kwargs["dtype"] = getattr(torch, dtype)


@hookimpl(tryfirst=True)
def fastpath_pipeline_created(plan: Plan, pipeline: Any) -> None:
    # Order matters: resilience sits below length sorting, and both below replicas (placement
    # plugin, called after this tryfirst one), so each replica splits and isolates on its own.
    from ..pipelines.resilience import enable_resilience

    if getattr(pipeline, "task", None) == "feature-extraction":
        from ..pipelines.outputs import enable_own_tokens

        enable_own_tokens(pipeline)  # each input's own tokens at any batch size, as a batch-1 call gives
    if plan.get("batched_processing") is True:
        from ..pipelines.batched import enable_batched_processing

        declined = enable_batched_processing(pipeline, sort_windows=plan.get("length_bucketing") is True,
                                             fill_batches=plan.get("static_cache") is True)
        if declined is not None:
            logger.debug("fastpath: batched processing stays off: %s", declined)
    input_errors = plan.get("input_errors")
    enable_resilience(pipeline, input_errors if input_errors in ("raise", "return") else "raise")
    if plan.get("length_bucketing") is True:
        from ..pipelines.batching import enable_length_sorting

        enable_length_sorting(pipeline)
