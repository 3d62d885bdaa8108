"""``transformers-fastpath bench``: named workloads, each timing four variants in one process, interleaved.

Variants (what each means exactly, per workload and machine, is written into every report):

* ``default``  -- transformers out of the box: ``pipeline(task, model=path)`` /
  ``from_pretrained(path)`` with no settings (the checkpoint's dtype, transformers' default
  attention and device placement, pipeline batch size 1); a bare model is moved to the GPU,
  as anyone with a GPU does (transformers 5 pipelines go to the first GPU by themselves);
* ``expert``   -- what an expert sets by hand: the device, fp16/bf16 on a GPU, a batch size,
  ``attn_implementation="sdpa"`` (and mixed precision for training);
* ``compile``  -- the expert's settings plus the compiler its user would reach for:
  ``torch.compile`` of the encoder's forward (``encoder-latency``, ``encoder-padded``: the fp16
  model on a GPU), transformers' own ``cache_implementation="static"``, which compiles the decode
  step (``generate``, ``quantized-generate``), ``TrainingArguments(torch_compile=True)``
  (``trainer-step``). Omitted, with the reason in the report, for the pipeline workloads
  (``feature-extraction``, ``pipeline-text-classification``, ``multi-gpu-pipeline``: each batch
  is padded to another shape), on a CPU for ``generate`` and ``trainer-step``, and with
  ``--quick`` on a CPU for the encoders;
* ``fastpath`` -- the default code plus the plugin, through a user entry point and nothing else:
  ``pipeline(..., fastpath=True)``, ``from_pretrained(..., fastpath=True)`` (or a policy given as
  ``fastpath=``), ``FastpathCallback()``. The model is never moved or applied again by hand: it
  runs where the plan put it, and the inputs are sent to ``model.device``.

Reports carry medians over the rounds, speed-ups against ``default`` and ``expert``, peak memory
per variant, the device, library versions, the date, and a correctness check of every
variant's output against ``default``'s. See ``docs/benchmarks.md``.

Python API::

    from transformers_fastpath import bench
    report = bench.run_workload("generate", quick=True)
    print(bench.render(report)); bench.save(report, "generate.json")
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

from .models import bundled_minilm_path, varied_sentences
from .report import (
    chart_available,
    device_slug,
    draw_chart,
    draw_headline,
    load,
    render,
    report_filename,
    save,
    status,
    to_markdown,
)
from .runner import VARIANT_ORDER, Bench, Sample, Variant, describe_error
from .workloads import WORKLOADS, Workload

__all__ = [
    "VARIANT_ORDER", "WORKLOADS", "Bench", "Sample", "Variant", "Workload", "availability", "bundled_minilm_path",
    "chart_available", "device_slug", "draw_chart", "draw_headline", "load", "render", "report_filename",
    "run_workload", "run_workloads", "save", "status", "to_markdown", "varied_sentences",
]

logger = logging.getLogger("transformers_fastpath.bench")


def availability(options: dict[str, Any] | None = None) -> dict[str, str | None]:
    """Workload name -> why it cannot run on this machine with ``options`` (None: it can)."""
    from ..planning.hardware import Hardware

    hardware = Hardware.detect()
    return {name: workload.unavailable(hardware, options) for name, workload in WORKLOADS.items()}


def run_workload(name: str, *, repeats: int | None = None, quick: bool = False, options: dict[str, Any] | None = None,
                 progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Run one workload and return its JSON-safe report; never raises for the workload's own failures.

    A workload that cannot run here returns ``{"skipped": reason, ...}``; one that crashes returns
    ``{"error": ..., ...}`` with whatever it measured before; an unknown name returns an error report.

    Args:
        name: a key of :data:`WORKLOADS`.
        repeats: interleaved rounds per case (default: 1 with ``quick``, else 3).
        quick: tiny sizes, one round (a smoke run: seconds per workload on a CPU).
        options: size overrides (``{"texts": 500, "batches": [1, 8]}``), see each workload's module.
        progress: show tqdm bars.
        threads: ``torch.set_num_threads`` for the run (restored afterwards). Default: torch's own,
            except ``quick`` on a CPU, which runs on one thread (on a shared CI machine,
            oversubscribed OpenMP threads make tiny models ten times slower).
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads is None and quick and not torch.cuda.is_available():
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(name, repeats=repeats, quick=quick, options=options, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(name: str, **kwargs: Any) -> dict[str, Any]:
    workload = WORKLOADS.get(name)
    description = workload.description if workload else ""
    bench = Bench(name, description, **kwargs)
    if workload is None:
        return bench.report(error=f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")
    reason = workload.unavailable(bench.hardware, bench.options)
    if reason:
        bench.skip(reason)
        return bench.report()
    start = time.perf_counter()
    error = None
    try:
        workload.run(bench)
    except Exception as exc:  # noqa: BLE001 - one workload's failure must not end `bench all`
        error = describe_error(exc)
        logger.info("bench %s failed: %s", name, error, exc_info=True)
    finally:
        _release_memory()
    return bench.report(elapsed_s=time.perf_counter() - start, error=error)


def run_workloads(names: Iterable[str], **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`run_workload` for each name, in order (``bench all``)."""
    return [run_workload(name, **kwargs) for name in names]


def _release_memory() -> None:
    """Between workloads: drop compiled graphs (and their CUDA graph pools) and cached GPU blocks."""
    gc.collect()
    if "torch._dynamo" in sys.modules:
        import torch._dynamo

        torch._dynamo.reset()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
