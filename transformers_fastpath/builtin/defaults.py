"""Built-in plugin: what a performance engineer would choose per hardware for the core settings.

Resolves ``auto`` for dtype, attention implementation, device, placement, pipeline batch size
and length bucketing. Other plugins resolve their own settings (the fused encoder, generation,
quantization and placement plugins).
"""

from __future__ import annotations

import importlib.util

from ..hookspecs import hookimpl
from ..passes.generation import is_generative
from ..planning.hardware import device_kind
from ..planning.plan import PlanBuilder
from ..planning.tasks import BATCHED_PROCESSING_TASKS, BATCHED_TASKS, GENERATE_BATCHED_TASKS, TEXT_TASKS

CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 64
# text-generation: prompts per generate() call. 16 rows keep the decode step weight-bound on a GPU
# (it streams the weights once for every row), and a long list still makes several batches to sort.
GENERATE_BATCH_SIZE = 16


@hookimpl(tryfirst=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    _resolve_dtype(plan)
    _resolve_attention(plan)
    _resolve_device(plan)
    _resolve_placement(plan)
    _resolve_batching(plan)


def model_location(plan: PlanBuilder) -> tuple[str, str]:
    """The device kind the model will run on (``"cpu"``, ``"cuda"``...) and why, before ``device`` is resolved.

    The caller's ``device_map`` wins; then an explicit ``device``; ``device = keep`` leaves a bare
    ``from_pretrained`` on the CPU (a pipeline puts it on its own default, the first accelerator);
    ``auto`` is the hardware's first device.
    """
    hw = plan.hardware
    device_map = plan.call_kwargs.get("device_map")
    if device_map is not None:
        kinds = {device_kind(v, hw) for v in (device_map.values() if isinstance(device_map, dict) else [device_map])}
        if kinds <= {"cpu", "disk"}:
            return "cpu", f"the caller's device_map={device_map!r} keeps it on the CPU"
        return hw.device, f"the caller's device_map={device_map!r}"
    device = plan.get("device")
    if device == "keep":
        if plan.model.task is None:
            return "cpu", "device = keep: from_pretrained leaves the model on the CPU"
        return hw.device, f"device = keep: transformers' pipeline puts it on its default device ({hw.device})"
    if isinstance(device, str) and device != "auto":
        return device_kind(device, hw), f"device = {device}"
    return hw.device, f"the first {hw.device} device"


def _resolve_dtype(plan: PlanBuilder) -> None:
    if not plan.is_auto("dtype"):
        return
    hw = plan.hardware
    where, why = model_location(plan)
    if where == "cpu" and hw.device != "cpu":
        plan.set("dtype", "float32", reason=f"auto: the model runs on the CPU ({why}), where float32 is fastest")
    elif hw.device == "cpu":
        plan.set("dtype", "float32", reason="auto: CPUs run float32 matmuls fastest (bf16/fp16 are emulated on most)")
    elif hw.is_gpu and where == hw.device and (encoder := _encoder_float16(plan)):
        plan.set("dtype", "float16", reason=encoder)
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
    elif plan.call_kwargs.get("device_map") is not None:
        plan.set("device", "keep", reason="auto: the caller's device_map places the model")
    else:
        plan.set("device", hw.torch_device, reason=f"auto: first {hw.device} device; from_pretrained loads the "
                 "weights straight onto it (transformers would leave the model on the CPU)")


def _resolve_placement(plan: PlanBuilder) -> None:
    if plan.is_auto("placement"):
        plan.set("placement", "single", reason="auto: the whole model on one device")


def _resolve_batching(plan: PlanBuilder) -> None:
    task = plan.model.task
    if plan.is_auto("batch_size"):
        if task is None:
            plan.set("batch_size", "keep", reason="not a pipeline")
        elif task in GENERATE_BATCHED_TASKS and plan.get("batched_processing") is False:
            # transformers' own batched generation is not each prompt's (max_length counts the padding)
            plan.set("batch_size", "keep", reason=f"{task}: batched_processing = false, so prompts run as "
                     "transformers runs them")
        elif task in GENERATE_BATCHED_TASKS:
            plan.set("batch_size", GENERATE_BATCH_SIZE,
                     reason="auto: a list's prompts run in length-sorted, left-padded batches, one generate() each "
                     "(faster than transformers' continuous batching: docs/generation.md#many-prompts); every result "
                     "is cut to what its prompt alone gives")
        elif task not in BATCHED_TASKS:
            plan.set("batch_size", "keep", reason=f"{task}: batching is left to the caller for this task")
        elif getattr(plan.model.config, "feat_extract_norm", None) == "group":
            # wav2vec2-base and the like group-normalize the waveform over time: zero padding from a
            # shorter clip in the batch changes every output (transformers documents this).
            plan.set("batch_size", "keep", reason="feat_extract_norm='group': padding changes this model's "
                     "outputs, so clips run one at a time")
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
    if plan.is_auto("batched_processing"):
        batch = plan.get("batch_size")
        if task is None:
            plan.set("batched_processing", False, reason="not a pipeline")
        elif task not in BATCHED_PROCESSING_TASKS:
            plan.set("batched_processing", False, reason=f"{task}: transformers' per-input processing")
        elif not isinstance(batch, int) or batch <= 1:
            plan.set("batched_processing", False, reason="batch size is not > 1")
        elif task in GENERATE_BATCHED_TASKS:
            plan.set("batched_processing", True, reason="auto: one generate() per batch of prompts, each result "
                     "cut to what its prompt alone gives")
        else:
            plan.set("batched_processing", True, reason="auto: each batch tokenized, copied and post-processed "
                     "at once, host work overlapping the device")


def _encoder_float16(plan: PlanBuilder) -> str | None:
    """The reason for float16 where the fused encoder converts this encoder-only model, else None."""
    if plan.get("encoder_fastpath") is False or is_generative(plan.model):
        return None
    from ..passes.fused_encoder.support import float16_reason  # the pass knows which models it converts

    return float16_reason(plan.model.config)


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
