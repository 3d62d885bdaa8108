"""The per-model runtime of the ``onnxruntime`` pass: run ``forward`` in an ONNX Runtime session
when the call is one the exported graph computes, and the model's own forward otherwise.

A call takes the session when it is inference (eval mode, no autograd recording), on CPU integer
token tensors, with only the exported inputs (plus ``return_dict`` and arguments left at
None/False), no hidden-state or attention capture and no forward hook inside the model (the
model's own hooks run as usual: they are outside ``forward``). Anything else runs the original
forward, counted by reason and logged at DEBUG once per reason; so does a batch larger than
:data:`SMALL_CALL_TOKENS` or padded below :data:`SMALL_CALL_MIN_FILL`, which torch runs faster
(:meth:`OrtRuntime._torch_is_faster`).

The weights the session computes with are the exported ones. When a parameter is written in
place (an optimizer step, ``load_state_dict``) or the model is a copy, the weights are hashed
again: equal to the export's key, the session stays in use; different, calls run the model's own
forward (logged once) until the weights change again. So a model fine-tuned after loading is
never served stale outputs.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import torch
from torch import nn

from ..fused_encoder.guards import hooks_reason
from ..instance_methods import bind_call
from .cache import export_key
from .export import ExportedGraph

__all__ = ["SMALL_CALL_MIN_FILL", "SMALL_CALL_TOKENS", "OrtRuntime", "session_for"]

logger = logging.getLogger(__name__)

SMALL_CALL_TOKENS = 128  # (batch x length) up to which a call runs in the session...
SMALL_CALL_MIN_FILL = 0.9  # ...when at least this share of it is real tokens (the session computes pads)
_CAPTURE_FLAGS = ("output_hidden_states", "output_attentions")


def session_for(path: str) -> Any:
    """An ONNX Runtime CPU session over ``path``, with as many intra-op threads as torch uses."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's own warnings are about its graph, not the caller
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class OrtRuntime:
    """Runs one model's eligible ``forward`` calls in an ONNX Runtime session.

    Args:
        graph: the export (file, inputs, outputs, key).
        output_type: the model's ``ModelOutput`` class, rebuilt around the session's tensors.
        recipe: what :func:`.cache.export_key` hashed besides the weights (to check them again).
        label: how log messages name the model.
    """

    def __init__(self, graph: ExportedGraph, output_type: type, recipe: dict[str, Any], label: str,
                 model: nn.Module) -> None:
        self.graph = graph
        self.output_type = output_type
        self.recipe = recipe
        self.label = label
        self.fallbacks: collections.Counter[str] = collections.Counter()
        self.served = 0  # calls the session computed
        self._session: Any = session_for(str(graph.path))
        self._versions = _weight_versions(list(model.modules()))
        self._stale = False
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A pickled or copied model: the session does not pickle; it is opened again from the
        # cache on first use, and the copy's weights are checked against the export's key.
        state = {**self.__dict__, "_session": None, "_versions": None}
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- the layer ------------------------------------------------------------------
    def around_forward(self, model: nn.Module, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """Layer around ``model.forward`` (see :func:`..instance_methods.add_layer`)."""
        call = bind_call(type(model), "forward", args, kwargs)
        reason = self._reason(model, call) or self._torch_is_faster(call)
        if reason is not None:
            if reason not in self.fallbacks:
                logger.debug("fastpath (%s): onnxruntime not used for this call: %s", self.label, reason)
            self.fallbacks[reason] += 1
            return inner(*args, **kwargs)
        return self._run(model, call)

    def _run(self, model: nn.Module, call: dict[str, Any]) -> Any:
        ids = call["input_ids"]
        feeds: dict[str, Any] = {}
        for name in self.graph.inputs:
            value = call.get(name)
            if value is None:  # the model's own default: attend to every token, token type 0
                value = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
            feeds[name] = value.to(torch.int64).contiguous().numpy()
        values = self._session_now().run(list(self.graph.outputs), feeds)
        self.served += 1
        output = self.output_type(**{name: torch.from_numpy(value)
                                     for name, value in zip(self.graph.outputs, values)})
        return_dict = call.get("return_dict")
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def _session_now(self) -> Any:
        with self._lock:
            if self._session is None:
                self._session = session_for(str(self.graph.path))
            return self._session

    # -- eligibility -----------------------------------------------------------------
    def _reason(self, model: nn.Module, call: dict[str, Any]) -> str | None:
        """Why this call runs the model's own forward, or None when the session computes it."""
        for name, value in call.items():
            if name in self.graph.inputs or name == "return_dict":
                continue
            if value is not None and value is not False:
                return f"argument {name} given"
        ids = call.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            return "input_ids is not a non-empty (batch, length) tensor"
        for name in self.graph.inputs:
            value = call.get(name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != ids.shape:
                return f"{name} is not a tensor shaped like input_ids"
            if value.device.type != "cpu" or value.dtype.is_floating_point or value.dtype == torch.bool:
                return f"{name} is not an integer tensor on the CPU"
        if model.training:
            return "training mode"
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            return "autograd is recording (call under torch.no_grad() or torch.inference_mode())"
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return "tracing or compiling"
        if torch.is_autocast_enabled("cpu"):
            return "autocast is on"
        if any(getattr(model.config, flag, False) for flag in _CAPTURE_FLAGS):
            return "the config asks for hidden states or attentions"
        modules = list(model.modules())  # one walk for both checks below (it costs ~0.2 ms on MiniLM)
        hooked = hooks_reason(modules[1:])  # modules() yields the model itself first
        if hooked is not None:
            return hooked
        if not self._weights_are_exported(model, modules):
            return "the weights changed since the ONNX export"
        return None

    def _torch_is_faster(self, call: dict[str, Any]) -> str | None:
        """Small, nearly unpadded calls run in the session; the rest go to torch.

        Measured on the 2-core CPU (all-MiniLM-L6-v2, the session against fastpath's torch path
        since its CPU packed route, 2026-12-07, 5 interleaved rounds): the session wins where
        per-operator overhead decides (one text of 16 tokens 2.03x, of 64 1.20x; full batches of
        2x32, 4x16, 8x16 1.09-1.15x), ties at 128-256 tokens (1x128 1.00x, 8x32 1.00x, 16x16
        1.05x), loses on longer single texts (1x256 0.89x, 1x512 0.75x) and on every padded batch
        (60-64% real tokens: 0.72-0.91x), since it computes the pad tokens the packed route
        skips. The int8 graph takes every call, so one model's outputs never mix int8 and float32
        numerics.
        """
        if self.recipe.get("quantize") == "int8":
            return None
        # Reasons name no shape: they key a counter that must not grow with every batch shape.
        ids = call["input_ids"]
        if ids.numel() > SMALL_CALL_TOKENS:
            return f"a call of more than {SMALL_CALL_TOKENS} tokens: no faster in the session than in torch"
        mask = call.get("attention_mask")
        if mask is not None and float(mask.count_nonzero()) < SMALL_CALL_MIN_FILL * ids.numel():
            return (f"a call with under {SMALL_CALL_MIN_FILL:.0%} real tokens: faster in torch, which skips the "
                    "pad tokens")
        return None

    def _weights_are_exported(self, model: nn.Module, modules: list[nn.Module]) -> bool:
        versions = _weight_versions(modules)
        if versions == self._versions:
            return not self._stale
        key, _ = export_key(model, self.recipe)
        self._versions, self._stale = versions, key != self.graph.key
        if self._stale:
            logger.warning("fastpath (%s): the weights changed since the ONNX export; forward runs in torch "
                           "until they match it again (load the model again with fastpath to export the new "
                           "weights)", self.label)
        return not self._stale


def _weight_versions(modules: list[nn.Module]) -> tuple[tuple[int, int], ...]:
    """Identity and in-place write counter of every parameter and buffer of ``modules`` (the
    model's ``modules()``): any change means the weights may differ from the export
    (``Tensor._version`` counts in-place writes). Read from the modules' own dicts: half the time
    of ``parameters()`` + ``buffers()`` (0.12 ms against 0.24 ms for MiniLM), on every call."""
    return tuple((id(t), t._version) for module in modules
                 for tensors in (module._parameters, module._buffers) for t in tensors.values() if t is not None)
