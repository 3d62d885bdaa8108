"""Batches of prompts for ``generate``: left padding, filler rows, EOS ids (shared by
:func:`~transformers_fastpath.generate_many` and the text-generation pipeline's batcher)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["eos_list", "fill_rows", "left_pad"]


def eos_list(eos: Any) -> list[int]:
    """An ``eos_token_id`` setting (None, one id or several) as a list of ids."""
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def left_pad(rows: Sequence[Any], pad: int) -> tuple[Any, Any]:
    """``(ids, attention_mask)`` of 1-D token rows, left-padded with ``pad`` (masked) to the longest,
    so the new tokens of every row start at one column."""
    import torch

    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), int(pad), dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = row
        mask[i, longest - len(row):] = 1
    return ids, mask


def fill_rows(batch: Any, rows: int) -> Any:
    """``batch`` with copies of its last row appended up to ``rows`` rows (as is when it has as many)."""
    import torch

    extra = rows - batch.shape[0]
    return batch if extra <= 0 else torch.cat([batch, batch[-1:].expand(extra, *batch.shape[1:])])
