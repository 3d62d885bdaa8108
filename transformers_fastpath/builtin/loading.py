"""Built-in plugin: turn the plan's core settings into ``from_pretrained`` keyword arguments."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from ..planning.plan import Plan

_TORCH_DTYPES = ("float32", "float16", "bfloat16")


@hookimpl(tryfirst=True)
def fastpath_load_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    dtype = plan.get("dtype")
    if dtype in _TORCH_DTYPES:
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    attn = plan.get("attn_implementation")
    if attn not in (None, "auto", "keep"):
        kwargs["attn_implementation"] = attn
