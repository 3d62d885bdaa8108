"""Fast ``generate``: a static, bucketed KV cache, transformers' own compile of the decode step, and a
lean decode loop (greedy and sampled decoding on the device)."""

from .cache_length import bucket_cache_len, describe_buckets
from .passes import (
    COMPILE_PASS,
    DECODE_LOOP_PASS,
    GENERATION_TASKS,
    STATIC_PASS,
    CompilePass,
    DecodeLoopPass,
    FastGenerate,
    StaticCachePass,
    is_generative,
    model_class,
)
from .request import GenerateRequest, plan_request

__all__ = [
    "COMPILE_PASS",
    "DECODE_LOOP_PASS",
    "GENERATION_TASKS",
    "STATIC_PASS",
    "CompilePass",
    "DecodeLoopPass",
    "FastGenerate",
    "GenerateRequest",
    "StaticCachePass",
    "bucket_cache_len",
    "describe_buckets",
    "is_generative",
    "model_class",
    "plan_request",
]
