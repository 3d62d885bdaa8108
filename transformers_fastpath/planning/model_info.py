"""What the policy knows about a model before (or without) loading its weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["ModelInfo", "missing_local_directory"]

logger = logging.getLogger(__name__)

_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class ModelInfo:
    """Facts about one model that policy rules match on and passes check.

    Built from a config alone (``explain`` never loads weights), from a local directory,
    or from a loaded model.
    """

    name: str
    model_type: str
    architectures: tuple[str, ...]
    num_params: int | None
    task: str | None = None
    config: PretrainedConfig | None = field(default=None, compare=False, repr=False)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def is_causal_lm(self) -> bool:
        """A decoder-only generator (GPT-2, Llama...): what ``generate`` settings apply to."""
        if self.is_encoder_decoder:
            return False
        if any(a.endswith(_DECODER_SUFFIXES) for a in self.architectures):
            return True
        return self.task in ("text-generation",)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "num_params": self.num_params,
            "task": self.task,
        }

    # -- constructors ------------------------------------------------------------
    @classmethod
    def from_config(cls, config: PretrainedConfig, *, name: str | None = None,
                    task: str | None = None, count_params: bool = True) -> ModelInfo:
        """Describe a model from its config; parameters are counted on the meta device."""
        return cls(
            name=name or getattr(config, "_name_or_path", "") or config.model_type,
            model_type=config.model_type,
            architectures=tuple(getattr(config, "architectures", None) or ()),
            num_params=_count_params_from_config(config) if count_params else None,
            task=task,
            config=config,
        )

    @classmethod
    def from_model(cls, model: PreTrainedModel, *, task: str | None = None) -> ModelInfo:
        config = model.config
        return cls(
            name=getattr(config, "_name_or_path", "") or type(model).__name__,
            model_type=config.model_type,
            architectures=tuple(getattr(config, "architectures", None) or (type(model).__name__,)),
            num_params=sum(p.numel() for p in model.parameters()),
            task=task,
            config=config,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, task: str | None = None,
                        **hub_kwargs: Any) -> ModelInfo:
        """Read only the config of a model (local directory, or the Hub cache).

        A name that can only be a local path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``) and does
        not exist raises ``FileNotFoundError`` saying so, not transformers' Hub repo-id error.
        """
        from transformers import AutoConfig

        problem = missing_local_directory(name_or_path)
        if problem is not None:
            raise FileNotFoundError(problem)
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        return cls.from_config(config, name=str(name_or_path), task=task)

    @classmethod
    def of(cls, target: Any, *, task: str | None = None) -> ModelInfo:
        """Accept a model, a config, a path or an existing ModelInfo.

        ``task`` must be a pipeline task of the installed transformers (or one its config declares,
        or one transformers removed in 5.x): a typo raises
        :class:`~transformers_fastpath.planning.tasks.UnknownTaskError` naming the close match.
        """
        info = cls._of(target, task)
        if task is not None:  # after reading the config: it may declare custom pipeline tasks
            from .tasks import check_task

            check_task(task, config=info.config)
        return info

    @classmethod
    def _of(cls, target: Any, task: str | None) -> ModelInfo:
        if isinstance(target, ModelInfo):
            return target if task is None or target.task == task else _with_task(target, task)
        from transformers import PretrainedConfig, PreTrainedModel

        if isinstance(target, PreTrainedModel):
            return cls.from_model(target, task=task)
        if isinstance(target, PretrainedConfig):
            return cls.from_config(target, task=task)
        if isinstance(target, (str, os.PathLike)):
            return cls.from_pretrained(target, task=task)
        raise TypeError(
            f"expected a PreTrainedModel, a PretrainedConfig, a model path or id, got {type(target).__name__}"
        )


def missing_local_directory(name_or_path: str | os.PathLike[str]) -> str | None:
    """Why ``name_or_path``, which can only be a local path, is not one, or None.

    Local-only means: starting with ``./``, ``../``, ``/`` or ``~``, or with a path separator that a
    Hub id cannot have (``\\`` on Windows, two or more ``/``, a ``.`` or ``..`` part).
    ``namespace/name`` and ``name`` may be Hub ids: transformers decides those.
    """
    text = os.fspath(name_or_path)
    if not isinstance(text, str) or not text or os.path.exists(text):
        return None
    parts = text.replace("\\", "/").split("/")
    local = (text.startswith(("./", "../", "/", "~", ".\\", "..\\"))
             or (os.sep != "/" and os.sep in text) or (os.altsep is not None and os.altsep != "/" and os.altsep in text)
             or text.count("/") >= 2 or any(part in (".", "..") for part in parts))
    if not local:
        return None
    expanded = os.path.expanduser(text)
    if text.startswith("~") and expanded != text and os.path.exists(expanded):
        return (f"no such directory: {text} ('~' is not expanded in a model path); pass the expanded path, "
                f"{expanded}, or os.path.expanduser({text!r})")
    return (f"no such directory: {text} (resolved to {os.path.abspath(expanded)}); pass the directory that holds "
            "the model's config.json, or a Hub id such as 'sentence-transformers/all-MiniLM-L6-v2'")


def _with_task(info: ModelInfo, task: str) -> ModelInfo:
    return ModelInfo(info.name, info.model_type, info.architectures, info.num_params, task, info.config)


def meta_model(config: PretrainedConfig) -> Any:
    """The architecture of ``config`` instantiated on the meta device: shapes only, no memory."""
    import torch
    import transformers

    model_cls = None
    for arch in getattr(config, "architectures", None) or ():
        model_cls = getattr(transformers, arch, None)
        if model_cls is not None:
            break
    with torch.device("meta"):
        return model_cls(config) if model_cls is not None else transformers.AutoModel.from_config(config)


def _count_params_from_config(config: PretrainedConfig) -> int | None:
    """Instantiate the architecture on the meta device (no memory, no weights) and count."""
    try:
        return sum(p.numel() for p in meta_model(config).parameters())
    except Exception as exc:  # an exotic config must not break explain
        logger.debug("could not count parameters of %s: %s", config.model_type, exc)
        return None
