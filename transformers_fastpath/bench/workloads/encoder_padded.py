"""``encoder-padded``: a padded batch (25% of the positions are real tokens) through an encoder.

GPU: BERT-base shape (random weights), 64x256, 10 forwards per sample. CPU: the real
all-MiniLM-L6-v2, 8x128. ``--quick``: 4x32. Row lengths follow ``benchmarks/fused_encoder.py``
(one full row, the rest drawn to hit the mean fill).
"""

from __future__ import annotations

from ..runner import Bench
from ._encoders import run_encoder
from ._workload import Workload


def run(bench: Bench) -> None:
    """Mostly padding: what a padding-free encoder saves."""
    run_encoder(bench,
                batch=bench.pick("batch", gpu=64, cpu=8, quick=4),
                length=bench.pick("length", gpu=256, cpu=128, quick=32),
                fill=float(bench.pick("fill", gpu=0.25, cpu=0.25, quick=0.25)),
                calls=bench.pick("calls", gpu=10, cpu=1, quick=1))


WORKLOAD = Workload(
    "encoder-padded",
    "encoder forward on a padded batch, 25% real tokens (GPU: BERT-base shape fp16, 64x256; "
    "CPU: all-MiniLM-L6-v2, 8x128)",
    run,
)
