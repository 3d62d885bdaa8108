"""Built-in plugin: the ``backend`` setting -- ONNX Runtime for CPU encoders (extra ``[onnx]``).

``backend = auto`` becomes ``onnxruntime`` for a float32 text encoder of a supported family that
runs on the CPU, when onnxruntime, onnx and onnxscript are installed; ``torch`` otherwise (the
reason says which condition failed). With ``onnxruntime`` the pass serves each eligible inference
call of at most 128 tokens (batch x length), at least 90% of them real, from the session (measured
on the 2-core CPU, all-MiniLM-L6-v2: one text of 16 tokens 2.0x, of 64 1.2x, small full batches
1.1x the torch path) and hands the rest to torch, where the session measured no faster (larger
calls) or slower (padded ones: the fused encoder's packed route skips the pad tokens); see
:mod:`..passes.onnxruntime.runtime`.
``onnxruntime-int8`` quantizes the weights
(faster, and it changes outputs): only a policy asks for it.

An explicit ``onnxruntime`` that cannot run here (package missing, GPU model, half precision) warns
once and loads with torch, or, with ``strict = true``, the skipped pass is an error.
"""

from __future__ import annotations

from ..errors import StrictModeError
from ..hookspecs import hookimpl
from ..loading.quantization import warn_once
from ..passes.base import Pass
from ..passes.onnxruntime import (
    ORT_BACKENDS,
    OnnxRuntimePass,
    config_reason,
    missing_reason,
)
from ..planning.plan import PlanBuilder
from ..planning.tasks import TEXT_TASKS
from .defaults import _resolve_dtype, model_location

PASS_NAME = OnnxRuntimePass.name
_ENCODER_TASKS = TEXT_TASKS - {"text-generation", "text2text-generation", "summarization", "translation"}


@hookimpl
def fastpath_register_passes() -> list[Pass]:
    """The ``onnxruntime`` pass (registered last, so its layer is the outermost around ``forward``)."""
    return [OnnxRuntimePass()]


@hookimpl(tryfirst=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    _resolve_dtype(plan)  # no-op unless dtype is still auto
    backend = plan.get("backend")
    problem = _problem(plan)
    if backend == "auto":
        if problem is None:
            plan.set("backend", "onnxruntime", reason="auto: a float32 CPU text encoder and onnxruntime is installed: "
                     "small, nearly unpadded calls (at most 128 tokens) run in ONNX Runtime, the rest in torch")
        else:
            plan.set("backend", "torch", reason=f"auto: {problem}")
    if plan.get("backend") == "torch":
        plan.set_pass(PASS_NAME, "off", "backend = torch")
    elif backend in ORT_BACKENDS and problem is not None:
        what = f"backend = {backend!r} cannot run for {plan.model.name or plan.model.model_type}: {problem}"
        if plan.strict:
            raise StrictModeError(f"{what}. Strict mode does not fall back; set backend = 'torch' (or 'auto'), "
                                  "or strict = false.")
        warn_once(f"{what}; the model runs in torch")
        plan.set_pass(PASS_NAME, "skipped", problem)


def _problem(plan: PlanBuilder) -> str | None:
    """Why ONNX Runtime cannot serve this model here (None: it can)."""
    task = plan.model.task
    if task is not None and task not in _ENCODER_TASKS:
        return f"{task} is not an encoder task"
    reason = config_reason(plan.model)
    if reason is not None:
        return reason
    where, why = model_location(plan)
    if where != "cpu":
        return f"the model runs on {where} ({why}); onnxruntime serves CPU models here"
    if plan.get("dtype") not in ("float32", "keep"):
        return f"dtype is {plan.get('dtype')}; the ONNX Runtime export is float32"
    if plan.get("quantization") not in ("none", None):
        return f"quantization = {plan.get('quantization')} needs torch's quantized layers"
    return missing_reason()
