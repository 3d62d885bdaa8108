"""Built-in plugin: what a performance engineer would choose per hardware for the core settings.

Resolves ``auto`` for dtype, attention implementation, device, placement, pipeline batch size
and length bucketing. Other plugins resolve their own settings (the fused encoder, generation,
quantization and placement plugins).
"""

from __future__ import annotations

import importlib.util

from ..hookspecs import hookimpl
from ..plan import PlanBuilder

# Pipelines whose inputs are independent texts/images: batching and length sorting pay off.
BATCHED_TASKS = frozenset({
    "feature-extraction", "text-classification", "sentiment-analysis", "token-classification", "ner",
    "fill-mask", "question-answering", "zero-shot-classification", "image-classification",
    "image-feature-extraction", "audio-classification", "table-question-answering",
})
# Tasks whose inputs are text (length sorting by characters is a good proxy of tokens).
TEXT_TASKS = frozenset({
    "feature-extraction", "text-classification", "sentiment-analysis", "token-classification", "ner",
    "fill-mask", "question-answering", "zero-shot-classification", "text-generation",
    "text2text-generation", "summarization", "translation", "table-question-answering",
})

CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 64


@hookimpl(tryfirst=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    _resolve_dtype(plan)
    _resolve_attention(plan)
    _resolve_device(plan)
    _resolve_placement(plan)
    _resolve_batching(plan)


def _resolve_dtype(plan: PlanBuilder) -> None:
    if not plan.is_auto("dtype"):
        return
    hw = plan.hardware
    if hw.device == "cpu":
        plan.set("dtype", "float32", reason="auto: CPUs run float32 matmuls fastest (bf16/fp16 are emulated on most)")
    elif hw.supports_bf16:
        plan.set("dtype", "bfloat16", reason="auto: the GPU runs bf16 at full speed; same range as float32")
    elif hw.is_gpu:
        plan.set("dtype", "float16", reason="auto: the GPU has fp16 tensor cores but no fast bf16")
    else:
        plan.set("dtype", "float16", reason=f"auto: half precision on {hw.device}")


def _resolve_attention(plan: PlanBuilder) -> None:
    if not plan.is_auto("attn_implementation"):
        return
    hw = plan.hardware
    half = plan.get("dtype") in ("float16", "bfloat16")
    if hw.device == "cuda" and half and hw.capability and hw.capability >= (8, 0) and _installed("flash_attn") \
            and _model_supports(plan, "_supports_flash_attn"):
        plan.set("attn_implementation", "flash_attention_2",
                 reason="auto: flash-attn is installed, the GPU is sm80+ and the dtype is half")
        return
    if not _model_supports(plan, "_supports_sdpa"):
        plan.set("attn_implementation", "eager", reason="auto: this architecture has no SDPA attention")
        return
    why = "flash-attn not installed" if hw.device == "cuda" else f"best kernel family on {hw.device}"
    plan.set("attn_implementation", "sdpa", reason=f"auto: torch scaled_dot_product_attention ({why})")


def _resolve_device(plan: PlanBuilder) -> None:
    if not plan.is_auto("device"):
        return
    hw = plan.hardware
    if hw.device == "cpu":
        plan.set("device", "cpu", reason="auto: no accelerator found")
    else:
        plan.set("device", hw.torch_device, reason=f"auto: first {hw.device} device "
                 "(transformers' pipeline would default to the CPU)")


def _resolve_placement(plan: PlanBuilder) -> None:
    if plan.is_auto("placement"):
        plan.set("placement", "single", reason="auto: the whole model on one device")


def _resolve_batching(plan: PlanBuilder) -> None:
    task = plan.model.task
    if plan.is_auto("batch_size"):
        if task is None:
            plan.set("batch_size", "keep", reason="not a pipeline")
        elif task not in BATCHED_TASKS:
            plan.set("batch_size", "keep", reason=f"{task}: batching is left to the caller for this task")
        elif plan.hardware.is_gpu:
            plan.set("batch_size", GPU_BATCH_SIZE, reason="auto: GPU pipelines are launch-bound at small batches")
        else:
            plan.set("batch_size", CPU_BATCH_SIZE,
                     reason="auto: large enough to amortize per-call overhead; length sorting keeps padding low")
    if plan.is_auto("length_bucketing"):
        batch = plan.get("batch_size")
        if task is None:
            plan.set("length_bucketing", False, reason="not a pipeline")
        elif task not in TEXT_TASKS:
            plan.set("length_bucketing", False, reason=f"{task}: inputs are not text")
        elif not isinstance(batch, int) or batch <= 1:
            plan.set("length_bucketing", False, reason="batch size is not > 1")
        else:
            plan.set("length_bucketing", True,
                     reason="auto: list inputs sorted by length so each batch pads little; results keep your order")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _model_supports(plan: PlanBuilder, flag: str) -> bool:
    """Ask the model class (from the config's architectures) whether it supports a kernel family."""
    import transformers

    for arch in plan.model.architectures:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return bool(getattr(cls, flag, False))
    return True  # unknown class: let transformers decide (it falls back with a warning)
