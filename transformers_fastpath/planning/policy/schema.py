"""Every policy key, its allowed values, and the validators that turn raw TOML into typed values.

This table is the single source of truth: ``docs/policy.md`` documents each key here and a
test fails if one is missing there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SETTINGS", "MATCH_KEYS", "Setting", "parse_count", "parse_memory_gib"]


class Invalid(Exception):
    """Raised by a validator; the loader turns it into a PolicyError with the location."""

    def __init__(self, problem: str, allowed: Any = None) -> None:
        self.problem = problem
        self.allowed = allowed
        super().__init__(problem)


@dataclass(frozen=True)
class Setting:
    """One policy key: how to validate it and what it means."""

    name: str
    validate: Callable[[Any], Any]
    default: Any
    help: str


def _choice(*values: Any) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or value not in values:
            raise Invalid("not an allowed value", values)
        return value

    return check


def _auto_or_bool(value: Any) -> Any:
    if value == "auto" or isinstance(value, bool):
        return value
    raise Invalid("not an allowed value", ("auto", True, False))


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid("must be a boolean", (True, False))


MAX_BATCH_SIZE = 1 << 20  # a pipeline batch past a million inputs is a typo, not a plan


def _batch_size(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BATCH_SIZE:
        return value
    allowed = f"'auto' or an integer from 1 to {MAX_BATCH_SIZE}"
    raise Invalid(f"must be {allowed}", allowed)


def _fraction(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0:
        return float(value)
    raise Invalid("must be a number in [0, 1)", "a number in [0, 1)")


_DEVICE_RE = re.compile(r"(auto|keep|cpu|mps|(cuda|xpu)(:\d+)?)")


def _device(value: Any) -> str:
    if isinstance(value, str) and _DEVICE_RE.fullmatch(value):
        return value
    raise Invalid("not a device", "'auto', 'keep', 'cpu', 'mps', 'cuda', 'cuda:N', 'xpu', 'xpu:N'")


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdpa_backends(value: Any) -> Any:
    if value == "auto":
        return value
    if not isinstance(value, list) or not value:
        raise Invalid("must be 'auto' or a non-empty list", SDPA_BACKENDS)
    for item in value:
        if item not in SDPA_BACKENDS:
            raise Invalid(f"unknown SDPA backend {item!r}", SDPA_BACKENDS)
    if len(set(value)) != len(value):
        raise Invalid("lists a backend twice", SDPA_BACKENDS)
    return tuple(value)


DTYPES = ("auto", "keep", "float32", "float16", "bfloat16")
ATTENTION = ("auto", "keep", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANTIZATION = ("none", "auto", "bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "torchao-int4",
                "torchao-float8")
PLACEMENT = ("auto", "single", "balanced", "replicate", "tensor-parallel")
BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-int8")

_SETTINGS_LIST = [
    Setting("dtype", _choice(*DTYPES), "auto",
            "Weights/compute dtype. auto: float32 on CPU; on a GPU float16 for encoders the fused encoder "
            "converts, else bfloat16 on GPUs that run it fast and float16 on older GPUs. keep: whatever the "
            "caller or checkpoint says."),
    Setting("attn_implementation", _choice(*ATTENTION), "auto",
            "Attention kernel family passed to from_pretrained as attn_implementation. auto: sdpa, "
            "or flash_attention_2/3 when installed and supported."),
    Setting("sdpa_backends", _sdpa_backends, "auto",
            "Ordered SDPA backend chain (flash, efficient, cudnn, math) tried around forward and "
            "generate. auto: the best chain for the device."),
    Setting("encoder_fastpath", _auto_or_bool, "auto",
            "Fused, padding-free encoder layers for BERT-family and ViT models at inference. "
            "auto: on wherever the model supports it."),
    Setting("cuda_graphs", _auto_or_bool, "auto",
            "Small fused-encoder batches on a GPU replay a CUDA graph captured per bucketed shape "
            "instead of launching every kernel from Python. auto: on where the model runs on a GPU."),
    Setting("backend", _choice(*BACKENDS), "auto",
            "What runs a CPU text encoder's inference forward. auto: onnxruntime where it applies (a float32 "
            "encoder on the CPU, the [onnx] extra installed), else torch. onnxruntime: single texts and small "
            "batches in ONNX Runtime, larger batches in torch. onnxruntime-int8: the same with int8 weights "
            "(faster; changes outputs)."),
    Setting("quantization", _choice(*QUANTIZATION), "none",
            "Weight quantization. auto: none when the model fits the memory budget, else the least "
            "lossy method that makes it fit."),
    Setting("quantization_fallback", _choice("warn", "error"), "warn",
            "When a quantization method cannot run here: warn and load unquantized, or raise."),
    Setting("placement", _choice(*PLACEMENT), "auto",
            "Where the model goes: single device, balanced shards over GPUs, one replica per GPU, "
            "or tensor parallel under torchrun."),
    Setting("device", _device, "auto",
            "Device for single placement and pipelines: from_pretrained loads the weights straight onto it. "
            "auto: the first GPU when present, else CPU. keep: leave the model where transformers puts it "
            "(from_pretrained: the CPU; pipeline: its own default)."),
    Setting("memory_headroom", _fraction, 0.2,
            "Fraction of device memory kept free for activations and KV cache when deciding fit."),
    Setting("compile", _auto_or_bool, "auto",
            "torch.compile the forward used by generate. auto: on for generation on a GPU."),
    Setting("static_cache", _auto_or_bool, "auto",
            "Static KV cache for generate. auto: on for generation on a GPU."),
    Setting("decode_loop", _auto_or_bool, "auto",
            "Plain greedy static-cache generate calls run fastpath's lean decode loop (same tokens, no "
            "per-token host sync). auto: on where compile is on."),
    Setting("batch_size", _batch_size, "auto",
            "Pipeline batch size when the caller sets none. auto: chosen per device."),
    Setting("length_bucketing", _auto_or_bool, "auto",
            "Sort list inputs of a pipeline by length so batches pad little; results come back in "
            "the caller's order. auto: on for text pipelines with batch size > 1."),
    Setting("batched_processing", _auto_or_bool, "auto",
            "Pipelines tokenize, copy and post-process whole batches (host work overlapping the GPU) "
            "instead of one input at a time; results are the same. auto: on for the pipelines that have "
            "it with batch size > 1."),
    Setting("strict", _bool, False,
            "Turn every skipped or failed optimization into an error instead of a logged skip."),
    Setting("verify", _bool, False,
            "After applying the passes, run a small probe batch through the converted model and the "
            "original one, and roll back every pass whose output differs beyond a dtype-aware tolerance."),
    Setting("input_errors", _choice("raise", "return"), "raise",
            "A pipeline input that fails on its own (malformed, or out of memory even alone) when a list "
            "is passed: the other inputs complete either way. raise: then its original exception is "
            "raised, naming the failed indices, with every result attached (exc.fastpath_results). "
            "return: the exception object takes that input's place in the result list."),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS_LIST}


# -- match keys ---------------------------------------------------------------------

_COUNT_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*")
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_count(value: Any) -> int:
    """``"7B"`` -> 7_000_000_000; ``"350M"``; plain integers pass through."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _COUNT_RE.fullmatch(value)
        if m:
            return int(float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()])
    raise Invalid("not a parameter count", "an integer, or a string like '350M', '7B'")


_MEM_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", re.IGNORECASE)
_MEM_UNITS = {"gib": 1.0, "gb": 1e9 / 2**30, "mib": 1 / 1024, "mb": 1e6 / 2**30,
              "tib": 1024.0, "tb": 1e12 / 2**30}


def parse_memory_gib(value: Any) -> float:
    """``"24GiB"`` -> 24.0; ``"512MiB"`` -> 0.5; bare numbers are GiB."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _MEM_RE.fullmatch(value)
        if m:
            return float(m.group(1)) * _MEM_UNITS[(m.group(2) or "gib").lower()]
    raise Invalid("not a memory size", "a number of GiB, or a string like '24GiB', '512MiB', '80GB'")


def _string_or_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise Invalid("must be a non-empty string or list of strings", "a string or a list of strings")


def _device_kind(value: Any) -> tuple[str, ...]:
    kinds = _string_or_list(value)
    for kind in kinds:
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise Invalid(f"unknown device kind {kind!r}", ("cpu", "cuda", "mps", "xpu"))
    return kinds


def _nonneg_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise Invalid("must be an integer >= 0", "an integer >= 0")


MATCH_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "model_type": (_string_or_list, "config.model_type, e.g. 'bert' or ['llama', 'mistral']"),
    "architecture": (_string_or_list, "an entry of config.architectures, e.g. 'LlamaForCausalLM'"),
    "task": (_string_or_list, "pipeline task, e.g. 'text-generation'"),
    "min_params": (parse_count, "at least this many parameters ('350M', '7B')"),
    "max_params": (parse_count, "at most this many parameters"),
    "device": (_device_kind, "device kind: 'cpu', 'cuda', 'mps', 'xpu'"),
    "min_device_count": (_nonneg_int, "at least this many accelerators"),
    "max_device_count": (_nonneg_int, "at most this many accelerators"),
    "min_device_memory": (parse_memory_gib, "each accelerator has at least this much memory"),
    "max_device_memory": (parse_memory_gib, "each accelerator has at most this much memory"),
}
