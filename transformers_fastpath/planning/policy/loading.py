"""Finding and reading policies: TOML files, pyproject.toml, dicts, and the discovery order."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from ...errors import PolicyError
from .model import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["load_policy", "PolicyLike", "discover_policy_source", "ENV_POLICY", "ENV_SWITCH"]

PolicyLike = Union[Policy, Mapping[str, Any], str, os.PathLike, bool, None]

ENV_POLICY = "TRANSFORMERS_FASTPATH_POLICY"
ENV_SWITCH = "TRANSFORMERS_FASTPATH"
PYPROJECT_TABLE = "transformers-fastpath"
_SWITCH_ON = ("1", "true", "yes", "on")
_SWITCH_OFF = ("", "0", "false", "no", "off")

BUILTIN = Policy(source="built-in default")


def load_policy(policy: PolicyLike = None) -> Policy:
    """Return a validated :class:`Policy`.

    Args:
        policy: a ``Policy`` (returned as is), a dict shaped like the TOML file, a path to a
            TOML file (``fastpath.toml`` or a ``pyproject.toml`` with a
            ``[tool.transformers-fastpath]`` table), or ``None``/``True`` to discover one:
            ``TRANSFORMERS_FASTPATH_POLICY`` > ``TRANSFORMERS_FASTPATH=<path>`` >
            ``./fastpath.toml`` > ``./pyproject.toml`` > the built-in default.

    Raises:
        PolicyError: the policy is invalid; the message names the file, rule, key and value.
    """
    if isinstance(policy, Policy):
        return policy
    if policy is None or policy is True:
        found = discover_policy_source()
        return BUILTIN if found is None else _load_file(found)
    if policy is False:
        raise PolicyError("fastpath=False means 'off' and has no policy; pass True, a path, a dict or a Policy",
                          source="<argument>", value=policy)
    if isinstance(policy, Mapping):
        return Policy.from_dict(policy, source="<dict>")
    if isinstance(policy, (str, os.PathLike)):
        return _load_file(Path(policy))
    raise PolicyError("cannot make a policy from this value", source="<argument>", value=type(policy).__name__,
                      allowed="a Policy, a dict, a path to a TOML file, True or None")


def discover_policy_source(cwd: Path | None = None) -> Path | None:
    """The file the discovery order picks, or None for the built-in default."""
    env_policy = os.environ.get(ENV_POLICY, "").strip()
    if env_policy:
        return Path(env_policy)
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch and switch.lower() not in _SWITCH_ON + _SWITCH_OFF:
        return Path(switch)
    here = cwd or Path.cwd()
    if (here / "fastpath.toml").is_file():
        return here / "fastpath.toml"
    pyproject = here / "pyproject.toml"
    if pyproject.is_file() and _pyproject_table(pyproject) is not None:
        return pyproject
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        special = path.exists() and not path.is_file() and not path.is_dir()
    except OSError:  # a name too long for the file system...: open() below says why
        special = False
    if special:  # a FIFO would block the reader forever; a device has no end
        raise PolicyError("policy path is not a regular file (a pipe, socket or device); point it at a TOML file",
                          source=str(path))
    try:
        with path.open("rb") as fh:
            raw = fh.read()
        # Windows editors save UTF-8 with a byte-order mark, which TOML does not allow: drop it.
        return tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except FileNotFoundError:
        raise PolicyError("policy file not found; check the path or the TRANSFORMERS_FASTPATH_POLICY variable",
                          source=str(path)) from None
    except IsADirectoryError:
        raise PolicyError("policy path is a directory, not a TOML file", source=str(path)) from None
    except OSError as exc:
        raise PolicyError(f"cannot read policy file: {exc.strerror or exc}", source=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"not valid TOML: {exc}", source=str(path)) from None


def _pyproject_table(path: Path) -> Any:
    try:
        return _read_toml(path).get("tool", {}).get(PYPROJECT_TABLE)
    except (PolicyError, AttributeError):
        return None


def _load_file(path: Path) -> Policy:
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool")
        table = tool.get(PYPROJECT_TABLE) if isinstance(tool, dict) else None
        if table is None:
            raise PolicyError(f"pyproject.toml has no [tool.{PYPROJECT_TABLE}] table", source=str(path))
        return Policy.from_dict(table, source=f"{path} [tool.{PYPROJECT_TABLE}]")
    return Policy.from_dict(data, source=str(path))
