"""``encoder-latency``: one small full batch through an encoder, the latency-bound case.

GPU: BERT-base shape (random weights), 8x128, 20 forwards per sample. CPU: the real
all-MiniLM-L6-v2, 8x64. ``--quick``: 2x16.
"""

from __future__ import annotations

from ..runner import Bench
from ._encoders import run_encoder
from ._workload import Workload


def run(bench: Bench) -> None:
    """Full rows (no padding): what dominates is per-layer launch and framework overhead."""
    run_encoder(bench,
                batch=bench.pick("batch", gpu=8, cpu=8, quick=2),
                length=bench.pick("length", gpu=128, cpu=64, quick=16),
                fill=1.0,
                calls=bench.pick("calls", gpu=20, cpu=1, quick=1))


WORKLOAD = Workload(
    "encoder-latency",
    "encoder forward on one full batch (GPU: BERT-base shape fp16, 8x128; CPU: all-MiniLM-L6-v2, 8x64)",
    run,
)
