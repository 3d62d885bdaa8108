"""The ``onnxruntime`` pass: a CPU encoder's ``forward`` served by an ONNX Runtime session.

Applies when the plan's ``backend`` is ``onnxruntime`` (or ``onnxruntime-int8``): the model is
exported once per cache key (:mod:`.export`, :mod:`.cache`) and a layer around ``forward`` runs
eligible calls in the session (:mod:`.runtime`). Parameters are never touched: the state_dict
stays canonical and ``revert`` removes the layer. Not training-safe: the FastpathCallback leaves
it off, and a model in training runs its own forward anyway.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from ...errors import PassSkipped
from ..instance_methods import add_layer, remove_layer

if TYPE_CHECKING:
    from torch import nn

    from ...planning.model_info import ModelInfo
    from ...planning.plan import Plan, PlanBuilder

__all__ = ["ORT_BACKENDS", "ORT_MODEL_TYPES", "OnnxRuntimePass", "config_reason", "missing_packages",
           "missing_reason", "runtime_of"]

ORT_BACKENDS = {"onnxruntime": "none", "onnxruntime-int8": "int8"}  # backend -> weight quantization
# Encoder-only text families whose forward is (input_ids, attention_mask[, token_type_ids]) -> tensors,
# each checked against the unconverted model in tests/test_onnxruntime.py.
ORT_MODEL_TYPES = ("bert", "camembert", "data2vec-text", "distilbert", "electra", "ernie", "mpnet", "roberta",
                   "xlm-roberta")
_PACKAGES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "onnxscript": "onnxscript"}


def missing_packages() -> list[str]:
    """The packages of the ``[onnx]`` extra that are not installed."""
    return [package for module, package in _PACKAGES.items() if importlib.util.find_spec(module) is None]


def missing_reason() -> str | None:
    """Why the ``[onnx]`` extra cannot serve a model here (None: it is installed)."""
    missing = missing_packages()
    if not missing:
        return None
    return f"{', '.join(missing)} not installed (pip install 'transformers-fastpath[onnx]')"


def config_reason(info: ModelInfo) -> str | None:
    """Why this model cannot be served by the pass, from its config alone (None: it can)."""
    if info.model_type not in ORT_MODEL_TYPES:
        return (f"model type {info.model_type!r} has no ONNX Runtime encoder export here "
                f"(supported: {', '.join(ORT_MODEL_TYPES)})")
    config = info.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "the config makes it a decoder (is_decoder / add_cross_attention)"
    return None


class OnnxRuntimePass:
    """Serve eligible ``forward`` calls from an ONNX Runtime session (reversible, canonical state_dict)."""

    name = "onnxruntime"
    setting = "backend"
    changes_state_dict = False
    training_safe = False

    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan) -> str | None:
        """The config and the installed packages; where the model runs and its dtype are decided by
        ``builtin.onnxruntime`` from the plan, and checked on the real weights by :meth:`apply`."""
        backend = plan.get("backend")
        if backend not in ORT_BACKENDS:
            return f"backend = {backend}"
        return config_reason(info) or missing_reason()

    def apply(self, model: nn.Module, plan: Plan) -> None:
        import torch

        from .cache import cache_root
        from .export import exported_graph
        from .runtime import OrtRuntime

        params = list(model.parameters())
        if any(p.device.type != "cpu" for p in params):
            raise PassSkipped("the model is not on the CPU (onnxruntime serves CPU models here)")
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in params):
            raise PassSkipped("the weights are not float32 (the ONNX Runtime export is float32)")
        quantize = ORT_BACKENDS[plan["backend"]]
        graph, output_type, recipe = exported_graph(model, cache_root(), quantize=quantize)
        runtime = OrtRuntime(graph, output_type, recipe, label=plan.model.name or type(model).__name__, model=model)
        add_layer(model, "forward", self.name, runtime.around_forward)

    def revert(self, model: nn.Module) -> None:
        remove_layer(model, "forward", self.name)


def runtime_of(model: Any) -> Any:
    """The :class:`.runtime.OrtRuntime` serving ``model``, or None."""
    from ..instance_methods import get_layer

    layer = get_layer(model, "forward", OnnxRuntimePass.name)
    return getattr(layer, "__self__", None)
