"""Which route computes a batch, from its shape and how full it is.

A deliberately small rule with one row of thresholds per device type::

    no padding:     dense if B*T <= full_dense_tokens, else full_route
    padded:         dense if B*T <= small_tokens or fill >= dense_min_fill,
                    else padded_route (nested falls back to packed for left padding)

``fill`` is real tokens / (B*T). A route of None means "run the original forward": on CPU the
fused op's attention (bmm + masked softmax) is slower than transformers' SDPA for large
unpadded batches. The CPU numbers come from ``benchmarks/fused_encoder.py --device cpu`` on a
2-core machine; the CUDA row from ``benchmarks/results/fused_encoder_h100.json`` (BERT-base fp16
on one H100: dense 1.5-1.7x at 8x128 whatever the fill, nested 1.3-1.65x on large padded batches
where dense with a mask drops to 0.64-0.77x). Numbers and tables: docs/fused-encoder.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .routes import Route

__all__ = ["THRESHOLDS", "Thresholds", "choose_route"]


@dataclass(frozen=True)
class Thresholds:
    """Route choice for one device type (see the module docstring)."""

    small_tokens: int
    dense_min_fill: float
    padded_route: Route
    full_dense_tokens: int
    full_route: Route | None


THRESHOLDS: dict[str, Thresholds] = {
    # fill >= 1.01 never happens: on CPU every padded batch above 16 tokens goes packed.
    "cpu": Thresholds(small_tokens=16, dense_min_fill=1.01, padded_route="packed",
                      full_dense_tokens=512, full_route=None),
    "cuda": Thresholds(small_tokens=2048, dense_min_fill=0.9, padded_route="nested",
                       full_dense_tokens=1 << 62, full_route="dense"),
}


def choose_route(device_type: str, batch: int, length: int, real_tokens: int | None,
                 left_aligned: bool = True) -> Route | None:
    """The route for a ``(batch, length)`` input with ``real_tokens`` real tokens (None: no padding).

    Returns None when the original forward is expected to be faster.
    """
    t = THRESHOLDS.get(device_type)
    if t is None:
        return None
    padded_tokens = batch * length
    if real_tokens is None or real_tokens >= padded_tokens:
        return "dense" if padded_tokens <= t.full_dense_tokens else t.full_route
    fill = real_tokens / padded_tokens
    if padded_tokens <= t.small_tokens or fill >= t.dense_min_fill:
        return "dense"
    if t.padded_route == "nested" and not left_aligned:
        return "packed"
    return t.padded_route
