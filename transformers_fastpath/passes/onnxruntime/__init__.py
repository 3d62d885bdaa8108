"""ONNX Runtime as the backend of CPU encoders (the ``backend`` policy setting, extra ``[onnx]``).

Modules, one job each:

* ``cache``    -- where exports live and the key that makes a stale one be rebuilt;
* ``export``   -- the ``torch.onnx`` export (and optional int8 quantization) of one model;
* ``runtime``  -- the layer around ``forward`` that runs eligible calls in the session;
* ``ort_pass`` -- the :class:`OnnxRuntimePass` object and its config-level checks.

Importing this package is cheap (no torch, no onnxruntime): ``export`` and ``runtime`` are
imported when the pass applies.
"""

from .ort_pass import (
    ORT_BACKENDS,
    ORT_MODEL_TYPES,
    OnnxRuntimePass,
    config_reason,
    missing_packages,
    missing_reason,
    runtime_of,
)

__all__ = ["ORT_BACKENDS", "ORT_MODEL_TYPES", "OnnxRuntimePass", "config_reason", "missing_packages",
           "missing_reason", "runtime_of"]
