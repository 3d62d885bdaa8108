"""``generate_many``: ``model.generate`` over many prompts of varied lengths, in length-sorted batches.

A plain loop over prompts runs one short call per prompt; a plain batched call pads every prompt
to the longest one of its batch, in the caller's order. This helper sorts the prompts by length,
cuts them into batches of ``batch_size`` (so a batch's prompts are close in length), left-pads
each batch, runs one ``model.generate`` per batch -- on a model loaded with ``fastpath=True`` on a
GPU that is fastpath's static cache and lean decode loop, whose cache length is bucketed, so
batches of similar size share a compiled step (a short last batch is filled with copies of its
last prompt, for the same batch shape) -- and hands the results back in the caller's order, each
cut to its own prompt and new tokens (no padding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .prompt_batches import eos_list, fill_rows, left_pad

__all__ = ["generate_many"]

logger = logging.getLogger(__name__)


def generate_many(model: Any, prompts: Sequence[Any], *, batch_size: int = 16, **generate_kwargs: Any) -> list[Any]:
    """Generate for each prompt; results in the caller's order.

    Args:
        model: a generating model (``AutoModelForCausalLM``, decoder-only).
        prompts: token ids per prompt: 1-D tensors or lists of ints (what a tokenizer returns for one
            text, without padding).
        batch_size: prompts per ``generate`` call, after sorting by length.
        **generate_kwargs: passed to every ``model.generate`` call (``max_new_tokens``, sampling
            settings, ``eos_token_id``...). ``pad_token_id`` defaults to the model's pad token, else
            its first EOS id.

    Returns:
        One 1-D LongTensor per prompt: the prompt's ids then its new tokens, up to and including its
        first EOS (what ``model.generate`` on that prompt alone returns, for greedy decoding).

    Raises:
        ValueError: an empty prompt, a batch size below 1, an encoder-decoder model, no token to pad
            with, or arguments that belong to a single call (``input_ids``, ``attention_mask``,
            ``num_return_sequences`` other than 1).
    """
    import torch

    _check(model, batch_size, generate_kwargs)
    rows = [_as_ids(p, i) for i, p in enumerate(prompts)]
    pad = _pad_token(model, generate_kwargs)
    eos = _eos_ids(model, generate_kwargs)
    device = getattr(model, "device", torch.device("cpu"))
    fill = _static_cache(model)
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    results: list[Any] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([rows[i] for i in chunk], pad)
        longest = ids.shape[1]
        if fill:  # copies of the last prompt: the full batches' compiled shape
            ids, mask = fill_rows(ids, batch_size), fill_rows(mask, batch_size)
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device),
                                 **{**generate_kwargs, "pad_token_id": pad})
        out = out.cpu()
        for row, i in enumerate(chunk):
            results[i] = torch.cat([rows[i], _cut_at_eos(out[row, longest:], eos)])
    logger.debug("generate_many: %d prompts in %d batches of up to %d", len(rows),
                 -(-len(rows) // batch_size) if rows else 0, batch_size)
    return results


def _static_cache(model: Any) -> bool:
    """Whether fastpath runs ``model``'s generate with its static cache, whose compiled step is
    specialised on the batch size (a short last batch is then filled up to the batch size)."""
    from .passes.runner import plan_of

    plan = plan_of(model)
    return plan is not None and plan.get("static_cache") is True


def _check(model: Any, batch_size: int, kwargs: dict[str, Any]) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate_many: batch_size must be a positive integer, got {batch_size!r}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError("generate_many: encoder-decoder models are not supported (their prompts are encoder "
                         "inputs); call model.generate per batch")
    for name in ("input_ids", "inputs", "attention_mask"):
        if name in kwargs:
            raise ValueError(f"generate_many: {name}= is built from the prompts; pass the prompts only")
    copies = kwargs.get("num_return_sequences")
    if copies not in (None, 1):
        raise ValueError(f"generate_many: num_return_sequences = {copies!r} is not supported (one result per "
                         "prompt); repeat the prompt in the list instead")


def _as_ids(prompt: Any, index: int) -> Any:
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1) if not isinstance(prompt, torch.Tensor) \
        else prompt.detach().to("cpu", torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError(f"generate_many: prompt {index} is empty; every prompt needs at least one token id")
    return ids


def _setting(model: Any, kwargs: dict[str, Any], name: str) -> Any:
    if kwargs.get(name) is not None:
        return kwargs[name]
    return getattr(getattr(model, "generation_config", None), name, None)


def _eos_ids(model: Any, kwargs: dict[str, Any]) -> list[int]:
    return eos_list(_setting(model, kwargs, "eos_token_id"))


def _pad_token(model: Any, kwargs: dict[str, Any]) -> int:
    pad = _setting(model, kwargs, "pad_token_id")
    if pad is None:
        eos = _eos_ids(model, kwargs)
        if not eos:
            raise ValueError("generate_many: the model has no pad_token_id and no eos_token_id to pad batches with; "
                             "pass pad_token_id=...")
        pad = eos[0]
    return int(pad)


def _cut_at_eos(new: Any, eos: list[int]) -> Any:
    """A row's new tokens up to and including its first EOS (the pads after it are batch filler)."""
    import torch

    if not eos or new.numel() == 0:
        return new
    hits = torch.isin(new, torch.tensor(eos)).nonzero()
    return new[: int(hits[0]) + 1] if len(hits) else new
