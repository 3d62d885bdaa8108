"""Start-up bootstrap, run from ``transformers_fastpath.pth`` in every interpreter.

It must be cheap and must never break start-up: it imports neither torch nor transformers,
only registers a post-import hook. When transformers' modeling or pipeline module is first
imported, the hook wraps it so ``fastpath=`` is accepted (and, with
``TRANSFORMERS_FASTPATH=1`` or a policy path, turns fastpath on for the whole process).

``TRANSFORMERS_FASTPATH=0`` (or false/no/off) turns fastpath off for the process: transformers is
not patched. A value it cannot use, an invalid policy, a transformers release outside the supported
range or a wrapper that fails warn once at start-up and leave the process unpatched the same way.
In each of these cases fastpath is off for the process, and the hook leaves only the guard of
:mod:`.guard` on transformers' entry points: a ``fastpath=`` argument is removed with one warning
that says why (not a bare ``TypeError`` from ``from_pretrained``, not a silent no-op in
``pipeline()``).
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
_disabled_reason: str | None = None  # why fastpath is off for the process (then only the guard goes in)
_disabled_fix = ""  # what to do about it, for the guard's warning
_TARGETS = ("transformers.modeling_utils", "transformers.pipelines")


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
        if _disabled_reason is not None:  # fastpath is off for this process: the guard only
            _guard(module)
            return
        try:
            from .compat import unsupported_transformers

            problem = unsupported_transformers()
            if problem is not None:  # one warning for both modules, and nothing patched
                _warn_once(f"transformers-fastpath: {problem}; the process stays unpatched.")
                _turn_off(problem, "Install a transformers release in the range above, or remove fastpath=.")
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
            _turn_off(f"transformers-fastpath could not patch {module.__name__} ({type(exc).__name__}: {exc})",
                      "Report it with your transformers version, or remove fastpath=.")

    return callback


def _turn_off(reason: str, fix: str) -> None:
    """Fastpath off for the rest of this process: the guard on the target modules imported so far
    (the post-import hook guards the others when they are imported)."""
    global _disabled_reason, _disabled_fix
    _disabled_reason, _disabled_fix = reason, fix
    for name in _TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _guard(module)


def _guard(module: ModuleType) -> None:
    try:
        from . import guard

        guard.protect(module, _disabled_reason or "", _disabled_fix)
    except Exception:  # noqa: BLE001 - never break the import of transformers
        pass


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
    from ..planning.policy import load_policy
    from . import patches, state

    if state.installed_policy() is not None:
        return
    try:
        policy = load_policy(None)
    except PolicyError as exc:
        _warn_once(f"{ENV_SWITCH}: the policy is invalid, so fastpath stays off in this process: {exc}")
        patches.unpatch_all()
        _turn_off(f"the policy {ENV_SWITCH} found is invalid ({exc})",
                  "Fix the policy (the error names the file, the rule and the key), or remove fastpath=.")
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
    global _booted, _mode, _disabled_reason, _disabled_fix
    if _booted:
        return
    _booted = True
    try:
        switch = os.environ.get(ENV_SWITCH, "").strip()
        lowered = switch.lower()
        policy_path = os.environ.get(ENV_POLICY, "").strip()
        if lowered in _OFF:
            _disabled_reason = f"{ENV_SWITCH}={switch}"
            _disabled_fix = (f"Unset {ENV_SWITCH} (or set it to 1) to use fastpath=, or remove fastpath= from the "
                             "call; fp.install() / fp.pipeline() still opt in explicitly.")
        elif lowered not in _ON and switch and not os.path.isfile(switch):
            _disabled_reason = (f"{ENV_SWITCH}={_shown(switch)} is not an accepted value: {', '.join(_ON)} (on); "
                                f"{', '.join(_OFF)} (off), in any case; or the path of an existing policy file")
            _disabled_fix = f"Set {ENV_SWITCH} to 1, to 0, or to the path of a fastpath.toml; or unset it."
            _warn_once(f"transformers-fastpath: {_disabled_reason}; the process stays unpatched. "
                       f"Use {ENV_SWITCH}=1, {ENV_SWITCH}=0, or a path to a fastpath.toml.")
        elif policy_path and not os.path.isfile(policy_path):
            _disabled_reason = f"{ENV_POLICY}={_shown(policy_path)} is not a file"
            _disabled_fix = f"Fix the path in {ENV_POLICY}, or unset it."
            _warn_once(f"transformers-fastpath: {_disabled_reason}; the process stays unpatched.")
        elif switch:
            _mode = "install"  # 1/true/yes/on, or the path of a policy file
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
    """What the bootstrap did in this process (for ``transformers-fastpath doctor``).

    ``disabled_reason``: why fastpath is off for the process (only the guard goes in), or None.
    """
    return {"booted": _booted, "mode": _mode, "disabled_reason": _disabled_reason}
