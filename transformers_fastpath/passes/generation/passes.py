"""The generation passes: a static, bucketed KV cache for ``generate``, and transformers' own compile of it.

Both work through one layer around the model's ``generate`` (an instance-level override, see
:mod:`..instance_methods`; parameters are never touched, so the state_dict stays canonical):

- ``generate_static_cache`` (setting ``static_cache``) adds ``cache_implementation="static"``
  and a bucketed ``max_cache_len`` to each call that leaves the cache unset;
- ``generate_compile`` (setting ``compile``) lets transformers compile the decode step, which it
  does by itself for a static cache (``GenerationMixin._valid_auto_compile_criteria`` ->
  ``get_compiled_call``, mode ``reduce-overhead`` on CUDA); without it, fastpath passes
  ``disable_compile=True`` so a static cache stays uncompiled.
- ``generate_decode_loop`` (setting ``decode_loop``) runs greedy and sampled calls through fastpath's
  lean loop (:mod:`.decode_loop`): transformers' token choice, without its per-token host work.

If compilation fails in a call, the call is re-run without compile (when no streamer of the
caller's has seen tokens yet), compile stays off for the model, the plan records the failure,
and a warning says so once; strict mode raises instead.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from ...errors import PassSkipped, StrictModeError
from ..instance_methods import add_layer, get_layer, remove_layer
from .decode_loop import DecodeLoop, StreamedFailure, StreamerRaised, call_rule, ineligible
from .request import GenerateRequest, apply_updates, bind_generate_call, plan_request
from .selection import Rule

if TYPE_CHECKING:
    from torch import nn

    from ...planning.model_info import ModelInfo
    from ...planning.plan import Plan, PlanBuilder

__all__ = ["COMPILE_PASS", "DECODE_LOOP_PASS", "GENERATION_TASKS", "STATIC_PASS", "CompilePass", "DecodeLoopPass",
           "FastGenerate", "StaticCachePass", "is_generative", "model_class"]

logger = logging.getLogger(__name__)

STATIC_PASS = "generate_static_cache"
COMPILE_PASS = "generate_compile"
DECODE_LOOP_PASS = "generate_decode_loop"

GENERATION_TASKS = frozenset({
    "text-generation", "text2text-generation", "summarization", "translation", "image-text-to-text",
})


def is_generative(info: ModelInfo) -> bool:
    """Whether ``generate`` is how this model is used: by pipeline task, else by architecture."""
    if info.task is not None:
        return info.task in GENERATION_TASKS
    if info.is_causal_lm:
        return True
    return info.is_encoder_decoder and any(a.endswith("ForConditionalGeneration") for a in info.architectures)


def model_class(info: ModelInfo) -> type | None:
    """The transformers class named by the config's architectures, when transformers has it."""
    import transformers

    for arch in info.architectures:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    return None


class FastGenerate:
    """The per-model runtime behind the layer around ``generate``.

    Attributes:
        compile: whether fastpath lets transformers compile the decode step (the compile pass sets it).
        decode_loop: whether static-cache calls run fastpath's lean loop (the decode-loop pass sets it).
        static_needs_compile: the static cache was chosen only for compile's sake (``static_cache =
            auto``): without compile it is slower than transformers' dynamic cache, so calls keep
            the dynamic one whenever compile does not run (skipped at apply time, or failed).
        compile_error: why compilation failed on this model, once it has (compile then stays off).
        last_request: the decision for the latest call (what ``explain`` cannot know in advance).
    """

    def __init__(self, *, strict: bool, label: str) -> None:
        self.compile = False
        self.decode_loop = False
        self.static_needs_compile = False
        self.loop = DecodeLoop()
        self.last_loop_reason: str | None = None
        self.strict = strict
        self.label = label
        self.compile_error: str | None = None
        self.last_request: GenerateRequest | None = None
        self._dynamic_reasons: set[str] = set()
        self._failed_rules: dict[Rule, str] = {}  # token choices whose compiled step failed, and why

    def around_generate(self, model: Any, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """Layer around ``model.generate`` (see :func:`..instance_methods.add_layer`)."""
        call = bind_generate_call(model, args, kwargs)
        compiling = self.compile and self.compile_error is None
        request = plan_request(model, call, compile=compiling)
        if request.static and self.static_needs_compile and not compiling and not request.caller_compiles:
            request = GenerateRequest(False, "static_cache = auto, and compile does not run for this model "
                                             f"({self.compile_error or 'the compile pass is not applied'}): an "
                                             "uncompiled static cache is slower than the dynamic one")
        self.last_request = request
        if not request.static:
            if request.reason not in self._dynamic_reasons:
                self._dynamic_reasons.add(request.reason)
                logger.debug("fastpath (%s): generate keeps the dynamic cache: %s", self.label, request.reason)
            return inner(*args, **kwargs)
        if self._loop_reason(model, call, request) is None:
            rng = _rng_state(model)
            try:
                return self.loop.generate(model, call, cache_len=request.cache_len or 0, compile=request.compiles)
            except StreamerRaised as exc:
                raise exc.original from exc.original.__cause__  # the caller's streamer failed: their error
            except StreamedFailure as exc:
                self._loop_failed(model, exc.__cause__ if isinstance(exc.__cause__, Exception) else exc, call)
                raise RuntimeError(f"fastpath: the lean decode loop failed {exc}. The streamer had already "
                                   "received tokens, so this call is not re-run; later calls on this model use "
                                   "transformers' decode loop.") from exc
            except Exception as exc:
                loop_error = exc
            # transformers' loop runs the call, from the random state the call started with (so a seeded
            # sampled call draws what transformers alone would). If it fails too, the call itself is at
            # fault (an id out of the vocabulary, out of memory...): its error propagates, the loop stays on.
            _restore_rng_state(rng)
            result = self._transformers_generate(model, inner, call, args, kwargs, request)
            self._loop_failed(model, loop_error, call)  # raises in strict mode
            return result
        return self._transformers_generate(model, inner, call, args, kwargs, request)

    def _transformers_generate(self, model: Any, inner: Any, call: dict[str, Any], args: tuple,
                               kwargs: dict[str, Any], request: GenerateRequest) -> Any:
        """transformers' own ``generate`` with the request's static cache (and compile, falling back once)."""
        new_args, new_kwargs = apply_updates(model, args, kwargs, request.updates)
        if not request.compiles:
            return inner(*new_args, **new_kwargs)
        try:
            return inner(*new_args, **new_kwargs)
        except Exception as exc:
            if not _is_compile_failure(exc):
                raise
            reason = f"torch.compile failed: {type(exc).__name__}: {_first_line(exc)}"
            if self.strict:
                raise StrictModeError(f"{COMPILE_PASS} ({self.label}): {reason}; strict mode does not fall back. "
                                      "Set compile = false in the policy, or strict = false.") from exc
            self.compile_error = reason
            _record_failure(model, COMPILE_PASS, reason)
            if call.get("streamer") is not None:
                raise RuntimeError(f"fastpath: {reason}. The streamer had already received tokens, so this call "
                                   "is not re-run; compile is now off for this model and later calls run "
                                   "without it.") from exc
            logger.warning("fastpath (%s): %s; generate runs without compile on this model from now on "
                           "(set compile = false in the policy to skip the attempt).", self.label, reason)
        return self.around_generate(model, inner, *args, **kwargs)  # compile_error is set: decided afresh

    def _loop_failed(self, model: Any, exc: Exception, call: dict[str, Any]) -> None:
        reason = f"the lean decode loop failed: {type(exc).__name__}: {_first_line(exc)}"
        if self.strict:
            raise StrictModeError(f"{DECODE_LOOP_PASS} ({self.label}): {reason}; strict mode does not fall back. "
                                  "Set decode_loop = false in the policy, or strict = false.") from exc
        rule = call_rule(model, call)
        if _is_compile_failure(exc) and not rule.greedy_only:
            # One token choice (sampling, a penalty...) did not compile: only its calls go to
            # transformers from now on; greedy and the other choices keep the loop.
            self._failed_rules[rule] = reason
            logger.warning("fastpath (%s): %s; generate calls with this token choice (%s) use transformers' decode "
                           "loop on this model from now on; other calls keep the lean loop.", self.label, reason,
                           rule.describe())
            return
        self.decode_loop = False
        self.loop = DecodeLoop()  # frees its static cache: transformers' loop keeps its own
        _record_failure(model, DECODE_LOOP_PASS, reason)
        logger.warning("fastpath (%s): %s; generate uses transformers' decode loop on this model from now on "
                       "(set decode_loop = false in the policy to skip the attempt).", self.label, reason)

    def _loop_reason(self, model: Any, call: dict[str, Any], request: GenerateRequest) -> str | None:
        """Why this static call goes through transformers' loop rather than the lean one (None: lean)."""
        if not self.decode_loop:
            reason: str | None = "decode_loop is off"
        elif request.caller_compiles:
            reason = "the call sets compile_config or disable_compile"
        elif self.compile_error is not None:
            reason = "compilation failed on this model"
        else:
            reason = ineligible(model, call, compiled=request.compiles, failed_rules=self._failed_rules)
        self.last_loop_reason = reason
        if reason is not None and self.decode_loop and reason not in self._dynamic_reasons:
            self._dynamic_reasons.add(reason)
            logger.debug("fastpath (%s): generate uses transformers' decode loop: %s", self.label, reason)
        return reason


class StaticCachePass:
    """``static_cache``: a static KV cache sized to each ``generate`` call's bucketed length."""

    name = STATIC_PASS
    setting = "static_cache"
    changes_state_dict = False

    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan) -> str | None:
        if not is_generative(info):
            return "not a generative model (no generate call to speed up)"
        cls = model_class(info)
        if cls is not None and not getattr(cls, "_can_compile_fullgraph", False):
            return f"{cls.__name__} has no static KV cache support in transformers (_can_compile_fullgraph = False)"
        return None

    def apply(self, model: nn.Module, plan: Plan) -> None:
        if not callable(getattr(model, "generate", None)) or getattr(model, "generation_config", None) is None:
            raise PassSkipped(f"{type(model).__name__} has no generate()")
        if not getattr(type(model), "_can_compile_fullgraph", False):
            raise PassSkipped(f"{type(model).__name__} has no static KV cache support in transformers "
                              "(_can_compile_fullgraph = False)")
        runtime = FastGenerate(strict=plan.strict, label=plan.model.name or type(model).__name__)
        decision = plan.settings.get("static_cache")
        runtime.static_needs_compile = decision is not None and decision.reason.startswith("auto:")
        add_layer(model, "generate", self.name, runtime.around_generate)

    def revert(self, model: nn.Module) -> None:
        remove_layer(model, "generate", self.name)


class DecodeLoopPass:
    """``decode_loop``: static-cache calls (greedy or sampled) run fastpath's lean decode loop."""

    name = DECODE_LOOP_PASS
    setting = "decode_loop"
    changes_state_dict = False

    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan) -> str | None:
        if plan.get("static_cache") is not True:
            return f"the lean loop runs on a static cache, and static_cache is {plan.get('static_cache')}"
        if info.is_encoder_decoder:
            return "encoder-decoder models keep transformers' loop"
        return None

    def apply(self, model: nn.Module, plan: Plan) -> None:
        runtime = _runtime_of(model)
        if runtime is None:
            raise PassSkipped("the static cache pass is not applied, and the lean loop runs on a static cache")
        runtime.decode_loop = True

    def revert(self, model: nn.Module) -> None:
        runtime = _runtime_of(model)
        if runtime is not None:
            runtime.decode_loop = False
            runtime.loop = DecodeLoop()  # frees the loop's static cache and compiled step


class CompilePass:
    """``compile``: let transformers compile the decode step of a static-cache ``generate``."""

    name = COMPILE_PASS
    setting = "compile"
    changes_state_dict = False

    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan) -> str | None:
        if plan.get("static_cache") is not True:
            return (f"transformers compiles generate only with a static cache, and static_cache is "
                    f"{plan.get('static_cache')}")
        static = plan.pass_status(STATIC_PASS)
        if static is not None and not static.will_run:
            return f"the static cache does not run ({static.reason})"
        return None

    def apply(self, model: nn.Module, plan: Plan) -> None:
        runtime = _runtime_of(model)
        if runtime is None:
            raise PassSkipped("the static cache pass is not applied, and transformers compiles generate only "
                              "with a static cache")
        problem = _compile_problem(model)
        if problem is not None:
            raise PassSkipped(problem)
        runtime.compile = True

    def revert(self, model: nn.Module) -> None:
        runtime = _runtime_of(model)
        if runtime is not None:
            runtime.compile = False


# -- helpers ------------------------------------------------------------------------

def _runtime_of(model: Any) -> FastGenerate | None:
    layer = get_layer(model, "generate", STATIC_PASS)
    runtime = getattr(layer, "__self__", None)
    return runtime if isinstance(runtime, FastGenerate) else None


def _compile_problem(model: Any) -> str | None:
    """Why torch.compile cannot run for this model here, or None."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile (dynamo) is not supported on this Python/platform"
    except Exception as exc:  # a broken torch install must not break loading
        return f"torch.compile is unavailable: {type(exc).__name__}: {exc}"
    device = getattr(getattr(model, "device", None), "type", "cpu")
    if device in ("cuda", "xpu") and importlib.util.find_spec("triton") is None:
        return f"torch.compile's inductor needs triton on {device}, which is not installed"
    if getattr(model, "hf_quantizer", None) is not None and not getattr(model.hf_quantizer, "is_compileable", True):
        return "this quantization method cannot be compiled"
    return None


def _rng_state(model: Any) -> tuple[Any, Any]:
    """torch's CPU random state and, for a model on a GPU, that device's (a host copy; no sync)."""
    import torch

    device = getattr(model, "device", None)
    on_cuda = getattr(device, "type", None) == "cuda"
    return torch.random.get_rng_state(), (device, torch.cuda.get_rng_state(device)) if on_cuda else None


def _restore_rng_state(state: tuple[Any, Any]) -> None:
    import torch

    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])


def _is_compile_failure(exc: BaseException) -> bool:
    """An error raised by dynamo or inductor (also when wrapped)."""
    try:
        import torch._dynamo.exc as dynamo_exc
        import torch._inductor.exc as inductor_exc
    except ImportError:
        return False
    types_: tuple[type, ...] = tuple(t for t in (
        getattr(dynamo_exc, "TorchDynamoException", None), getattr(inductor_exc, "InductorError", None),
    ) if isinstance(t, type))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, types_):
            return True
        current = current.__cause__ or current.__context__
    return False


def _record_failure(model: Any, pass_name: str, reason: str) -> None:
    from ..runner import PLAN_ATTR

    plan = getattr(model, PLAN_ATTR, None)
    if plan is not None and plan.pass_status(pass_name) is not None:
        object.__setattr__(model, PLAN_ATTR, plan.with_pass_status(pass_name, "failed", reason))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:200]
