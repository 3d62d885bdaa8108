"""Where a model goes: one device, balanced shards, one replica per GPU, or tensor parallel.

``resolve_placement`` decides ``placement`` (and ``quantization = "auto"``, which depends on
the same memory arithmetic) on a :class:`~transformers_fastpath.planning.plan.PlanBuilder`;
``load_kwargs`` turns the decision into ``from_pretrained`` arguments (``device_map``,
``max_memory``, ``distributed_config`` / ``tp_plan``). Replicas are built on the pipeline
(:mod:`transformers_fastpath.pipelines.replicas`).

Memory arithmetic: weights = parameters at the plan's dtype (quantized layers at the
method's rate); the budget of a device is its memory less ``memory_headroom`` (kept for
activations and the KV cache), summed over the GPUs when the placement can shard.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import FastpathError, PolicyError, StrictModeError
from ..planning.plan import SOURCE_ARGUMENT
from ..planning.tasks import BATCHED_TASKS  # pipelines fed lists of independent inputs: replicas pay off
from .quantization import (
    AUTO_ORDER,
    METHODS,
    gib,
    inventory_of,
    obstacle,
    warn_once,
    weights_bytes,
)

if TYPE_CHECKING:
    from ..planning.hardware import Hardware
    from ..planning.model_info import ModelInfo
    from ..planning.plan import Plan, PlanBuilder

__all__ = [
    "PlacementError",
    "check_device_exists",
    "has_tp_plan",
    "load_kwargs",
    "local_rank",
    "pipeline_conflicts",
    "rank_device",
    "replica_devices",
    "resolve_placement",
    "settle_loaded_model",
    "single_device",
    "tensor_parallel_kwargs",
    "tp_obstacle",
]

logger = logging.getLogger(__name__)

_DENSE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlacementError(FastpathError, ValueError):
    """Placement arguments transformers cannot combine (``device_map`` with tensor parallelism...)."""


# -- facts ------------------------------------------------------------------------------

def has_tp_plan(config: Any) -> bool:
    """True when the architecture declares a tensor-parallel plan (``config.base_model_tp_plan``)."""
    return bool(getattr(config, "base_model_tp_plan", None))


def tp_obstacle(config: Any, world_size: int) -> str | None:
    """Why transformers' tensor parallel cannot shard this model over ``world_size`` ranks, or None."""
    if config is None:
        return "no config to read a tensor-parallel plan from"
    if not has_tp_plan(config):
        return f"{config.model_type} has no tensor-parallel plan (config.base_model_tp_plan)"
    for attr in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value % world_size:
            return f"{attr} = {value} is not divisible by the {world_size} ranks"
    return None


def tensor_parallel_kwargs(world_size: int) -> dict[str, Any]:
    """``from_pretrained`` arguments for tensor parallel with the architecture's own plan.

    transformers >= 5.18 takes ``distributed_config=DistributedConfig(tp_plan="auto")``; older
    releases take ``tp_plan="auto"`` (detected from ``DistributedConfig``'s signature).
    """
    import transformers

    config_cls = getattr(transformers, "DistributedConfig", None)
    params = inspect.signature(config_cls).parameters if config_cls is not None else {}
    if config_cls is None or "tp_plan" not in params:
        return {"tp_plan": "auto"}
    extra = {"tp_size": world_size} if "tp_size" in params and world_size > 1 else {}
    return {"distributed_config": config_cls(tp_plan="auto", **extra)}


def replica_devices(hardware: Hardware) -> list[str]:
    """One device string per replica: ``cuda:0 .. cuda:N-1`` (``cpu`` repeated for a CPU "count")."""
    if hardware.device in ("cuda", "xpu"):
        return [f"{hardware.device}:{i}" for i in range(hardware.count)]
    return [hardware.torch_device] * hardware.count


def rank_device(hardware: Hardware) -> str:
    """This rank's accelerator: ``cuda:LOCAL_RANK``, or ``cuda:0`` when the launcher shows each rank
    only its own GPU (``CUDA_VISIBLE_DEVICES`` per task: LOCAL_RANK is then past the visible count)."""
    rank = local_rank()
    return f"{hardware.device}:{rank if rank < hardware.count else 0}"


def local_rank() -> int:
    """This process's rank on its node under torchrun / accelerate launch (0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0") or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class _Memory:
    """Weights and budgets for one plan, in bytes (None = unknown)."""

    model: ModelInfo
    hardware: Hardware
    dtype: str
    headroom: float
    device_budget: float | None  # one device, headroom taken off
    devices: int

    def weights(self, method: str | None) -> float | None:
        if method is not None and method not in METHODS:  # "keep": the caller's or checkpoint's own scheme
            return None
        info = self.model
        return weights_bytes(inventory_of(info.config), info.num_params, self.dtype, method, self.hardware)

    def fits_one(self, method: str | None) -> bool | None:
        return self._fits(method, 1)

    def fits_all(self, method: str | None) -> bool | None:
        return self._fits(method, self.devices)

    def _fits(self, method: str | None, shards: int) -> bool | None:
        w = self.weights(method)
        return None if w is None or self.device_budget is None else w <= self.device_budget * shards

    def budget_text(self, shards: int = 1) -> str:
        hw = self.hardware
        if self.device_budget is None:
            return "memory unknown"
        what = "RAM" if hw.device == "cpu" else hw.device.upper()
        each = f"{hw.memory_gib:g} GiB {what} x {1 - self.headroom:g}"
        if shards > 1:
            return f"budget {gib(self.device_budget * shards)} ({shards} x {each})"
        return f"budget {gib(self.device_budget)} ({each})"

    def needs_text(self, method: str | None) -> str:
        w = self.weights(method)
        if w is None:
            return "size unknown"
        return f"needs {gib(w)} at {self.dtype}" if method is None else f"{method} ({gib(w)})"


def _memory(model: ModelInfo, hardware: Hardware, get: Any) -> _Memory:
    """Memory facts from a plan's ``model``, ``hardware`` and its ``get`` (PlanBuilder or Plan)."""
    dtype = get("dtype")
    if dtype not in _DENSE_BYTES:  # keep / unresolved: the checkpoint's dtype
        text = str(getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None) or "float32")
        dtype = text.removeprefix("torch.") if text.removeprefix("torch.") in _DENSE_BYTES else "float32"
    headroom = float(get("memory_headroom", 0.2))
    budget = hardware.memory_gib * 2**30 * (1.0 - headroom) if hardware.memory_gib else None
    return _Memory(model, hardware, dtype, headroom, budget, hardware.count if hardware.is_gpu else 1)


# -- deciding -----------------------------------------------------------------------------

def resolve_placement(plan: PlanBuilder) -> None:
    """Resolve ``placement`` and, when ``auto``, ``quantization`` and the rank's ``device``.

    Explicit placements that cannot run here fall back to the automatic choice with the
    reason in the plan and a warning (``StrictModeError`` in strict mode). Raises
    :class:`PlacementError` / :class:`PolicyError` for combinations transformers forbids.
    """
    check_device_exists(plan)
    _reject_forbidden_mixes(plan)
    _resolve(plan)
    placement = plan.get("placement")
    if plan.is_auto("device") and placement in ("balanced", "tensor-parallel"):
        where = ("device_map puts each layer on its GPU" if placement == "balanced"
                 else "transformers binds each rank to its GPU (LOCAL_RANK)")
        plan.set("device", "keep", reason=f"auto: placement = {placement}: {where}; no single device")


def check_device_exists(plan: PlanBuilder) -> None:
    """A policy's ``device`` that this hardware does not have is an error naming the setting and the fix.

    Runs before anything resolves ``device = auto``; the caller's own ``device=`` is transformers' to check.
    """
    decision = plan.decision("device")
    if decision is None or decision.source == SOURCE_ARGUMENT:
        return
    device = decision.value
    if not isinstance(device, str) or device in ("auto", "keep", "cpu"):
        return
    hw = plan.hardware
    kind, _, index = device.partition(":")
    if kind != hw.device:
        problem = f"this machine has no {kind} device (hardware: {hw.describe()})"
    elif index and int(index) >= hw.count:
        problem = (f"this machine has only {kind}:0" if hw.count == 1
                   else f"this machine has {hw.count} {kind} devices ({kind}:0..{kind}:{hw.count - 1})")
    else:
        return
    raise PolicyError(f"device = {device!r} cannot be used: {problem}. Fix: set device = 'auto' (the first "
                      f"accelerator, else the CPU), 'cpu', or a device that exists here",
                      source=decision.source, key="device", value=device)


def _resolve(plan: PlanBuilder) -> None:
    hw = plan.hardware
    if hw.distributed_world_size > 1 and plan.is_auto("device") and hw.is_gpu:
        plan.set("device", rank_device(hw),
                 reason=f"auto: this rank's GPU under a {hw.distributed_world_size}-process launch (LOCAL_RANK)")
    memory = _memory(plan.model, plan.hardware, plan.get)
    placement = plan.get("placement")
    if placement == "keep":
        _resolve_quantization_for(plan, memory, shards=memory.devices,
                                  why="the caller placed the model (device_map / tp_plan); ")
        return
    if placement == "auto":
        _auto(plan, memory)
        return
    problem = _explicit_problem(plan, memory, placement)
    if problem is None:
        shards = memory.devices if placement == "balanced" else 1
        if placement == "tensor-parallel":
            shards = hw.distributed_world_size
            if plan.is_auto("quantization"):
                plan.set("quantization", "none", reason="auto: tensor parallel shards dense weights over "
                         f"{shards} ranks ({memory.needs_text(None)}, {gib((memory.weights(None) or 0) / shards)} "
                         "a rank)")
            return
        _resolve_quantization_for(plan, memory, shards=shards)
        method = plan.get("quantization")
        if memory._fits(method if method in METHODS else None, shards) is False:
            plan.note(f"placement = {placement}: the weights ({memory.needs_text(method if method in METHODS else None)}) "
                      f"exceed the {memory.budget_text(shards)}; loading may run out of memory")
        return
    message = f"placement = {placement!r} cannot run here: {problem}"
    if plan.strict:
        raise StrictModeError(message + " (strict = true)")
    warn_once(message + "; using the automatic choice instead")
    _auto(plan, memory, prefix=f"{placement} not possible ({problem}); ")


def _explicit_problem(plan: PlanBuilder, memory: _Memory, placement: str) -> str | None:
    hw = plan.hardware
    quantization = plan.get("quantization")
    quantized = quantization not in ("none", "auto")
    if placement == "single":
        return None
    device = plan.decision("device")
    if device is not None and device.source == SOURCE_ARGUMENT:
        return f"the caller passed device={device.value}, which pins the model to one device"
    if placement == "balanced":
        return None if hw.is_gpu else f"sharding needs GPUs (this is {hw.device})"
    if placement == "replicate":
        if hw.count < 2:
            return f"one replica per device needs several devices (found {hw.count} {hw.device})"
        if quantized:
            return f"replicas copy dense weights; quantization = {quantization!r} loads once"
        if memory.fits_one(None) is False:
            return f"a replica does not fit one device ({memory.needs_text(None)}, {memory.budget_text()})"
        return None
    if placement == "tensor-parallel":
        world = hw.distributed_world_size
        if world < 2:
            return ("tensor parallel needs a torchrun / accelerate launch with WORLD_SIZE > 1 "
                    "(e.g. `torchrun --nproc-per-node 2 script.py`)")
        if quantized:
            return f"transformers' tensor parallel cannot shard quantized weights (quantization = {quantization!r})"
        return tp_obstacle(plan.model.config, world)
    return None


def _auto(plan: PlanBuilder, memory: _Memory, prefix: str = "") -> None:
    hw = plan.hardware
    quantization = plan.get("quantization")
    quantized = quantization not in ("none", "auto")
    device = plan.decision("device")

    def place(value: str, reason: str) -> None:
        plan.set("placement", value, reason=f"auto: {prefix}{reason}")

    if device is not None and device.source == SOURCE_ARGUMENT:
        place("single", f"the caller passed device={device.value}")
        _resolve_quantization_for(plan, memory, shards=1)
        return

    world = hw.distributed_world_size
    if world > 1:
        problem = (f"quantization = {quantization!r} is on and tensor parallel cannot shard quantized weights"
                   if quantized else tp_obstacle(plan.model.config, world))
        if problem is None and plan.model.task is None and memory.fits_one(None):
            # A bare from_pretrained under torchrun is usually a DDP / accelerate training script,
            # which needs one full copy per rank; pipelines (inference) get tensor parallel.
            problem = ("no pipeline task and the model fits one device: a bare from_pretrained under torchrun "
                       "is usually DDP / accelerate training, which needs a full copy per rank; set placement = "
                       "'tensor-parallel' to shard it")
        if problem is None:
            w = memory.weights(None)
            per_rank = f", {gib(w / world)} a rank" if w is not None else ""
            place("tensor-parallel", f"launched with {world} processes and the model has a tensor-parallel plan "
                  f"({memory.needs_text(None)}{per_rank})")
            if plan.is_auto("quantization"):
                plan.set("quantization", "none", reason="auto: tensor parallel shards dense weights")
            return
        place("single", f"{world} processes, data parallel: each rank runs its own copy on its device "
              f"({problem})")
        _resolve_quantization_for(plan, memory, shards=1)
        return

    if not hw.is_gpu:
        place("single", f"one {hw.device} device")
        _resolve_quantization_for(plan, memory, shards=1)
        return

    method = quantization if quantized else None
    fits_one = memory.fits_one(method)
    if fits_one is not False:
        sized = ("size unknown" if fits_one is None
                 else f"{memory.needs_text(method) if quantized else memory.needs_text(None)}, {memory.budget_text()}")
        task = plan.model.task
        fit = "one GPU" if fits_one is None else "fits one GPU"
        if hw.count > 1 and not quantized and task in BATCHED_TASKS:
            place("replicate", f"{fit} ({sized}); {task} is a batched task -> one replica on each of the "
                  f"{hw.count} GPUs, list inputs split between them")
        else:
            why = ("" if hw.count == 1 else
                   "; quantized weights are not replicated" if quantized else
                   f"; replicas only pay off for batched pipeline tasks (task: {task or 'none'})")
            place("single", f"{fit} ({sized}){why}")
        if plan.is_auto("quantization"):
            plan.set("quantization", "none", reason=f"auto: fits ({sized})" if fits_one
                     else "auto: cannot tell whether it fits (size or device memory unknown)")
        return

    # Does not fit one GPU.
    if hw.count > 1 and memory.fits_all(method):
        place("balanced", f"does not fit one GPU ({memory.needs_text(method)}, {memory.budget_text()}) but fits "
              f"the {hw.count} GPUs ({memory.budget_text(hw.count)}): balanced shards")
        if plan.is_auto("quantization"):
            plan.set("quantization", "none", reason=f"auto: sharded over {hw.count} GPUs, the model fits unquantized")
        return
    if plan.is_auto("quantization"):
        chosen = _choose_method(plan, memory)
        if chosen is not None:
            name, shards = chosen
            if shards == 1:
                place("single", f"fits one GPU once quantized ({memory.needs_text(name)}, {memory.budget_text()})")
            else:
                place("balanced", f"fits the {shards} GPUs once quantized ({memory.needs_text(name)}, "
                      f"{memory.budget_text(shards)})")
            return
    place("balanced", f"does not fit the GPUs ({memory.needs_text(method)}, {memory.budget_text(hw.count)}): "
          "layers that do not fit are offloaded to CPU RAM (slow)"
          + ("" if quantized or quantization == "auto" else "; quantization = 'auto' would pick a method that fits"))
    plan.note(f"{plan.model.name} does not fit the GPU memory budget; expect CPU offload to be slow")


def _choose_method(plan: PlanBuilder, memory: _Memory, shards: int | None = None) -> tuple[str, int] | None:
    """``quantization = auto``: the least lossy method that runs here and fits; sets the decision.

    Methods in :data:`~transformers_fastpath.loading.quantization.AUTO_ORDER` (int8 before 4-bit); for
    each, one device first, then every GPU when ``shards`` allows (int8 over two GPUs beats nf4
    on one). Returns (method, shards), or None after setting ``quantization = none`` with the reason.
    """
    hw = plan.hardware
    if shards is None:
        options = [1, hw.count] if hw.is_gpu and hw.count > 1 else [1]
    else:
        options = [shards]
    need = memory.needs_text(None)
    blocked: list[str] = []
    for name in AUTO_ORDER:
        w = memory.weights(name)
        for n in options:
            budget = memory.device_budget * n if memory.device_budget is not None else None
            if w is None or budget is None or w > budget:
                continue
            problem = obstacle(name, hw)
            if problem is not None:
                blocked.append(f"{name} would fit ({gib(w)}) but {problem.reason}: {problem.fix}")
                break
            plan.set("quantization", name, reason=f"auto: {need}, {memory.budget_text(n)} -> {name} ({gib(w)})")
            return name, n
    plan.set("quantization", "none", reason=f"auto: {need}, {memory.budget_text(options[-1])}: no quantization "
             "method that runs here makes it fit" + (f" ({'; '.join(blocked)})" if blocked else ""))
    return None


def _resolve_quantization_for(plan: PlanBuilder, memory: _Memory, *, shards: int, why: str = "") -> None:
    """``quantization = auto`` once the placement is known: none when it fits ``shards`` devices."""
    if not plan.is_auto("quantization"):
        return
    budget = memory.device_budget * shards if memory.device_budget is not None else None
    w = memory.weights(None)
    if w is None or budget is None:
        plan.set("quantization", "none", reason=f"auto: {why}cannot tell whether it fits "
                 f"({'size' if w is None else 'device memory'} unknown)")
        return
    if w <= budget:
        plan.set("quantization", "none", reason=f"auto: {why}fits ({memory.needs_text(None)}, "
                 f"{memory.budget_text(shards)})")
        return
    _choose_method(plan, memory, shards=shards)


# -- forbidden mixes ------------------------------------------------------------------------

def _reject_forbidden_mixes(plan: PlanBuilder) -> None:
    call = plan.call_kwargs
    tp_args = [k for k in ("tp_plan", "distributed_config") if call.get(k) is not None]
    if call.get("device_map") is not None and tp_args:
        raise PlacementError(
            f"the call passes device_map={call['device_map']!r} together with {tp_args[0]}=...: transformers "
            "cannot combine tensor parallelism with a device_map. Pass only device_map (one process, layers "
            f"split over the GPUs) or only {tp_args[0]} (under torchrun), or neither and let the fastpath "
            "policy's placement decide."
        )
    if call.get("device_map") is None:
        return
    policy_value, where = _policy_value(plan, "placement")
    if policy_value == "tensor-parallel":
        raise PolicyError(
            f"placement = 'tensor-parallel' cannot be combined with the call's device_map={call['device_map']!r} "
            "(transformers forbids device_map with tensor parallelism); remove device_map from the call, or set "
            "placement = 'balanced' (device_map sharding) in the policy",
            source=where, key="placement", value="tensor-parallel")


def _policy_value(plan: PlanBuilder, key: str) -> tuple[Any, str]:
    """The value the policy file's layers give ``key`` before call arguments, and where it was set."""
    policy = plan.policy
    value, where = policy.defaults.get(key), f"{policy.source} [defaults]"
    for rule in policy.rules:
        if key in rule.settings and rule.match.failed_condition(plan.model, plan.hardware) is None:
            value, where = rule.settings[key], f"{policy.source} {rule.label}"
    return value, where


# -- from_pretrained arguments ------------------------------------------------------------------

def load_kwargs(plan: Plan) -> dict[str, Any]:
    """``device_map`` / ``max_memory`` / ``distributed_config`` for the plan's placement."""
    placement = plan.get("placement")
    hw = plan.hardware
    quantized = plan.get("quantization") in METHODS
    if placement == "tensor-parallel":
        return tensor_parallel_kwargs(hw.distributed_world_size)
    if placement == "balanced" and hw.is_gpu:
        memory = _memory(plan.model, hw, plan.get)
        max_memory: dict[Any, str | int] = {}
        if memory.device_budget is not None:
            max_memory = {i: _size(memory.device_budget) for i in range(hw.count)}
            method = plan.get("quantization") if quantized else None
            if memory.fits_all(method) is False:
                host = _host_memory_gib()
                if host:
                    max_memory["cpu"] = _size(host * 2**30 * (1 - memory.headroom))
        return {"device_map": "balanced", **({"max_memory": max_memory} if max_memory else {})}
    device = single_device(plan)
    return {} if device is None else {"device_map": {"": device}}


def single_device(plan: Plan) -> str | None:
    """The accelerator ``from_pretrained`` loads the whole model onto, or None (the CPU, the caller's
    choice, ``device = keep``, or a sharded placement).

    Loading with a one-device ``device_map`` puts each weight straight there: no CPU copy first,
    and no second copy of the model in host memory.
    """
    device = plan.get("device")
    if plan.get("placement") not in ("single", "replicate") or not isinstance(device, str):
        return None
    if device in ("auto", "keep") or device.split(":", 1)[0] == "cpu":
        return None
    if ":" not in device:  # "cuda": transformers reads it as this rank's GPU; so does fastpath
        return rank_device(plan.hardware)
    return device


def settle_loaded_model(model: Any, plan: Plan, placed_by_fastpath: bool) -> None:
    """After a load fastpath placed with a one-device ``device_map``: make the model what
    ``from_pretrained(...).to(device)`` gives.

    accelerate marks such a model ``hf_device_map = {"": device}`` in transformers before 5.25
    (later releases set no mark for one device), and transformers' pipeline refuses a ``device=``
    argument for a marked model. With one device the mark says nothing ``model.device`` does not,
    so it goes, and a pipeline then gets the plan's device like any other.
    """
    if not placed_by_fastpath:
        return
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) == 1:
        del model.hf_device_map


def _size(n_bytes: float) -> str | int:
    """A ``max_memory`` value accelerate parses: ``"12.80GiB"``, ``"300MiB"``, or bytes when tiny."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.2f}GiB"
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.0f}MiB"
    return int(n_bytes)


def _host_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def pipeline_conflicts(plan: Plan) -> tuple[str, ...]:
    """Pipeline arguments fastpath must not add for this placement: a sharded model has no one device."""
    return ("device",) if plan.get("placement") in ("balanced", "tensor-parallel") else ()
