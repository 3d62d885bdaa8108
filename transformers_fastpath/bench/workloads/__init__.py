"""The named workloads of ``transformers-fastpath bench``: one module and one function each.

A workload is a function ``run(bench)`` over a :class:`~transformers_fastpath.bench.runner.Bench`
plus ``requires(hardware, options) -> reason | None`` (why it cannot run on this machine with
these options). Registered
in :data:`WORKLOADS` in the order ``bench all`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...planning.hardware import Hardware
    from ..runner import Bench

__all__ = ["WORKLOADS", "Workload"]


def _anywhere(hardware: Hardware, options: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class Workload:
    """A named benchmark.

    Attributes:
        name: what ``transformers-fastpath bench NAME`` takes.
        description: one line: the model, the inputs, what is measured.
        run: fills a :class:`Bench` (builds variants, measures cases).
        requires: why it cannot run on ``hardware`` with ``options`` (None: it can).
    """

    name: str
    description: str
    run: Callable[[Bench], None]
    requires: Callable[[Hardware, Mapping[str, Any]], str | None] = _anywhere

    def unavailable(self, hardware: Hardware, options: Mapping[str, Any] | None = None) -> str | None:
        """Why this workload is skipped on ``hardware`` (with ``options``), or None when it runs."""
        return self.requires(hardware, options or {})


def _registry() -> dict[str, Workload]:
    from . import (
        encoder_latency,
        encoder_padded,
        feature_extraction,
        generate,
        multi_gpu_pipeline,
        pipeline_text_classification,
        quantized_generate,
        trainer_step,
    )

    modules = (feature_extraction, encoder_latency, encoder_padded, pipeline_text_classification, generate,
               quantized_generate, trainer_step, multi_gpu_pipeline)
    return {m.WORKLOAD.name: m.WORKLOAD for m in modules}


WORKLOADS: dict[str, Workload] = _registry()
