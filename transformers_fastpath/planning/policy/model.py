"""The validated, immutable policy: defaults plus ordered rules, and how rules match."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ...errors import PolicyError
from .schema import MATCH_KEYS, SETTINGS, Invalid

if TYPE_CHECKING:
    from ..hardware import Hardware
    from ..model_info import ModelInfo

__all__ = ["Policy", "Rule", "Match"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Match:
    """The conditions of a rule; every key given must hold (logical AND)."""

    conditions: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def failed_condition(self, info: ModelInfo | None, hardware: Hardware) -> str | None:
        """Return the first condition that does not hold (as text), or None when all hold.

        Model conditions cannot hold when the model is unknown (``info`` is None), and a
        parameter bound cannot hold when the parameter count is unknown.
        """
        c = self.conditions
        model_type = info.model_type if info else None
        if "model_type" in c and model_type not in c["model_type"]:
            return f"model_type {model_type!r} not in {list(c['model_type'])}"
        if "architecture" in c and not (info and set(info.architectures) & set(c["architecture"])):
            return f"architecture not in {list(c['architecture'])}"
        task = info.task if info else None
        if "task" in c and task not in c["task"]:
            return f"task {task!r} not in {list(c['task'])}"
        params = info.num_params if info else None
        if "min_params" in c and (params is None or params < c["min_params"]):
            return f"parameters {params} < {c['min_params']}"
        if "max_params" in c and (params is None or params > c["max_params"]):
            return f"parameters {params} > {c['max_params']}"
        if "device" in c and hardware.device not in c["device"]:
            return f"device {hardware.device!r} not in {list(c['device'])}"
        count = hardware.count if hardware.is_gpu else 0
        if "min_device_count" in c and count < c["min_device_count"]:
            return f"device count {count} < {c['min_device_count']}"
        if "max_device_count" in c and count > c["max_device_count"]:
            return f"device count {count} > {c['max_device_count']}"
        memory = hardware.memory_gib
        if "min_device_memory" in c and (memory is None or memory < c["min_device_memory"]):
            return f"device memory {memory} GiB < {c['min_device_memory']} GiB"
        if "max_device_memory" in c and (memory is None or memory > c["max_device_memory"]):
            return f"device memory {memory} GiB > {c['max_device_memory']} GiB"
        return None


@dataclass(frozen=True)
class Rule:
    """One ``[[rules]]`` entry: a name, a match and the settings it applies when it matches."""

    index: int
    name: str | None
    match: Match
    settings: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"rule #{self.index}" + (f" {self.name!r}" if self.name else "")


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build one with :func:`transformers_fastpath.load_policy`.

    ``source`` names where it came from (a file path, ``<dict>``, ``built-in default``);
    plans cite it for every decision the policy made.
    """

    defaults: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    rules: tuple[Rule, ...] = ()
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Policy:
        """Validate a mapping shaped like the TOML file; raises :class:`PolicyError`."""
        if not isinstance(data, Mapping):
            raise PolicyError("a policy must be a table (dict)", source=source, value=type(data).__name__)
        for key in data:
            if key not in ("defaults", "rules"):
                if key in SETTINGS:
                    raise PolicyError(f"setting {key!r} must live under [defaults] or a [[rules]] entry",
                                      source=source, key=key, allowed=("defaults", "rules"))
                raise PolicyError("unknown top-level key", source=source, key=key, allowed=("defaults", "rules"))
        raw_defaults = data.get("defaults", {})
        if not isinstance(raw_defaults, Mapping):
            raise PolicyError("[defaults] must be a table", source=source, key="defaults",
                              value=raw_defaults)
        defaults = _validate_settings(raw_defaults, source=source, rule=None)
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list):
            raise PolicyError("'rules' must be an array of tables ([[rules]])", source=source, key="rules",
                              value=raw_rules)
        rules = tuple(_validate_rule(i, r, source) for i, r in enumerate(raw_rules))
        return cls(defaults=defaults, rules=rules, source=source)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "defaults": {k: plain(v) for k, v in self.defaults.items()},
            "rules": [
                {"name": r.name, "match": {k: plain(v) for k, v in r.match.conditions.items()},
                 **{k: plain(v) for k, v in r.settings.items()}}
                for r in self.rules
            ],
        }


def _validate_settings(raw: Mapping[str, Any], *, source: str,
                       rule: tuple[int, str | None] | None) -> Mapping[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        setting = SETTINGS.get(key)
        if setting is None:
            raise PolicyError("unknown setting", source=source, rule=rule, key=str(key),
                              allowed=sorted(SETTINGS))
        try:
            out[key] = setting.validate(value)
        except Invalid as exc:
            raise PolicyError(exc.problem, source=source, rule=rule, key=key, value=value,
                              allowed=exc.allowed) from None
    return MappingProxyType(out)


def _validate_rule(index: int, raw: Any, source: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError("each rule must be a table", source=source, rule=(index, None), value=raw)
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError("rule name must be a string", source=source, rule=(index, None), key="name",
                          value=name)
    where = (index, name)
    if "match" not in raw:
        raise PolicyError("rule has no 'match' table (use match = {} to match every model)",
                          source=source, rule=where, key="match")
    raw_match = raw["match"]
    if not isinstance(raw_match, Mapping):
        raise PolicyError("'match' must be a table", source=source, rule=where, key="match", value=raw_match)
    conditions: dict[str, Any] = {}
    for key, value in raw_match.items():
        if key not in MATCH_KEYS:
            raise PolicyError("unknown match condition", source=source, rule=where, key=f"match.{key}",
                              allowed=sorted(MATCH_KEYS))
        validate, _ = MATCH_KEYS[key]
        try:
            conditions[key] = validate(value)
        except Invalid as exc:
            raise PolicyError(exc.problem, source=source, rule=where, key=f"match.{key}", value=value,
                              allowed=exc.allowed) from None
    for low, high in (("min_params", "max_params"), ("min_device_count", "max_device_count"),
                      ("min_device_memory", "max_device_memory")):
        if low in conditions and high in conditions and conditions[low] > conditions[high]:
            raise PolicyError(f"{low} is greater than {high}; the rule could never match",
                              source=source, rule=where, key=f"match.{low}", value=raw_match[low])
    settings_raw = {k: v for k, v in raw.items() if k not in ("name", "match")}
    if not settings_raw:
        raise PolicyError("rule sets nothing (add a setting such as dtype = 'bfloat16')",
                          source=source, rule=where, allowed=sorted(SETTINGS))
    settings = _validate_settings(settings_raw, source=source, rule=where)
    return Rule(index=index, name=name, match=Match(MappingProxyType(conditions)), settings=settings)
