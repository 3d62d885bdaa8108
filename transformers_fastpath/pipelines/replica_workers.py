"""Pipeline replicas in worker processes: one interpreter (and one GIL) per extra device.

A text pipeline spends most of its time in Python -- tokenizing, collating and post-processing
one input at a time -- so replicas in threads of one process share one GIL and do not scale
(0.60x on two H100s for a BERT-base classifier). A :class:`WorkerReplica` instead runs its
shard in a spawned process that rebuilds the same pipeline on its own device: the same task,
checkpoint (at the commit the parent loaded, for a Hub id), tokenizer, batch size and load
arguments (``revision``, ``trust_remote_code``, ``model_kwargs``...), and the parent's plan pinned
as an explicit policy (every setting as resolved, placement ``single``), so the worker makes the
parent's decisions.

The recipe needs a checkpoint the worker can load (a local directory or a Hub id, as
``model.name_or_path``) and picklable pipeline parameters; :func:`recipe_for` says why when
there is none, and :mod:`transformers_fastpath.pipelines.replicas` then uses thread replicas. A worker
loads the checkpoint, not the parent's model object: weights changed in memory after loading
(a fine-tune, ``load_state_dict``) are not seen by it -- pass ``workers="threads"`` for such
a pipeline. Models carrying PEFT adapters get thread replicas automatically.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import sys
import types
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..planning.plan import Plan

__all__ = ["PipelineRecipe", "WorkerReplica", "WorkerUnavailable", "recipe_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineRecipe:
    """How a worker process rebuilds a pipeline: ``pipeline(**call, device=..., fastpath=policy)``."""

    call: dict[str, Any]
    policy: dict[str, Any]


# pipeline() arguments a worker needs to load the same model and tokenizer. Placement and dtype
# are not among them: the pinned policy decides those, and the worker's device is its own. A
# caller's quantization_config stays (the plan says "keep" for it, which a policy cannot pin).
_REBUILD_ARGS = ("config", "revision", "use_fast", "token", "trust_remote_code", "model_kwargs")
_PLACEMENT_MODEL_KWARGS = ("device_map", "max_memory", "tp_plan", "tp_size", "distributed_config", "dtype",
                           "torch_dtype", "offload_folder")


def _rebuild_args(call: dict[str, Any]) -> dict[str, Any]:
    """Of a pipeline's ``pipeline()`` arguments (kept by fastpath's wrapper, see
    :func:`~transformers_fastpath.interception.state.remember_pipeline_call`), those a worker needs
    to load the same model and tokenizer (revision, remote code, model_kwargs...)."""
    kept = {key: call[key] for key in _REBUILD_ARGS if call.get(key) is not None}
    if not isinstance(kept.get("config"), str):
        kept.pop("config", None)  # a config object: the checkpoint's own is loaded instead
    if "model_kwargs" in kept:
        kept["model_kwargs"] = {k: v for k, v in kept["model_kwargs"].items() if k not in _PLACEMENT_MODEL_KWARGS}
    return kept


def recipe_for(pipeline: Any, plan: Plan | None) -> PipelineRecipe | str:
    """The recipe that rebuilds ``pipeline`` in another process, or why there is none."""
    if plan is None:
        return "the pipeline has no fastpath plan to pin"
    model = getattr(pipeline, "model", None)
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        return "the model has no name_or_path to load it from"
    if not os.path.isdir(source) and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        return f"the model's name_or_path {source!r} is neither a directory nor a Hub id"
    if getattr(model, "peft_config", None) or getattr(model, "_hf_peft_config_loaded", False):
        return "the model carries PEFT adapters that its checkpoint does not"
    from ..interception.state import pipeline_call

    call = _rebuild_args(pipeline_call(pipeline))
    call.update(task=getattr(pipeline, "task", None), model=source, batch_size=getattr(pipeline, "_batch_size", None))
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is not None:
        call["tokenizer"] = getattr(tokenizer, "name_or_path", None) or source
    # The very snapshot the parent loaded, not whatever main is now -- unless the tokenizer or the
    # config comes from another repository: pipeline() passes one revision to every load.
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit and not os.path.isdir(source) and all(call.get(k, source) == source for k in ("tokenizer", "config")):
        call["revision"] = commit
    for params in ("_preprocess_params", "_forward_params", "_postprocess_params"):
        call.update(getattr(pipeline, params, None) or {})
    call = {k: v for k, v in call.items() if v is not None}
    policy = _pinned_policy(plan)
    try:
        pickle.dumps((call, policy))
    except Exception as exc:  # a parameter that cannot cross a process boundary
        return f"the pipeline's parameters cannot be sent to a worker process ({type(exc).__name__}: {exc})"
    return PipelineRecipe(call, policy)


def _pinned_policy(plan: Plan) -> dict[str, Any]:
    """The plan's resolved settings as a policy that resolves to the same decisions (placement single)."""
    from ..errors import PolicyError
    from ..planning.policy import Policy

    defaults: dict[str, Any] = {}
    for key, decision in plan.settings.items():
        value = list(decision.value) if isinstance(decision.value, tuple) else decision.value
        try:
            Policy.from_dict({"defaults": {key: value}})
        except PolicyError:
            continue  # a value the policy cannot state (rare): the worker resolves it itself
        defaults[key] = value
    defaults["placement"] = "single"
    defaults.pop("device", None)  # the worker's device comes from its pipeline argument
    return {"defaults": defaults}


# -- in the worker process ----------------------------------------------------------------------

_PIPELINE: Any = None
_INIT_ERROR: BaseException | None = None


class WorkerUnavailable(RuntimeError):
    """The worker process could not build its pipeline, or is gone: its shards must run elsewhere."""


def _worker_init(recipe: PipelineRecipe, device: str, threads: int | None) -> None:
    # An exception escaping an initializer breaks the pool and loses the reason: keep it instead,
    # and raise it (as WorkerUnavailable) from every task.
    global _PIPELINE, _INIT_ERROR
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from ..api import pipeline

        _PIPELINE = pipeline(**recipe.call, device=device, fastpath=recipe.policy)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent by every task
        _INIT_ERROR = exc


def _check_built() -> None:
    if _INIT_ERROR is not None:
        raise WorkerUnavailable(f"the worker could not build its pipeline: {type(_INIT_ERROR).__name__}: "
                                f"{_INIT_ERROR}")


def _worker_ready() -> str:
    _check_built()
    return str(getattr(_PIPELINE, "device", "?"))


def _worker_run(inputs: list[Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    _check_built()
    return _PIPELINE(inputs, *args, **kwargs)


# -- in the parent ------------------------------------------------------------------------------

@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Start processes without re-running the user's script in them.

    A spawned process imports the parent's ``__main__`` (by path or module name) before it runs
    anything; a script without an ``if __name__ == "__main__":`` guard would run again, top to
    bottom, in every worker. The workers need nothing from it (they rebuild the pipeline from the
    recipe), so while they start ``__main__`` is a bare module with no file and no spec.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main

class WorkerReplica:
    """A pipeline replica in a spawned process on ``device``; call it like the pipeline.

    The worker starts (and loads its model) as soon as the replica is created; the first call
    waits for it. The process ends with :meth:`close`, or when the replica is garbage collected.
    """

    def __init__(self, recipe: PipelineRecipe, device: str, *, threads: int | None = None) -> None:
        self.device = device
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init, initargs=(recipe, device, threads))
        with _main_script_hidden():  # the first submit starts the process
            self._ready: Future[str] = self._pool.submit(_worker_ready)
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self.unavailable: str | None = None  # why the worker cannot serve, once known

    def wait_ready(self, timeout: float | None = None) -> str:
        """Block until the worker's pipeline is built; raises :class:`WorkerUnavailable` with the reason."""
        return self._call(lambda: self._ready, timeout)

    def __call__(self, inputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline in the worker. Errors of the pipeline itself propagate unchanged; a worker
        that cannot serve raises :class:`WorkerUnavailable` (and keeps raising it without trying)."""
        return self._call(lambda: self._pool.submit(_worker_run, inputs, args, kwargs))

    def _call(self, submit: Any, timeout: float | None = None) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        if self.unavailable is not None:
            raise WorkerUnavailable(f"the replica worker on {self.device} cannot serve: {self.unavailable}")
        try:
            return submit().result(timeout)
        except WorkerUnavailable as exc:
            self.unavailable = str(exc)
            raise
        except (BrokenProcessPool, pickle.PicklingError) as exc:
            self.unavailable = f"{type(exc).__name__}: {exc}"
            raise WorkerUnavailable(f"the replica worker on {self.device} cannot serve: {self.unavailable}") from exc
        except RuntimeError as exc:
            if "after shutdown" not in str(exc):  # submit() on a closed pool
                raise
            self.unavailable = "the worker was closed"
            raise WorkerUnavailable(f"the replica worker on {self.device} cannot serve: {self.unavailable}") from exc

    def close(self) -> None:
        """Stop the worker process."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"WorkerReplica(device={self.device!r})"
