"""The :class:`Workload` record every workload module fills (its own module, so the modules and the
registry in ``__init__`` import it without importing each other)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...planning.hardware import Hardware
    from ..runner import Bench

__all__ = ["Workload"]


def _anywhere(hardware: Hardware, options: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class Workload:
    """A named benchmark.

    Attributes:
        name: what ``transformers-fastpath bench NAME`` takes.
        description: one line: the model, the inputs, what is measured.
        run: fills a :class:`Bench` (builds variants, measures cases).
        requires: why it cannot run on ``hardware`` with ``options`` (None: it can).
    """

    name: str
    description: str
    run: Callable[[Bench], None]
    requires: Callable[[Hardware, Mapping[str, Any]], str | None] = _anywhere

    def unavailable(self, hardware: Hardware, options: Mapping[str, Any] | None = None) -> str | None:
        """Why this workload is skipped on ``hardware`` (with ``options``), or None when it runs."""
        return self.requires(hardware, options or {})
