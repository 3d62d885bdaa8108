"""The wrappers around transformers' entry points, and putting the originals back.

Wrapped: ``PreTrainedModel.from_pretrained`` (the Auto classes reach it too),
``PreTrainedModel.save_pretrained`` (canonical weights for converted models),
``transformers.pipeline`` / ``transformers.pipelines.pipeline``, and the pipeline's model
loader ``load_model`` (so a ``pipeline`` name imported before patching still gets its task).
With fastpath off for a call, each wrapper calls the original with exactly the caller's arguments.

Thread safety: patching, unpatching and ``install()``/``uninstall()`` hold :data:`lock`; every
``from_pretrained`` runs alone (:data:`load_lock`), with fastpath on or off, because transformers
builds a model under process-wide state that two loads at once corrupt: the default dtype
(``torch.set_default_dtype``: mixed float32/bfloat16 parameters) and ``PreTrainedModel.tie_weights``,
which ``initialization.no_tie_weights`` swaps out for the whole load and back at the end (two
loads at once could leave it swapped out for the rest of the process, and later tied models
with their tied weights on the meta device).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
from types import ModuleType
from typing import Any

from . import state
from .state import UNSET, LoadContext
from .targets import ABSENT, AttributeSwaps, transformers_module_objects

__all__ = ["patch_modeling", "patch_pipelines", "patch_all", "unpatch_all", "is_patched", "original", "is_wrapper",
           "import_targets", "lock"]

logger = logging.getLogger("transformers_fastpath")

# Guards _swaps and every patch/unpatch, and (held by install()/uninstall()) makes "patched +
# policy set" one step. Never import a module while holding it: the .pth bootstrap patches from
# inside an import (holding that module's import lock) and takes this lock, so a thread holding
# it and waiting for the same import would deadlock.
lock = threading.RLock()
_lock = lock
# Every load runs alone (see the module docstring); re-entrant: a model whose code loads another.
load_lock = threading.RLock()
# Every wrapper put in place, and the original object found there (exactly as found in __dict__).
_swaps = AttributeSwaps()
_originals = _swaps.found  # (id(owner), attribute) -> (owner, original), for tests and diagnostics
# Set on every wrapper function, so a wrapper is never taken for an original and wrapped again.
_WRAPPER_MARK = "__transformers_fastpath_wrapper__"


def is_wrapper(obj: Any) -> bool:
    """True for the functions fastpath puts in place (also behind a ``classmethod``)."""
    return getattr(getattr(obj, "__func__", obj), _WRAPPER_MARK, False) is True


def _mark(wrapper: Any) -> Any:
    setattr(wrapper, _WRAPPER_MARK, True)
    return wrapper

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code",
               "force_download", "proxies")


def _check_version() -> None:
    """Refuse to patch a transformers release outside the supported range (FastpathError naming the fix)."""
    from .compat import unsupported_transformers

    problem = unsupported_transformers()
    if problem is not None:
        from ..errors import FastpathError

        raise FastpathError(problem)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The caller's Hub arguments for fastpath's own config read.

    ``trust_remote_code`` is the caller's, or False: fastpath never runs (nor asks on the terminal
    to run) a model's custom code to plan it. When the config needs it, planning fails and
    transformers' own load reports it, exactly as without fastpath.
    """
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    if hub.get("trust_remote_code") is not True:
        hub["trust_remote_code"] = False
    return hub


def _replace(owner: Any, attr: str, new: Any) -> None:
    if _swaps.holds(owner, attr):
        return
    found = getattr(owner, "__dict__", {}).get(attr, ABSENT)
    # A stale wrapper of ours (a lazy ``transformers`` module that cached it while patched) is
    # never wrapped again: the original behind it is what gets recorded and restored.
    while not isinstance(found, classmethod) and is_wrapper(found) and hasattr(found, "__wrapped__"):
        found = found.__wrapped__
    _swaps.replace(owner, attr, new, found=found)


def original(owner: Any, attr: str) -> Any:
    """The object transformers had at ``owner.attr`` before patching (or the current one)."""
    found = _swaps.original(owner, attr)
    return getattr(owner, attr) if found is ABSENT else found


def is_patched() -> bool:
    return bool(_swaps)


# -- from_pretrained / save_pretrained ------------------------------------------------

def patch_modeling(modeling_utils: ModuleType) -> None:
    """Wrap ``from_pretrained`` and ``save_pretrained`` of ``PreTrainedModel`` (idempotent)."""
    _check_version()
    with _lock:
        cls = modeling_utils.PreTrainedModel
        if _swaps.holds(cls, "from_pretrained"):
            return
        orig_from = cls.__dict__["from_pretrained"]  # a classmethod object
        orig_save = cls.__dict__["save_pretrained"]
        if is_wrapper(orig_from) or is_wrapper(orig_save):  # wrapped by another copy of this module
            raise RuntimeError("PreTrainedModel.from_pretrained is already wrapped by transformers-fastpath, but "
                               "not by this copy of it (two installations, or the module was reloaded)")
        _replace(cls, "from_pretrained", classmethod(_make_from_pretrained(orig_from.__func__)))
        _replace(cls, "save_pretrained", _make_save_pretrained(orig_save))


def _make_from_pretrained(orig: Any) -> Any:
    @_mark
    @functools.wraps(orig)
    def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, fastpath: Any = UNSET,
                        **kwargs: Any) -> Any:
        policy = state.policy_for_call(fastpath)
        with load_lock:
            if policy is None or state.inside_load():
                return orig(cls, pretrained_model_name_or_path, *args, **kwargs)
            return _fastpath_load(orig, cls, pretrained_model_name_or_path, args, kwargs, policy)

    return from_pretrained


def _fastpath_load(orig: Any, cls: type, path: Any, args: tuple, kwargs: dict[str, Any], policy: Any) -> Any:
    from ..errors import FastpathError
    from ..passes.runner import apply_plan
    from ..planning.resolution import resolve

    ctx = state.load_context()
    task = ctx.task if ctx else None
    plan = ctx.plan if ctx is not None and ctx.plan is not None and ctx.model_ref == path else None
    if plan is None:
        config = kwargs.get("config")
        target = config if config is not None and not isinstance(config, str) else path
        try:
            if target is path:
                from ..planning.model_info import ModelInfo

                target = ModelInfo.from_pretrained(path, task=task, **_hub_kwargs(kwargs))
            plan = resolve(target, task=task, policy=policy, call_kwargs=kwargs)
        except FastpathError:
            raise
        except Exception as exc:
            # Let transformers raise its own error (missing directory...) unmasked, or load plainly.
            logger.debug("fastpath: could not plan %r (%s); loading without fastpath", path, exc)
            return orig(cls, path, *args, **kwargs)
    extra = {k: v for k, v in plan.load_kwargs.items() if kwargs.get(k) is None and not _conflicts(k, kwargs)}
    with state.loading():
        model = orig(cls, path, *args, **kwargs, **extra)
    from ..loading.placement import settle_loaded_model

    settle_loaded_model(model, plan, placed_by_fastpath="device_map" in extra)
    apply_plan(model, plan.with_task(task))
    return model


def _conflicts(key: str, kwargs: dict[str, Any]) -> bool:
    """Keys transformers refuses to see together with what the caller passed."""
    if key == "dtype":
        return kwargs.get("torch_dtype") is not None
    if key == "device_map":
        return kwargs.get("tp_plan") is not None or kwargs.get("distributed_config") is not None
    return False


def _make_save_pretrained(orig: Any) -> Any:
    @_mark
    @functools.wraps(orig)
    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        from ..passes.runner import PLAN_ATTR, canonical_for_save

        if getattr(self, PLAN_ATTR, None) is None:
            return orig(self, save_directory, *args, **kwargs)
        with canonical_for_save(self, str(save_directory)):
            return orig(self, save_directory, *args, **kwargs)

    return save_pretrained


# -- pipeline ---------------------------------------------------------------------------

def patch_pipelines(pipelines: ModuleType) -> None:
    """Wrap ``transformers.pipeline`` (both public names) and the pipeline's ``load_model`` (idempotent)."""
    _check_version()
    with _lock:
        if _swaps.holds(pipelines, "pipeline"):
            return
        orig_pipeline = pipelines.__dict__["pipeline"]
        if is_wrapper(orig_pipeline):
            raise RuntimeError("transformers.pipelines.pipeline is already wrapped by transformers-fastpath, but "
                               "not by this copy of it (two installations, or the module was reloaded)")
        wrapper = _make_pipeline(orig_pipeline)
        _replace(pipelines, "pipeline", wrapper)
        for transformers in transformers_module_objects():
            _replace(transformers, "pipeline", wrapper)
        loader = _make_load_model(pipelines.__dict__["load_model"])
        _replace(pipelines, "load_model", loader)
        base = sys.modules.get("transformers.pipelines.base")
        if base is not None:
            _replace(base, "load_model", loader)


def _make_pipeline(orig: Any) -> Any:
    signature = inspect.signature(orig)

    @_mark
    @functools.wraps(orig)
    def pipeline(*args: Any, fastpath: Any = UNSET, **kwargs: Any) -> Any:
        policy = state.policy_for_call(fastpath)
        if policy is None:
            return orig(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        return _fastpath_pipeline(orig, call, policy)

    return pipeline


def _fastpath_pipeline(orig: Any, call: dict[str, Any], policy: Any) -> Any:
    from ..passes.runner import apply_plan, plan_of
    from ..planning.resolution import resolve
    from ..plugins import get_plugin_manager

    task, model = call.get("task"), call.get("model")
    model_kwargs = dict(call.get("model_kwargs") or {})
    plan = None
    if isinstance(model, str):
        from ..planning.model_info import ModelInfo

        try:
            info = ModelInfo.from_pretrained(model, task=task, **_hub_kwargs(call))
        except Exception as exc:  # transformers raises its own, clearer error below
            logger.debug("fastpath: cannot read the config of %r (%s); transformers will report it", model, exc)
            info = None
        if info is not None:
            plan = resolve(info, task=task, policy=policy, call_kwargs={**model_kwargs, **call})
    elif model is not None and hasattr(model, "config"):
        plan = plan_of(model)
        if plan is None:
            plan = apply_plan(model, resolve(model, task=task, policy=policy, call_kwargs=call))

    if plan is not None:
        extra: dict[str, Any] = {}
        get_plugin_manager().hook.fastpath_pipeline_kwargs(plan=plan, kwargs=extra)
        for key, value in extra.items():
            if call.get(key) is not None or _pipeline_conflict(key, call, model_kwargs):
                continue
            call[key] = value

    with state.scoped_policy(policy), state.pipeline_load(LoadContext(task, plan, model)):
        pipe = orig(**call)
    final = plan_of(pipe.model) or plan
    if final is not None:
        state.remember_pipeline_call(pipe, call)
        final = final.with_task(getattr(pipe, "task", task))
        get_plugin_manager().hook.fastpath_pipeline_created(plan=final, pipeline=pipe)
    return pipe


def _pipeline_conflict(key: str, call: dict[str, Any], model_kwargs: dict[str, Any]) -> bool:
    if key == "device":
        return call.get("device_map") is not None or "device_map" in model_kwargs
    if key == "dtype":
        return "dtype" in model_kwargs or "torch_dtype" in model_kwargs or call.get("torch_dtype") is not None
    return False


def _make_load_model(orig: Any) -> Any:
    @_mark
    @functools.wraps(orig)
    def load_model(model: Any, config: Any, model_classes: Any = None, task: str | None = None,
                   **model_kwargs: Any) -> Any:
        # A pipeline created through a name imported before patching: give the load its task.
        if state.load_context() is None and state.policy_for_call() is not None:
            with state.pipeline_load(LoadContext(task)):
                return orig(model, config, model_classes=model_classes, task=task, **model_kwargs)
        return orig(model, config, model_classes=model_classes, task=task, **model_kwargs)

    return load_model


# -- all at once ------------------------------------------------------------------------

def import_targets() -> tuple[ModuleType, ModuleType]:
    """Import transformers' modeling and pipeline modules (call this *before* taking :data:`lock`)."""
    import transformers.modeling_utils
    import transformers.pipelines

    return transformers.modeling_utils, transformers.pipelines


def patch_all() -> None:
    """Import transformers' modeling and pipeline modules and wrap them (idempotent, all or nothing).

    Code that patches opts in explicitly, so the start-up guard (:mod:`.guard`) goes first. The
    imports happen outside the lock (see :data:`lock`); both modules are then wrapped in one
    step, so a concurrent :func:`unpatch_all` never leaves one wrapped and the other not.
    """
    modeling_utils, pipelines = import_targets()
    with lock:
        from . import guard

        guard.remove()  # the start-up guard (fastpath off at start-up) is no original to record
        try:
            patch_modeling(modeling_utils)
            patch_pipelines(pipelines)
        except BaseException:
            unpatch_all()
            raise


def unpatch_all() -> None:
    """Put every original object back where it was found."""
    with _lock:
        _swaps.restore_all()
