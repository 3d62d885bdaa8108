"""Built-in plugin: the ``quantization`` setting -> ``quantization_config`` for ``from_pretrained``.

Around plan resolution (a pluggy wrapper): before the other plugins, an explicit method that
cannot run here (package missing, wrong device or GPU generation, tensor parallel) falls back
per ``quantization_fallback``; after them (``auto`` is resolved by the placement plugin, which
does the memory arithmetic), passes that need dense weights are vetoed and the plan notes
which layers stay dense.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ..hookspecs import hookimpl
from ..loading.quantization import (
    METHODS,
    QuantizationUnavailable,
    build_quantization_config,
    dense_modules,
    inventory_of,
    nothing_to_quantize,
    obstacle,
    warn_once,
)
from ..planning.plan import Plan, PlanBuilder

SOURCE = "plugin transformers_fastpath.builtin.quantization"

# Passes that rewrite or read dense nn.Linear weights: quantized layers have none.
DENSE_WEIGHT_PASSES = ("fused_encoder",)
# Passes that torch.compile the model: transformers marks bitsandbytes quantizers not compileable.
COMPILE_PASSES = ("generate_compile",)
NOT_COMPILEABLE = ("bnb-int8", "bnb-nf4", "bnb-fp4")


@hookimpl(wrapper=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> Generator[None, Any, Any]:
    _settle_explicit_method(plan)
    result = yield
    _veto_dense_passes(plan)
    _note_dense_layers(plan)
    return result


@hookimpl
def fastpath_load_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    method = plan.get("quantization")
    if method not in METHODS:
        return
    import torch

    dtype = plan.get("dtype")
    compute = getattr(torch, dtype) if dtype in ("float32", "float16", "bfloat16") else None
    inventory = inventory_of(plan.model.config)
    skip = list(dense_modules(inventory, method, plan.hardware)) if inventory is not None else None
    try:
        kwargs["quantization_config"] = build_quantization_config(method, compute_dtype=compute, skip_modules=skip)
    except ImportError as exc:  # found on the path but does not import (a broken or mismatched install)
        fix = f"reinstall it: pip install -U 'transformers-fastpath[{METHODS[method].extra}]'"
        if plan.get("quantization_fallback") == "error":
            raise QuantizationUnavailable(method, f"{METHODS[method].package} does not import ({exc})", fix) from exc
        warn_once(f"quantization = {method!r}: {METHODS[method].package} does not import ({exc}); loading the "
                  f"model unquantized (quantization_fallback = 'warn'). Fix: {fix}")


def _settle_explicit_method(plan: PlanBuilder) -> None:
    config = plan.model.config
    pre = getattr(config, "quantization_config", None)
    if pre is not None and plan.get("quantization") != "keep":
        method = pre.get("quant_method") if isinstance(pre, dict) else getattr(pre, "quant_method", "?")
        plan.set("quantization", "keep", reason=f"the checkpoint is already quantized ({method}); loaded as it is")
        return
    method = plan.get("quantization")
    if method not in METHODS:
        return
    problem = obstacle(method, plan.hardware)
    reason, fix = (problem.reason, problem.fix) if problem else (None, None)
    inventory = inventory_of(config) if reason is None else None
    if inventory is not None:
        reason = nothing_to_quantize(inventory, method, plan.hardware)
        fix = "use quantization = 'bnb-int8' (no shape limits) or run on a GPU"
    if reason is None and plan.get("placement") == "tensor-parallel":
        reason = "transformers' tensor parallel cannot shard quantized weights (placement = 'tensor-parallel')"
        fix = "set quantization = 'none' (tensor parallel already splits the weights over the ranks)"
    if reason is None:
        return
    decision = plan.decision("quantization")
    if plan.get("quantization_fallback") == "error":
        raise QuantizationUnavailable(method, reason, fix or "", source=decision.source if decision else "")
    warn_once(f"quantization = {method!r} cannot run here: {reason}; loading the model unquantized "
              f"(quantization_fallback = 'warn'). Fix: {fix}")
    plan.set("quantization", "none", reason=f"{method} cannot run here: {reason}; loaded unquantized "
             f"(quantization_fallback = warn). Fix: {fix}")


def _veto_dense_passes(plan: PlanBuilder) -> None:
    method = plan.get("quantization")
    if method not in METHODS and method != "keep":
        return
    from ..plugins import get_passes

    registered = {p.name: p for p in get_passes()}
    vetoes = {name: f"needs dense weights; quantization={method} has priority" for name in DENSE_WEIGHT_PASSES}
    if method in NOT_COMPILEABLE:
        vetoes.update({name: f"bitsandbytes layers cannot be compiled; quantization={method} has priority"
                       for name in COMPILE_PASSES})
    for name, reason in vetoes.items():
        pass_ = registered.get(name)
        if pass_ is None or plan.get(pass_.setting) is False or plan.pass_status(name) is not None:
            continue
        if pass_.supports(plan.model, _Unquantized(plan)) is not None:
            continue  # it would not run even unquantized: keep its own reason in the plan
        plan.skip(name, reason, source=SOURCE)


class _Unquantized:
    """A read-only view of a plan as if ``quantization = "none"`` (to ask a pass whether
    quantization is the only thing stopping it)."""

    def __init__(self, plan: PlanBuilder) -> None:
        self._plan = plan
        self.model = plan.model
        self.hardware = plan.hardware
        self.policy = plan.policy

    def get(self, key: str, default: Any = None) -> Any:
        return "none" if key == "quantization" else self._plan.get(key, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plan, name)


def _note_dense_layers(plan: PlanBuilder) -> None:
    method = plan.get("quantization")
    if method not in METHODS:
        return
    inventory = inventory_of(plan.model.config)
    if inventory is None:
        return
    dense = dense_modules(inventory, method, plan.hardware)
    if not dense:
        return
    shown = [f"{name} ({why})" for name, why in list(dense.items())[:4]]
    more = f" and {len(dense) - 4} more" if len(dense) > 4 else ""
    plan.note(f"{method} keeps {len(dense)} module(s) dense: {', '.join(shown)}{more}")
