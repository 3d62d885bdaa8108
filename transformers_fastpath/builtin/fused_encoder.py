"""Built-in plugin: registers the padding-free fused encoder pass (``encoder_fastpath``).

Importing this module is cheap: torch and the pass are imported only when the hook runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from ..passes.base import Pass


@hookimpl
def fastpath_register_passes() -> list[Pass]:
    """The ``fused_encoder`` pass (see docs/fused-encoder.md)."""
    from ..passes.fused_encoder import FusedEncoderPass

    return [FusedEncoderPass()]
