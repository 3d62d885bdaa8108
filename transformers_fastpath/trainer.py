"""``FastpathCallback``: fine-tune with the fast path; every checkpoint is canonical.

The callback converts the transformers model a :class:`transformers.Trainer` trains (under
accelerate, ``torch.compile`` and PEFT wrappers, or inside a user's container module) with the
training-safe part of its plan:

* the optimization passes (a pass without backward, like the fused encoder, runs the original
  computation per call while training or autograd is on, and the fast one under evaluation);
* the attention kernel, where transformers can switch it on a loaded model
  (``PreTrainedModel.set_attn_implementation``).

It never changes what the Trainer manages: dtype (mixed precision belongs to
``TrainingArguments``), quantization, placement and device. The plan attached to the model
(:func:`transformers_fastpath.plan_of`) says what was applied, what was left alone and why.

Saving needs no event: ``PreTrainedModel.save_pretrained`` is wrapped (``canonical_for_save``)
and a model converted by a pass that changes its state_dict carries ``state_dict`` /
``load_state_dict`` hooks (``passes/runner.py``), so every Trainer save and load path sees
canonical weights. See ``docs/trainer.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from .errors import FastpathError
from .passes.runner import PLAN_ATTR, apply_plan, canonical_for_save, revert_model
from .planning.plan import Decision, Plan
from .planning.policy import PolicyLike, load_policy
from .plugins import get_passes

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, TrainerControl, TrainerState, TrainingArguments

    from .passes.base import Pass
    from .planning.hardware import Hardware

__all__ = ["FastpathCallback", "CALLBACK_SOURCE", "trained_transformers_models"]

logger = logging.getLogger(__name__)

CALLBACK_SOURCE = "FastpathCallback"

# Settings that act when weights are loaded: on a model the Trainer already manages they stay as they are.
_LOAD_TIME_SETTINGS: dict[str, str] = {
    "dtype": "the Trainer manages the dtype; mixed precision belongs to TrainingArguments (bf16=/fp16=)",
    "quantization": "quantization is chosen when weights are loaded (from_pretrained(..., fastpath=...))",
    "placement": "the Trainer (accelerate) places the model",
    "device": "the Trainer moves the model to TrainingArguments.device",
}


class FastpathCallback(TrainerCallback):
    """A Trainer callback that trains and evaluates with fastpath's training-safe optimizations.

    Add it to any :class:`transformers.Trainer`::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[fp.FastpathCallback()])

    The model is converted when the Trainer is built (``on_init_end``, so ``evaluate()`` and
    ``predict()`` are fast too) or, for a callback added later, when training begins
    (``on_train_begin``). A model that already has a plan (loaded with fastpath) keeps it.
    Checkpoints, ``trainer.save_model()`` and what ``push_to_hub`` uploads hold the weights of
    the same model never converted.

    Args:
        policy: the same values as :func:`transformers_fastpath.load_policy` (a Policy, dict,
            TOML path, or None for the discovery order). Validated here, so a bad policy fails
            before training starts.
    """

    def __init__(self, policy: PolicyLike = None) -> None:
        self.policy = load_policy(policy)
        self._watched: list[tuple[nn.Module, frozenset[int]]] = []

    # -- Trainer events ------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        """Convert the model as soon as the Trainer holds it (evaluation-only use is fast too)."""
        if model is not None:
            self.prepare(model, args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        """Convert the model if that has not happened yet (``model_init``, ``add_callback``), and
        remember its parameters: saves re-apply passes, which must not replace what the optimizer holds."""
        if model is None:
            return
        targets = self.prepare(model, args)
        self._watched = [(t, _parameter_ids(t)) for t in targets if _changes_state_dict_applied(t)]

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """After a checkpoint: check that re-applying passes kept the parameters the optimizer trains."""
        for target, before in self._watched:
            if _parameter_ids(target) != before:
                applied = [p.name for p in (getattr(target, PLAN_ATTR).passes) if p.status == "applied"]
                raise FastpathError(
                    f"FastpathCallback: after the checkpoint at step {state.global_step}, {type(target).__name__} "
                    f"has different parameter objects than when training began; a pass re-applied after the "
                    f"save ({', '.join(applied)}) re-created them, so the optimizer would stop training them. "
                    "Fix the pass's apply() to reuse the model's parameters, or turn it off in the policy.")

    # -- conversion ----------------------------------------------------------------------
    def prepare(self, model: nn.Module, args: TrainingArguments | None = None) -> list[PreTrainedModel]:
        """Convert every transformers model inside ``model`` that has no plan yet; return them all.

        Idempotent: a model with a plan (from this callback or from a fastpath load) is kept as is.
        """
        targets = trained_transformers_models(model)
        if not targets:
            logger.warning("FastpathCallback: found no transformers PreTrainedModel in %s; nothing converted",
                           type(model).__name__)
        for target in targets:
            existing: Plan | None = getattr(target, PLAN_ATTR, None)
            if existing is not None:
                logger.debug("FastpathCallback: %s already has a fastpath plan; keeping it", type(target).__name__)
                _warn_half_precision_load(target, existing)
                continue
            self._convert(target, args)
        if targets:
            _make_wrapper_saves_canonical(_unwrap_parallel(model))
        return targets

    def _convert(self, model: PreTrainedModel, args: TrainingArguments | None) -> Plan:
        from .planning.resolution import resolve

        # The model's real dtype is passed like a caller's argument so that the attention choice
        # (flash attention wants half precision) follows the weights the Trainer will train.
        plan = resolve(model, policy=self.policy, hardware=_hardware_for(args),
                       call_kwargs={"dtype": model.dtype})
        plan = _training_plan(plan, args)
        plan = _switch_attention(model, plan)
        before = _parameter_ids(model)
        plan = apply_plan(model, plan)
        if _parameter_ids(model) != before:
            plan = _undo_parameter_changes(model, plan)
        _log_outcome(model, plan)
        return plan


# -- finding the model -------------------------------------------------------------------

def trained_transformers_models(model: nn.Module) -> list[PreTrainedModel]:
    """The transformers models inside what a Trainer holds, outermost first.

    Unwraps accelerate/torch containers (DDP, ``torch.compile``...) and PEFT
    (``get_base_model()``), then finds the outermost ``PreTrainedModel`` s of a user's module.
    """
    from transformers import PreTrainedModel

    model = _unwrap_parallel(model)
    get_base_model = getattr(model, "get_base_model", None)
    if not isinstance(model, PreTrainedModel) and callable(get_base_model):
        model = get_base_model()
    return _outermost(model, PreTrainedModel)


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _make_wrapper_saves_canonical(model: nn.Module) -> None:
    """Give a wrapper with its own ``save_pretrained`` (PEFT) canonical saves, on this instance only.

    peft's ``save_pretrained`` is not ``PreTrainedModel.save_pretrained``, and it picks the adapter
    entries by walking the live module tree, so the state_dict hooks alone do not make it
    canonical: the whole save must see the reverted model.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) or not callable(getattr(type(model), "save_pretrained", None)):
        return
    current = model.__dict__.get("save_pretrained")
    if getattr(current, "__func__", None) is _canonical_wrapper_save:
        return
    # A bound method (not a closure) so that copy.deepcopy binds it to the copy.
    object.__setattr__(model, "save_pretrained", types.MethodType(_canonical_wrapper_save, model))


def _canonical_wrapper_save(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a wrapper (a PEFT model) with every converted model inside it canonical."""
    with contextlib.ExitStack() as stack:
        for target in trained_transformers_models(self):
            if getattr(target, PLAN_ATTR, None) is not None:
                stack.enter_context(canonical_for_save(target, str(save_directory)))
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def _outermost(module: nn.Module, cls: type) -> list[Any]:
    if isinstance(module, cls):
        return [module]
    found: list[Any] = []
    for child in module.children():
        found.extend(_outermost(child, cls))
    return found


# -- shaping the plan for training -----------------------------------------------------------

def _training_plan(plan: Plan, args: TrainingArguments | None) -> Plan:
    """Load-time settings become ``keep``; passes that cannot run under this Trainer are skipped."""
    settings = dict(plan.settings)
    for key, why in _LOAD_TIME_SETTINGS.items():
        if key in settings:
            settings[key] = Decision(key, "keep", CALLBACK_SOURCE, f"left alone: {why}")
    plan = dataclasses.replace(plan, settings=settings, notes=(*plan.notes, (
        "FastpathCallback: dtype, quantization, placement and device are left as the Trainer has them; "
        "only passes and the attention kernel are applied to a model in training")))
    registry = {p.name: p for p in get_passes()}
    for status in plan.passes:
        pass_ = registry.get(status.name)
        if status.status != "planned" or pass_ is None:
            continue
        reason = _training_veto(pass_, args)
        if reason is not None:
            plan = plan.with_pass_status(status.name, "skipped", reason)
            plan = dataclasses.replace(plan, notes=(*plan.notes, f"FastpathCallback: {status.name} left off: {reason}"))
    return plan


def _training_veto(pass_: Pass, args: TrainingArguments | None) -> str | None:
    """Why a planned pass must not run on a model in training, or None."""
    if getattr(pass_, "training_safe", True) is False:
        return "the pass declares itself not training-safe (training_safe = False)"
    if pass_.changes_state_dict and args is not None and _gathers_state_dict_itself(args):
        return ("it changes the state_dict, and DeepSpeed/FSDP gather checkpoint weights without torch's "
                "state_dict hooks, so its checkpoints could not be made canonical")
    return None


def _gathers_state_dict_itself(args: TrainingArguments) -> bool:
    return bool(getattr(args, "deepspeed", None)) or bool(getattr(args, "fsdp", None))


def _hardware_for(args: TrainingArguments | None) -> Hardware:
    """This machine, or a CPU when the Trainer trains on the CPU of a machine with a GPU (``use_cpu``)."""
    from .planning.hardware import Hardware

    detected = Hardware.detect()
    if args is None or detected.device == "cpu" or args.device.type != "cpu":
        return detected
    return Hardware(device="cpu", cpu_count=detected.cpu_count)


def _switch_attention(model: PreTrainedModel, plan: Plan) -> Plan:
    """Set the plan's attention kernel on the loaded model where transformers allows it."""
    wanted = plan.get("attn_implementation")
    current = getattr(model.config, "_attn_implementation", None)
    if wanted in (None, "auto", "keep") or wanted == current:
        return plan
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        why = "this transformers version has no set_attn_implementation; the kernel is chosen at load time"
    else:
        try:
            setter(wanted)
        except Exception as exc:  # transformers raises ValueError/ImportError for kernels it cannot use here
            why = f"set_attn_implementation({wanted!r}) raised {type(exc).__name__}: {exc}"
        else:
            now = getattr(model.config, "_attn_implementation", None)
            if now == wanted:
                logger.info("FastpathCallback: attention switched from %s to %s", current, wanted)
                return _with_decision(plan, "attn_implementation", wanted,
                                      f"switched from {current} on the loaded model (set_attn_implementation)")
            why = f"{type(model).__name__} cannot switch its attention on a loaded model (it kept {now})"
    logger.warning("FastpathCallback: attention kernel %s not applied, %s kept: %s", wanted, current, why)
    return _with_decision(plan, "attn_implementation", current, f"kept; wanted {wanted} but {why}")


def _with_decision(plan: Plan, key: str, value: Any, reason: str) -> Plan:
    settings = dict(plan.settings)
    settings[key] = Decision(key, value, CALLBACK_SOURCE, reason)
    return dataclasses.replace(plan, settings=settings)


def _warn_half_precision_load(model: nn.Module, plan: Plan) -> None:
    """A fastpath load may have chosen half-precision weights (dtype = auto on a GPU): say so."""
    decision = plan.settings.get("dtype")
    if decision is None or decision.value not in ("float16", "bfloat16") or decision.source == "call argument":
        return
    logger.warning(
        "FastpathCallback: %s was loaded by fastpath in %s (%s: %s), so the Trainer trains %s weights without "
        "a float32 master copy. For fine-tuning, load with dtype=torch.float32 (mixed precision comes from "
        "TrainingArguments(bf16=True)) or set dtype = \"keep\" in the policy.",
        type(model).__name__, decision.value, decision.source, decision.reason or "policy", decision.value)


# -- parameters the optimizer holds ---------------------------------------------------------

def _parameter_ids(model: nn.Module) -> frozenset[int]:
    return frozenset(id(p) for p in model.parameters())


def _changes_state_dict_applied(model: nn.Module) -> bool:
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    if plan is None:
        return False
    registry = {p.name: p for p in get_passes()}
    return any(s.status == "applied" and s.name in registry and registry[s.name].changes_state_dict
               for s in plan.passes)


def _undo_parameter_changes(model: nn.Module, plan: Plan) -> Plan:
    """Passes that replaced parameters are unsafe in training (the optimizer may hold the old ones,
    and saves re-apply them): revert everything and say why."""
    applied = [p.name for p in plan.passes if p.status == "applied"]
    revert_model(model)
    plan = getattr(model, PLAN_ATTR)
    reason = (f"reverted: applying {', '.join(applied)} re-created model parameters, but in training the "
              "optimizer holds the originals (and every save re-applies the passes)")
    for name in applied:
        plan = plan.with_pass_status(name, "failed", reason)
    logger.warning("FastpathCallback: reverted %s on %s: %s", ", ".join(applied), type(model).__name__, reason)
    object.__setattr__(model, PLAN_ATTR, plan)
    return plan


def _log_outcome(model: nn.Module, plan: Plan) -> None:
    applied = [p.name for p in plan.passes if p.status == "applied"]
    others = [f"{p.name} ({p.status}: {p.reason})" for p in plan.passes if p.status != "applied"]
    logger.info("FastpathCallback: %s: applied %s; not applied %s; attention %s", type(model).__name__,
                ", ".join(applied) or "nothing", "; ".join(others) or "none", plan.get("attn_implementation"))
