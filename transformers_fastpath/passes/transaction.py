"""Snapshots that make applying a pass a transaction: all of it, or the model exactly as before.

:class:`ModelSnapshot` records, by reference (no copy of any weight), everything a pass can
change on a loaded model:

* every module's class and instance ``__dict__``: parameters, buffers and submodules (so a
  replaced or added module or parameter goes away), hooks of every kind, instance-level method
  overrides (``forward = ...``, :mod:`~transformers_fastpath.passes.instance_methods` layers),
  and any attribute a pass added or changed;
* every parameter's and buffer's data (``p.data = other`` is undone), ``requires_grad`` and
  autograd version counter;
* the attributes of the configs the modules hold (``config``, ``generation_config``);
* torch's process-wide module hooks (``register_module_forward_hook``...).

:meth:`ModelSnapshot.restore` puts all of that back. Values written *in place* into a weight
(``p.mul_(2)`` under ``no_grad``) cannot be undone from references: they are detected through
the tensor's version counter, and restored only when the snapshot was taken with
``copy_values=True`` (a pass that declares ``mutates_weights = True``; the copy lives in host
memory for the duration of the apply). Otherwise :meth:`restore` reports them and the runner
raises :class:`~transformers_fastpath.errors.RollbackError` rather than carry on with weights
that are no longer the loaded ones. (Writes through ``p.data`` bypass version counters; only a
value copy sees those.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .instance_methods import LAYERS_ATTR

__all__ = ["ModelSnapshot"]

logger = logging.getLogger(__name__)

# Process-wide hook registries of torch.nn.modules.module (register_module_forward_hook...).
_GLOBAL_HOOK_PREFIX = "_global_"


class _TensorState:
    __slots__ = ("alias", "meta", "requires_grad", "tensor", "value", "version")

    def __init__(self, tensor: torch.Tensor, copy_value: bool) -> None:
        self.tensor = tensor
        self.alias = tensor.data  # same storage and metadata; lets ``t.data = ...`` be undone
        self.meta = _meta(tensor)
        self.requires_grad = tensor.requires_grad
        self.version = _version(tensor)
        self.value = _host_copy(tensor) if copy_value else None


class ModelSnapshot:
    """The restorable state of ``model`` (see the module docstring).

    Args:
        model: the model (any ``nn.Module``).
        copy_values: also copy every parameter and buffer to host memory, so that in-place
            writes can be undone bit for bit.
        exclude: attribute names of ``model`` itself left out (the runner's own bookkeeping).
    """

    def __init__(self, model: nn.Module, *, copy_values: bool = False, exclude: tuple[str, ...] = ()) -> None:
        self.model = model
        self.copy_values = copy_values
        self.exclude = frozenset(exclude)
        self._modules: list[tuple[nn.Module, type, dict[str, tuple[Any, Any]], list[tuple[Any, list, Any, Any]]]] = []
        self._tensors: dict[int, _TensorState] = {}
        self._objects: dict[int, tuple[Any, dict[str, Any]]] = {}
        config_types = _config_types()
        for module in model.modules():
            self._modules.append(self._capture_module(module))
            for value in vars(module).values():
                if isinstance(value, config_types) and id(value) not in self._objects:
                    self._objects[id(value)] = (value, dict(vars(value)))
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if isinstance(tensor, torch.Tensor) and id(tensor) not in self._tensors:
                    self._tensors[id(tensor)] = _TensorState(tensor, copy_values)
        self._globals = _global_hook_dicts()
        self._global_copies = {name: dict(d) for name, d in self._globals.items()}

    # -- capture ------------------------------------------------------------------------
    def _capture_module(self, module: nn.Module) -> tuple[nn.Module, type, dict[str, tuple[Any, Any]], list]:
        saved: dict[str, tuple[Any, Any]] = {}
        for key, value in vars(module).items():
            if module is self.model and key in self.exclude:
                continue
            saved[key] = (value, _shallow_copy(value))
        stacks = []
        for stack in (vars(module).get(LAYERS_ATTR) or {}).values():
            stacks.append((stack, list(stack.layers), stack.previous, stack.dispatcher))
        return module, type(module), saved, stacks

    # -- checking -----------------------------------------------------------------------
    def changed_in_place(self) -> list[str]:
        """Names of parameters/buffers written in place since the snapshot (by version counter)."""
        changed = [id(s.tensor) for s in self._tensors.values()
                   if s.version is not None and _version(s.tensor) not in (None, s.version)]
        return self._names(changed)

    # -- restoring ------------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Put everything back; returns the weights whose in-place changes could not be undone."""
        for module, cls, saved, stacks in self._modules:
            self._restore_module(module, cls, saved, stacks)
        lost: list[int] = []
        for state in self._tensors.values():
            if not self._restore_tensor(state):
                lost.append(id(state.tensor))
        for obj, attrs in self._objects.values():
            _restore_dict(vars(obj), attrs)
        for name, live in self._globals.items():
            _restore_dict(live, self._global_copies[name])
        return self._names(lost)

    def _restore_module(self, module: nn.Module, cls: type, saved: dict[str, tuple[Any, Any]],
                        stacks: list[tuple[Any, list, Any, Any]]) -> None:
        if type(module) is not cls:
            object.__setattr__(module, "__class__", cls)
        live = vars(module)
        for key in [k for k in live if k not in saved and not (module is self.model and k in self.exclude)]:
            del live[key]
        for key, (value, contents) in saved.items():
            if contents is not None:
                _refill(value, contents)  # same container object: hook handles keep working
            live[key] = value
        for stack, layers, previous, dispatcher in stacks:
            stack.layers = layers
            stack.previous = previous
            stack.dispatcher = dispatcher

    def _restore_tensor(self, state: _TensorState) -> bool:
        tensor = state.tensor
        try:
            if _meta(tensor) != state.meta:
                tensor.data = state.alias
            if tensor.requires_grad != state.requires_grad:
                tensor.requires_grad_(state.requires_grad)
        except Exception:  # exotic tensor subclasses: leave them, report below if their values moved
            logger.debug("fastpath: could not restore the data of a %s", type(tensor).__name__, exc_info=True)
        if state.value is not None:
            with torch.no_grad():
                saved = state.value
                if tensor.shape != saved.shape or tensor.dtype != saved.dtype:
                    return False
                if not torch.equal(tensor.detach().cpu(), saved):
                    tensor.copy_(saved.to(tensor.device))
            return True
        now = _version(tensor)
        return state.version is None or now is None or now == state.version

    def _names(self, ids: list[int]) -> list[str]:
        if not ids:
            return []
        wanted = set(ids)
        names: dict[int, str] = {}
        for name, tensor in (*self.model.named_parameters(remove_duplicate=False),
                             *self.model.named_buffers(remove_duplicate=False)):
            if id(tensor) in wanted and id(tensor) not in names:
                names[id(tensor)] = name
        return [names.get(i, "<a tensor no longer in the model>") for i in ids]


# -- helpers ---------------------------------------------------------------------------

def _shallow_copy(value: Any) -> Any:
    """A copy of a container's contents (None for anything else)."""
    if isinstance(value, (dict, set, list)):
        try:
            return value.copy()
        except Exception:  # noqa: BLE001 - a container subclass that cannot copy itself: kept by reference only
            return None
    return None


def _refill(container: Any, contents: Any) -> None:
    if isinstance(container, dict):
        _restore_dict(container, contents)
    elif isinstance(container, list) and container != contents:
        container[:] = contents
    elif isinstance(container, set) and container != contents:
        container.clear()
        container.update(contents)


def _restore_dict(live: dict[Any, Any], saved: dict[Any, Any]) -> None:
    """Make ``live`` hold exactly ``saved`` (keys, values and order), touching it only if it differs."""
    if list(live.keys()) == list(saved.keys()) and all(live[k] is v for k, v in saved.items()):
        return
    live.clear()
    live.update(saved)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor | None:
    try:
        return tensor.detach().to("cpu", copy=True)
    except Exception:  # noqa: BLE001 - meta tensors, exotic subclasses: nothing to copy
        return None


def _meta(tensor: torch.Tensor) -> tuple[Any, ...]:
    try:
        return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device,
                tensor.storage_offset())
    except Exception:  # noqa: BLE001 - tensors without storage (some subclasses)
        return (id(tensor.data), tensor.dtype, tuple(tensor.shape), tensor.device)


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return int(tensor._version)
    except Exception:  # noqa: BLE001 - inference tensors (created under inference_mode) have no version counter
        return None


def _config_types() -> tuple[type, ...]:
    """transformers' config classes, whose attributes passes may set (``_attn_implementation``...)."""
    try:
        from transformers import GenerationConfig, PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (PretrainedConfig, GenerationConfig)


def _global_hook_dicts() -> dict[str, dict[Any, Any]]:
    from torch.nn.modules import module as torch_module

    return {name: value for name, value in vars(torch_module).items()
            if name.startswith(_GLOBAL_HOOK_PREFIX) and isinstance(value, dict)}
