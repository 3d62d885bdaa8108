"""One pipeline replica per device: list inputs split into contiguous shards, run side by side.

``enable_replicas(pipe, ["cuda:0", "cuda:1"])`` makes ``pipe(list_of_inputs)`` send the first
half of the list to the pipeline itself on ``cuda:0`` (on the caller's thread) and the second
half to a replica on ``cuda:1`` (served from a long-lived thread of its own), and return the
results in the caller's order. Anything that is not a list (one input, a generator, a dataset)
goes to the first replica. ``disable_replicas(pipe)`` puts the pipeline back as it was.

Two kinds of replica (``workers``):

- ``processes`` (what ``auto`` picks on GPUs, when the pipeline can be rebuilt from its
  checkpoint): each extra replica is a worker process (:mod:`.replica_workers`) with its own
  interpreter, so the Python work of a text pipeline -- most of its time -- runs in parallel.
- ``threads``: each extra replica is a shallow copy of the pipeline in this process with its
  own model copy (weights copied straight to the target device) and its own tokenizer copy
  (fast tokenizers are not safe to share between threads). Cheap to start, but the replicas
  share one GIL: on two H100s a BERT-base classifier ran 0.60x of one GPU this way.

The pipeline object keeps its class for ``isinstance``; only ``__call__`` changes (a subclass
swap, as :mod:`transformers_fastpath.pipelines.batching` does). A worker that fails has its shard re-run
on the first replica (logged once), so no input is lost.
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from ..planning.plan import Plan
from .batching import override_subclass
from .replica_workers import WorkerReplica, WorkerUnavailable, recipe_for
from .resilience import gather_shards

__all__ = ["disable_replicas", "enable_replicas", "replicas_of", "split_contiguous"]

logger = logging.getLogger(__name__)

_REPLICAS_ATTR = "_fastpath_replicas"
_LANES_ATTR = "_fastpath_replica_lanes"  # (single-thread executor, its finalizer) per extra replica
Workers = Literal["auto", "threads", "processes"]


def split_contiguous(n_items: int, n_shards: int) -> list[range]:
    """``n_items`` indices cut into ``min(n_items, n_shards)`` contiguous ranges of near-equal size."""
    n_shards = max(1, min(n_shards, n_items))
    base, extra = divmod(n_items, n_shards)
    out, start = [], 0
    for i in range(n_shards):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _replicated_call(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    replicas: Sequence[Any] = getattr(self, _REPLICAS_ATTR)
    if not isinstance(inputs, list) or len(inputs) < 2 or len(replicas) < 2:
        return replicas[0](inputs, *args, **kwargs)
    shards = split_contiguous(len(inputs), len(replicas))
    lanes = [lane for lane, _ in getattr(self, _LANES_ATTR)]
    # The extra replicas start first, each on its own long-lived thread; the first shard runs on
    # the caller's thread. Both matter on GPUs: torch keeps per-thread state (cuBLAS handles,
    # cuDNN attention's graph cache), and a fresh thread rebuilds it -- a new thread per call ran
    # a BERT shard 2.4x slower on an H100, all of it inside scaled_dot_product_attention.
    futures = [_submit(lane, replica, [inputs[i] for i in shard], args, kwargs)
               for lane, replica, shard in zip(lanes, replicas[1:], shards[1:])]
    outcomes: list[Any] = []
    try:
        outcomes.append(replicas[0]([inputs[i] for i in shards[0]], *args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - kept, merged or raised below once every shard is done
        outcomes.append(exc)
    for future in futures:  # every shard finishes before anything is raised: nothing is lost
        try:
            outcomes.append(future.result())
        except Exception as exc:
            outcomes.append(exc)
    # A worker that cannot serve: its shard runs on the first replica, after the others, in this
    # thread (one pipeline object is never called from two threads at once).
    for k, (replica, shard, outcome) in enumerate(zip(replicas, shards, outcomes)):
        if isinstance(outcome, WorkerUnavailable):
            _warn_once(replica, outcome)
            try:
                outcomes[k] = replicas[0]([inputs[i] for i in shard], *args, **kwargs)
            except Exception as exc:
                outcomes[k] = exc
    for shard, outcome in zip(shards, outcomes):
        if not isinstance(outcome, BaseException) and (not isinstance(outcome, list) or len(outcome) != len(shard)):
            raise RuntimeError(
                f"a {type(self).__name__} replica returned {type(outcome).__name__} for {len(shard)} inputs, "
                "not one result per input; cannot merge the shards. Set placement = 'single' in the "
                "fastpath policy for this pipeline."
            )
    # Per-input errors (exc.fastpath_results, see pipeline_resilience) merge across shards.
    return gather_shards([list(shard) for shard in shards], outcomes, len(inputs))


def _submit(lane: ThreadPoolExecutor, replica: Any, shard: list[Any], args: tuple, kwargs: dict[str, Any]) -> Future:
    try:
        return lane.submit(replica, shard, *args, **kwargs)
    except RuntimeError as exc:  # the lane is shut down: disable_replicas ran during this call
        failed: Future = Future()
        failed.set_exception(WorkerUnavailable(f"its thread is stopped ({exc})"))
        return failed


def _warn_once(replica: WorkerReplica, exc: Exception) -> None:
    if getattr(replica, "_warned", False):
        return
    replica._warned = True  # type: ignore[attr-defined]
    logger.warning("fastpath: the pipeline replica on %s cannot serve (%s); its inputs run on the first replica "
                   "instead", replica.device, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)


def _replicated_subclass(cls: type) -> type:
    return override_subclass(cls, "_fastpath_replicas_base", __call__=_replicated_call)


def _copy_model(model: Any, device: str) -> Any:
    """A deep copy of ``model`` whose parameters and buffers are created on ``device`` directly
    (no second full copy on the source device); tied weights stay tied."""
    import torch

    target = torch.device(device)
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = torch.nn.Parameter(param.detach().to(target, copy=True),
                                                 requires_grad=param.requires_grad)
    for buffer in model.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = buffer.detach().to(target, copy=True)
    for value in vars(model).values():  # the attached plan is immutable: share it
        if isinstance(value, Plan):
            memo[id(value)] = value
    clone = copy.deepcopy(model, memo)
    # Plain tensor attributes (caches some modules keep outside parameters/buffers) follow too.
    for module in clone.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device != target:
                setattr(module, name, value.to(target))
    return clone


def _replica(pipeline: Any, device: str) -> Any:
    import torch

    clone = copy.copy(pipeline)
    clone.model = _copy_model(pipeline.model, device)
    clone.device = torch.device(device)
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is not None:
        clone.tokenizer = copy.deepcopy(tokenizer)
    return clone


def enable_replicas(pipeline: Any, devices: Sequence[str], *, plan: Plan | None = None,
                    workers: Workers = "auto") -> None:
    """Give ``pipeline`` one replica per entry of ``devices`` (the first one is the pipeline's own model).

    The pipeline's model stays where it is and serves the first shard; the other devices get
    replicas. A no-op with fewer than two devices or when replicas are already on.

    Args:
        plan: the pipeline's plan; worker processes pin its decisions (required for ``processes``).
        workers: ``processes``, ``threads``, or ``auto``: processes on GPUs when the pipeline can
            be rebuilt from its checkpoint (else threads, with the reason logged), threads on CPUs.
    """
    if len(devices) < 2 or getattr(type(pipeline), "_fastpath_replicas_base", None) is not None:
        return
    recipe = recipe_for(pipeline, plan) if workers != "threads" else "threads were asked for"
    use_processes = not isinstance(recipe, str) and (workers == "processes" or devices[0].startswith("cuda"))
    if workers == "processes" and isinstance(recipe, str):
        raise ValueError(f"replica worker processes cannot rebuild this pipeline: {recipe}. Use workers='threads'.")
    if workers == "auto" and isinstance(recipe, str) and devices[0].startswith("cuda"):
        logger.info("fastpath: pipeline replicas run in threads (one GIL): %s", recipe)
    primary = copy.copy(pipeline)  # same model and device; called without the replicated __call__
    replicas: list[Any] = [primary]
    for device in devices[1:]:
        if use_processes:
            assert not isinstance(recipe, str)
            threads = max(1, (os.cpu_count() or 1) // len(devices)) if device.startswith("cpu") else None
            replicas.append(WorkerReplica(recipe, device, threads=threads))
        else:
            replicas.append(_replica(pipeline, device))
        logger.info("fastpath: pipeline replica on %s (%s)", device, "process" if use_processes else "thread")
    lanes = tuple(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fastpath-replica-{device}")
                  for device in devices[1:])
    # Idle lane threads end with the pipeline, if disable_replicas never runs.
    finalizers = tuple(weakref.finalize(pipeline, lane.shutdown, wait=False) for lane in lanes)
    object.__setattr__(pipeline, _REPLICAS_ATTR, tuple(replicas))
    object.__setattr__(pipeline, _LANES_ATTR, tuple(zip(lanes, finalizers)))
    pipeline.__class__ = _replicated_subclass(type(pipeline))  # type: ignore[arg-type]


def disable_replicas(pipeline: Any) -> None:
    """Undo :func:`enable_replicas`: one model again (the copies are dropped)."""
    base = getattr(type(pipeline), "_fastpath_replicas_base", None)
    if base is None:
        return
    pipeline.__class__ = base
    for lane, finalizer in pipeline.__dict__.pop(_LANES_ATTR, ()):
        finalizer.detach()
        lane.shutdown(wait=True)
    for replica in pipeline.__dict__.pop(_REPLICAS_ATTR, ()):
        if isinstance(replica, WorkerReplica):
            replica.close()


def replicas_of(pipeline: Any) -> tuple[Any, ...]:
    """The replicas serving ``pipeline`` (empty when replicas are off)."""
    return tuple(getattr(pipeline, _REPLICAS_ATTR, ()))
