"""The three ways to turn fastpath on: ``install()``, ``enabled()``, and per call (``fastpath=``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..planning.policy import PolicyLike, load_policy
from . import bootstrap, guard, patches, state

__all__ = ["install", "uninstall", "enabled", "is_installed"]


def install(policy: PolicyLike = None) -> None:
    """Turn fastpath on for every ``from_pretrained`` and ``pipeline`` in this process.

    Idempotent: a second call only replaces the policy. The policy is validated first, so an
    invalid one raises :class:`PolicyError` and nothing is patched.
    """
    resolved = load_policy(policy)
    patches.import_targets()  # outside the lock: importing may run the bootstrap's own patching
    bootstrap.user_decided()
    with patches.lock:  # patched + policy set in one step, against a concurrent uninstall()
        patches.patch_all()  # also takes away the start-up guard (TRANSFORMERS_FASTPATH=0...): this call wins
        state.set_installed_policy(resolved)


def uninstall() -> None:
    """Turn fastpath off and put transformers' original function objects back.

    Thread-safe against concurrent :func:`install` calls: whichever runs last decides, and the
    process is then either fully patched with a policy, or fully unpatched.

    Fully unpatched means transformers exactly as without this package: the start-up guard (which
    drops ``fastpath=`` with a warning when the bootstrap is off) goes too, so a later
    ``from_pretrained(..., fastpath=True)`` raises transformers' ``TypeError`` and
    ``pipeline(..., fastpath=True)`` hands the key to the pipeline class.
    """
    bootstrap.user_decided()  # a later first import of transformers.pipelines must not patch again
    with patches.lock:
        state.set_installed_policy(None)
        patches.unpatch_all()
        guard.remove()


def is_installed() -> bool:
    return state.installed_policy() is not None


@contextlib.contextmanager
def enabled(policy: PolicyLike = None) -> Iterator[None]:
    """Fastpath on inside the block, for this thread / asyncio task only (a contextvar).

    ``enabled(policy=...)`` takes the same values as :func:`load_policy`. The wrappers are put in
    place if they were not (they pass calls through unchanged outside any scope).
    """
    resolved = load_policy(policy)
    patches.patch_all()  # takes away the start-up guard too: an explicit opt-in wins
    with state.scoped_policy(resolved):
        yield

