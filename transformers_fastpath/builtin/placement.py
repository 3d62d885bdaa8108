"""Built-in plugin: the ``placement`` setting -> device maps, tensor parallel, pipeline replicas.

Its ``fastpath_resolve_plan`` runs before the defaults plugin (``tryfirst``, registered after
it) so it can resolve ``placement``, ``quantization = "auto"`` and, under torchrun, ``device``
while they are still ``auto`` (see :func:`transformers_fastpath.loading.placement.resolve_placement`).
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from ..loading.placement import (
    load_kwargs,
    pipeline_conflicts,
    replica_devices,
    resolve_placement,
)
from ..planning.plan import Plan, PlanBuilder


@hookimpl(tryfirst=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    _settle_dtype(plan)
    resolve_placement(plan)


@hookimpl
def fastpath_load_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    kwargs.update(load_kwargs(plan))


@hookimpl
def fastpath_pipeline_kwargs(plan: Plan, kwargs: dict[str, Any]) -> None:
    # A model sharded by device_map or tensor parallel has no single device to move to.
    for key in pipeline_conflicts(plan):
        kwargs.pop(key, None)


@hookimpl
def fastpath_pipeline_created(plan: Plan, pipeline: Any) -> None:
    if plan.get("placement") == "replicate":
        from ..pipelines.replicas import enable_replicas

        enable_replicas(pipeline, replica_devices(plan.hardware), plan=plan)


def _settle_dtype(plan: PlanBuilder) -> None:
    """Resolve ``dtype = auto`` now, exactly as the defaults plugin would: fit depends on it."""
    from . import defaults

    resolve_dtype = getattr(defaults, "_resolve_dtype", None)
    if callable(resolve_dtype):
        resolve_dtype(plan)
