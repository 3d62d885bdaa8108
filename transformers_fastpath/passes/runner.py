"""Apply a plan's passes to a loaded model, revert them, and keep saves canonical.

Each pass is applied as a transaction: when one declines (:class:`PassSkipped`), fails, or
fails the optional ``verify`` step, the model is restored exactly as it was before that pass
(:mod:`.transaction`), the reason lands in the plan, and the others still run (strict mode
rolls back the whole plan and raises instead). A pass that fails later, while the model runs
(the fused encoder's kernel on the first batch), undoes itself and reports through
:func:`record_run_time_failure`. :func:`apply_plan` says why only the failing pass is rolled back.

Canonical state dicts: while a pass with ``changes_state_dict = True`` is applied, the model
carries ``state_dict`` and ``load_state_dict`` hooks (public ``torch.nn.Module`` hook API) that
revert such passes for the duration of the call and re-apply them after. So every reader of
the weights sees canonical keys and tensors, not only ``save_pretrained``: Trainer checkpoints
of models that are not ``PreTrainedModel`` (``safetensors.save_file(model.state_dict())``), a
``state_dict=`` taken beforehand and handed to ``save_pretrained``, and the Trainer's loads
(resume, ``load_best_model_at_end``). (peft's ``save_pretrained`` also walks the live module
tree; ``FastpathCallback`` makes a PEFT model save inside :func:`canonical_for_save`.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from ..errors import FastpathError, PassSkipped, RollbackError, StrictModeError
from ..plugins import get_passes
from .transaction import ModelSnapshot

if TYPE_CHECKING:
    from torch import nn

    from ..planning.plan import Plan
    from .base import Pass

__all__ = ["PLAN_ATTR", "apply_plan", "canonical_for_save", "plan_of", "record_run_time_failure", "revert_model"]

logger = logging.getLogger(__name__)

PLAN_ATTR = "_fastpath_plan"
APPLIED_ATTR = "_fastpath_applied"
# Canonical-view bookkeeping (see the module docstring): nesting depth of "canonical" sections
# (save_pretrained, state_dict, load_state_dict), the passes reverted for the outermost one, and
# whether the state_dict hooks are registered on the model.
_CANONICAL_DEPTH_ATTR = "_fastpath_canonical_depth"
# Guards every model's canonical-section counter and the revert / re-apply it triggers, so threads
# calling state_dict() at once nest like one thread's calls. Module-level: a lock attribute would
# stop pickling and deep copies of the model. Reentrant: re-applying may call state_dict().
_CANONICAL_LOCK = threading.RLock()
_REVERTED_ATTR = "_fastpath_reverted_for_canonical"
_HOOKED_ATTR = "_fastpath_state_dict_hooked"
# The runner's own attributes: left out of pass snapshots (the runner sets them itself).
_RUNNER_ATTRS = (PLAN_ATTR, APPLIED_ATTR, _CANONICAL_DEPTH_ATTR, _REVERTED_ATTR, _HOOKED_ATTR)


def plan_of(model: Any) -> Plan | None:
    """The plan fastpath applied to ``model`` (or to a pipeline's model), or None."""
    inner = getattr(model, "model", None)
    if getattr(model, PLAN_ATTR, None) is None and inner is not None and hasattr(inner, "config"):
        model = inner
    return getattr(model, PLAN_ATTR, None)


def _passes_by_name() -> dict[str, Pass]:
    return {p.name: p for p in get_passes()}


def apply_plan(model: nn.Module, plan: Plan) -> Plan:
    """Run every planned pass on ``model`` and attach the resulting plan to it.

    Returns the plan with each pass's outcome (applied / skipped / failed), and with the
    ``verify`` step's outcome when the policy turns it on.

    Each pass is a transaction (:class:`~transformers_fastpath.passes.transaction.ModelSnapshot`):
    when its ``apply`` raises (a bug, an unsupported module, out of memory), declines
    (:class:`PassSkipped`) or fails verification, the pass's ``revert`` runs and then the model
    is restored exactly as it was before that pass -- module types, parameters, buffers,
    hooks, instance attributes and method overrides, config attributes; values written in
    place into weights too when the pass declares ``mutates_weights = True`` (otherwise such
    writes raise :class:`RollbackError`, as the loaded weights are lost). The failure is logged
    once (warning, ``transformers_fastpath`` logger; an info line for a skip), the plan records
    the pass as ``failed``/``skipped`` with the reason, and the remaining passes still run.

    Rollback scope: only the failing pass is rolled back; passes that were applied before it
    stay. They succeeded on their own, each is independent (one that needs another, like
    ``generate_compile`` on ``static_cache``, declines by itself when the other is not there),
    and none of the built-in ones changes the state_dict, so the model still holds exactly the
    weights it was loaded with; undoing them would only take away speed the user asked for
    because of an unrelated failure. In strict mode (``strict = true``) the whole plan is
    rolled back instead -- every pass applied by this call, newest first, each to its own
    snapshot -- so the model is exactly as before the call, and :class:`StrictModeError`
    (naming the pass, the model and the fix) is raised.

    With ``verify = true`` (:mod:`transformers_fastpath.verify`), a probe batch runs through the
    model before the first pass and after each applied pass; a pass whose output differs from
    the reference beyond the dtype's tolerance is rolled back like a failing one (reason
    ``verify: ...``), and ``plan.verification`` records the outcome. A pass that fails while
    the probe runs (the fused kernel) reverts itself and is recorded as failed.
    """
    registry = _passes_by_name()
    previous_plan = getattr(model, PLAN_ATTR, None)
    previous_applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    label = _label(model, plan)
    for status in plan.passes:  # checked before anything changes
        if status.status == "skipped" and plan.strict and plan.get(_setting_of(registry, status.name)) is True:
            raise StrictModeError(f"pass {status.name!r} was requested (true) but cannot run on {label}: "
                                  f"{status.reason}. Fix: set {_setting_of(registry, status.name)} = \"auto\" or "
                                  "false in the policy for this model, or strict = false.")
    applied = list(previous_applied)
    verifier = _Verifier(model, label) if plan.get("verify") is True else None
    done: list[tuple[Pass, ModelSnapshot]] = []  # this call's applied passes (kept in strict mode only)
    # Strict mode undoes the whole plan. A declared in-place pass's value copy restores weights by
    # writing them (new version counters), which the by-reference snapshots of the passes before
    # it would take for a lost write: one value copy of the model, taken before the first pass,
    # restores those weights at the end of a strict rollback instead.
    whole_plan = (ModelSnapshot(model, copy_values=True, exclude=_RUNNER_ATTRS)
                  if plan.strict and any(getattr(registry.get(s.name), "mutates_weights", False)
                                         for s in plan.passes if s.status == "planned" and s.name not in applied)
                  else None)
    for status in plan.passes:
        if status.status != "planned" or status.name in applied:
            continue
        pass_ = registry.get(status.name)
        if pass_ is None:
            plan = plan.with_pass_status(status.name, "skipped", "no plugin registers this pass any more")
            continue
        if verifier is not None and not verifier.started:
            verifier.start()
            if verifier.unavailable and plan.strict:
                raise StrictModeError(
                    f"verify = true, but no probe batch could be run through {label}: {verifier.unavailable}. "
                    "Fix: set verify = false for this model (a [[rules]] entry matching it), or strict = false.")
        snapshot = ModelSnapshot(model, copy_values=bool(getattr(pass_, "mutates_weights", False)),
                                 exclude=_RUNNER_ATTRS)
        failure: BaseException | None = None
        try:
            pass_.apply(model, plan)
        except BaseException as exc:  # noqa: BLE001 - rolled back, then re-raised unless it is a pass failure
            failure = exc
        if failure is None:
            applied.append(pass_.name)
            plan = plan.with_pass_status(pass_.name, "applied")
            if verifier is not None:
                _attach(model, plan, applied)  # a run-time failure during the probe records itself here
                try:
                    mismatch = verifier.check(pass_.name)
                except BaseException as exc:  # noqa: BLE001
                    failure = exc
                else:
                    plan = getattr(model, PLAN_ATTR, plan)
                    applied = list(getattr(model, APPLIED_ATTR, applied))
                    if mismatch is not None:
                        failure = _VerifyMismatch(mismatch)
                    elif pass_.name not in applied:  # it failed while running the probe and reverted itself
                        _restore(pass_, model, snapshot, revert=False)
                        verifier.note_run_time_failure(pass_.name)
                        continue
        if failure is None:
            if plan.strict:
                done.append((pass_, snapshot))
            continue
        # -- the pass failed: roll it back, record it, and go on (strict: undo the whole plan, raise)
        if pass_.name in applied:
            applied.remove(pass_.name)
        skipped = isinstance(failure, PassSkipped)
        reason = failure.reason if isinstance(failure, PassSkipped) else _reason(failure)
        plan = plan.with_pass_status(pass_.name, "skipped" if skipped else "failed", reason)
        try:
            revert_error = _restore(pass_, model, snapshot)
        except RollbackError:
            _attach(model, plan, applied)
            raise
        if isinstance(failure, _VerifyMismatch) and verifier is not None:
            verifier.note_rollback(pass_.name)
        if plan.strict:
            for earlier, earlier_snapshot in reversed(done):
                try:
                    _restore(earlier, model, earlier_snapshot)
                except RollbackError:
                    if whole_plan is None:
                        raise
            if whole_plan is not None:
                lost = whole_plan.restore()
                if lost:  # a weight that could not be copied to host (meta, an exotic subclass)
                    _attach(model, previous_plan, previous_applied)
                    raise RollbackError(
                        f"fastpath: strict mode could not restore {len(lost)} weight tensor(s) of {label} after "
                        f"pass {pass_.name!r} failed ({', '.join(lost[:5])}): load the model again. Fix: set "
                        f"{pass_.setting} = false in the policy, or strict = false.",
                        pass_name=pass_.name, weights=lost) from failure
            _attach(model, previous_plan, previous_applied)
            if not isinstance(failure, Exception) or isinstance(failure, StrictModeError):
                raise failure
            raise StrictModeError(
                f"pass {pass_.name!r} {'skipped' if skipped else 'failed'} on {label} in strict mode: {reason}. "
                "The model was restored to its state before the plan. Fix: set "
                f"{pass_.setting} = false in the policy for this model, or strict = false to continue without it."
            ) from failure
        _attach(model, plan, applied)
        if not isinstance(failure, Exception):  # KeyboardInterrupt, SystemExit: this pass rolled back, then on
            raise failure
        extra = f" (its revert raised too: {_reason(revert_error)})" if revert_error is not None else ""
        if skipped:
            logger.info("fastpath: %s skipped on %s: %s", pass_.name, label, reason)
        else:
            logger.warning("fastpath: pass %s failed on %s and was rolled back (the model is as it was before "
                           "this pass); continuing without it: %s%s", pass_.name, label, reason, extra)
    if verifier is not None:
        plan = verifier.record(plan, applied)
    # Attributes on the module (not a registry keyed by id) follow the model through copies.
    _attach(model, plan, applied)
    if any(name in registry and registry[name].changes_state_dict for name in applied):
        _install_state_dict_hooks(model)
    return plan


def record_run_time_failure(model: nn.Module, pass_name: str, reason: str) -> bool:
    """Record that ``pass_name`` failed while ``model`` ran and has been reverted on it.

    Called by a pass's runtime code (the fused encoder's forward) after it has undone itself:
    the pass leaves the applied list and the plan shows it as ``failed`` with ``reason``.
    Returns False when the pass was not (or no longer) recorded as applied on ``model``.
    """
    applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    if pass_name not in applied:
        return False
    applied.remove(pass_name)
    object.__setattr__(model, APPLIED_ATTR, applied)
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    if plan is not None and plan.pass_status(pass_name) is not None:
        object.__setattr__(model, PLAN_ATTR, plan.with_pass_status(pass_name, "failed", reason))
    return True


def revert_model(model: nn.Module) -> nn.Module:
    """Undo every applied pass, newest first. The plan stays attached with status ``reverted``."""
    registry = _passes_by_name()
    applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    for name in reversed(applied):
        pass_ = registry.get(name)
        if pass_ is not None:
            pass_.revert(model)
        if plan is not None:
            plan = plan.with_pass_status(name, "reverted")
    object.__setattr__(model, APPLIED_ATTR, [])
    if plan is not None:
        object.__setattr__(model, PLAN_ATTR, plan)
    return model


@contextlib.contextmanager
def canonical_for_save(model: nn.Module, save_directory: str) -> Iterator[None]:
    """Inside the block the model's state_dict is canonical; passes that change it are re-applied after."""
    from ..plugins import get_plugin_manager

    if getattr(model, PLAN_ATTR, None) is None:
        yield
        return
    hook = get_plugin_manager().hook
    _enter_canonical(model)
    try:
        hook.fastpath_before_save(model=model, save_directory=save_directory)
        yield
    finally:
        try:
            hook.fastpath_after_save(model=model, save_directory=save_directory)
        finally:
            _exit_canonical(model)


def _enter_canonical(model: nn.Module) -> None:
    """Revert the applied passes that change the state_dict (newest first), unless already done.

    Sections nest (``save_pretrained`` calls ``state_dict``), also across threads: only the
    outermost one reverts. The counter and what it guards change under :data:`_CANONICAL_LOCK`.
    """
    with _CANONICAL_LOCK:
        depth = getattr(model, _CANONICAL_DEPTH_ATTR, 0)
        object.__setattr__(model, _CANONICAL_DEPTH_ATTR, depth + 1)
        if depth:
            return
        registry = _passes_by_name()
        applied: list[str] = list(getattr(model, APPLIED_ATTR, ()))
        reverted = [n for n in reversed(applied) if n in registry and registry[n].changes_state_dict]
        object.__setattr__(model, _REVERTED_ATTR, reverted)
        for name in reverted:
            registry[name].revert(model)


def _exit_canonical(model: nn.Module) -> None:
    """Leave a canonical section; the last one to leave, on any thread, re-applies what was reverted
    (oldest first)."""
    with _CANONICAL_LOCK:
        depth = getattr(model, _CANONICAL_DEPTH_ATTR, 0)
        if depth > 1:
            object.__setattr__(model, _CANONICAL_DEPTH_ATTR, depth - 1)
            return
        try:  # the depth stays 1 while re-applying, so a state_dict() inside apply() reverts nothing
            registry = _passes_by_name()
            plan: Plan | None = getattr(model, PLAN_ATTR, None)
            first_error: Exception | None = None
            for name in reversed(getattr(model, _REVERTED_ATTR, ())):
                if name in registry:
                    try:
                        _reapply(registry[name], model, plan)
                    except Exception as exc:  # noqa: BLE001 - recorded as failed; the others still come back first
                        first_error = first_error or exc
            if first_error is not None:
                raise first_error
        finally:
            object.__setattr__(model, _REVERTED_ATTR, [])
            object.__setattr__(model, _CANONICAL_DEPTH_ATTR, 0)


def _reapply(pass_: Pass, model: nn.Module, plan: Plan | None) -> None:
    """Apply again a pass reverted for a canonical section, as a transaction like :func:`apply_plan`'s."""
    snapshot = ModelSnapshot(model, copy_values=bool(getattr(pass_, "mutates_weights", False)), exclude=_RUNNER_ATTRS)
    try:
        pass_.apply(model, plan)  # type: ignore[arg-type]  # the plan the pass was applied with
    except Exception as exc:  # any failure: rolled back, recorded, logged (strict: raised)
        _restore(pass_, model, snapshot)
        reason = f"re-applying it after a save failed: {_reason(exc)}"
        record_run_time_failure(model, pass_.name, reason)
        label = _label(model, plan)
        if plan is not None and plan.strict:
            raise StrictModeError(f"pass {pass_.name!r} failed on {label} in strict mode: {reason}. The model "
                                  "keeps its canonical weights. Fix: set "
                                  f"{pass_.setting} = false in the policy for this model, or strict = false.") from exc
        logger.warning("fastpath: pass %s failed on %s and was rolled back; continuing without it: %s",
                       pass_.name, label, reason)


def _install_state_dict_hooks(model: nn.Module) -> None:
    """Make ``state_dict()`` / ``load_state_dict()`` canonical on a model whose passes change them.

    The hooks also fire when the model is a submodule of the one whose ``state_dict`` is taken
    (a PEFT wrapper, a user's container): torch calls them on every module it recurses into.
    They stay registered after :func:`revert_model` and do nothing when no such pass is applied.
    """
    if getattr(model, _HOOKED_ATTR, False):
        return
    model.register_state_dict_pre_hook(_state_dict_pre_hook)
    # public since torch 2.4-ish; the older private spelling takes the same hook (ours returns None)
    register_post = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
    register_post(_state_dict_post_hook)
    model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    model.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    object.__setattr__(model, _HOOKED_ATTR, True)


def _state_dict_pre_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    _enter_canonical(module)


def _state_dict_post_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                          local_metadata: dict[str, Any]) -> None:
    _exit_canonical(module)


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
    _enter_canonical(module)


def _load_state_dict_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    _exit_canonical(module)


def _setting_of(registry: dict[str, Pass], name: str) -> str:
    pass_ = registry.get(name)
    return pass_.setting if pass_ is not None else name


def _label(model: nn.Module, plan: Plan | None) -> str:
    """``BertModel ('my-org/my-model')``: the class, and the name the plan knows the model by."""
    name = getattr(getattr(plan, "model", None), "name", "") or ""
    cls = type(model).__name__
    return f"{cls} ({name!r})" if name and name != cls else cls


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, _VerifyMismatch):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _attach(model: nn.Module, plan: Plan | None, applied: list[str]) -> None:
    if plan is None:
        vars(model).pop(PLAN_ATTR, None)
    else:
        object.__setattr__(model, PLAN_ATTR, plan)
    object.__setattr__(model, APPLIED_ATTR, list(applied))


def _restore(pass_: Pass, model: nn.Module, snapshot: ModelSnapshot, *, revert: bool = True) -> BaseException | None:
    """Undo a pass: its own ``revert`` (it may hold state outside the model), then the snapshot.

    Returns the exception ``revert`` raised, if any (the snapshot restores the model anyway).
    Raises :class:`RollbackError` when weights were written in place and could not be restored.
    """
    revert_error: BaseException | None = None
    if revert:
        try:
            pass_.revert(model)
        except Exception as exc:  # the snapshot below restores the model; the first error matters more
            revert_error = exc
            logger.debug("fastpath: reverting %s after a failure raised too", pass_.name, exc_info=True)
    lost = snapshot.restore()
    if lost:
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        raise RollbackError(
            f"fastpath: pass {pass_.name!r} wrote into {len(lost)} weight tensor(s) in place ({shown}) and then "
            "failed; fastpath restored the modules, hooks and attributes, but kept no copy of those values, so "
            f"the model no longer holds the loaded weights: load it again. Fix: the pass should declare "
            f"mutates_weights = True (fastpath then copies the weights before applying it), or set "
            f"{pass_.setting} = false in the policy.",
            pass_name=pass_.name, weights=lost)
    return revert_error


class _VerifyMismatch(Exception):
    """A pass's output on the probe batch differs from the original forward's."""


class _Verifier:
    """The ``verify`` step (see :mod:`transformers_fastpath.verify`) for one :func:`apply_plan` call."""

    def __init__(self, model: nn.Module, label: str) -> None:
        self.model = model
        self.label = label
        self.started = False
        self.unavailable: str | None = None
        self.probe: Any = None
        self.reference: Any = None
        self.passed: list[tuple[str, str]] = []
        self.rolled_back: list[str] = []
        self.failed_at_run_time: list[str] = []

    def start(self) -> None:
        """Build the probe and run it through the model as it is before any pass of this call."""
        from ..verify import ProbeUnavailable, build_probe, run_probe

        self.started = True
        try:
            self.probe = build_probe(self.model)
            self.reference = run_probe(self.model, self.probe)
        except ProbeUnavailable as exc:
            self.unavailable = str(exc)
        except Exception as exc:  # noqa: BLE001 - recorded as the reason verification did not run
            self.unavailable = f"the original forward raised {_reason(exc)} on the probe batch"
        if self.unavailable is not None:
            logger.warning("fastpath: verify = true, but no probe batch could be run through %s (%s); the passes "
                           "are applied unverified", self.label, self.unavailable)

    def check(self, pass_name: str) -> str | None:
        """None when the model (with ``pass_name`` now applied) matches the reference, else the reason."""
        if self.unavailable is not None or self.probe is None:
            return None
        from ..verify import compare, run_probe

        try:
            output = run_probe(self.model, self.probe)
        except FastpathError:
            raise
        except Exception as exc:  # noqa: BLE001 - the pass broke the forward: that is the verdict
            return (f"verify: the forward raised {_reason(exc)} on the probe batch ({self.probe.description}), "
                    "which the original forward runs")
        ok, detail = compare(self.reference, output, self.probe.keep)
        if ok:
            self.passed.append((pass_name, detail))
            return None
        return f"verify: {detail} on the probe batch ({self.probe.description})"

    def note_rollback(self, pass_name: str) -> None:
        self.rolled_back.append(pass_name)

    def note_run_time_failure(self, pass_name: str) -> None:
        self.failed_at_run_time.append(pass_name)

    def record(self, plan: Plan, applied: list[str]) -> Plan:
        if not self.started:
            return plan.with_verification("not run", "no pass was applied")
        if self.unavailable is not None:
            return plan.with_verification("not run", self.unavailable)
        kept = [(name, detail) for name, detail in self.passed if name in applied]
        parts = [f"{name}: {detail}" for name, detail in kept]
        parts += [f"{name}: output differs, rolled back" for name in self.rolled_back]
        parts += [f"{name}: failed while running the probe, reverted" for name in self.failed_at_run_time]
        detail = f"probe: {self.probe.description}; " + "; ".join(parts) if parts else "no pass was applied"
        status: Literal["passed", "rolled back", "not run"] = (
            "rolled back" if self.rolled_back or self.failed_at_run_time else "passed")
        if not parts:
            status = "not run"
        return plan.with_verification(status, detail)
