"""Built-in plugin: registers the padding-free fused encoder pass (``encoder_fastpath``) and
resolves ``cuda_graphs`` for it. (Which models ``dtype = auto`` makes float16 on a GPU is
``passes.fused_encoder.support.float16_reason``, read by ``builtin.defaults``.)

Importing this module is cheap: torch and the pass are imported only when the hook runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl
from .defaults import model_location

if TYPE_CHECKING:
    from ..passes.base import Pass
    from ..planning.plan import PlanBuilder


@hookimpl
def fastpath_register_passes() -> list[Pass]:
    """The ``fused_encoder`` pass (see docs/fused-encoder.md)."""
    from ..passes.fused_encoder import FusedEncoderPass

    return [FusedEncoderPass()]


@hookimpl
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    _resolve_cuda_graphs(plan)


def _resolve_cuda_graphs(plan: PlanBuilder) -> None:
    """``cuda_graphs = auto``: on where the model runs on a GPU (the graphs serve CUDA batches only)."""
    if not plan.is_auto("cuda_graphs"):
        return
    where, why = model_location(plan)
    if where == "cuda":
        plan.set("cuda_graphs", True, reason="auto: small fused-encoder batches replay a CUDA graph per bucketed "
                 "shape (launch-bound on a GPU)")
    else:
        plan.set("cuda_graphs", False, reason=f"auto: the model runs on {where} ({why}); CUDA graphs need a GPU")
