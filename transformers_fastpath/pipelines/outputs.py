"""Pipeline outputs shaped exactly as the same pipeline without fastpath returns them.

transformers' feature-extraction pipeline returns each input's hidden states padded to the
length of the batch it ran in: with its default batch size of 1 that is the input's own
tokens, but with the batch size fastpath chooses (or any ``batch_size`` a caller passes) each
input gets the pad rows of the longest input in its batch, and idioms such as
``np.mean(out[i][0], axis=0)`` silently average them in. Here each output loses the rows the
batch added, whatever the batch size: what a batch-1 call returns. Padding the input itself asked
for (``tokenize_kwargs={"padding": "max_length", ...}``) stays, as without fastpath.

How: ``preprocess`` records each input's own length (its tokens before the batch is collated),
transformers' collation stacks the lengths, ``_forward`` hands them on beside the model's output
(transformers' own unbatching slices them per input), and ``postprocess`` cuts the batch's padding
off the output it reads, on the side the tokenizer pads. The three methods are overridden on a
subclass (the pipeline's class is swapped, as for length sorting), so copies of the pipeline
(replicas) run their own model.
"""

from __future__ import annotations

from typing import Any

from .batching import override_subclass

__all__ = ["OWN_LENGTH_KEY", "enable_own_tokens", "own_tokens_enabled", "padding_side"]

OWN_LENGTH_KEY = "fastpath_own_length"
_MARKER = "_fastpath_own_tokens_base"


def _preprocess(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    model_inputs = _base(self).preprocess(self, inputs, *args, **kwargs)
    ids = model_inputs.get("input_ids") if hasattr(model_inputs, "get") else None
    if getattr(ids, "ndim", 0) == 2 and ids.shape[0] == 1:
        import torch

        model_inputs[OWN_LENGTH_KEY] = torch.tensor([ids.shape[1]])  # (1,): collated into (B,)
    return model_inputs


def _forward(self: Any, model_inputs: Any, **forward_params: Any) -> Any:
    lengths = model_inputs.pop(OWN_LENGTH_KEY, None) if hasattr(model_inputs, "pop") else None
    outputs = _base(self)._forward(self, model_inputs, **forward_params)
    if lengths is not None and hasattr(outputs, "keys") and hasattr(outputs, "__setitem__"):
        outputs[OWN_LENGTH_KEY] = lengths
    return outputs


def _postprocess(self: Any, model_outputs: Any, *args: Any, **kwargs: Any) -> Any:
    return _base(self).postprocess(self, _own_tokens(model_outputs, padding_side(self)), *args, **kwargs)


def _own_tokens(model_outputs: Any, side: str) -> Any:
    """One input's output without the rows its batch added: only the first output (the one
    ``postprocess`` reads), only when it is ``(1, T, H)`` with T longer than the input's own length."""
    if not hasattr(model_outputs, "keys") or OWN_LENGTH_KEY not in model_outputs.keys():
        return model_outputs
    items = {k: v for k, v in model_outputs.items() if k != OWN_LENGTH_KEY}
    own = int(model_outputs[OWN_LENGTH_KEY].reshape(-1)[0])
    first = next(iter(items), None)
    value = items.get(first) if first is not None else None
    if getattr(value, "ndim", 0) == 3 and value.shape[0] == 1 and value.shape[1] > own:
        items[first] = value[:, -own:] if side == "left" else value[:, :own]
    return type(model_outputs)(items)


def padding_side(pipeline: Any) -> str:
    """The side transformers' collation pads text on: the tokenizer's."""
    return getattr(getattr(pipeline, "tokenizer", None), "padding_side", None) or "right"


def _base(pipeline: Any) -> type:
    return getattr(type(pipeline), _MARKER)


def enable_own_tokens(pipeline: Any) -> None:
    """Make a feature-extraction pipeline return each input's own tokens at any batch size (idempotent)."""
    if not own_tokens_enabled(pipeline):
        pipeline.__class__ = override_subclass(type(pipeline), _MARKER, preprocess=_preprocess, _forward=_forward,
                                               postprocess=_postprocess)


def own_tokens_enabled(pipeline: Any) -> bool:
    return any(_MARKER in vars(cls) for cls in type(pipeline).__mro__)
