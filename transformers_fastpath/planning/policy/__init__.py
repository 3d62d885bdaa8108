"""Declarative policy: defaults plus ordered rules, loaded from TOML, a dict or pyproject.toml."""

from ...errors import PolicyError
from .loading import ENV_POLICY, ENV_SWITCH, PolicyLike, discover_policy_source, load_policy
from .model import Match, Policy, Rule
from .schema import MATCH_KEYS, SETTINGS, parse_count, parse_memory_gib

__all__ = [
    "ENV_POLICY",
    "ENV_SWITCH",
    "MATCH_KEYS",
    "Match",
    "Policy",
    "PolicyError",
    "PolicyLike",
    "Rule",
    "SETTINGS",
    "discover_policy_source",
    "load_policy",
    "parse_count",
    "parse_memory_gib",
]
