"""The ``sdpa_backends`` pass: run a model's SDPA attention through an ordered chain of kernels.

Around each call of the top-level model's ``forward`` (an instance-level override, see
:mod:`.instance_methods`; parameters are never touched), the pass enters
``torch.nn.attention.sdpa_kernel(chain, set_priority=True)``: every attention call takes the
first backend of the chain that has a kernel for its inputs -- torch itself falls through the
chain per call, so a decode step can use one backend and a padded prefill the next. Around
``generate`` the pass only chooses the chain for the whole call (its call kinds, its retry); the
chain is held per forward step (and per call of transformers' compiled step, through a layer on
``get_compiled_call``), never while the caller's streamer, logits processors or stopping
criteria run.

Before the first call of each kind (unpadded, single-token decode, masked), a tiny probe tells
which backends of the chain run the model's attention geometry (heads, KV heads, head dim),
dtype and device. When the first backend cannot, the next one in the chain serves those calls:
this is logged once per model (at INFO for the chains fastpath chose itself, WARNING for a
policy's), and in strict mode it raises :class:`StrictModeError` instead.
When no backend in the chain can, torch's remaining backends are appended (logged; strict
raises). Should a call still end in "No available kernel", it is re-run once with every backend
allowed, when re-running is safe (no cache object or streamer of the caller's is involved).

Calls that record autograd (training) use a chain without cuDNN when the chain is fastpath's own
(``auto``): cuDNN's attention backward has produced NaN gradients on Hopper.

``sdpa_kernel``'s flags and priority order are process-wide, not per thread: two threads entering
different chains would interleave their enter/exit pairs and leave the process with one of them.
:func:`process_chain` shares one applied chain among the threads that want the same one and makes
a thread that wants another wait until the current one is released. Since a chain is held only
while a model's own forward code runs (no code of the caller's inside, except its forward hooks),
a wait lasts at most one forward call of another model, and a thread that waits for another
one's streamer cannot deadlock with it.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PassSkipped, StrictModeError
from .instance_methods import add_layer, bind_call, get_layer, remove_layer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..planning.model_info import ModelInfo
    from ..planning.plan import Plan, PlanBuilder

__all__ = [
    "BACKEND_NAMES",
    "TORCH_DEFAULT_ORDER",
    "AttentionGeometry",
    "BackendChain",
    "SdpaBackendsPass",
    "available_backends",
    "compiled_step_scope",
    "is_no_kernel_error",
    "probe_backend",
    "training_chain",
]

logger = logging.getLogger(__name__)

# Policy name -> torch.nn.attention.SDPBackend member.
BACKEND_NAMES: dict[str, str] = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
# torch's own priority when nothing is chosen (torch._C._get_sdp_priority_order() on 2.13).
TORCH_DEFAULT_ORDER: tuple[str, ...] = ("flash", "efficient", "math", "cudnn")

CallKind = Literal["full", "decode", "masked"]
_KIND_TEXT = {"full": "unmasked attention", "decode": "single-token decode attention",
              "masked": "masked (padded or static-cache) attention"}
_NO_KERNEL = re.compile(r"No available kernel|No viable backend for scaled_dot_product_attention")
_STATIC_CACHES = ("static", "offloaded_static")

# True while this thread/task holds a chain: nested calls run under it and pass through.
_HELD: contextvars.ContextVar[bool] = contextvars.ContextVar("transformers_fastpath_sdpa_held", default=False)


@dataclass(frozen=True)
class _GenerateScope:
    """The chain chosen for the ``generate`` call this thread/task is in, held per forward step."""

    model: Any
    backends: list[Any]


_GENERATING: contextvars.ContextVar[_GenerateScope | None] = contextvars.ContextVar(
    "transformers_fastpath_sdpa_generating", default=None)


_CHAIN_LOCK = threading.Condition()
_applied: tuple[Any, ...] | None = None  # the chain applied process-wide now
_holders = 0  # calls (any thread) running under it
_queue: collections.deque[tuple[object, tuple[Any, ...]]] = collections.deque()  # waiting calls, first come first
_applied_context: Any = None


@contextlib.contextmanager
def process_chain(backends: Sequence[Any]) -> Iterator[None]:
    """``sdpa_kernel(backends, set_priority=True)``, shared safely between threads.

    The first caller applies the chain and the last one to leave restores the previous flags.
    Callers wanting the applied chain join it while nobody waits; otherwise callers queue and
    enter in arrival order (a caller wanting another chain is not starved by a stream of calls
    under the current one). Must not be nested in one thread with a different chain (the pass
    never does: inner calls of a model under a chain pass through).
    """
    global _applied, _holders, _applied_context
    from torch.nn.attention import sdpa_kernel

    key = tuple(backends)
    with _CHAIN_LOCK:
        if not (_holders and _applied == key and not _queue):
            ticket = object()
            _queue.append((ticket, key))
            try:
                while not (_queue[0][0] is ticket and (not _holders or _applied == key)):
                    _CHAIN_LOCK.wait()
            finally:
                _queue.remove((ticket, key))
                _CHAIN_LOCK.notify_all()  # the next in line may want the same chain and join now
        if not _holders:
            context = sdpa_kernel(list(backends), set_priority=True)
            context.__enter__()
            _applied, _applied_context = key, context
        _holders += 1
    try:
        yield
    finally:
        with _CHAIN_LOCK:
            _holders -= 1
            if not _holders:
                context, _applied, _applied_context = _applied_context, None, None
                try:
                    context.__exit__(None, None, None)
                finally:
                    _CHAIN_LOCK.notify_all()


def available_backends() -> tuple[str, ...]:
    """The backend names this torch build knows (all four on torch >= 2.5)."""
    from torch.nn.attention import SDPBackend

    return tuple(name for name, member in BACKEND_NAMES.items() if hasattr(SDPBackend, member))


def is_no_kernel_error(exc: BaseException) -> bool:
    """True for torch's "no kernel for these inputs" RuntimeError (CUDA and CPU wording), also when wrapped."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RuntimeError) and _NO_KERNEL.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class AttentionGeometry:
    """What an attention call of this model looks like to a kernel."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: Any) -> AttentionGeometry:
        """Read it from the model's (decoder) text config; 4 heads of 64 when the config says nothing."""
        config = model.config
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            config = config.get_text_config(decoder=True)
        heads = _positive_int(getattr(config, "num_attention_heads", None)) or 4
        kv_heads = _positive_int(getattr(config, "num_key_value_heads", None)) or heads
        hidden = _positive_int(getattr(config, "hidden_size", None))
        head_dim = _positive_int(getattr(config, "head_dim", None)) or (hidden // heads if hidden else 64)
        return cls(heads, kv_heads if heads % kv_heads == 0 else heads, head_dim)


def probe_backend(backend: str, kind: CallKind, geometry: AttentionGeometry, device: torch.device,
                  dtype: torch.dtype) -> str | None:
    """Run one tiny attention call of ``kind`` on ``backend`` alone: None when it runs, else why not.

    The call is shaped like transformers' ``sdpa_attention_forward``: grouped KV heads use
    ``enable_gqa`` when there is no mask, and are repeated when there is one.
    """
    import torch
    from torch.nn.attention import SDPBackend

    member = getattr(SDPBackend, BACKEND_NAMES[backend], None)
    if member is None:
        return "not in this torch build"
    q_len = 1 if kind == "decode" else 8
    kv_len = 8
    gqa = kind != "masked" and geometry.num_kv_heads != geometry.num_heads
    kv_heads = geometry.num_kv_heads if gqa else geometry.num_heads
    kwargs: dict[str, Any] = {"enable_gqa": True} if gqa else {}
    if kind == "masked":
        kwargs["attn_mask"] = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device).tril()
    elif kind == "full":
        kwargs["is_causal"] = True
    try:
        q = torch.zeros(1, geometry.num_heads, q_len, geometry.head_dim, dtype=dtype, device=device)
        kv = torch.zeros(1, kv_heads, kv_len, geometry.head_dim, dtype=dtype, device=device)
        with warnings.catch_warnings(), process_chain([member]), torch.no_grad():
            warnings.simplefilter("ignore")  # torch explains each refusal in a UserWarning; we report it ourselves
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, **kwargs)
    except RuntimeError as exc:
        return _first_line(exc)
    return None


class BackendChain:
    """The per-model runtime of the pass: picks the backends for each call and logs fallbacks once.

    Args:
        chain: backend names in priority order (``("flash", "math")``).
        strict: raise :class:`StrictModeError` instead of falling back.
        label: how log messages name the model.
        grad_chain: the chain for calls that record autograd (training); ``chain`` when None.
        quiet: log the first fallback at INFO instead of WARNING (chains fastpath chose itself,
            where a fallback such as flash -> cudnn for masked calls is expected).
    """

    def __init__(self, chain: Sequence[str], *, strict: bool, label: str, grad_chain: Sequence[str] | None = None,
                 quiet: bool = False) -> None:
        for name, value in (("chain", chain), ("grad_chain", grad_chain)):
            if value is None:
                continue
            if not value:
                raise ValueError(f"BackendChain: {name} needs at least one backend")
            unknown = [b for b in value if b not in BACKEND_NAMES]
            if unknown:
                raise ValueError(f"BackendChain: unknown SDPA backends {unknown} in {name}; "
                                 f"use names from {sorted(BACKEND_NAMES)}")
        self.chain = tuple(chain)
        self.grad_chain = tuple(grad_chain) if grad_chain else self.chain
        self.strict = strict
        self.label = label
        self.quiet = quiet
        self._probes: dict[tuple[CallKind, str, str], dict[str, str | None]] = {}
        self._selected: dict[tuple[tuple[str, ...], frozenset[CallKind], str, str], list[Any]] = {}
        self._logged = False

    def __getstate__(self) -> dict[str, Any]:
        # torch.save of a fastpath model: torch's SDPBackend members do not pickle; the selection
        # is a cache, made again from the probes on the first call after loading.
        return {**self.__dict__, "_selected": {}}

    # -- choosing ---------------------------------------------------------------
    def backends_for(self, model: Any, kinds: Iterable[CallKind], *, grad: bool = False) -> list[Any]:
        """The ``SDPBackend`` list (priority order) to run calls of ``kinds`` on this model."""
        device, dtype = _device_and_dtype(model)
        chain = self.grad_chain if grad else self.chain
        key = (chain, frozenset(kinds), str(device), str(dtype))
        selected = self._selected.get(key)
        if selected is None:
            selected = self._select(model, chain, key[1], device, dtype)
            self._selected[key] = selected
        return selected

    def _select(self, model: Any, chain: tuple[str, ...], kinds: frozenset[CallKind], device: Any,
                dtype: Any) -> list[Any]:
        geometry = AttentionGeometry.of(model)
        names = list(chain)
        first = names[0]
        shown = f"[{', '.join(chain)}]"
        for kind in sorted(kinds):
            results = self._probe(kind, geometry, device, dtype)
            if results[first] is None:
                continue
            serving = next((name for name in names if results[name] is None), None)
            where = (f"{_KIND_TEXT[kind]} on {device} {str(dtype).removeprefix('torch.')} "
                     f"(heads {geometry.num_heads}/{geometry.num_kv_heads}, head dim {geometry.head_dim})")
            if self.strict:
                raise StrictModeError(
                    f"sdpa_backends: {first!r}, first in {shown}, has no kernel for {where}: "
                    f"{results[first]}. Strict mode does not fall back; put a backend that runs these inputs "
                    f"first in sdpa_backends, or set strict = false.")
            if serving is None:
                extra = [name for name in _torch_order() if name not in names]
                names += extra
                self._log_once(f"no backend in sdpa_backends {shown} has a kernel for {where} "
                               f"({first}: {results[first]}); torch's other backends [{', '.join(extra)}] are "
                               "allowed for this model")
            else:
                self._log_once(f"SDPA backend {first!r} has no kernel for {where} ({results[first]}); "
                               f"{serving!r}, next in sdpa_backends {shown}, runs those calls")
        return _members(names)

    def _probe(self, kind: CallKind, geometry: AttentionGeometry, device: Any, dtype: Any) -> dict[str, str | None]:
        key = (kind, str(device), str(dtype))
        results = self._probes.get(key)
        if results is None:
            results = {name: probe_backend(name, kind, geometry, device, dtype) for name in BACKEND_NAMES}
            self._probes[key] = results
        return results

    def _log_once(self, message: str) -> None:
        if self._logged:
            logger.debug("fastpath (%s): %s", self.label, message)
            return
        self._logged = True
        logger.log(logging.INFO if self.quiet else logging.WARNING,
                   "fastpath (%s): %s. Logged once per model; set sdpa_backends in the policy to choose "
                   "another order.", self.label, message)

    # -- running ----------------------------------------------------------------
    def around_forward(self, model: Any, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """Layer around ``model.forward`` (see :func:`.instance_methods.add_layer`): the chain held for the call."""
        import torch

        if torch.compiler.is_compiling() or _HELD.get():
            return inner(*args, **kwargs)
        scope = _GENERATING.get()
        if scope is not None and scope.model is model:  # a step of generate: its chain, its retry
            with _held(scope.backends):
                return inner(*args, **kwargs)
        call = bind_call(type(model), "forward", args, kwargs)
        kinds = _forward_kinds(call)
        retry_safe = call.get("past_key_values") is None and call.get("cache") is None
        return self._run(model, inner, args, kwargs, kinds, retry_safe, _held)

    def around_generate(self, model: Any, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """Layer around ``model.generate``: one chain chosen for the whole call, held per forward step."""
        scope = _GENERATING.get()
        if _HELD.get() or (scope is not None and scope.model is model):
            return inner(*args, **kwargs)
        call = bind_call(type(model), "generate", args, kwargs)
        kinds = _generate_kinds(model, call)
        retry_safe = call.get("streamer") is None and call.get("past_key_values") is None and call.get("cache") is None
        return self._run(model, inner, args, kwargs, kinds, retry_safe,
                         lambda backends: _generating(_GenerateScope(model, backends)))

    def around_compiled_call(self, model: Any, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """Layer around ``model.get_compiled_call``: inside ``generate``, the compiled step holds the chain.

        transformers calls the compiled ``__call__`` it returns for each decode step; the compiler
        traces the forward (where :meth:`around_forward` passes through) under whatever chain is
        applied, so the chain must be held around the compiled call itself.
        """
        compiled = inner(*args, **kwargs)
        scope = _GENERATING.get()
        if scope is None or scope.model is not model:
            return compiled
        backends = scope.backends

        def call_holding_the_chain(*call_args: Any, **call_kwargs: Any) -> Any:
            with _held(backends):
                return compiled(*call_args, **call_kwargs)

        return call_holding_the_chain

    def _run(self, model: Any, inner: Any, args: tuple, kwargs: dict[str, Any], kinds: frozenset[CallKind],
             retry_safe: bool, under: Callable[[list[Any]], contextlib.AbstractContextManager[Any]] | None = None
             ) -> Any:
        """``inner`` under ``under(backends)`` (held for this call by default); on "no kernel", once more with
        every backend allowed, when that is safe."""
        import torch

        under = under or _held
        grad = torch.is_grad_enabled()
        backends = self.backends_for(model, kinds, grad=grad)
        chain = self.grad_chain if grad else self.chain
        try:
            with under(backends):
                return inner(*args, **kwargs)
        except RuntimeError as exc:
            if not is_no_kernel_error(exc):
                raise
            names = ", ".join(chain)
            if self.strict:
                raise StrictModeError(f"sdpa_backends [{names}]: no kernel for an attention call of "
                                      f"{self.label} ({_first_line(exc)}); strict mode does not fall back") from exc
            if not retry_safe:
                raise RuntimeError(f"fastpath: no backend in sdpa_backends [{names}] has a kernel for an attention "
                                   f"call of {self.label}, and the call cannot be re-run safely (it uses your cache "
                                   "object or streamer). Add 'math' to sdpa_backends.") from exc
            self._log_once(f"no backend in sdpa_backends [{names}] had a kernel for an attention call "
                           f"({_first_line(exc)}); the call was re-run with every backend allowed")
        everything = _members([*chain, *(n for n in _torch_order() if n not in chain)])
        with under(everything):
            return inner(*args, **kwargs)


@contextlib.contextmanager
def _held(backends: list[Any]) -> Iterator[None]:
    """Hold ``backends`` as the process's chain for this thread/task's call; nested calls pass through
    (a thread/task that already holds a chain keeps it: entering another one would interleave)."""
    if _HELD.get():
        yield
        return
    token = _HELD.set(True)
    try:
        with process_chain(backends):
            yield
    finally:
        _HELD.reset(token)


def compiled_step_scope(model: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """For code that calls a compiled function running ``model``'s forward (fastpath's lean decode step):
    a context factory holding the model's chain for masked calls around each call of it.

    Inside compiled code the forward layer passes through (no lock can be taken while tracing), and
    the compiler picks the kernel under whatever chain is applied when it traces, so the caller of
    the compiled function holds the chain. Without this pass on the model, nothing is held.
    """
    layer = get_layer(model, "forward", SdpaBackendsPass.name)
    runtime = getattr(layer, "__self__", None)
    if not isinstance(runtime, BackendChain):
        return contextlib.nullcontext
    backends = runtime.backends_for(model, ("masked",))
    return lambda: _held(backends)


@contextlib.contextmanager
def _generating(scope: _GenerateScope) -> Iterator[None]:
    token = _GENERATING.set(scope)
    try:
        yield
    finally:
        _GENERATING.reset(token)


class SdpaBackendsPass:
    """Apply the plan's ``sdpa_backends`` chain around ``forward`` and ``generate`` (reversible).

    Runs only when the model's attention implementation is ``sdpa``; never touches parameters,
    so the state_dict stays canonical.
    """

    name = "sdpa_backends"
    setting = "sdpa_backends"
    changes_state_dict = False

    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan) -> str | None:
        chain = plan.get("sdpa_backends")
        if not isinstance(chain, (list, tuple)) or not chain:
            return f"sdpa_backends is {chain!r}: there is no backend chain to apply"
        attn = plan.get("attn_implementation")
        if attn not in ("sdpa", "keep", "auto", None):
            return f"attn_implementation is {attn}, not sdpa: the backend chain applies to SDPA attention only"
        return None

    def apply(self, model: nn.Module, plan: Plan) -> None:
        actual = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if actual != "sdpa":
            raise PassSkipped(f"the model runs {actual or 'unknown'} attention, not sdpa: "
                              "the backend chain applies to SDPA attention only")
        known = available_backends()
        chain = [name for name in plan["sdpa_backends"] if name in known]
        if not chain:
            raise PassSkipped(f"none of sdpa_backends {list(plan['sdpa_backends'])} exists in this torch build")
        decision = plan.settings.get("sdpa_backends")
        auto = decision is not None and decision.reason.startswith("auto:")
        runtime = BackendChain(chain, strict=plan.strict, label=plan.model.name or type(model).__name__,
                               grad_chain=training_chain(chain) if auto else None, quiet=auto)
        add_layer(model, "forward", self.name, runtime.around_forward)
        if callable(getattr(model, "generate", None)):
            add_layer(model, "generate", self.name, runtime.around_generate)
            if callable(getattr(model, "get_compiled_call", None)):
                add_layer(model, "get_compiled_call", self.name, runtime.around_compiled_call)

    def revert(self, model: nn.Module) -> None:
        remove_layer(model, "get_compiled_call", self.name)
        remove_layer(model, "generate", self.name)
        remove_layer(model, "forward", self.name)


def training_chain(chain: Sequence[str]) -> tuple[str, ...]:
    """An automatic chain for calls that record autograd: without cuDNN, whose attention backward
    has given NaN gradients on Hopper (pytorch#196678, huggingface/trl#7181) while its forward is
    fine and fastest. A chain of cuDNN alone is kept as it is."""
    kept = tuple(name for name in chain if name != "cudnn")
    return kept or tuple(chain)


# -- helpers ------------------------------------------------------------------------

def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _torch_order() -> tuple[str, ...]:
    """torch's current priority order, as backend names."""
    import torch
    from torch.nn.attention import SDPBackend

    by_value = {int(getattr(SDPBackend, member)): name for name, member in BACKEND_NAMES.items()
                if hasattr(SDPBackend, member)}
    try:
        order = tuple(by_value[int(v)] for v in torch._C._get_sdp_priority_order() if int(v) in by_value)
    except AttributeError:  # older torch: no priority order API
        order = ()
    return order + tuple(n for n in TORCH_DEFAULT_ORDER if n not in order and n in by_value.values())


def _members(names: Iterable[str]) -> list[Any]:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, BACKEND_NAMES[name]) for name in names if hasattr(SDPBackend, BACKEND_NAMES[name])]


def _device_and_dtype(model: Any) -> tuple[Any, Any]:
    import torch

    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    for module in model.modules():  # a torch.nn.DataParallel replica holds its weights here instead
        for tensor in getattr(module, "_former_parameters", {}).values():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _has_padding(mask: Any) -> bool:
    import torch

    if not isinstance(mask, torch.Tensor):
        return False
    if mask.dim() != 2:  # a custom 3D/4D mask: transformers passes it on as a mask
        return True
    return bool((mask == 0).any())


def _is_static_cache(cache: Any) -> bool:
    self_attention = getattr(cache, "self_attention_cache", cache)
    return bool(getattr(self_attention, "is_compileable", False)) and type(self_attention).__name__ != "DynamicCache"


def _forward_kinds(call: dict[str, Any]) -> frozenset[CallKind]:
    if _has_padding(call.get("attention_mask")) or _is_static_cache(call.get("past_key_values") or call.get("cache")):
        return frozenset({"masked"})
    tokens = call.get("input_ids")
    if tokens is None:
        tokens = call.get("inputs_embeds")
    shape: tuple[Any, ...] = tuple(getattr(tokens, "shape", ()))
    length = int(shape[1]) if len(shape) >= 2 else 2
    return frozenset({"decode" if length == 1 else "full"})


def _generate_kinds(model: Any, call: dict[str, Any]) -> frozenset[CallKind]:
    config = call.get("generation_config")
    implementation = call.get("cache_implementation") or getattr(config, "cache_implementation", None) or getattr(
        getattr(model, "generation_config", None), "cache_implementation", None)
    static = implementation in _STATIC_CACHES or _is_static_cache(call.get("past_key_values") or call.get("cache"))
    if static or _has_padding(call.get("attention_mask")):
        return frozenset({"masked"})
    return frozenset({"full", "decode"})
