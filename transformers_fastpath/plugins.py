"""The plugin manager: hook specs, built-in plugin modules, and third-party entry points.

Third-party plugins are found once, lazily, in the ``transformers_fastpath`` entry-point group.
``TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD=1`` turns autoload off (a value that is not
1/true/yes/on or 0/false/no/off warns and turns it off too); ``TRANSFORMERS_FASTPATH_PLUGINS=a,b``
loads only the named entry points (names that match no installed plugin warn). A plugin that
fails to import is reported (a warning and ``transformers-fastpath plugins``) and skipped.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import FastpathError, PluginError

if TYPE_CHECKING:
    from .passes.base import Pass

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "get_plugin_manager",
    "get_passes",
    "list_plugins",
    "reset_plugin_manager",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "transformers_fastpath"
ENV_DISABLE_AUTOLOAD = "TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "TRANSFORMERS_FASTPATH_PLUGINS"

# Built-in behaviour, registered exactly like third-party plugins (order = call order, reversed:
# pluggy calls later-registered implementations first unless they are tryfirst/trylast).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "transformers_fastpath.builtin.defaults",
    "transformers_fastpath.builtin.loading",
    "transformers_fastpath.builtin.pipelines",
    "transformers_fastpath.builtin.fused_encoder",
    "transformers_fastpath.builtin.attention",
    "transformers_fastpath.builtin.generation",
    "transformers_fastpath.builtin.placement",
    "transformers_fastpath.builtin.quantization",
    "transformers_fastpath.builtin.onnxruntime",
)


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from, for ``transformers-fastpath plugins``."""

    name: str
    kind: str  # "builtin" | "entry point" | "registered"
    module: str
    distribution: str | None
    hooks: tuple[str, ...]
    error: str | None = None


_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_passes: tuple[Pass, ...] | None = None
_origins: dict[str, PluginInfo] = {}
_failures: list[PluginInfo] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager, built on first use (idempotent and thread-safe)."""
    global _manager
    if _manager is not None:
        return _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            for module_name in BUILTIN_PLUGINS:
                module = importlib.import_module(module_name)
                pm.register(module, name=module_name)
                _origins[module_name] = PluginInfo(module_name, "builtin", module_name, "transformers-fastpath",
                                                   _hook_names(pm, module))
            if _autoload_enabled():
                _load_entry_points(pm)
            _manager = pm
    return _manager


def get_passes() -> tuple[Pass, ...]:
    """Every registered pass, in registration order (collected once)."""
    global _passes
    if _passes is None:
        with _lock:
            if _passes is None:
                pm = get_plugin_manager()
                collected: list[Pass] = []
                # historic order: builtins first, then third-party (pluggy returns LIFO).
                for result in reversed(pm.hook.fastpath_register_passes()):
                    collected.extend(result or ())
                names = [p.name for p in collected]
                duplicates = {n for n in names if names.count(n) > 1}
                if duplicates:
                    raise RuntimeError(f"two plugins register a pass named {sorted(duplicates)}; "
                                       "rename one of them (pass names must be unique)")
                _passes = tuple(collected)
    return _passes


def register(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object or module at run time (tests, notebooks)."""
    global _passes
    pm = get_plugin_manager()
    with _lock:
        registered = pm.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"plugin {name or plugin!r} is already registered")
        _guard_hooks(pm, registered)
        module = getattr(plugin, "__name__", type(plugin).__name__)
        _origins[registered] = PluginInfo(registered, "registered", module, None, _hook_names(pm, plugin))
        _passes = None
    return registered


def unregister(name: str) -> None:
    global _passes
    pm = get_plugin_manager()
    with _lock:
        pm.unregister(name=name)
        _origins.pop(name, None)
        _passes = None


def list_plugins() -> list[PluginInfo]:
    """Loaded plugins and the ones that failed to load, with where they came from."""
    get_plugin_manager()
    return [*_origins.values(), *_failures]


def reset_plugin_manager() -> None:
    """Forget the plugin manager so the next use rebuilds it (reads entry points again)."""
    global _manager, _passes
    with _lock:
        _manager = None
        _passes = None
        _origins.clear()
        _failures.clear()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _autoload_enabled() -> bool:
    """False when ``TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD`` is set.

    1/true/yes/on disable autoload, 0/false/no/off (or unset) keep it. Any other value warns
    and disables it too: a variable whose name says "disable" is taken at its word.
    """
    raw = os.environ.get(ENV_DISABLE_AUTOLOAD, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return False
    if value in _FALSE:
        return True
    _warn_env(f"transformers-fastpath: {ENV_DISABLE_AUTOLOAD}={_shown(raw)} is not an accepted value: "
              f"{', '.join(_TRUE)} (disable autoload); {', '.join(_FALSE[1:])} or blank (load plugins), in any case; "
              "third-party plugins are not loaded (set it to 0 to load them)")
    return False


def _allow_list() -> set[str] | None:
    """The names in ``TRANSFORMERS_FASTPATH_PLUGINS`` (None: unset, every plugin loads)."""
    raw = os.environ.get(ENV_ALLOW, "")
    if not raw.strip():
        return None
    names = {a.strip() for a in raw.split(",") if a.strip()}
    if not names:
        _warn_env(f"transformers-fastpath: {ENV_ALLOW}={_shown(raw)} names no plugin; no third-party plugin "
                  "is loaded (unset it to load all of them)")
    return names


def _shown(value: str, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} characters)"


_env_warned: set[str] = set()


def _warn_env(message: str) -> None:
    if message not in _env_warned:
        _env_warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow = _allow_list()
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    if allow:
        unknown = sorted(allow - {ep.name for ep in entry_points})
        if unknown:
            _warn_env(f"transformers-fastpath: {ENV_ALLOW} names {_shown(', '.join(unknown))}, but no installed "
                      f"plugin has that name (installed: {', '.join(sorted(ep.name for ep in entry_points)) or 'none'})")
    for ep in entry_points:
        if allow is not None and ep.name not in allow:
            logger.debug("plugin %s not in %s; not loaded", ep.name, ENV_ALLOW)
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else None
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            _guard_hooks(pm, ep.name)
        except (Exception, SystemExit) as exc:  # a broken third-party plugin must not break the user's program
            message = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"transformers-fastpath plugin {ep.name!r} ({ep.value}, from {dist or 'unknown distribution'}) "
                f"failed to load and is skipped: {message}. Fix or uninstall it, or set "
                f"{ENV_DISABLE_AUTOLOAD}=1.",
                RuntimeWarning,
                stacklevel=2,
            )
            _failures.append(PluginInfo(ep.name, "entry point", ep.value, dist, (), error=message))
            continue
        _origins[ep.name] = PluginInfo(ep.name, "entry point", ep.value, dist, _hook_names(pm, plugin))


def _hook_names(pm: pluggy.PluginManager, plugin: Any) -> tuple[str, ...]:
    return tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))


# -- third-party hooks that raise at run time ------------------------------------------------

_hook_warned: set[tuple[str, str]] = set()


def _guard_hooks(pm: pluggy.PluginManager, plugin_name: str) -> None:
    """Make each hook implementation of a third-party plugin fail alone.

    An implementation that raises (anything but a :class:`~transformers_fastpath.errors.FastpathError`,
    which is an answer, not a failure) is reported once per plugin and hook with a warning naming
    both and the error, and its contribution is skipped for that call: the user's load or pipeline
    goes on without it. When the call's plan asks for ``strict = true`` it raises a
    :class:`~transformers_fastpath.errors.PluginError` naming them instead. Built-in plugins are
    not guarded (their errors are fastpath's own), nor are wrappers (``wrapper=True``).
    """
    for caller in pm.get_hookcallers(pm.get_plugin(plugin_name)) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin_name == plugin_name and not (impl.wrapper or impl.hookwrapper):
                impl.function = _GuardedHook(impl.function, plugin_name, caller.name, tuple(impl.argnames))


class _GuardedHook:
    """A hook implementation that reports its own failure instead of failing the user's call."""

    def __init__(self, function: Any, plugin: str, hook: str, argnames: tuple[str, ...]) -> None:
        self.function, self.plugin, self.hook, self.argnames = function, plugin, hook, argnames
        self.__name__ = getattr(function, "__name__", hook)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pluggy passes arguments by position, in argnames order
        try:
            return self.function(*args, **kwargs)
        except FastpathError:
            raise
        except Exception as exc:  # noqa: BLE001 - a third-party plugin's failure: reported, skipped (strict: raised)
            named = dict(zip(self.argnames, args), **kwargs)
            plan = named.get("plan")
            problem = (f"transformers-fastpath plugin {self.plugin!r} raised in {self.hook}: "
                       f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            if plan is not None and getattr(plan, "strict", False):
                raise PluginError(f"{problem} (strict = true). Fix or uninstall the plugin, or set strict = false "
                                  "to carry on without it", plugin=self.plugin, hook=self.hook) from exc
            if (self.plugin, self.hook) not in _hook_warned:
                _hook_warned.add((self.plugin, self.hook))
                warnings.warn(f"{problem}; fastpath carries on without it for this call (and says so once). Fix "
                              "or uninstall the plugin, or leave it out with TRANSFORMERS_FASTPATH_PLUGINS.",
                              RuntimeWarning, stacklevel=2)
            logger.debug("plugin %s failed in %s", self.plugin, self.hook, exc_info=True)
            return None
