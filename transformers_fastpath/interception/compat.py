"""Which transformers releases fastpath supports, checked before it patches anything.

The range is the one ``pyproject.toml`` declares (a test keeps the two equal). pip enforces it
at install time; this check covers environments that bypass pip's resolver (``--no-deps``, a
later downgrade, conda): there the ``.pth`` bootstrap warns once and leaves transformers
unpatched, and ``fp.install()`` / ``fp.enabled()`` / ``fp.pipeline()`` raise
:class:`~transformers_fastpath.errors.FastpathError` naming the fix.

Why the floor is where it is (see docs/reliability.md, "Version range"): below it, static-cache
generation passes ``max_cache_len`` that ``generate`` rejects, the fused encoder does not engage
(layers receive ``cache_position``), and vision encoders have another layout.
"""

from __future__ import annotations

import re
import sys

__all__ = ["MAX_TRANSFORMERS", "MIN_TRANSFORMERS", "parse_version", "unsupported_transformers"]

MIN_TRANSFORMERS: tuple[int, int, int] = (5, 13, 0)  # lowest release the whole test suite passes on
MAX_TRANSFORMERS: tuple[int, int, int] = (6, 0, 0)  # exclusive: the next major may change every API we wrap


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"5.18.0"`` / ``"5.24.0.dev0"`` / ``"5.3"`` -> (5, 18, 0); None when it does not start with a number."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", text or "")
    if match is None:
        return None
    major, minor, patch = (int(g) if g is not None else 0 for g in match.groups())
    return major, minor, patch


def _text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def unsupported_transformers(version: str | None = None) -> str | None:
    """Why the installed (or given) transformers version is outside the supported range, or None.

    Reads ``transformers.__version__`` of the already imported module (no import here: the
    bootstrap calls this from inside transformers' own import).
    """
    if version is None:
        module = sys.modules.get("transformers")
        version = getattr(module, "__version__", None)
        if version is None:
            return None  # not imported yet (callers import it first), or a stripped build: do not guess
    parsed = parse_version(version)
    if parsed is None:
        return None
    low, high = _text(MIN_TRANSFORMERS), _text(MAX_TRANSFORMERS)
    if parsed < MIN_TRANSFORMERS:
        return (f"transformers {version} is older than {low}, the lowest release transformers-fastpath supports; "
                f"upgrade it: pip install 'transformers>={low},<{high}'")
    if parsed >= MAX_TRANSFORMERS:
        return (f"transformers {version} is newer than this transformers-fastpath supports (< {high}); "
                f"upgrade transformers-fastpath, or pip install 'transformers>={low},<{high}'")
    return None
