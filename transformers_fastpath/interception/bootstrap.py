"""Start-up bootstrap, run from ``transformers_fastpath.pth`` in every interpreter.

It must be cheap and must never break start-up: it imports neither torch nor transformers,
only registers a post-import hook. When transformers' modeling or pipeline module is first
imported, the hook wraps it so ``fastpath=`` is accepted (and, with
``TRANSFORMERS_FASTPATH=1`` or a policy path, turns fastpath on for the whole process).

``TRANSFORMERS_FASTPATH=0`` (or false/no/off) disables the bootstrap entirely. A value it
cannot use warns once and leaves the process unpatched.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

ENV_SWITCH = "TRANSFORMERS_FASTPATH"
ENV_POLICY = "TRANSFORMERS_FASTPATH_POLICY"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")

_booted = False
_mode = "passive"  # "passive": accept fastpath= only; "install": fastpath on for the process
_disabled_reason: str | None = None


class _PatchingLoader(Loader):
    """Runs the real loader, then our callback on the fresh module; everything else is delegated."""

    def __init__(self, loader: Loader, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class PostImportFinder(MetaPathFinder):
    """Calls ``callbacks[name](module)`` right after module ``name`` is first executed."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, callback)
                return spec
        return None


_user_decided = False  # install() / uninstall() was called: later imports leave the state alone


def user_decided() -> None:
    """Called by ``install()``/``uninstall()``: from now on the hook no longer patches on import (an
    ``uninstall()`` would otherwise be undone by the first import of ``transformers.pipelines``)."""
    global _user_decided
    _user_decided = True


def _safely(patch: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
    def callback(module: ModuleType) -> None:
        if _user_decided:
            return
        try:
            from .compat import unsupported_transformers

            problem = unsupported_transformers()
            if problem is not None:  # one warning for both modules, and nothing patched
                _warn_once(f"transformers-fastpath: {problem}; the process stays unpatched.")
                return
            patch(module)
        except Exception as exc:  # never break the import of transformers
            _warn_once(f"transformers-fastpath could not patch {module.__name__} and leaves it unpatched: "
                       f"{type(exc).__name__}: {exc}. Set {ENV_SWITCH}=0 to silence this.")
            try:  # all or nothing: no half-patched transformers, no policy without patches
                from . import patches, state

                with patches.lock:
                    state.set_installed_policy(None)
                    patches.unpatch_all()
            except Exception:
                pass

    return callback


def _patch_modeling(module: ModuleType) -> None:
    from . import patches

    patches.patch_modeling(module)
    if _mode == "install":
        _install_from_env()


def _patch_pipelines(module: ModuleType) -> None:
    from . import patches

    patches.patch_pipelines(module)
    if _mode == "install":
        _install_from_env()


def _install_from_env() -> None:
    from ..errors import PolicyError
    from ..policy import load_policy
    from . import patches, state

    if state.installed_policy() is not None:
        return
    try:
        policy = load_policy(None)
    except PolicyError as exc:
        _warn_once(f"{ENV_SWITCH}: the policy is invalid, so fastpath stays off in this process: {exc}")
        patches.unpatch_all()
        return
    with patches.lock:  # two threads importing the two modules at once: one policy, set once
        if state.installed_policy() is None and patches.is_patched():
            state.set_installed_policy(policy)


_warned: set[str] = set()


def _shown(value: str, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: a huge variable must not become a huge warning."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} characters)"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        except Exception:  # noqa: BLE001 - warnings turned into errors (-W error) must not break imports
            print(message, file=sys.stderr)


def boot() -> None:
    """Entry point of the ``.pth`` file. Idempotent; never raises."""
    global _booted, _mode, _disabled_reason
    if _booted:
        return
    _booted = True
    try:
        switch = os.environ.get(ENV_SWITCH, "").strip()
        lowered = switch.lower()
        if lowered in _OFF:
            _disabled_reason = f"{ENV_SWITCH}={switch}"
            return
        if lowered in _ON:
            _mode = "install"
        elif switch:
            if not os.path.isfile(switch):
                _disabled_reason = f"{ENV_SWITCH}={_shown(switch)} is neither 0/1 nor an existing policy file"
                _warn_once(f"transformers-fastpath: {_disabled_reason}; the process stays unpatched. "
                           f"Use {ENV_SWITCH}=1, {ENV_SWITCH}=0, or a path to a fastpath.toml.")
                return
            _mode = "install"
        policy_path = os.environ.get(ENV_POLICY, "").strip()
        if policy_path and not os.path.isfile(policy_path):
            _disabled_reason = f"{ENV_POLICY}={_shown(policy_path)} is not a file"
            _warn_once(f"transformers-fastpath: {_disabled_reason}; the process stays unpatched.")
            return
        finder = PostImportFinder({
            "transformers.modeling_utils": _safely(_patch_modeling),
            "transformers.pipelines": _safely(_patch_pipelines),
        })
        sys.meta_path.insert(0, finder)
        for name, callback in finder.callbacks.items():  # imported before us (rare: sitecustomize)
            if name in sys.modules:
                callback(sys.modules[name])
    except Exception as exc:  # pragma: no cover - last line of defence for interpreter start-up
        _disabled_reason = f"bootstrap error: {exc}"


def status() -> dict[str, Any]:
    """What the bootstrap did in this process (for ``transformers-fastpath doctor``)."""
    return {"booted": _booted, "mode": _mode, "disabled_reason": _disabled_reason}
