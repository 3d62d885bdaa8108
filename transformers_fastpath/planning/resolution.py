"""``resolve``: Request x Policy x Hardware -> Plan.

Layers, lowest first: setting defaults < plugin defaults < plugin rules < policy ``[defaults]``
< matching policy rules (in file order) < call arguments. Then the ``fastpath_resolve_plan``
hooks turn ``auto`` into concrete values, the passes say whether they support the model, and
the ``fastpath_load_kwargs`` hooks compute what ``from_pretrained`` will receive.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ..plugins import get_passes, get_plugin_manager
from .hardware import Hardware
from .model_info import ModelInfo
from .plan import SOURCE_ARGUMENT, SOURCE_DEFAULT, Plan, PlanBuilder, _show
from .policy import SETTINGS, Policy, PolicyLike, load_policy
from .policy.schema import DTYPES

__all__ = ["resolve", "CALL_KWARG_SETTINGS"]

# from_pretrained / pipeline arguments that, when the caller passes them, decide a setting.
CALL_KWARG_SETTINGS: dict[str, str] = {
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "attn_implementation": "attn_implementation",
    "quantization_config": "quantization",
    "device_map": "placement",
    "tp_plan": "placement",
    "distributed_config": "placement",
    "device": "device",
    "batch_size": "batch_size",
}


def resolve(
    model_or_path_or_config: Any,
    task: str | None = None,
    policy: PolicyLike = None,
    hardware: Hardware | None = None,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
) -> Plan:
    """Decide what fastpath does to a model, without loading weights.

    Args:
        model_or_path_or_config: a loaded model, a ``PretrainedConfig``, a local directory or
            Hub id (only its config is read), or a :class:`ModelInfo`.
        task: the pipeline task, when there is one (rules can match on it).
        policy: a Policy, dict, TOML path, or None for the discovery order.
        hardware: what to plan for; ``Hardware.detect()`` when None.
        call_kwargs: keyword arguments the caller passed to ``from_pretrained`` / ``pipeline``;
            the settings they decide are marked ``call argument`` and not overridden.

    Returns:
        An immutable :class:`Plan`.
    """
    policy = load_policy(policy)
    hardware = hardware or Hardware.detect()
    info = ModelInfo.of(model_or_path_or_config, task=task)
    pm = get_plugin_manager()
    builder = PlanBuilder(info, hardware, policy, call_kwargs=call_kwargs)

    for key, setting in SETTINGS.items():
        builder.set(key, setting.default, source=SOURCE_DEFAULT)
    _apply_plugin_layers(builder, pm, hardware)
    for key, value in policy.defaults.items():
        builder.set(key, value, source=f"{policy.source} [defaults]")
    _warn_unknown_rule_tasks(policy)
    for rule in policy.rules:
        if rule.match.failed_condition(info, hardware) is None:
            for key, value in rule.settings.items():
                builder.set(key, value, source=f"{policy.source} {rule.label}")
    from_pipeline_default = bool(call_kwargs and call_kwargs.get("_from_pipeline"))
    for kwarg, key in CALL_KWARG_SETTINGS.items():
        value = (call_kwargs or {}).get(kwarg)
        if value is not None and not (from_pipeline_default and value == "auto"):
            builder.set(key, _as_setting_value(key, value, hardware), reason=f"caller passed {kwarg}={_show(value)}",
                        source=SOURCE_ARGUMENT)

    pm.hook.fastpath_resolve_plan(plan=builder)
    _plan_passes(builder)

    for decision in builder.decisions():
        if decision.value == "auto":
            builder.set(decision.key, "auto", reason="no installed plugin acts on this setting yet")

    draft = builder.build()
    load_kwargs: dict[str, Any] = {}
    pm.hook.fastpath_load_kwargs(plan=draft, kwargs=load_kwargs)
    return builder.build(load_kwargs)


def _as_setting_value(key: str, value: Any, hardware: Hardware) -> Any:
    """A caller's argument as the plan shows it: the value itself when it is one the policy
    could have chosen (so later decisions can use it), else ``keep``."""
    if key == "dtype":
        text = str(value).removeprefix("torch.")
        return text if text in DTYPES else "keep"
    if key == "batch_size" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if key == "attn_implementation" and isinstance(value, str):
        return value
    if key == "device":
        return _device_setting(value, hardware)
    return "keep"


def _device_setting(value: Any, hardware: Hardware) -> str:
    """A pipeline's ``device=`` (``0``, ``-1``, ``"cuda:1"``, ``torch.device``) as a ``device`` value."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0 or hardware.device == "cpu":
            return "cpu"
        return f"{hardware.device}:{value}"
    if isinstance(value, str) or type(value).__name__ == "device":  # torch.device, without importing torch
        return str(value)
    return "keep"


def _plan_passes(builder: PlanBuilder) -> None:
    """Each registered pass: off by its setting, vetoed by a hook, unsupported, or planned.

    A pass setting left at ``auto`` becomes True/False here, citing the pass's own verdict.
    """
    for pass_ in get_passes():
        decision = builder.decision(pass_.setting)
        enabled = decision.value if decision else "auto"
        source = decision.source if decision else SOURCE_DEFAULT
        vetoed = builder.pass_status(pass_.name)
        if enabled is False:
            builder.set_pass(pass_.name, "off", f"{pass_.setting} = false", source=source)
            continue
        if vetoed is not None:  # a fastpath_resolve_plan hook already decided (e.g. skipped it)
            reason = vetoed.reason
        else:
            reason = pass_.supports(builder.model, builder)
            if reason is None:
                builder.set_pass(pass_.name, "planned", source=source)
            else:
                builder.set_pass(pass_.name, "skipped", reason, source=source)
        if enabled == "auto":
            on = builder.pass_status(pass_.name).will_run
            builder.set(pass_.setting, on, reason=f"auto: {pass_.name} " + ("runs" if on else f"skipped: {reason}"))


def _apply_plugin_layers(builder: PlanBuilder, pm: Any, hardware: Hardware) -> None:
    """Plugin defaults, then plugin rules, each validated like a policy file and cited by plugin."""
    for impl, result in _results_with_plugin(pm.hook.fastpath_policy_defaults, hardware=hardware):
        if not result:
            continue
        source = f"plugin {impl}"
        layer = Policy.from_dict({"defaults": dict(result)}, source=source)
        for key, value in layer.defaults.items():
            builder.set(key, value, source=source if impl not in _BUILTIN_SOURCES else SOURCE_DEFAULT)
    for impl, result in _results_with_plugin(pm.hook.fastpath_policy_rules, hardware=hardware):
        if not result:
            continue
        layer = Policy.from_dict({"rules": list(result)}, source=f"plugin {impl}")
        for rule in layer.rules:
            if rule.match.failed_condition(builder.model, hardware) is None:
                for key, value in rule.settings.items():
                    builder.set(key, value, source=f"plugin {impl} {rule.label}")


_BUILTIN_SOURCES = {"transformers_fastpath.builtin.defaults"}


def _results_with_plugin(hook: Any, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call a hook implementation by implementation, oldest registered first, keeping its plugin name."""
    out = []
    for impl in hook.get_hookimpls():  # pluggy lists them in call-order reversed: oldest first
        result = impl.function(**{name: kwargs[name] for name in impl.argnames})
        out.append((impl.plugin_name, result))
    return out


_warned_rule_tasks: set[tuple[str, str, str]] = set()


def _warn_unknown_rule_tasks(policy: Policy) -> None:
    """A rule that matches a task transformers does not know (a typo such as ``text-clasification``)
    can never match: warn once per policy, rule and task, with the close match."""
    for rule in policy.rules:
        tasks = rule.match.conditions.get("task")
        for task in (tasks,) if isinstance(tasks, str) else tasks or ():
            key = (policy.source, rule.label, task)
            if key in _warned_rule_tasks:
                continue
            from .tasks import unknown_task

            problem = unknown_task(task, where=f"{policy.source} {rule.label}: match task")
            _warned_rule_tasks.add(key)
            if problem is not None:
                warnings.warn(f"transformers-fastpath: {problem}; this rule never matches. Fix the task name.",
                              UserWarning, stacklevel=3)
