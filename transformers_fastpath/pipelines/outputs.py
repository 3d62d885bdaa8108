"""Pipeline outputs shaped exactly as the same pipeline without fastpath returns them.

transformers' feature-extraction pipeline returns each input's hidden states padded to the
length of the batch it ran in: with its default batch size of 1 that is the input's own
tokens, but with the batch size fastpath chooses (or any ``batch_size`` a caller passes) each
input gets the pad rows of the longest input in its batch, and idioms such as
``np.mean(out[i][0], axis=0)`` silently average them in. Here each output keeps its own tokens
only, whatever the batch size: the rows a batch-1 call returns.

The attention mask of each batch travels with the model's output (one extra key, sliced per
input by transformers' own unbatching) to ``postprocess``, which drops the pad rows.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OWN_TOKENS_KEY", "disable_own_tokens", "enable_own_tokens", "own_tokens_enabled"]

OWN_TOKENS_KEY = "fastpath_attention_mask"
_MARK = "_fastpath_own_tokens"


class _ForwardWithMask:
    """``pipeline._forward`` that also returns the batch's attention mask under :data:`OWN_TOKENS_KEY`."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(self, model_inputs: Any, **forward_params: Any) -> Any:
        outputs = type(self.pipeline)._forward(self.pipeline, model_inputs, **forward_params)
        mask = model_inputs.get("attention_mask") if hasattr(model_inputs, "get") else None
        if mask is not None and hasattr(outputs, "__setitem__"):
            outputs[OWN_TOKENS_KEY] = mask
        return outputs


class _PostprocessOwnTokens:
    """``pipeline.postprocess`` that drops the rows of pad tokens from the first output first."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(self, model_outputs: Any, *args: Any, **kwargs: Any) -> Any:
        return type(self.pipeline).postprocess(self.pipeline, _own_tokens(model_outputs), *args, **kwargs)


def _own_tokens(model_outputs: Any) -> Any:
    """The model's output for one input with its pad rows dropped from the token dimension."""
    if not hasattr(model_outputs, "keys") or OWN_TOKENS_KEY not in model_outputs.keys():
        return model_outputs
    mask = model_outputs[OWN_TOKENS_KEY]
    items = {k: v for k, v in model_outputs.items() if k != OWN_TOKENS_KEY}
    keep = mask.reshape(-1).bool()
    for key, value in items.items():
        # (1, T, ...) tensors over this input's (padded) tokens: last_hidden_state, logits...
        if getattr(value, "ndim", 0) >= 2 and value.shape[0] == 1 and value.shape[1] == keep.shape[0]:
            items[key] = value[:, keep.to(value.device)]
    return type(model_outputs)(items)


def enable_own_tokens(pipeline: Any) -> None:
    """Make a feature-extraction pipeline return each input's own tokens at any batch size (idempotent)."""
    if own_tokens_enabled(pipeline):
        return
    pipeline._forward = _ForwardWithMask(pipeline)
    pipeline.postprocess = _PostprocessOwnTokens(pipeline)
    setattr(pipeline, _MARK, True)


def disable_own_tokens(pipeline: Any) -> None:
    if not own_tokens_enabled(pipeline):
        return
    for name in ("_forward", "postprocess", _MARK):
        vars(pipeline).pop(name, None)


def own_tokens_enabled(pipeline: Any) -> bool:
    return bool(vars(pipeline).get(_MARK, False))
