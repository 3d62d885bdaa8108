"""Read a pure key-padding mask out of the attention mask transformers hands the encoder.

transformers 5 gives the encoder (and each layer) a 4D mask of shape ``(B, 1, Q, T)``:

* sdpa: bool, True = attend (keep), or None when nothing is padded;
* eager: float, 0 where attended and a very large negative value (``finfo.min``) at pads;
  older encoders (MarkupLM...) still add -10000, which is as good as masking: ``exp(-10000)``
  is 0 in every float dtype, so any value at or below -10000 counts as a pad.

The fused routes only know "these key positions are padding". Anything that is not exactly
that (a causal or otherwise query-dependent mask, head-specific masks, additive biases other
than 0 / -inf-like, 2D masks whose convention is ambiguous) is rejected with a reason, and the
caller runs the original forward.
"""

from __future__ import annotations

import torch

__all__ = ["MaskRejected", "keep_mask"]

_MASKED = -10000.0  # an additive mask value at or below this hides the key (see above)


class MaskRejected(Exception):
    """The attention mask is not a pure key-padding mask; the message says why."""


def keep_mask(mask: object, batch: int, length: int) -> torch.Tensor | None:
    """``(B, T)`` bool, True at real tokens; None when every token is real (or ``mask`` is None).

    Raises :class:`MaskRejected` for anything that is not a pure key-padding mask, and for a
    sequence with no real token at all (its attention is undefined; the original forward decides).
    """
    if mask is None:
        return None
    if type(mask) is not torch.Tensor:
        raise MaskRejected(f"attention mask of type {type(mask).__name__}")
    if mask.dim() != 4:
        raise MaskRejected(f"attention mask with {mask.dim()} dimensions (expected 4)")
    b, h, q, t = mask.shape
    if b != batch or t != length or h != 1 or q not in (1, length):
        # No shapes in the message: it becomes a key of the per-model fallback counter.
        raise MaskRejected("attention mask is not (batch, 1, 1 or length, length)")

    if mask.dtype == torch.bool:
        keep4 = mask
    elif mask.dtype.is_floating_point:
        # Additive: 0 = attend, a huge negative number (or -inf) = masked. Anything in between
        # is a bias the fused op cannot add.
        keep4 = mask == 0
        if not bool((keep4 | (mask <= _MASKED)).all()):
            raise MaskRejected("additive attention mask holds values other than 0 and -inf/finfo.min")
    else:
        raise MaskRejected(f"attention mask of dtype {mask.dtype}")

    keep = keep4[:, 0, 0, :]
    if q > 1 and mask.stride(2) != 0 and not torch.equal(keep4, keep[:, None, None, :].expand_as(keep4)):
        raise MaskRejected("attention mask depends on the query position (causal or custom), not only on padding")
    if bool(keep.all()):
        return None
    if not bool(keep.any(dim=1).all()):
        raise MaskRejected("a sequence in the batch has no real token")
    return keep.contiguous()
