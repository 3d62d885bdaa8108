"""What one ``generate`` call asks for, and the arguments fastpath adds to it.

The caller always wins: whatever the call (or the ``generation_config`` it passes, or the
model's own generation config) says about the cache or compilation is left alone, and
fastpath only fills in what is unset. Everything else -- sampling settings, logits processors,
stopping criteria, streamers -- goes through untouched.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

from ..instance_methods import bind_call
from .cache_length import bucket_cache_len

__all__ = ["STATIC_CACHE_IMPLEMENTATIONS", "GenerateRequest", "apply_updates", "bind_generate_call", "plan_request"]

STATIC_CACHE_IMPLEMENTATIONS = ("static", "offloaded_static")
_ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
_DEFAULT_MAX_LENGTH = 20  # GenerationConfig's default: 20 new tokens when nothing is set
_COMPILE_DEVICES = ("cuda", "xpu")  # where transformers compiles on its own (besides tpu/neuron)


@dataclass
class GenerateRequest:
    """The decision for one call: the keyword arguments to add, or why the call stays dynamic.

    Attributes:
        static: True when fastpath gives this call a static cache.
        reason: why not, when ``static`` is False.
        cache_len: the bucketed cache length (static calls only).
        compiles: True when fastpath lets transformers compile the decode step (False when the call's
            own compile settings decide).
        caller_compiles: True when the call (or a generation config) sets compile_config or
            disable_compile itself: compilation is then the caller's business, not fastpath's.
        updates: generation settings to set where the caller left them unset.
    """

    static: bool
    reason: str = ""
    cache_len: int | None = None
    compiles: bool = False
    caller_compiles: bool = False
    updates: dict[str, Any] = field(default_factory=dict)


def bind_generate_call(model: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, the ``**kwargs`` of ``generate`` flattened in."""
    return bind_call(type(model), "generate", args, kwargs)


def plan_request(model: Any, call: dict[str, Any], *, compile: bool) -> GenerateRequest:
    """Decide the static cache (and whether compile may run) for one ``generate`` call.

    Args:
        model: the generating model.
        call: the call's arguments by name (:func:`bind_generate_call`).
        compile: the plan's (and the model's current) compile decision.
    """

    def setting(name: str) -> Any:
        return _setting(model, call, name)

    if call.get("past_key_values") is not None or call.get("cache") is not None:
        return GenerateRequest(False, "the caller passed a cache object")
    implementation = setting("cache_implementation")
    if implementation is not None:
        return GenerateRequest(False, f"cache_implementation = {implementation!r} was set by the caller "
                                      "or the model's generation config")
    if setting("use_cache") is False:
        return GenerateRequest(False, "use_cache = False")
    assisted = next((name for name in _ASSISTED if setting(name) is not None), None)
    if assisted is not None:
        return GenerateRequest(False, f"assisted generation ({assisted}) keeps the dynamic cache")
    if call.get("custom_generate") is not None:
        return GenerateRequest(False, "custom_generate decides its own cache")

    needed = _needed_length(model, call, setting)
    cache_len = bucket_cache_len(needed, _max_positions(model))
    updates: dict[str, Any] = {"cache_implementation": "static"}
    if setting("max_cache_len") is None:
        updates["max_cache_len"] = cache_len
    compiles = False
    caller_compiles = setting("compile_config") is not None or setting("disable_compile") is not None
    if caller_compiles:
        pass  # the caller's compile settings stand; fastpath neither adds nor manages compilation
    elif compile:
        compiles = True
        if _device_type(model) not in _COMPILE_DEVICES:
            updates["compile_config"] = _all_devices_compile_config()
    else:
        updates["disable_compile"] = True
    return GenerateRequest(True, cache_len=cache_len, compiles=compiles, caller_compiles=caller_compiles,
                           updates=updates)


def apply_updates(model: Any, args: tuple, kwargs: dict[str, Any], updates: dict[str, Any]) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with ``updates`` filled in where the caller left them unset.

    With a ``generation_config`` in the call they go into a copy of it (transformers warns when a
    generation_config and generation keyword arguments are mixed); else they become keyword arguments.
    """
    if not updates:
        return args, kwargs
    positional_config = len(args) >= 2
    config = args[1] if positional_config else kwargs.get("generation_config")
    if config is None:
        return args, {**updates, **kwargs}
    config = copy.deepcopy(config)
    for key, value in updates.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    if positional_config:
        return (args[0], config, *args[2:]), kwargs
    return args, {**kwargs, "generation_config": config}


# -- helpers ------------------------------------------------------------------------

def _setting(model: Any, call: dict[str, Any], name: str) -> Any:
    """A generation setting as ``generate`` will see it: call kwargs > the call's generation_config >
    the model's generation_config."""
    if call.get(name) is not None:
        return call[name]
    passed = call.get("generation_config")
    value = getattr(passed, name, None) if passed is not None else None
    if value is None:
        value = getattr(getattr(model, "generation_config", None), name, None)
    return value


def _needed_length(model: Any, call: dict[str, Any], setting: Any) -> int:
    """Positions the cache must hold: prompt (decoder side) + new tokens."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        prompt = _length(call.get("decoder_input_ids")) or 1
    else:
        prompt = (_length(call.get("inputs")) or _length(call.get("input_ids"))
                  or _length(call.get("inputs_embeds")) or 1)
    new_tokens = setting("max_new_tokens")
    if isinstance(new_tokens, int) and new_tokens >= 0:
        return max(1, prompt + new_tokens)
    max_length = setting("max_length")
    if not isinstance(max_length, int) or max_length == _DEFAULT_MAX_LENGTH:
        return prompt + _DEFAULT_MAX_LENGTH
    return max(max_length, prompt + 1)


def _length(tensor: Any) -> int | None:
    shape = getattr(tensor, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _max_positions(model: Any) -> int | None:
    config: Any = getattr(model, "config", None)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        config = config.get_text_config(decoder=True)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _device_type(model: Any) -> str:
    device = getattr(model, "device", None)
    return getattr(device, "type", str(device or "cpu"))


def _all_devices_compile_config() -> Any:
    """A CompileConfig for devices transformers does not compile on by itself (CPU, MPS).

    ``_compile_all_devices`` is the flag transformers documents for exactly this ("compile on
    e.g. CPU ... useful for testing"); there is no public argument for it. Mode ``default``:
    CUDA graphs (``reduce-overhead``) do not apply off CUDA.
    """
    from transformers import CompileConfig

    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # type: ignore[assignment]  # declared as a None class attribute
    return config
