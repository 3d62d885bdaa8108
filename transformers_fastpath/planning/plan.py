"""The plan: every setting with its value, source and reason, and every optimization's status.

A :class:`Plan` is immutable. Plugins shape it while it is resolved through a
:class:`PlanBuilder` (the ``fastpath_resolve_plan`` hook); what runs later (passes, the
pipeline) only reads it, and records outcomes by deriving a new Plan.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .hardware import Hardware
    from .model_info import ModelInfo
    from .policy import Policy

__all__ = ["SOURCE_ARGUMENT", "SOURCE_DEFAULT", "Decision", "PassStatus", "Plan", "PlanBuilder", "Verification"]

SOURCE_DEFAULT = "built-in default"
SOURCE_ARGUMENT = "call argument"

Status = Literal["planned", "applied", "skipped", "off", "failed", "reverted"]


@dataclass(frozen=True)
class Decision:
    """One setting: its value, who decided it, and why (empty when the value was given as is)."""

    key: str
    value: Any
    source: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": _json_safe(self.value), "source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class PassStatus:
    """What happens (or happened) to one optimization pass on this model."""

    name: str
    status: Status
    reason: str = ""
    source: str = SOURCE_DEFAULT

    @property
    def will_run(self) -> bool:
        return self.status in ("planned", "applied")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "source": self.source}


@dataclass(frozen=True)
class Verification:
    """The outcome of the ``verify`` step (a probe batch through the converted and the original model).

    Attributes:
        status: ``"passed"`` (every applied pass matched), ``"rolled back"`` (at least one pass
            did not match and was rolled back; the others matched) or ``"not run"``.
        detail: what was compared and the largest difference, or why it did not run.
    """

    status: Literal["passed", "rolled back", "not run"]
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Plan:
    """What transformers-fastpath does to one model on one hardware, and why.

    ``str(plan)`` is a human table; ``plan.to_dict()`` is JSON-safe.
    """

    model: ModelInfo
    hardware: Hardware
    policy_source: str
    settings: Mapping[str, Decision]
    passes: tuple[PassStatus, ...] = ()
    load_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    notes: tuple[str, ...] = ()
    verification: Verification | None = None

    # -- reading ----------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.settings[key].value

    def get(self, key: str, default: Any = None) -> Any:
        decision = self.settings.get(key)
        return default if decision is None else decision.value

    def pass_status(self, name: str) -> PassStatus | None:
        return next((p for p in self.passes if p.name == name), None)

    @property
    def strict(self) -> bool:
        return bool(self.get("strict", False))

    # -- deriving ---------------------------------------------------------------
    def with_pass_status(self, name: str, status: Status, reason: str = "") -> Plan:
        """A copy where pass ``name`` has a new status (the source is kept)."""
        updated = tuple(
            dataclasses.replace(p, status=status, reason=reason) if p.name == name else p for p in self.passes
        )
        return dataclasses.replace(self, passes=updated)

    def with_verification(self, status: Literal["passed", "rolled back", "not run"], detail: str = "") -> Plan:
        """A copy that records the outcome of the ``verify`` step."""
        return dataclasses.replace(self, verification=Verification(status, detail))

    def with_task(self, task: str | None) -> Plan:
        from .model_info import _with_task

        return self if task is None or task == self.model.task else dataclasses.replace(
            self, model=_with_task(self.model, task))

    # -- showing ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "policy": self.policy_source,
            "settings": {k: d.to_dict() for k, d in self.settings.items()},
            "passes": [p.to_dict() for p in self.passes],
            "load_kwargs": {k: _json_safe(v) for k, v in self.load_kwargs.items()},
            "notes": list(self.notes),
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        info = self.model
        params = f", {_human_count(info.num_params)} parameters" if info.num_params else ""
        arch = f" ({', '.join(info.architectures)})" if info.architectures else ""
        lines = [
            f"transformers-fastpath plan for {info.name}{arch}",
            f"  model type: {info.model_type}{params}" + (f", task: {info.task}" if info.task else ""),
            f"  hardware:   {self.hardware.describe()}",
            f"  policy:     {self.policy_source}",
            "",
        ]
        rows = [(d.key, _show(d.value), d.source, d.reason) for d in self.settings.values()]
        lines += _table(("setting", "value", "source", "reason"), rows)
        if self.passes:
            lines.append("")
            rows = [(p.name, p.status, p.source, p.reason) for p in self.passes]
            lines += _table(("optimization", "status", "source", "reason"), rows)
        if self.load_kwargs:
            lines.append("")
            lines.append("from_pretrained kwargs: " + ", ".join(
                f"{k}={_show(v)}" for k, v in self.load_kwargs.items()))
        if self.verification is not None:
            v = self.verification
            lines.append(f"verify: {v.status}" + (f" ({v.detail})" if v.detail else ""))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.settings.values())

    def __copy__(self) -> Plan:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Plan:
        # Immutable (and its MappingProxyType fields cannot be deep-copied): copy.deepcopy(model)
        # of a fastpath model shares the plan instead of failing.
        return self

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # pickle / torch.save of a fastpath model: the read-only mappings travel as dicts.
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["settings"], state["load_kwargs"] = dict(self.settings), dict(self.load_kwargs)
        return _unpickle_plan, (state,)


def _unpickle_plan(state: dict[str, Any]) -> Plan:
    state["settings"] = MappingProxyType(state["settings"])
    state["load_kwargs"] = MappingProxyType(state["load_kwargs"])
    return Plan(**state)


class PlanBuilder:
    """The mutable plan that ``fastpath_resolve_plan`` hook implementations shape.

    Attributes:
        model: facts about the model (:class:`ModelInfo`).
        hardware: the :class:`Hardware` the plan is for.
        policy: the :class:`Policy` in force.
        call_kwargs: the keyword arguments the caller passed to ``from_pretrained`` /
            ``pipeline`` (read-only; empty for ``explain``), to reject combinations that
            transformers forbids (``device_map`` with ``tp_plan``...).
    """

    def __init__(self, model: ModelInfo, hardware: Hardware, policy: Policy,
                 call_kwargs: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.hardware = hardware
        self.policy = policy
        self.call_kwargs: Mapping[str, Any] = MappingProxyType(dict(call_kwargs or {}))
        self._settings: dict[str, Decision] = {}
        self._passes: dict[str, PassStatus] = {}
        self._notes: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        decision = self._settings.get(key)
        return default if decision is None else decision.value

    def decision(self, key: str) -> Decision | None:
        return self._settings.get(key)

    def decisions(self) -> list[Decision]:
        return list(self._settings.values())

    def set(self, key: str, value: Any, *, reason: str = "", source: str | None = None) -> None:
        """Set ``key``. Without ``source`` the previous decision's source is kept (resolving ``auto``)."""
        previous = self._settings.get(key)
        if source is None:
            source = previous.source if previous is not None else "plugin"
        self._settings[key] = Decision(key, value, source, reason)

    def is_auto(self, key: str) -> bool:
        return self.get(key) == "auto"

    def pass_status(self, name: str) -> PassStatus | None:
        return self._passes.get(name)

    def set_pass(self, name: str, status: Status, reason: str = "", *, source: str | None = None) -> None:
        previous = self._passes.get(name)
        if source is None:
            source = previous.source if previous is not None else SOURCE_DEFAULT
        self._passes[name] = PassStatus(name, status, reason, source)

    def skip(self, pass_name: str, reason: str, *, source: str | None = None) -> None:
        """Mark a pass as not running, with the reason ``explain`` shows."""
        self.set_pass(pass_name, "skipped", reason, source=source)

    def note(self, text: str) -> None:
        self._notes.append(text)

    @property
    def strict(self) -> bool:
        return bool(self.get("strict", False))

    def build(self, load_kwargs: Mapping[str, Any] | None = None) -> Plan:
        return Plan(
            model=self.model,
            hardware=self.hardware,
            policy_source=self.policy.source,
            settings=MappingProxyType(dict(self._settings)),
            passes=tuple(self._passes.values()),
            load_kwargs=MappingProxyType(dict(load_kwargs or {})),
            notes=tuple(self._notes),
        )


# -- formatting helpers -------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return _show(value)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    text = str(value)
    if "\n" in text:  # transformers config objects (BitsAndBytesConfig...) print as multi-line JSON
        fields = _non_default_fields(value)
        if isinstance(fields, Mapping):
            shown = ", ".join(f"{k}={_show(v)}" for k, v in fields.items() if not str(k).startswith("_"))
            return f"{type(value).__name__}({shown})"
        return " ".join(text.split())
    return text[len("torch."):] if text.startswith("torch.") else text


def _non_default_fields(value: Any) -> Mapping[str, Any] | None:
    """A config object's fields that differ from its defaults (``to_diff_dict``, or ``to_dict``
    compared with a default instance), or None when it has neither."""
    diff = getattr(value, "to_diff_dict", None)
    if callable(diff):
        return diff()
    to_dict = getattr(value, "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        defaults = type(value)().to_dict()
    except Exception:
        return to_dict()
    return {k: v for k, v in to_dict().items() if defaults.get(k, object()) != v}


def _human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    out = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths)]
        out.append(("  " + "  ".join(cells) + ("  " + str(row[-1]) if row[-1] else "")).rstrip())
    out.insert(1, "  " + "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return out
