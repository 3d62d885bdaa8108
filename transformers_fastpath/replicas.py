"""One pipeline replica per device: list inputs split into contiguous shards, run in threads.

``enable_replicas(pipe, ["cuda:0", "cuda:1"])`` makes ``pipe(list_of_inputs)`` send the first
half of the list to a replica on ``cuda:0`` and the second half to one on ``cuda:1``, each in
its own thread (CUDA kernels and tokenizers release the GIL), and return the results in the
caller's order. Anything that is not a list (one input, a generator, a dataset) goes to the
first replica. ``disable_replicas(pipe)`` puts the pipeline back as it was.

The pipeline object keeps its class for ``isinstance``; only ``__call__`` changes (a subclass
swap, as :mod:`transformers_fastpath.batching` does). Each replica is a shallow copy of the
pipeline with its own model copy (weights copied straight to the target device) and its own
tokenizer copy (fast tokenizers are not safe to share between threads).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .batching import call_override_subclass
from .plan import Plan

__all__ = ["disable_replicas", "enable_replicas", "replicas_of", "split_contiguous"]

logger = logging.getLogger(__name__)

_REPLICAS_ATTR = "_fastpath_replicas"


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
    with ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="fastpath-replica") as pool:
        futures = [pool.submit(replica, [inputs[i] for i in shard], *args, **kwargs)
                   for replica, shard in zip(replicas, shards)]
        results = [f.result() for f in futures]
    merged: list[Any] = []
    for shard, result in zip(shards, results):
        if not isinstance(result, list) or len(result) != len(shard):
            raise RuntimeError(
                f"a {type(self).__name__} replica returned {type(result).__name__} for {len(shard)} inputs, "
                "not one result per input; cannot merge the shards. Set placement = 'single' in the "
                "fastpath policy for this pipeline."
            )
        merged.extend(result)
    return merged


def _replicated_subclass(cls: type) -> type:
    return call_override_subclass(cls, _replicated_call, "_fastpath_replicas_base")


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


def enable_replicas(pipeline: Any, devices: Sequence[str]) -> None:
    """Give ``pipeline`` one replica per entry of ``devices`` (the first one is the pipeline's own model).

    The pipeline's model stays where it is and serves the first shard; the other devices get
    copies. A no-op with fewer than two devices or when replicas are already on.
    """
    if len(devices) < 2 or getattr(type(pipeline), "_fastpath_replicas_base", None) is not None:
        return
    primary = copy.copy(pipeline)  # same model and device; called without the replicated __call__
    replicas = [primary]
    for device in devices[1:]:
        replicas.append(_replica(pipeline, device))
        logger.info("fastpath: pipeline replica on %s", device)
    object.__setattr__(pipeline, _REPLICAS_ATTR, tuple(replicas))
    pipeline.__class__ = _replicated_subclass(type(pipeline))  # type: ignore[arg-type]


def disable_replicas(pipeline: Any) -> None:
    """Undo :func:`enable_replicas`: one model again (the copies are dropped)."""
    base = getattr(type(pipeline), "_fastpath_replicas_base", None)
    if base is None:
        return
    pipeline.__class__ = base
    pipeline.__dict__.pop(_REPLICAS_ATTR, None)


def replicas_of(pipeline: Any) -> tuple[Any, ...]:
    """The replicas serving ``pipeline`` (empty when replicas are off)."""
    return tuple(getattr(pipeline, _REPLICAS_ATTR, ()))
