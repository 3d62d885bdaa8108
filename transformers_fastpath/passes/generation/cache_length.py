"""Static KV cache sizes, bucketed so that calls of different lengths share one compiled decode step.

A static cache has a fixed length, and the compiled decode step is specialised on it: a new
length means a new cache allocation and a recompile. Sizing the cache to ``prompt +
max_new_tokens`` rounded up to a bucket keeps the number of distinct lengths small, and
transformers itself never shrinks the cache of a model (it keeps the largest length it has
allocated, ``GenerationMixin._prepare_static_cache``), so a model compiles once per bucket it
grows into, at most.
"""

from __future__ import annotations

__all__ = ["MIN_BUCKET", "POWER_OF_TWO_UP_TO", "STEP_ABOVE", "bucket_cache_len", "describe_buckets"]

MIN_BUCKET = 64
"""The smallest cache: short calls all share it."""
POWER_OF_TWO_UP_TO = 1024
"""Up to this length buckets are powers of two (64, 128, 256, 512, 1024)."""
STEP_ABOVE = 512
"""Above it they are multiples of this (1536, 2048, 2560, ...): at most a third of the cache unused."""


def bucket_cache_len(needed: int, limit: int | None = None) -> int:
    """The static cache length for a request that needs ``needed`` positions.

    Args:
        needed: prompt length + new tokens (at least 1).
        limit: the model's maximum positions; a bucket past it is cut back to
            ``max(needed, limit)`` (never below what the request needs).

    Raises:
        ValueError: ``needed`` is not a positive integer.
    """
    if not isinstance(needed, int) or isinstance(needed, bool) or needed < 1:
        raise ValueError(f"needed must be a positive integer, got {needed!r}")
    if needed <= POWER_OF_TWO_UP_TO:
        bucket = max(MIN_BUCKET, 1 << (needed - 1).bit_length())
    else:
        bucket = -(-needed // STEP_ABOVE) * STEP_ABOVE
    if limit is not None and limit > 0 and bucket > limit:
        bucket = max(needed, limit)
    return bucket


def describe_buckets() -> str:
    """One line for ``explain``: how cache lengths are chosen."""
    return (f"prompt + max_new_tokens rounded up to a power of two (at least {MIN_BUCKET}) up to "
            f"{POWER_OF_TWO_UP_TO}, then to a multiple of {STEP_ABOVE}, capped at the model's max positions")
