"""Which route computes a batch, from its shape and how full it is.

A deliberately small rule with one row of thresholds per device type::

    no padding:     dense if B*T <= full_dense_tokens, else full_route
    padded:         dense if B*T <= small_tokens or fill >= dense_min_fill,
                    else padded_route (nested falls back to packed for left padding)

``fill`` is real tokens / (B*T). A route of None means "run the original forward" (no row uses it
today). The CPU numbers come from ``benchmarks/fused_encoder.py --device cpu`` on a
2-core machine. On a GPU whose packed route runs flash varlen attention (fp16/bf16, sm80+; the
``cuda-varlen`` row), two runs on one H100 (``benchmarks/results/fused_encoder_bf16_{routes,varlen}_h100.json``,
BERT-base bf16) have packed at 1.32-1.93x of SDPA on large batches at 25-50% fill, where nested
is 0.82-1.21x and dense with a mask 0.63-0.77x; dense wins small batches (1.42-1.62x at 8x128,
packed 1.18-1.25x).
The plain ``cuda`` row (float32, or GPUs without flash) keeps the earlier fp16 measurement
(``fused_encoder_h100.json``: nested 1.3-1.65x, before the packed route had varlen attention).
Numbers and tables: docs/fused-encoder.md.
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
    # Unpadded on CPU (torch 2.13, 2 cores, 2026-12-07): dense 1.04-1.11x at 16-32 tokens, 0.92-1.04x
    # at 64-128 and 0.95-0.96x at 197 (MiniLM, BERT-base); ViT-base 1x197 0.95x in the families bench.
    # Since the packed route runs oneDNN linear layers and unmasked attention (2026-12-07, MiniLM,
    # unpadded): packed 1.19-1.41x the original forward from 2x32 to 32x128 and at 1x256, where
    # dense is 0.94-1.10x; at 1x16 dense and packed tie.
    "cpu": Thresholds(small_tokens=16, dense_min_fill=1.01, padded_route="packed",
                      full_dense_tokens=16, full_route="packed"),
    "cuda": Thresholds(small_tokens=2048, dense_min_fill=0.9, padded_route="nested",
                       full_dense_tokens=1 << 62, full_route="dense"),
    "cuda-varlen": Thresholds(small_tokens=2048, dense_min_fill=1.01, padded_route="packed",
                              full_dense_tokens=1 << 62, full_route="dense"),
}


def choose_route(device_type: str, batch: int, length: int, real_tokens: int | None,
                 left_aligned: bool = True, varlen: bool = False) -> Route | None:
    """The route for a ``(batch, length)`` input with ``real_tokens`` real tokens (None: no padding).

    ``varlen``: the packed route's attention can run padding-free here (see
    :func:`.routes.use_varlen`); picks the device's ``-varlen`` row where there is one.
    Returns None when the original forward is expected to be faster.
    """
    t = THRESHOLDS.get(f"{device_type}-varlen") if varlen else None
    t = t or THRESHOLDS.get(device_type)
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
