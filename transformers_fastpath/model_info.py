"""What the policy knows about a model before (or without) loading its weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["ModelInfo"]

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
        """Read only the config of a model (local directory, or the Hub cache)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        return cls.from_config(config, name=str(name_or_path), task=task)

    @classmethod
    def of(cls, target: Any, *, task: str | None = None) -> ModelInfo:
        """Accept a model, a config, a path or an existing ModelInfo."""
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
