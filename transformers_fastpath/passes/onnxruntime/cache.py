"""Where ONNX exports live on disk, and the key that says when one is stale.

An export is kept under ``<cache root>/onnx/<key>/`` and never in the user's model folder. The
key hashes everything the exported graph depends on: the weights (every tensor of the state_dict,
by value), the config, the model class, the exported inputs and outputs, the optimization, and the
versions of torch, transformers, onnx, onnxruntime and fastpath. A changed checkpoint or an
upgraded package gives another key, so a stale export is never used; it is rebuilt instead.

The cache root is ``TRANSFORMERS_FASTPATH_CACHE`` when set, else ``$XDG_CACHE_HOME/transformers-fastpath``,
else ``~/.cache/transformers-fastpath``. Deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ENV_CACHE", "MANIFEST", "cache_root", "export_key", "locked", "publish", "read_manifest", "write_manifest"]

ENV_CACHE = "TRANSFORMERS_FASTPATH_CACHE"
MANIFEST = "manifest.json"
_VERSIONED = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "transformers-fastpath")


def cache_root() -> Path:
    """The folder fastpath keeps exports in (created on first use)."""
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transformers-fastpath"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def export_key(model: Any, recipe: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cache key of ``model`` exported with ``recipe`` (inputs, outputs, opset, optimization),
    and the description stored beside the export (what the key was made of, minus the weights).

    Hashing the weights reads every byte once (about 0.1 s per 100 MB): it is what makes a
    fine-tuned copy of a checkpoint, saved under the same name, get its own export.
    """
    described = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": model.config.to_json_string(use_diff=False),
        "recipe": dict(recipe),
        "versions": {name: _version(name) for name in _VERSIONED},
    }
    digest = hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=20)
    import torch

    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest(), described


@contextlib.contextmanager
def locked(folder: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """One builder of ``folder`` at a time across processes (a lock file beside it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(folder.name + ".lock")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if _stale_lock(lock, timeout_s) or time.monotonic() > deadline:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            time.sleep(0.2)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _stale_lock(lock: Path, timeout_s: float) -> bool:
    try:
        return time.time() - lock.stat().st_mtime > timeout_s
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def publish(folder: Path) -> Iterator[Path]:
    """A fresh staging folder next to ``folder``; when the block ends without error it replaces
    ``folder`` in one rename, so a reader sees a whole export or none (never a half-written one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete export in ``folder``, or None (missing, partial or unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    model_file = manifest.get("model_file") if isinstance(manifest, dict) else None
    if not isinstance(model_file, str) or not (folder / model_file).is_file():
        return None
    return manifest


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
