"""The converted forward, and installing / removing it on module instances.

Nothing is replaced in the module tree and nothing is registered: the converted forward is an
instance attribute (``module.forward = FusedForward(...)``, as accelerate's hooks do), which
``nn.Module.__call__`` finds before the class's ``forward``. Removing it (``del
module.forward``) brings the class's forward back. So module types, parameters, buffers and
state_dict keys never change, and ``save_pretrained`` writes canonical weights by construction.

Where there is an encoder module (BERT family, DistilBERT) its forward is replaced, so a
padded batch can be packed once for all layers. Otherwise (ViT, wav2vec2, BART's encoder...)
each layer's forward is, and a padded batch is packed and unpacked around each layer.

Run-time failures: when the fused computation raises (a native-op error, NotImplementedError,
out of memory, a bug of ours), the original forward runs on the same input. If it raises too,
its exception propagates unchanged (a bad input, or memory that is short for both) and the
conversion stays. After an out-of-memory error the conversion stays in any case (the next,
smaller batch may fit). Otherwise, if the original succeeds, the call returns its result and the
conversion undoes itself on the whole model (:meth:`FusedRuntime.fail`): logged once, the plan
shows the pass as failed, and every later call runs the original forward; strict mode raises
instead. The call's result is then the unconverted model's, bit for bit, for encoder-level
conversions (all layers are one call); for layer-level ones (ViT) the layers before the failing
one already ran fused in that call (within the fused tolerance).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...errors import StrictModeError, is_out_of_memory
from ..instance_methods import fix_data_parallel_replicas, unfix_data_parallel_replicas
from .families import Family
from .graphs import MAX_GRAPHS, GraphCache
from .guards import hooks_reason, kwargs_reason, state_reason
from .heuristic import choose_route
from .layers import BoundLayer, LayerParts, LayerWeights
from .masks import MaskRejected, keep_mask
from .routes import ROUTES, Route, run_route, use_varlen

__all__ = ["RUNTIME_ATTR", "FusedForward", "FusedRuntime", "remove_all", "runtime_of"]

logger = logging.getLogger(__name__)

RUNTIME_ATTR = "_fastpath_fused_encoder"
PASS_OWNER = "fused_encoder"  # this conversion's name among a module's DataParallel replica fixes
_FAIL_LOCK = threading.Lock()  # module-level: a lock attribute would stop deepcopy/pickle of the model

RouteChoice = Literal["auto", "dense", "nested", "packed"]
_FP16_OVERFLOW = "float16 overflow: rerun in float32"


class FusedRuntime:
    """Per-model state of the conversion: parts, route policy and counters.

    Attributes:
        stats: how many calls took each route (``"dense"``, ``"nested"``, ``"packed"``) and
            how many ran the original forward, keyed ``"original: <reason>"``.
        root: the model the pass was applied to (it carries the plan); ``owner`` when None.
        strict: raise :class:`~transformers_fastpath.errors.StrictModeError` when the fused
            route fails at run time, instead of reverting to the original forward.
        failed: why the conversion was undone at run time, or None.
        graphs: the CUDA graphs small dense batches replay (see ``graphs``), or None when off.
    """

    def __init__(self, family: Family, config: Any, owner: nn.Module,
                 layer_lists: Sequence[tuple[nn.ModuleList, Sequence[LayerParts]]], route: RouteChoice = "auto", *,
                 root: nn.Module | None = None, strict: bool = False, pass_name: str = "fused_encoder",
                 layer_returns_tuple: bool = False, cuda_graphs: bool = False) -> None:
        self.family = family
        self.config = config
        self.owner = owner
        self.layer_lists = tuple((layers, tuple(parts)) for layers, parts in layer_lists)
        self.parts = tuple(p for _, parts in self.layer_lists for p in parts)
        self.route = route
        self.stats: Counter[str] = Counter()
        # A plain reference (no weakref): copy.deepcopy and pickle of the model map it to the copy.
        self.root = root
        self.strict = strict
        self.pass_name = pass_name
        self.layer_returns_tuple = layer_returns_tuple  # layer-level: the layer's forward returns (hidden, ...)
        self.failed: str | None = None
        self.graphs: GraphCache | None = None
        if cuda_graphs and not any(p.cache_qkv for p in self.parts):  # a cached q/k/v copy would freeze in a graph
            forwards = 1 if family.encoder is not None else len(self.parts)
            self.graphs = GraphCache(max_graphs=MAX_GRAPHS * forwards)

    @property
    def route(self) -> RouteChoice:
        """``"auto"`` or the route forced for every padded batch; may be changed at any time."""
        return self._route

    @route.setter
    def route(self, value: RouteChoice) -> None:
        if value not in ("auto", *ROUTES):
            raise ValueError(f"route must be 'auto' or one of {', '.join(ROUTES)}, got {value!r}")
        self._route = value

    # -- installing ---------------------------------------------------------------------
    def install(self, encoder: nn.Module | None) -> None:
        """Put the converted forward(s) in place; on error the caller runs :func:`remove_all`."""
        setattr(self.owner, RUNTIME_ATTR, self)
        fix_data_parallel_replicas(self.owner, PASS_OWNER, _unfused_replica)
        if encoder is not None:
            _set_forward(encoder, FusedForward(self, encoder, self.parts, whole_encoder=True))
        else:
            for parts in self.parts:
                _set_forward(parts.layer, FusedForward(self, parts.layer, (parts,), whole_encoder=False))

    def drop_caches(self) -> None:
        for parts in self.parts:
            parts.drop_cache()
        if self.graphs is not None:
            self.graphs.clear()

    def cache_bytes(self) -> int:
        """Bytes held by packed q/k/v copies (only with ``cache_qkv=True``)."""
        return sum(p.cache_bytes() for p in self.parts)

    # -- per call -----------------------------------------------------------------------
    def layers_intact(self) -> bool:
        for layers, parts in self.layer_lists:
            if len(layers) != len(parts):
                return False
            if not all(layers[i] is p.layer and p.intact() for i, p in enumerate(parts)):
                return False
        return True

    def fail(self, exc: BaseException) -> None:
        """The fused route raised where the original forward did not: undo the conversion on the
        model, record it in the plan, log once (strict mode: raise instead)."""
        lines = str(exc).strip().splitlines()
        with _FAIL_LOCK:  # two threads failing at once: one of them undoes the conversion
            if self.failed is not None:
                return
            first = lines[0][:300] if lines else ""
            self.failed = f"failed at run time: {type(exc).__name__}: {first}".rstrip(": ")
        model = self.root if self.root is not None else self.owner
        remove_all(model)
        from ..runner import PLAN_ATTR, _label, record_run_time_failure

        record_run_time_failure(model, self.pass_name, f"{self.failed}; reverted, the original forward runs")
        name = _label(model, getattr(model, PLAN_ATTR, None))
        if self.strict:
            raise StrictModeError(
                f"{self.pass_name} {self.failed} on {name} in strict mode (the original forward ran fine on the same "
                "input). The conversion was reverted on the model. Fix: set encoder_fastpath = false in the policy "
                "for this model, or strict = false to fall back to the original forward.") from exc
        logger.warning("fastpath: %s %s on %s, where the original forward runs; reverted it on this model, so this "
                       "call and later ones run the original forward. Set encoder_fastpath = false in the policy to "
                       "skip it.", self.pass_name, self.failed, name)


class _Fallback:
    """Returned by :meth:`FusedForward._fused` when the original forward must run, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _set_forward(module: nn.Module, forward: FusedForward) -> None:
    if "forward" in vars(module):
        raise RuntimeError(f"{type(module).__name__} already has an instance-level forward")
    module.forward = forward
    fix_data_parallel_replicas(module, PASS_OWNER, _unfused_replica)


def _unfused_replica(original: nn.Module, replica: nn.Module) -> None:
    """A ``torch.nn.DataParallel`` replica runs the original forward: the converted one reads the
    original module's weights (on the first GPU), and a replica has no parameters of its own."""
    own = vars(replica)
    if getattr(own.get("forward"), "__fastpath_fused_encoder__", False):
        del own["forward"]
    own.pop(RUNTIME_ATTR, None)


class FusedForward:
    """The forward installed on one encoder (``whole_encoder``: all layers in one call, a padded
    batch packed once) or on one layer; falls back to the class's forward.

    Plain attributes only (no bound methods), so ``copy.deepcopy`` and pickling of the model
    carry a working conversion over to the copy.
    """

    __fastpath_fused_encoder__ = True

    def __init__(self, runtime: FusedRuntime, module: nn.Module, layers: Sequence[LayerParts], *,
                 whole_encoder: bool) -> None:
        self.runtime = runtime
        self.module = module
        self.layers = tuple(layers)
        self.whole_encoder = whole_encoder
        cls_forward = type(module).forward
        self.__name__ = getattr(cls_forward, "__name__", "forward")
        self.__doc__ = getattr(cls_forward, "__doc__", None)
        try:
            # Callers such as pipelines read forward's signature; show the original one.
            self.__signature__ = inspect.signature(cls_forward.__get__(module))
        except (TypeError, ValueError):
            pass
        # Submodules whose hooks a fused route would skip (hooks on ``module`` itself still run).
        self.inner_modules = tuple(m for m in module.modules() if m is not module)
        self.fusable = all(parts.fusable for parts in self.layers)

    def _params(self) -> Iterator[torch.Tensor]:
        # Read fresh from the modules: a Parameter may have been replaced since apply.
        for parts in self.layers:
            for p in parts.parameters():
                if p is not None:
                    yield p

    def original(self, *args: Any, **kwargs: Any) -> Any:
        """The unconverted computation: the class's forward on the same module and parameters."""
        return type(self.module).forward(self.module, *args, **kwargs)

    def _fallback(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.runtime.stats[f"original: {reason}"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("fused encoder: original forward of %s (%s)", type(self.module).__name__, reason)
        return self.original(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            outcome = self._fused(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - a failure of the fused path itself: decided below, outside this handler
            # Its traceback's frames hold the fused route's tensors: free them before the original runs.
            failure: Exception | None = exc.with_traceback(None)
        else:
            failure = None
        if failure is None:
            if isinstance(outcome, _Fallback):
                return self._fallback(outcome.reason, args, kwargs)
            return outcome
        return self._after_failure(failure, args, kwargs)

    def _after_failure(self, failure: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The fused path raised (a native-op error, NotImplementedError, out of memory, a bug).

        The original forward runs on the same input. If it raises too, the input (or the memory
        left) is the problem, not the conversion: its exception propagates unchanged and the
        conversion stays. If it succeeds, the conversion is at fault: it is undone on the model
        (:meth:`FusedRuntime.fail`), and this call returns the original forward's result -- except
        after an out-of-memory error, which may be this batch's alone: the conversion stays.
        """
        runtime = self.runtime
        if is_out_of_memory(failure):
            # Memory short for this batch only, maybe: the original runs this call (or raises its
            # own OOM, which a pipeline answers by splitting the batch), the conversion stays.
            runtime.stats["original: fused route out of memory"] += 1
            if runtime.stats["original: fused route out of memory"] == 1:
                logger.info("fastpath: the fused encoder ran out of memory on a batch; the original forward ran it "
                            "and the conversion stays (runtime_of(model).stats counts these)")
            return self.original(*args, **kwargs)
        runtime.stats[f"original: fused route failed: {type(failure).__name__}"] += 1
        result = self.original(*args, **kwargs)
        runtime.fail(failure)
        return result

    def _fused(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The fused computation, or a :class:`_Fallback` saying why the original forward runs."""
        runtime = self.runtime
        names = runtime.family.encoder_args
        if len(args) > len(names) or any(n in kwargs for n in names[: len(args)]):
            return _Fallback("unexpected positional arguments")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        hidden = bound.pop("hidden_states", None)
        mask = bound.pop("attention_mask", None)

        reason = (kwargs_reason(bound)
                  or state_reason(hidden, self.inner_modules + (self.module,), runtime.config, self._params()))
        if reason is None and not runtime.layers_intact():
            reason = "layers changed since the conversion"
        if reason is None:
            reason = hooks_reason(self.inner_modules)
        bound_layers: list[BoundLayer] = []
        if reason is None:
            if hidden.shape[-1] != self.layers[0].embed_dim:
                reason = f"hidden size {hidden.shape[-1]}"
            else:
                dtype, device = hidden.dtype, hidden.device
                for parts in self.layers:
                    bound_layer = parts.read(dtype, device)
                    if bound_layer is None:
                        reason = f"weights are not all {dtype} on {device}"
                        break
                    bound_layers.append(bound_layer)
        if reason is not None:
            return _Fallback(reason)

        batch, length, _ = hidden.shape
        try:
            keep = keep_mask(mask, batch, length)
        except MaskRejected as exc:
            return _Fallback(str(exc))

        if keep is None and not self.fusable:
            return _Fallback("no padding to skip, and the fused op cannot compute the activation")
        route = self._route(hidden, keep)
        if route is None:
            return _Fallback("the original forward is faster for this shape")
        graphs = runtime.graphs
        out = None
        if route == "dense" and graphs is not None and graphs.fits(hidden):
            out = graphs.run(hidden, keep, bound_layers)  # graphs.stats counts the replays
        if out is None:
            out = run_route(route, hidden, keep, bound_layers)
        runtime.stats[route] += 1
        if out.dtype == torch.float16 and self.whole_encoder and not bool(torch.isfinite(out).all()):
            out = self._rerun_in_float32(route, hidden, keep, bound_layers)
        return self._output(out)

    def _rerun_in_float32(self, route: Route, hidden: torch.Tensor, keep: torch.Tensor | None,
                          layers: Sequence[BoundLayer]) -> torch.Tensor:
        """The float16 overflow guard: the same route again in float32 (each layer's weights cast as
        it runs, so one layer's copy is alive at a time), cast back to float16, which holds the
        normalized hidden states an encoder returns."""
        stats = self.runtime.stats
        stats[_FP16_OVERFLOW] += 1
        if stats[_FP16_OVERFLOW] == 1:
            logger.warning("fastpath: float16 overflowed in the fused encoder of %s; that call ran again in float32 "
                           "(runtime_of(model).stats counts these). If it happens often, set dtype = 'bfloat16' in the "
                           "policy for this model.", type(self.module).__name__)
        wide = (BoundLayer(layer.parts, LayerWeights(*(None if t is None else t.float() for t in layer.w)))
                for layer in layers)
        return run_route(route, hidden.float(), keep, wide).to(torch.float16)

    def _route(self, hidden: torch.Tensor, keep: torch.Tensor | None) -> Route | None:
        forced = self.runtime.route
        if keep is None:
            real = None
            left_aligned = True
        else:
            real = int(keep.sum())
            left_aligned = not bool((keep[:, 1:] & ~keep[:, :-1]).any())
        if forced == "auto":
            batch, length, _ = hidden.shape
            varlen = use_varlen(hidden, hidden.shape[-1] // self.layers[0].num_heads)
            route = choose_route(hidden.device.type, batch, length, real, left_aligned, varlen)
        else:
            route = forced
        if route is None:
            return None
        if keep is None:
            return "packed" if route == "packed" else "dense"  # no padding: nested has nothing to skip
        if route == "nested" and (not left_aligned or not self.whole_encoder):
            return "packed"  # nested tensors are built from right-padded batches, once per encoder
        if not self.fusable:
            return "packed"  # the packed route calls the layer's own activation
        return route

    def _output(self, hidden: torch.Tensor) -> Any:
        family = self.runtime.family
        if not self.whole_encoder:  # one layer: what the layer's own forward returns
            if family.clamp_fp16 and hidden.dtype == torch.float16 and not bool(torch.isfinite(hidden).all()):
                limit = torch.finfo(torch.float16).max - 1000  # what BART's encoder layer does
                hidden = hidden.clamp(min=-limit, max=limit)
            return (hidden,) if self.runtime.layer_returns_tuple else hidden
        if family.output_class is None:
            return hidden
        from transformers import modeling_outputs

        return getattr(modeling_outputs, family.output_class)(last_hidden_state=hidden)


def runtime_of(model: nn.Module) -> FusedRuntime | None:
    """The conversion state of ``model`` (any module of it that holds one), or None."""
    for module in model.modules():
        runtime = vars(module).get(RUNTIME_ATTR)
        if isinstance(runtime, FusedRuntime):
            return runtime
    return None


def remove_all(model: nn.Module) -> int:
    """Delete every converted forward and runtime under ``model``; returns how many forwards went.

    Safe on a model that was never (or only partly) converted.
    """
    removed = 0
    for module in model.modules():
        own = vars(module)
        if getattr(own.get("forward"), "__fastpath_fused_encoder__", False):
            own.pop("forward", None)  # pop, not del: two threads may undo a failed conversion at once
            removed += 1
        runtime = own.pop(RUNTIME_ATTR, None)
        if isinstance(runtime, FusedRuntime):
            runtime.drop_caches()
        unfix_data_parallel_replicas(module, PASS_OWNER)
    return removed
