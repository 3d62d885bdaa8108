"""Built-in plugin: fast ``generate`` -- a static, bucketed KV cache and transformers' compile of it.

Resolves ``static_cache``, ``compile`` and ``decode_loop`` (and registers their passes, in this
order: ``generate_static_cache``, ``generate_compile``, ``generate_decode_loop``). Listed after ``builtin.attention`` in
``BUILTIN_PLUGINS`` so that it runs first (pluggy calls later-registered ``tryfirst``
implementations first): the attention choice reads ``compile``.

``auto`` means: on for generative models (by pipeline task, else a causal-LM / seq2seq
architecture) on a GPU, where the compiled decode step pays off (static cache + compile gave 6x
tokens/s at batch 1 on an H100); off on the CPU and MPS, where compiling costs more than it
saves and ``generate`` stays dynamic. ``compile = true`` with ``static_cache = auto`` turns the
static cache on (transformers compiles ``generate`` only for a static cache); ``static_cache =
true`` alone gives an uncompiled static cache (``compile`` stays off on a CPU).
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..passes.base import Pass
from ..passes.generation import (
    COMPILE_PASS,
    CompilePass,
    DecodeLoopPass,
    StaticCachePass,
    describe_buckets,
    is_generative,
)
from ..planning.plan import PlanBuilder

__all__ = ["resolve_generation"]

_GPU_ONLY = "compile pays off on GPUs; {device} generate stays dynamic"


@hookimpl(tryfirst=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    resolve_generation(plan)


@hookimpl
def fastpath_register_passes() -> list[Pass]:
    return [StaticCachePass(), CompilePass(), DecodeLoopPass()]


def resolve_generation(plan: PlanBuilder) -> None:
    """Turn ``compile`` / ``static_cache`` ``auto`` into True/False with reasons, and note the cache sizing."""
    generative = is_generative(plan.model)
    hw = plan.hardware
    not_generative = (f"{plan.model.task}: not a generation task" if plan.model.task
                      else "not a generative model")
    off_device = _GPU_ONLY.format(device=hw.device.upper() if hw.device == "cpu" else hw.device)
    static = plan.get("static_cache")

    if plan.is_auto("compile"):
        if not generative:
            plan.set("compile", False, reason=f"auto: {not_generative}")
        elif not hw.is_gpu:
            plan.set("compile", False, reason=f"auto: {off_device}")
        elif str(plan.get("quantization")).startswith("bnb-"):
            plan.set("compile", False, reason="auto: transformers does not compile bitsandbytes weights (their "
                                              "quantizer is not compileable)")
        elif static is False:
            plan.set("compile", False, reason="auto: transformers compiles generate only with a static cache, "
                                              "and static_cache = false")
        else:
            plan.set("compile", True, reason="auto: transformers compiles the decode step of a static-cache "
                                             "generate (CUDA graphs, mode reduce-overhead)")
    if plan.is_auto("static_cache"):
        if not generative:
            plan.set("static_cache", False, reason=f"auto: {not_generative}")
        elif plan.get("compile") is True:
            plan.set("static_cache", True, reason="auto: a fixed-shape KV cache, so the compiled decode step "
                                                  "does not recompile as the sequence grows")
        elif not hw.is_gpu:
            plan.set("static_cache", False, reason=f"auto: {off_device}")
        else:
            plan.set("static_cache", False, reason="auto: a static cache pays off only with compile, "
                                                   "and compile = false")
    if plan.is_auto("decode_loop"):
        if plan.get("compile") is True and not plan.model.is_encoder_decoder:
            plan.set("decode_loop", True, reason="auto: greedy and sampled calls run a compiled step per token "
                                                 "with no per-token host sync (other calls use transformers' loop)")
        else:
            plan.set("decode_loop", False, reason="auto: on only where compile is on, for decoder-only models")
    if plan.get("static_cache") is True and generative:
        plan.note(f"generate: static KV cache sized per call: {describe_buckets()}; "
                  "the caller's generation arguments (cache_implementation, max_cache_len, compile_config...) win")
        if plan.get("compile") is True and not hw.is_gpu:
            plan.note(f"generate: {COMPILE_PASS} on {hw.device} uses inductor's default mode and costs tens of "
                      "seconds on the first call")
