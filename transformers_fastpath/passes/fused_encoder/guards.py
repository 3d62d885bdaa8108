"""Per-call checks: may this call take a fused route, or must the original forward run?

Every check answers with the reason to fall back (a short string, counted per model and
logged at debug level) or None. They are ordered cheapest first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .support import ATTENTION_IMPLEMENTATIONS

__all__ = [
    "SUPPORTED_DEVICES",
    "SUPPORTED_DTYPES",
    "capture_active",
    "hooks_reason",
    "kwargs_reason",
    "state_reason",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DEVICES = ("cpu", "cuda")

# Arguments transformers passes down that must be empty for an encoder-only forward.
_MUST_BE_EMPTY = frozenset({
    "encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values",
    "output_attentions", "output_hidden_states", "head_mask",
})
# Arguments the sdpa/eager attention of these layers never reads (``num_items_in_batch`` is a
# loss-normalisation count that Trainer's evaluation passes down through the model;
# ``use_cache`` reaches encoder layers through ``**kwargs`` of seq2seq models, and no cache is
# built without a decoder: configs with ``is_decoder`` are never converted).
_IGNORED = frozenset({"position_ids", "return_dict", "num_items_in_batch", "use_cache"})


def kwargs_reason(kwargs: Mapping[str, Any]) -> str | None:
    """Fall back on any argument the fused routes would not honour."""
    for key, value in kwargs.items():
        if key in _MUST_BE_EMPTY:
            if value is not None and value is not False:
                return f"argument {key} given"
        elif key not in _IGNORED:
            return f"unexpected argument {key}"
    return None


def state_reason(hidden: Any, modules: Iterable[nn.Module], config: Any, params: Iterable[torch.Tensor]) -> str | None:
    """Fall back for training, autograd, tracing/compiling, autocast, and unsupported inputs."""
    if type(hidden) is not torch.Tensor:
        return f"hidden states of type {type(hidden).__name__}"
    if hidden.dim() != 3 or hidden.is_nested:
        return "hidden states are not (batch, length, hidden)"
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return "tracing or compiling"
    if hidden.dtype not in SUPPORTED_DTYPES:
        return f"dtype {hidden.dtype}"
    device_type = hidden.device.type
    if device_type not in SUPPORTED_DEVICES:
        return f"device {device_type}"
    if torch.is_autocast_enabled(device_type):
        return "autocast is on"
    for module in modules:
        if module.training:
            return "training mode"
    if torch.is_grad_enabled():
        if hidden.requires_grad:
            return "grad: hidden states require grad"
        if any(p.requires_grad for p in params):
            return "grad: enabled and weights require grad"
    attn = getattr(config, "_attn_implementation", None)
    if attn is not None and attn not in ATTENTION_IMPLEMENTATIONS:
        return f"attn_implementation {attn}"
    return None


@functools.lru_cache(maxsize=1)
def _capture_context_var() -> Any:
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    return getattr(output_capturing, "_active_collector", None)


def capture_active() -> bool | None:
    """Whether transformers is collecting hidden states/attentions right now.

    transformers 5 collects ``output_hidden_states`` / ``output_attentions`` with forward hooks
    on the layers (``utils.output_capturing``), switched on through a context variable, and not
    always through arguments that reach the encoder (``config.output_hidden_states=True`` does
    not). Returns None when that mechanism cannot be found (another transformers version).
    """
    var = _capture_context_var()
    if var is None:
        return None
    return bool(var.get())


def _is_capture_hook(hook: Any) -> bool:
    return (getattr(hook, "__name__", "") == "output_capturing_hook"
            and getattr(hook, "__module__", "").startswith("transformers."))


def hooks_reason(modules: Iterable[nn.Module]) -> str | None:
    """Fall back when a hook would be skipped by a fused route, or outputs are being captured.

    transformers' own capture hooks stay installed once used; they are harmless while capture
    is off. Any other forward (pre-)hook inside the converted modules would be bypassed.
    """
    # torch exposes no public "has hooks" query; these dicts are what Module.__call__ reads.
    from torch.nn.modules import module as torch_module

    if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
        return "global forward hooks are registered"
    active = capture_active()
    if active:
        return "transformers is capturing hidden states or attentions"
    for module in modules:
        pre, post = module._forward_pre_hooks, module._forward_hooks
        if not pre and not post:
            continue
        if pre:
            return f"forward pre-hook on {type(module).__name__}"
        if active is None or not all(_is_capture_hook(h) for h in post.values()):
            return f"forward hook on {type(module).__name__}"
    return None
