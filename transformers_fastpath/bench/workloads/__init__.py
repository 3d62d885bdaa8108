"""The named workloads of ``transformers-fastpath bench``: one module and one function each.

A workload is a function ``run(bench)`` over a :class:`~transformers_fastpath.bench.runner.Bench`
plus ``requires(hardware, options) -> reason | None`` (why it cannot run on this machine with
these options). Registered
in :data:`WORKLOADS` in the order ``bench all`` runs them.
"""

from __future__ import annotations

from ._workload import Workload

__all__ = ["WORKLOADS", "Workload"]


def _registry() -> dict[str, Workload]:
    from . import (
        encoder_latency,
        encoder_padded,
        feature_extraction,
        generate,
        generate_many,
        multi_gpu_pipeline,
        pipeline_text_classification,
        quantized_generate,
        trainer_step,
    )

    modules = (feature_extraction, encoder_latency, encoder_padded, pipeline_text_classification, generate,
               generate_many, quantized_generate, trainer_step, multi_gpu_pipeline)
    return {m.WORKLOAD.name: m.WORKLOAD for m in modules}


WORKLOADS: dict[str, Workload] = _registry()
