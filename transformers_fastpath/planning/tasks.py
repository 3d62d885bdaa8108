"""Pipeline task names: the ones the installed transformers knows, and a clear error for the others.

The valid names come from transformers' own pipeline task registry (``transformers.pipelines``:
``PIPELINE_REGISTRY``, i.e. ``SUPPORTED_TASKS``, the aliases of ``TASK_ALIASES`` and any pipeline
registered with ``PIPELINE_REGISTRY.register_pipeline``), plus the tasks a model's config declares
itself (``custom_pipelines``, remote code). Tasks that transformers removed in 5.x
(``REMOVED_TASKS``: ``text2text-generation``, ``summarization``...) are still valid labels for a
policy and for :func:`~transformers_fastpath.resolve` (a model loaded by hand has no pipeline), but
``explain`` refuses them, as ``pipeline()`` would.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import FastpathError

__all__ = ["BATCHED_PROCESSING_TASKS", "BATCHED_TASKS", "GENERATE_BATCHED_TASKS", "TEXT_TASKS", "UnknownTaskError", "check_task", "known_tasks"]

# Pipelines whose inputs are independent texts/images: batching and length sorting pay off.
BATCHED_TASKS = frozenset({
    "feature-extraction", "text-classification", "sentiment-analysis", "token-classification", "ner",
    "fill-mask", "question-answering", "zero-shot-classification", "image-classification",
    "image-feature-extraction", "audio-classification", "table-question-answering",
})
# Generating pipelines whose lists fastpath runs in batches of prompts (each result as its prompt alone gives).
GENERATE_BATCHED_TASKS = frozenset({"text-generation"})
# Pipelines whose pre- and post-processing fastpath runs per batch
# (transformers_fastpath.pipelines.batched_tasks.BATCHERS; a test keeps the two in step).
BATCHED_PROCESSING_TASKS = frozenset({"feature-extraction", "text-classification", "sentiment-analysis",
                                      "token-classification", "ner", "fill-mask", "zero-shot-classification",
                                      "image-classification"}) | GENERATE_BATCHED_TASKS
# Tasks whose inputs are text (length sorting by characters is a good proxy of tokens).
TEXT_TASKS = frozenset({
    "feature-extraction", "text-classification", "sentiment-analysis", "token-classification", "ner",
    "fill-mask", "question-answering", "zero-shot-classification", "text-generation",
    "text2text-generation", "summarization", "translation", "table-question-answering",
})


class UnknownTaskError(FastpathError, ValueError, KeyError):
    """A task name that is not a pipeline task of the installed transformers.

    A ``ValueError`` (a bad argument) and a ``KeyError`` (what transformers' own ``pipeline()``
    raises for an unknown task), so code catching either keeps working.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _registry() -> Any:
    try:
        import transformers.pipelines as pipelines
    except Exception:  # noqa: BLE001 - a broken optional import must not turn into a task error
        return None
    return pipelines


def known_tasks(config: Any = None, *, removed: bool = True) -> tuple[list[str], dict[str, str]]:
    """(every accepted task name, sorted; removed task -> transformers' reason) for this transformers.

    ``config``: a model config whose ``custom_pipelines`` add tasks. ``removed``: whether the tasks
    transformers removed count as known. Empty when transformers' pipelines cannot be imported.
    """
    pipelines = _registry()
    if pipelines is None:
        return [], {}
    registry = getattr(pipelines, "PIPELINE_REGISTRY", None)
    names = set(registry.get_supported_tasks()) if registry is not None else set()
    names |= set(getattr(pipelines, "SUPPORTED_TASKS", {})) | set(getattr(pipelines, "TASK_ALIASES", {}))
    names.add("image-to-text")  # redirected to image-text-to-text by transformers (_resolve_deprecated_task)
    names |= set(getattr(config, "custom_pipelines", None) or {})
    gone = {str(k): str(v) for k, v in (getattr(pipelines, "REMOVED_TASKS", None) or {}).items()}
    if removed:
        names |= set(gone)
    return sorted(names), gone


def _transformers_version() -> str:
    import transformers

    return str(getattr(transformers, "__version__", "?"))


def unknown_task(task: str, *, config: Any = None, removed: bool = True, where: str = "task") -> str | None:
    """Why ``task`` is not a task of the installed transformers (the close match and where the names
    come from), or None when it is one (or when transformers' registry cannot be read)."""
    names, gone = known_tasks(config, removed=removed)
    if not names:
        return None
    base = "translation" if task.startswith("translation_") else task  # translation_en_to_fr
    if task in names or base in names:
        return None
    version = _transformers_version()
    if base in gone:
        return (f"{where} {task!r} was removed from transformers ({version} has no such pipeline): {gone[base]} "
                "Pick a task of the installed transformers (transformers.pipelines.SUPPORTED_TASKS)")
    close = difflib.get_close_matches(task, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(n for n in names if n not in gone)
    return (f"{where} {task!r} is not a pipeline task of transformers {version}; {hint}"
            f"the valid names are transformers' pipeline tasks (transformers.pipelines.SUPPORTED_TASKS and the "
            f"aliases in TASK_ALIASES): {shown}")


def check_task(task: str | None, *, config: Any = None, removed: bool = True, where: str = "task") -> None:
    """Raise :class:`UnknownTaskError` when ``task`` is given and is not a task transformers knows."""
    if task is None:
        return
    if not isinstance(task, str):
        raise UnknownTaskError(f"{where} must be a pipeline task name (a string such as 'text-classification'), "
                               f"got {type(task).__name__} {task!r}")
    problem = unknown_task(task, config=config, removed=removed, where=where)
    if problem is not None:
        raise UnknownTaskError(problem)
