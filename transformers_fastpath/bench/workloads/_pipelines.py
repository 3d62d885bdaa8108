"""Pipeline workloads over many texts (feature-extraction, text-classification, multi-GPU): variants and one case."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..checks import compare_embeddings, compare_probabilities, is_half
from ..models import quiet_transformers
from ..runner import Bench, Sample, Variant
from ._common import dtype_name, enable_fastpath_kwarg, plan_summary

__all__ = ["FORWARD_METRICS", "PER_INPUT", "forward_clock", "run_pipeline"]

PER_INPUT = "fastpath-per-input"

FORWARD_METRICS = ("forward_s: time inside the model's forward calls (on a GPU: device time between CUDA events "
                   "recorded by forward hooks on the model and its replicas, summed); around_s: the rest of the "
                   "call's wall time (tokenizing, collating, copies, post-processing, and GPU idle); "
                   "forward_share: forward_s / wall time")

COMPILE_OMITTED = ("a pipeline's batches change shape from one batch to the next (each is padded to its longest "
                   "text), so a compiled forward would recompile or run dynamic-shape graphs; compile is measured on "
                   "fixed shapes by encoder-latency and encoder-padded")


def run_pipeline(bench: Bench, *, task: str, path: str, what: str, texts: list[str], expert_batch: int,
                 call_kwargs: dict[str, Any] | None = None, warmup_texts: int = 64) -> dict[str, Any]:
    """Time ``pipe(texts)`` for the default, expert and fastpath pipelines of ``task`` over ``path``.

    Returns the pipelines (so a workload can report more about them).
    """
    import torch
    import transformers

    enable_fastpath_kwarg()
    call_kwargs = dict(call_kwargs or {})
    half = torch.float16 if bench.on_gpu else torch.float32
    device = bench.device
    expert_kwargs: dict[str, Any] = {"device": device, "dtype": half, "batch_size": expert_batch,
                                     "model_kwargs": {"attn_implementation": "sdpa"}}

    where = ("transformers itself puts it on the first GPU" if bench.on_gpu else "on the CPU")
    bench.define("default", f"transformers.pipeline({task!r}, model=path) with no settings: the checkpoint's "
                            f"float32, batch size 1 (one text per forward), {where}")
    bench.define("expert", f"pipeline({task!r}, model=path, device={device!r}, dtype={dtype_name(half)}, "
                           f"batch_size={expert_batch}, model_kwargs={{'attn_implementation': 'sdpa'}})")
    bench.define("fastpath", f"pipeline({task!r}, model=path, fastpath=True): the default call plus fastpath "
                             "(its plan picks device, dtype, batch size, length-sorted batching, batched pre- and "
                             "post-processing, fused encoder"
                             + (", replicas over the GPUs" if bench.hardware.count > 1 and bench.on_gpu else "") + ")")
    bench.omit("compile", COMPILE_OMITTED)

    build_pipeline: Any = transformers.pipeline  # fastpath's wrapper (enable_fastpath_kwarg) takes fastpath=

    def make(fastpath: bool | dict[str, Any], **kwargs: Any) -> Any:
        with quiet_transformers():
            return build_pipeline(task, model=path, fastpath=fastpath, **kwargs)

    pipes = {
        "default": bench.build("default", lambda: make(False)),
        "expert": bench.build("expert", lambda: make(False, **expert_kwargs)),
        "fastpath": bench.build("fastpath", lambda: make(True)),
    }
    if bench.option("per_input"):  # --set per_input=1: what batched processing adds, side by side
        bench.define(PER_INPUT, "fastpath=True with batched_processing = false: transformers' per-input "
                                "tokenizing, collating and post-processing around fastpath's model")
        pipes[PER_INPUT] = bench.build(PER_INPUT, lambda: make({"defaults": {"batched_processing": False}}))
    pipes = {k: p for k, p in pipes.items() if p is not None}
    dtypes = {k: dtype_name(p) for k, p in pipes.items()}
    tokenizer = next(iter(pipes.values())).tokenizer if pipes else None
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]] if tokenizer is not None else []
    warm = texts[:warmup_texts]

    def variant(pipe: Any) -> Variant:
        def run() -> Sample:
            with forward_clock(pipe) as in_forward:
                start = time.perf_counter()
                output = pipe(texts, **call_kwargs)
                wall = time.perf_counter() - start
                forward = in_forward()
            return Sample(output=output, metrics={"forward_s": forward, "around_s": max(wall - forward, 0.0),
                                                  "forward_share": forward / wall if wall else 0.0})

        return Variant(run=run, warmup=lambda: pipe(warm, **call_kwargs))

    def check(name: str, reference: Any, candidate: Any) -> dict[str, Any]:
        half_involved = is_half(dtypes["default"], dtypes[name])
        if task == "feature-extraction":
            return compare_embeddings(reference, candidate, lengths, half=half_involved)
        return compare_probabilities(reference, candidate, half=half_involved)

    from ...pipelines.replicas import replicas_of

    bench.config.update(
        model=what, task=task, texts=len(texts),
        tokens={"total": sum(lengths), "min": min(lengths, default=0), "max": max(lengths, default=0)},
        pipelines={k: {"device": str(p.device), "dtype": dtypes[k], "batch_size": getattr(p, "_batch_size", None) or 1,
                       "replicas": len(replicas_of(p)) or 1} for k, p in pipes.items()},
        fastpath_plan=plan_summary(pipes["fastpath"]) if "fastpath" in pipes else None,
    )
    bench.config["forward_metrics"] = FORWARD_METRICS
    bench.measure(f"{len(texts)} texts", {k: variant(p) for k, p in pipes.items()}, check=check,
                  params={"texts": len(texts), "tokens": sum(lengths)}, work=len(texts), work_unit="texts",
                  one_time=False)
    return pipes


@contextlib.contextmanager
def forward_clock(pipe: Any) -> Iterator[Callable[[], float]]:
    """Time spent inside ``pipe.model``'s forward (and its replicas') while the block runs.

    Forward hooks on the top-level model only (fastpath's passes run under them unchanged). On
    a GPU each call is timed by CUDA events, so host work overlapping a forward is not counted in
    it; the callable yielded returns the seconds so far (it synchronises the device).
    """
    import torch

    from ...pipelines.replicas import replicas_of

    models = [pipe.model, *(getattr(r, "model", None) for r in replicas_of(pipe))]
    models = [m for i, m in enumerate(models) if m is not None and all(m is not o for o in models[:i])]
    spans: list[tuple[Any, Any]] = []
    host: list[float] = []
    started: dict[int, Any] = {}

    def on_gpu(model: Any) -> bool:
        first = next(iter(model.parameters()), None)
        return first is not None and first.is_cuda

    def before(model: Any, args: Any, kwargs: Any) -> None:
        if on_gpu(model):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            started[id(model)] = event
        else:
            started[id(model)] = time.perf_counter()

    def after(model: Any, args: Any, kwargs: Any, output: Any) -> None:
        start = started.pop(id(model), None)
        if isinstance(start, float):
            host.append(time.perf_counter() - start)
        elif start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            spans.append((start, end))

    def seconds() -> float:
        if spans:
            torch.cuda.synchronize()
        return sum(host) + sum(s.elapsed_time(e) for s, e in spans) / 1e3

    handles = [h for m in models for h in (m.register_forward_pre_hook(before, with_kwargs=True),
                                           m.register_forward_hook(after, with_kwargs=True))]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()
