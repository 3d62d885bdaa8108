"""Reversible, stackable overrides of a model's methods on the instance (the way accelerate hooks work).

A pass that needs to run code around ``model.forward`` or ``model.generate`` adds a *layer*::

    add_layer(model, "generate", owner="my_pass", around=my_around)

    def my_around(model, inner, *args, **kwargs):
        ...                                  # before
        return inner(*args, **kwargs)        # the next layer, or the original method

The first layer puts one dispatcher in the instance's ``__dict__`` (the class is never touched,
parameters are never touched, so ``state_dict`` stays canonical); :func:`remove_layer` of the
last layer deletes it again, or puts back an instance attribute that was there before (an
accelerate hook). Layers of several passes stack: the one added last runs outermost, and any
layer can be removed in any order.

The dispatcher is bound like a method (:class:`_Bound`), and the layers live in a dict on the
model, so ``copy.deepcopy(model)`` and ``pickle`` give a copy whose overrides call the copy, not
the original.
``torch.nn.DataParallel`` copies a module's ``__dict__`` shallowly into each GPU's replica (as
the Trainer does on a machine with several GPUs and no torchrun), which would leave each
replica's override bound to the original on GPU 0. :func:`fix_data_parallel_replicas` lets
whatever puts state on an instance repair each replica (the layers here are rebound to it, weakly,
so the short-lived replica is freed without the garbage collector; the fused encoder drops its
converted forward from it).
``inspect.signature(model.forward)`` still shows the original parameters (``generate`` inspects
``forward``'s signature to decide which inputs to pass).
"""

from __future__ import annotations

import enum
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LAYERS_ATTR", "Around", "add_layer", "bind_call", "fix_data_parallel_replicas", "get_layer",
           "method_signature", "remove_layer", "unfix_data_parallel_replicas"]

LAYERS_ATTR = "_fastpath_method_layers"
REPLICATE_ATTR = "_replicate_for_data_parallel"  # torch.nn.Module's hook for DataParallel replicas
FIXES_ATTR = "_fastpath_replica_fixes"

Around = Callable[..., Any]
"""``around(model, inner, *args, **kwargs) -> result``; call ``inner(*args, **kwargs)`` to go on."""


class _Sentinel(enum.Enum):
    MISSING = "missing"  # an enum member survives copy.deepcopy as itself


_MISSING = _Sentinel.MISSING


@dataclass
class _Stack:
    """The layers around one method of one model, innermost first."""

    previous: Any  # the instance attribute found before the first layer, or _MISSING
    dispatcher: Any  # the bound dispatcher this module put in the instance __dict__
    layers: list[tuple[str, Around]] = field(default_factory=list)


def add_layer(model: Any, method: str, owner: str, around: Around) -> None:
    """Run ``around`` around ``model.<method>`` from now on (outermost of the existing layers).

    Raises:
        ValueError: ``owner`` already has a layer on this method, or the model has no such method.
    """
    if not callable(getattr(type(model), method, None)) and method not in vars(model):
        raise ValueError(f"{type(model).__name__} has no method {method!r} to override")
    stacks: dict[str, _Stack] = model.__dict__.setdefault(LAYERS_ATTR, {})
    stack = stacks.get(method)
    if stack is None:
        previous = model.__dict__.get(method, _MISSING)
        dispatcher = _Bound(_dispatcher_for(type(model), method), model, type(model), method)
        stack = stacks[method] = _Stack(previous, dispatcher)
        model.__dict__[method] = dispatcher
        fix_data_parallel_replicas(model, "method_layers", _rebind_layers)
    if any(name == owner for name, _ in stack.layers):
        raise ValueError(f"{owner!r} already overrides {method!r} on this model; remove its layer first")
    stack.layers.append((owner, around))


def remove_layer(model: Any, method: str, owner: str) -> bool:
    """Remove ``owner``'s layer from ``model.<method>``; True when there was one.

    When no layer is left, the instance attribute goes back to what it was before the first
    layer (deleted, or the earlier override) -- unless something else has since replaced our
    dispatcher, in which case the empty dispatcher stays as a pass-through.
    """
    stacks: dict[str, _Stack] = model.__dict__.get(LAYERS_ATTR) or {}
    stack = stacks.get(method)
    if stack is None:
        return False
    before = len(stack.layers)
    stack.layers = [(name, fn) for name, fn in stack.layers if name != owner]
    removed = len(stack.layers) != before
    if not stack.layers and _is_ours(model.__dict__.get(method), stack):
        if stack.previous is _MISSING:
            model.__dict__.pop(method, None)
        else:
            model.__dict__[method] = stack.previous
        del stacks[method]
        if not stacks:
            del model.__dict__[LAYERS_ATTR]
            unfix_data_parallel_replicas(model, "method_layers")
    return removed


def _rebind_layers(original: Any, replica: Any) -> None:
    """A replica's layers and dispatchers, bound (weakly) to the replica instead of ``original``."""
    stacks: dict[str, _Stack] = {}
    for method, stack in original.__dict__.get(LAYERS_ATTR, {}).items():
        dispatcher = _WeaklyBound(stack.dispatcher.__func__, replica, type(original), method)
        if _is_ours(replica.__dict__.get(method), stack):
            replica.__dict__[method] = dispatcher
        stacks[method] = _Stack(stack.previous, dispatcher, list(stack.layers))
    replica.__dict__[LAYERS_ATTR] = stacks


# -- torch.nn.DataParallel replicas ------------------------------------------------------------

def fix_data_parallel_replicas(module: Any, owner: str, fix: Callable[[Any, Any], None]) -> None:
    """Run ``fix(module, replica)`` on every ``torch.nn.DataParallel`` replica made of ``module``.

    DataParallel builds each replica with ``module._replicate_for_data_parallel()``, a shallow copy
    of ``__dict__``: instance state that refers to ``module`` itself still does in the replica.
    ``fix`` is a module-level function (copies and pickles of the model keep it). A no-op for
    objects that are not torch modules.
    """
    if not callable(getattr(type(module), REPLICATE_ATTR, None)):
        return
    module.__dict__.setdefault(FIXES_ATTR, {})[owner] = fix
    if REPLICATE_ATTR not in module.__dict__:
        module.__dict__[REPLICATE_ATTR] = _Bound(_replicate_fixed, module, type(module), REPLICATE_ATTR)


def unfix_data_parallel_replicas(module: Any, owner: str) -> None:
    """Undo ``owner``'s :func:`fix_data_parallel_replicas` (the instance hook goes with the last one)."""
    fixes: dict[str, Any] = module.__dict__.get(FIXES_ATTR) or {}
    fixes.pop(owner, None)
    if fixes:
        return
    module.__dict__.pop(FIXES_ATTR, None)
    if getattr(module.__dict__.get(REPLICATE_ATTR), "__func__", None) is _replicate_fixed:
        del module.__dict__[REPLICATE_ATTR]


def _replicate_fixed(self: Any) -> Any:
    """``torch.nn.Module._replicate_for_data_parallel`` followed by the registered fixes."""
    replica = type(self)._replicate_for_data_parallel(self)  # __dict__ copied: refers to self
    replica.__dict__.pop(REPLICATE_ATTR, None)  # a replica is never replicated again
    for fix in (replica.__dict__.pop(FIXES_ATTR, None) or {}).values():
        fix(self, replica)
    return replica



class _Bound:
    """A dispatcher bound to its model, like a bound method, except that it pickles.

    pickle rebuilds a bound method as ``getattr(model, name)`` before the unpickled model's
    ``__dict__`` is filled, which finds the class's own method: a pickled or ``torch.save``d model
    lost every layer (outputs right, every pass silently gone). This one is rebuilt by
    :func:`_rebind` around the unpickled model (a layer dispatcher is made again for its class and
    method; a module-level function, such as the DataParallel fix, is pickled by reference);
    ``copy.deepcopy`` takes the same path and binds the copy. A plain class (no ``__slots__``) that
    dynamo inlines like a method.
    """

    def __init__(self, func: Callable[..., Any], owner: Any, cls: type, method: str) -> None:
        self.__func__ = func
        self.__self__ = owner
        self._cls = cls
        self._method = method

    @property
    def __signature__(self) -> inspect.Signature | None:
        """The original method's parameters, ``self`` left out (what ``inspect.signature`` shows)."""
        return _signature_without_self(self._cls, self._method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        dispatcher = self.__func__ is _dispatcher_for(self._cls, self._method)
        return _rebind, (self.__self__, self._cls, self._method, None if dispatcher else self.__func__)

    def __repr__(self) -> str:
        return f"<fastpath dispatcher of {self._cls.__name__}.{self._method} of {type(self.__self__).__name__}>"


def _rebind(owner: Any, cls: type, method: str, func: Callable[..., Any] | None) -> _Bound:
    return _Bound(func or _dispatcher_for(cls, method), owner, cls, method)


def _signature_without_self(cls: type, method: str) -> inspect.Signature | None:
    signature = method_signature(cls, method)
    if signature is None:
        return None
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class _WeaklyBound:
    """A dispatcher bound to a DataParallel replica through a weak reference.

    A bound method in the replica's own ``__dict__`` is a reference cycle: every step's replicas,
    with their copies of the weights on each GPU, would then wait for the cyclic garbage collector
    instead of being freed when DataParallel drops them (a Trainer step of BERT-base on two H100s
    peaked at 1.9x the memory of the same step without fastpath, and ran 8% slower).
    """

    __slots__ = ("__func__", "_ref", "_cls", "_method")

    def __init__(self, func: Callable[..., Any], owner: Any, cls: type, method: str) -> None:
        self.__func__ = func
        self._ref = weakref.ref(owner)
        self._cls = cls
        self._method = method

    @property
    def __self__(self) -> Any:
        return self._ref()

    @property
    def __signature__(self) -> inspect.Signature | None:
        """The original method's parameters, ``self`` left out (what ``inspect.signature`` shows)."""
        return _signature_without_self(self._cls, self._method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._ref()
        if owner is None:
            raise ReferenceError(f"the DataParallel replica this {self._method!r} belonged to no longer exists")
        return self.__func__(owner, *args, **kwargs)


def get_layer(model: Any, method: str, owner: str) -> Around | None:
    """``owner``'s layer on ``model.<method>``, or None."""
    stacks: dict[str, _Stack] | None = model.__dict__.get(LAYERS_ATTR)
    stack = stacks.get(method) if stacks else None
    if stack is None:
        return None
    return next((fn for name, fn in stack.layers if name == owner), None)


def _is_ours(value: Any, stack: _Stack) -> bool:
    return (isinstance(value, (_Bound, _WeaklyBound)) and value.__func__ is stack.dispatcher.__func__
            and value.__self__ is stack.dispatcher.__self__)


@functools.cache
def _dispatcher_for(cls: type, method: str) -> Callable[..., Any]:
    """One dispatcher function per (class, method); it finds the layers on the instance at call time."""

    def dispatcher(self: Any, *args: Any, **kwargs: Any) -> Any:
        stack: _Stack = self.__dict__[LAYERS_ATTR][method]
        # functools.partial, not function.__get__: dynamo traces partials, and a graph break here
        # split transformers' compiled decode step in two (0.4 ms/token on an H100).
        call = functools.partial(getattr(cls, method), self) if stack.previous is _MISSING else stack.previous
        for _, around in stack.layers:
            call = functools.partial(around, self, call)
        return call(*args, **kwargs)

    original = getattr(cls, method)
    functools.update_wrapper(dispatcher, original)  # __wrapped__: inspect.signature sees the real parameters
    return dispatcher


@functools.lru_cache(maxsize=256)
def method_signature(cls: type, method: str) -> inspect.Signature | None:
    """``inspect.signature(cls.method)``, cached per class (None when it has none)."""
    try:
        return inspect.signature(getattr(cls, method))
    except (TypeError, ValueError, AttributeError):
        return None


def bind_call(cls: type, method: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call of ``cls.method`` by argument name, its ``**kwargs`` flattened in, ``self`` left out.

    Falls back to the keyword arguments alone when the signature is unknown or does not bind.
    """
    signature = method_signature(cls, method)
    if signature is None or not args:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(None, *args, **kwargs)  # None stands for self
    except TypeError:
        return dict(kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(signature.parameters)), None)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named
