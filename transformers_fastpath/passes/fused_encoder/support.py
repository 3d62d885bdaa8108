"""Config-level checks: can the fused encoder run this model at all? (No weights needed.)

Each check returns the reason it cannot, phrased for ``explain``, or None.
"""

from __future__ import annotations

from typing import Any

from .families import UNSUPPORTED, Family, family_for, supported_model_types

__all__ = ["ATTENTION_IMPLEMENTATIONS", "EXACT_ACTIVATIONS", "config_reason"]

# The fused op computes exact (erf) GELU or ReLU. Other activations ("gelu_new", "quick_gelu",
# "silu"...) are left to the packed route, which calls the layer's own activation module, so
# only padded batches gain from it.
EXACT_ACTIVATIONS = ("gelu", "relu")

# The masks the converted forward understands are the 4D masks transformers builds for these.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def config_reason(config: Any, family: Family | None = None) -> str | None:
    """Why the fused encoder cannot run a model with this config, or None when it can."""
    if config is None:
        return "no model config to check"
    model_type = getattr(config, "model_type", None)
    family = family or family_for(model_type)
    if family is None:
        if model_type in UNSUPPORTED:
            return f"model type {model_type!r} has no fused-encoder layout: {UNSUPPORTED[model_type]}"
        return (f"model type {model_type!r} has no fused-encoder layout "
                f"({len(supported_model_types())} model types have one: docs/fused-encoder.md#architectures)")
    if getattr(config, "is_decoder", False):
        return "config.is_decoder is true: causal self-attention is not an encoder layer"
    if getattr(config, "add_cross_attention", False):
        return "config.add_cross_attention is true: cross-attention layers cannot be fused"
    if getattr(config, "is_encoder_decoder", False) and not family.seq2seq_encoder:
        return "encoder-decoder models are not converted"
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        return (f"position_embedding_type={position!r}: relative position scores are not part of "
                "the fused attention")
    act = getattr(config, family.activation_key, None)
    if isinstance(act, str) and act not in EXACT_ACTIVATIONS and not family.padded_inputs:
        return (f"{family.activation_key}={act!r}: the fused op computes only exact GELU or ReLU "
                f"({', '.join(EXACT_ACTIVATIONS)}), and {family.name} inputs are never padded, so the packed "
                "route has nothing to skip")
    if act is not None and not isinstance(act, str):
        return f"{family.activation_key} is a callable ({act!r}); only 'gelu' or 'relu' can be fused"
    attn = getattr(config, "_attn_implementation", None)
    if attn is not None and attn not in ATTENTION_IMPLEMENTATIONS:
        return (f"attn_implementation={attn!r}: the fused encoder reads the masks of "
                f"{' or '.join(ATTENTION_IMPLEMENTATIONS)} only")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        return f"hidden size {hidden} is not a multiple of the {heads} attention heads"
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int) and head_dim * heads != hidden:
        return f"head_dim {head_dim} x {heads} heads != hidden size {hidden}"
    return None


def float16_reason(config: Any) -> str | None:
    """Why ``dtype = auto`` is float16 for this model on a GPU, or None: an encoder the fused
    encoder converts as a whole (BERT-like families with an encoder module).

    On one H100 (BERT-base, ``benchmarks/results/bench_encoder-*_h100.json``) float16 came out 8x
    closer to float32 than bfloat16 (largest error on real tokens 0.011-0.013 against 0.08-0.12) at
    the same speed (0.98-1.03x at every measured shape). Its narrower range is covered by the
    converted encoder's overflow guard: a float16 call whose output is not finite runs again in
    float32 (``runtime.FusedForward._rerun_in_float32``).
    """
    family = family_for(getattr(config, "model_type", None))
    if config is None or family is None or family.encoder is None or config_reason(config, family) is not None:
        return None
    return ("auto: a fused encoder on a GPU: float16 measured 8x closer to float32 than bfloat16 at the same "
            "speed; a call that overflows float16 reruns in float32")
