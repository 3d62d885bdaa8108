"""Padding-free fused encoder layers for BERT-family and ViT models (the BetterTransformer successor).

Modules, one job each:

* ``families``  -- the table of supported architectures and where their parts live;
* ``support``   -- config-level checks (``Pass.supports``);
* ``layers``    -- checking one layer and reading it as the fused op's arguments;
* ``masks``     -- reading a key-padding mask out of transformers' 4D masks;
* ``routes``    -- the dense, nested and packed computations;
* ``heuristic`` -- which route a batch takes;
* ``guards``    -- per-call reasons to run the original forward;
* ``runtime``   -- the instance-level forward override, install and removal;
* ``fused_pass``-- the :class:`FusedEncoderPass` object.

Importing this package imports torch; the plugin module ``transformers_fastpath.builtin.fused_encoder``
imports it only when passes are registered.
"""

from .fused_pass import FusedEncoderPass
from .runtime import runtime_of

__all__ = ["FusedEncoderPass", "runtime_of"]
