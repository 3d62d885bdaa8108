"""Pipeline workloads over many texts (feature-extraction, text-classification, multi-GPU): variants and one case."""

from __future__ import annotations

from typing import Any

from ..checks import compare_embeddings, compare_probabilities, is_half
from ..models import quiet_transformers
from ..runner import Bench, Variant
from ._common import dtype_name, enable_fastpath_kwarg, plan_summary

__all__ = ["run_pipeline"]

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
                             "(its plan picks device, dtype, batch size, length-sorted batching, fused encoder"
                             + (", replicas over the GPUs" if bench.hardware.count > 1 and bench.on_gpu else "") + ")")
    bench.omit("compile", COMPILE_OMITTED)

    build_pipeline: Any = transformers.pipeline  # fastpath's wrapper (enable_fastpath_kwarg) takes fastpath=

    def make(fastpath: bool, **kwargs: Any) -> Any:
        with quiet_transformers():
            return build_pipeline(task, model=path, fastpath=fastpath, **kwargs)

    pipes = {
        "default": bench.build("default", lambda: make(False)),
        "expert": bench.build("expert", lambda: make(False, **expert_kwargs)),
        "fastpath": bench.build("fastpath", lambda: make(True)),
    }
    pipes = {k: p for k, p in pipes.items() if p is not None}
    dtypes = {k: dtype_name(p) for k, p in pipes.items()}
    tokenizer = next(iter(pipes.values())).tokenizer if pipes else None
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]] if tokenizer is not None else []
    warm = texts[:warmup_texts]

    def variant(pipe: Any) -> Variant:
        return Variant(run=lambda: pipe(texts, **call_kwargs), warmup=lambda: pipe(warm, **call_kwargs))

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
    bench.measure(f"{len(texts)} texts", {k: variant(p) for k, p in pipes.items()}, check=check,
                  params={"texts": len(texts), "tokens": sum(lengths)}, work=len(texts), work_unit="texts",
                  one_time=False)
    return pipes
