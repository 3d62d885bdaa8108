"""What each pipeline task does with a whole batch: encode it in one call, read its outputs in one go.

A :class:`Batcher` stands in for a pipeline's per-input ``preprocess`` / ``postprocess`` (the
runner in :mod:`transformers_fastpath.pipelines.batched` drives it):

* :meth:`Batcher.encode` turns a batch of inputs into model inputs with one call of the fast
  tokenizer (its batch encode runs in Rust) or the image processor, padded exactly as
  transformers' collation pads: with the tokenizer's pad token, on its padding side;
* :meth:`Batcher.select` picks, on the model's device, the few tensors the results are made of
  (the first output; class scores after softmax; the top-k tokens at each mask), so one small
  device-to-host copy per batch is all that crosses;
* :meth:`Batcher.decode` makes one result per input from those host tensors, each exactly what
  the task's own ``postprocess`` returns for that input (types, nesting, keys, order).

The text-generation batcher (:class:`TextGenerationBatcher`) runs the pipeline's own per-prompt
``preprocess`` and ``postprocess`` around one ``generate`` per batch of left-padded prompts.

A batcher declines what it does not reproduce exactly (:meth:`Batcher.unsupported`,
:meth:`Batcher.accepts`); those calls and inputs run transformers' own per-input path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..prompt_batches import eos_list, fill_rows, left_pad
from .outputs import padding_side as tokenizer_padding_side

__all__ = ["BATCHERS", "BatchDeclined", "Batcher", "Encoded", "FeatureExtractionBatcher", "FillMaskBatcher",
           "ImageClassificationBatcher", "TextBatcher", "TextClassificationBatcher", "TextGenerationBatcher",
           "TokenClassificationBatcher", "ZeroShotClassificationBatcher", "batcher_for", "generation_settings"]

# Tokenizer arguments a batched tokenizer call reproduces per input: padding to the longest input
# of the batch is what transformers' collation does anyway.
_SAME_PER_INPUT = frozenset({"truncation", "max_length", "add_special_tokens"})
_PADDING_LIKE_COLLATION = (True, False, "longest", "do_not_pad")


class BatchDeclined(Exception):
    """Raised by :meth:`Batcher.encode` or :meth:`Batcher.decode` for a batch it cannot reproduce
    exactly after all (images the processor cannot stack, an output of another shape): that batch's
    inputs run transformers' per-input path instead."""


@dataclass
class Encoded:
    """A batch ready for the model: its inputs (CPU tensors) and what decoding needs to know."""

    inputs: dict[str, Any]  # what goes to the device
    lengths: list[int] = field(default_factory=list)  # text: each input's own token count (a batch-1 call's)
    padding_side: str = "right"
    host: dict[str, Any] = field(default_factory=dict)  # what stays on the host for decode (offsets, inputs...)


class Batcher:
    """The batched form of one task's ``preprocess`` / ``postprocess``; subclasses name the task."""

    task: str = ""
    pipeline_class: str = ""  # the name of transformers' pipeline class for the task (in transformers.pipelines)

    # Batch size of a call this batcher declines (None: the call's own; 1: one input per model call).
    declined_batch_size: int | None = None

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        """Why this call cannot be batched here (None when it can)."""
        raise NotImplementedError

    def unsupported_forward(self, pipe: Any, forward_params: Mapping[str, Any]) -> str | None:
        """Why the call's model arguments (``forward_params``) cannot be batched here (None when they can)."""
        return None

    def accepts(self, item: Any) -> bool:
        """Whether one input is of the kind :meth:`encode` takes."""
        raise NotImplementedError

    def rows(self, preprocess_params: Mapping[str, Any]) -> int:
        """Model rows one input makes (zero-shot: one per candidate label); a batch holds about
        ``batch_size`` rows, as transformers' batches do."""
        return 1

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        """The batch's model inputs on the host, padded as transformers' collation pads them."""
        raise NotImplementedError

    def filled(self, encoded: Encoded, rows: int) -> Encoded:
        """``encoded`` with filler rows up to ``rows`` that :meth:`decode` ignores (it reads
        ``encoded.lengths``), for a compiled step that should see one batch shape; as is by default."""
        return encoded

    def forward(self, pipe: Any, inputs: dict[str, Any], forward_params: Mapping[str, Any]) -> Any:
        """The model's outputs for the batch (the pipeline's own ``_forward`` unless it needs per-input keys)."""
        return pipe._forward(inputs, **forward_params)

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        """The device tensors :meth:`decode` reads (copied to the host together)."""
        raise NotImplementedError

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        """One result per input of the batch, in batch order."""
        raise NotImplementedError


class TextBatcher(Batcher):
    """Texts through the fast tokenizer, one call per batch."""

    def tokenizer_kwargs(self, preprocess_params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The tokenizer arguments in ``preprocess_params`` (None: it holds other arguments too)."""
        return dict(preprocess_params)

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            return "no fast tokenizer"
        if tokenizer.pad_token_id is None:
            return "the tokenizer has no pad token"
        if "attention_mask" not in getattr(tokenizer, "model_input_names", ()):
            return "the tokenizer makes no attention mask (pads would be attended to)"
        kwargs = self.tokenizer_kwargs(preprocess_params)
        if kwargs is None:
            return f"preprocess arguments {', '.join(sorted(preprocess_params))}"
        extra = sorted(set(kwargs) - _SAME_PER_INPUT - {"padding"})
        if extra:
            return f"tokenizer arguments {', '.join(extra)}"
        if kwargs.get("padding", True) not in _PADDING_LIKE_COLLATION:
            return f"padding={kwargs['padding']!r}"
        if "max_length" in kwargs and not kwargs.get("truncation"):
            # alone, the tokenizer truncates to max_length; padded to the batch's longest, it would not
            return "max_length without truncation"
        return None

    def accepts(self, item: Any) -> bool:
        return isinstance(item, str)

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        params = {k: v for k, v in (self.tokenizer_kwargs(preprocess_params) or {}).items() if k != "padding"}
        inputs = pipe.tokenizer([_text_or_pair(item) for item in items], padding=True, return_tensors="pt", **params)
        return Encoded(dict(inputs), inputs["attention_mask"].sum(-1).tolist(), tokenizer_padding_side(pipe))


class FeatureExtractionBatcher(TextBatcher):
    """``feature-extraction``: each input's hidden states on its own tokens (what a batch-1 call returns)."""

    task = "feature-extraction"
    pipeline_class = "FeatureExtractionPipeline"

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        if set(postprocess_params) - {"return_tensors"}:
            return f"postprocess arguments {', '.join(sorted(postprocess_params))}"
        return super().unsupported(pipe, preprocess_params, postprocess_params)

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        return {"first": outputs[0]}  # the pipeline's own postprocess reads model_outputs[0]

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        first = host["first"]
        per_token = first.ndim == 3 and tuple(first.shape[:2]) == tuple(encoded.inputs["input_ids"].shape)
        if first.ndim == 3 and not per_token:  # a sequence of another length: which rows are padding is unknown
            raise BatchDeclined("the first output is 3-D but not one row per token")
        width = first.shape[1] if first.ndim >= 2 else 0
        results: list[Any] = []
        for row, own in enumerate(encoded.lengths):
            if per_token:  # the batch's padding off, on the side the tokenizer pads
                start = width - own if encoded.padding_side == "left" else 0
                value = first[row:row + 1, start:start + own]
            else:
                value = first[row:row + 1]
            results.append(value.clone() if postprocess_params.get("return_tensors") else value.tolist())
        return results


class TextClassificationBatcher(TextBatcher):
    """``text-classification``: class scores after the pipeline's function, labels from the config."""

    task = "text-classification"
    pipeline_class = "TextClassificationPipeline"

    def accepts(self, item: Any) -> bool:
        return isinstance(item, str) or (
            isinstance(item, dict) and set(item) == {"text", "text_pair"}
            and all(isinstance(v, str) for v in item.values()))

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        return {"scores": _class_scores(pipe, outputs["logits"], postprocess_params.get("function_to_apply"))}

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        id2label = pipe.model.config.id2label
        top_k = postprocess_params.get("top_k", 1)
        legacy = postprocess_params.get("_legacy", True)
        results: list[Any] = []
        for row in host["scores"].tolist():
            if top_k == 1 and legacy:
                best = max(range(len(row)), key=row.__getitem__)  # the first maximum, as argmax
                results.append({"label": id2label[best], "score": row[best]})
                continue
            scored = [{"label": id2label[i], "score": score} for i, score in enumerate(row)]
            if not legacy:
                scored.sort(key=lambda x: x["score"], reverse=True)  # stable, as transformers' sort
                if top_k is not None:
                    scored = scored[:top_k]
            results.append(scored)
        return results


class FillMaskBatcher(TextBatcher):
    """``fill-mask``: the top-k tokens at each mask, found on the device (the vocabulary-wide
    logits never cross), each proposal decoded as transformers decodes it."""

    task = "fill-mask"
    pipeline_class = "FillMaskPipeline"

    def tokenizer_kwargs(self, preprocess_params: Mapping[str, Any]) -> dict[str, Any] | None:
        if set(preprocess_params) - {"tokenizer_kwargs"}:
            return None
        return dict(preprocess_params.get("tokenizer_kwargs") or {})

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        if getattr(getattr(pipe, "tokenizer", None), "mask_token_id", None) is None:
            return "the tokenizer has no mask token"
        return super().unsupported(pipe, preprocess_params, postprocess_params)

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        encoded = super().encode(pipe, items, preprocess_params)
        pipe.ensure_exactly_one_mask_token(encoded.inputs)  # transformers' own check and error, per row
        return encoded

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        logits = outputs["logits"]
        # (masks, 2): row and position of each mask, found on the host copy (no device sync)
        where = torch.nonzero(encoded.inputs["input_ids"] == pipe.tokenizer.mask_token_id, as_tuple=False)
        at = where.to(logits.device, non_blocking=True)
        probs = logits[at[:, 0], at[:, 1]].softmax(dim=-1)  # in the model's dtype, as transformers does
        target_ids = postprocess_params.get("target_ids")
        if target_ids is not None:
            probs = probs[..., torch.as_tensor(target_ids, device=probs.device)]
        values, predictions = probs.topk(self._top_k(postprocess_params))
        return {"values": values, "predictions": predictions, "where": where}

    @staticmethod
    def _top_k(postprocess_params: Mapping[str, Any]) -> int:
        top_k = postprocess_params.get("top_k", 5)
        target_ids = postprocess_params.get("target_ids")
        return min(top_k, len(target_ids)) if target_ids is not None else top_k

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        import numpy as np

        tokenizer = pipe.tokenizer
        target_ids = postprocess_params.get("target_ids")
        rows = host["where"][:, 0].tolist()
        positions = host["where"][:, 1].tolist()
        values, predictions = host["values"].tolist(), host["predictions"].tolist()
        ids = encoded.inputs["input_ids"].numpy()
        per_row: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for mask, row in enumerate(rows):
            per_row[row].append(mask)
        results: list[Any] = []
        for row, masks in enumerate(per_row):
            single_mask = len(masks) == 1
            propositions = []
            for mask in masks:
                found = []
                for score, token in zip(values[mask], predictions[mask]):
                    if target_ids is not None:
                        token = target_ids[token].tolist()
                    tokens = ids[row].copy()
                    tokens[positions[mask]] = token
                    tokens = tokens[np.where(tokens != tokenizer.pad_token_id)]  # the batch's pads and any other
                    found.append({"score": score, "token": token, "token_str": tokenizer.decode([token]),
                                  "sequence": tokenizer.decode(tokens, skip_special_tokens=single_mask)})
                propositions.append(found)
            results.append(propositions[0] if single_mask else propositions)
        return results


class TokenClassificationBatcher(TextBatcher):
    """``token-classification`` (``ner``): one tokenizer call per batch with offsets and special-token
    masks; each input's rows, cut to its own tokens, go through the pipeline's own ``postprocess``
    (entities, aggregation strategies and ignored labels exactly as transformers makes them)."""

    task = "token-classification"
    pipeline_class = "TokenClassificationPipeline"

    def tokenizer_kwargs(self, preprocess_params: Mapping[str, Any]) -> dict[str, Any] | None:
        plain = (not preprocess_params.get("is_split_into_words") and not preprocess_params.get("tokenizer_params")
                 and preprocess_params.get("offset_mapping") is None)  # no words, stride or given offsets
        return {} if plain else None

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        tokenizer = pipe.tokenizer
        truncation = bool(tokenizer.model_max_length and tokenizer.model_max_length > 0)  # as its preprocess
        batch = tokenizer(list(items), padding=True, truncation=truncation, return_special_tokens_mask=True,
                          return_offsets_mapping=True, return_tensors="pt")
        host = {k: batch.pop(k) for k in ("special_tokens_mask", "offset_mapping")}
        return Encoded(dict(batch), batch["attention_mask"].sum(-1).tolist(), tokenizer_padding_side(pipe),
                       {**host, "sentences": list(items)})

    def forward(self, pipe: Any, inputs: dict[str, Any], forward_params: Mapping[str, Any]) -> Any:
        return pipe.model(**inputs)

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": outputs["logits"] if isinstance(outputs, dict) else outputs[0]}

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        per_token = {"logits": host["logits"], "special_tokens_mask": encoded.host["special_tokens_mask"],
                     "offset_mapping": encoded.host["offset_mapping"], **encoded.inputs}
        width = encoded.inputs["input_ids"].shape[1]
        results = []
        for row, (own, sentence) in enumerate(zip(encoded.lengths, encoded.host["sentences"])):
            start = width - own if encoded.padding_side == "left" else 0
            chunk = {k: v[row:row + 1, start:start + own] for k, v in per_token.items()}  # a batch-1 call's chunk
            chunk.update(sentence=sentence, is_last=True, word_ids=None, word_to_chars_map=None)
            results.append(pipe.postprocess([chunk], **postprocess_params))
        return results


class ZeroShotClassificationBatcher(TextBatcher):
    """``zero-shot-classification``: every (input, candidate label) pair of the batch in one
    tokenizer call (the pipeline's own ``_parse_and_tokenize``); each input's rows go through the
    pipeline's own ``postprocess`` (entailment softmax, ``multi_label``, label order)."""

    task = "zero-shot-classification"
    pipeline_class = "ZeroShotClassificationPipeline"

    def tokenizer_kwargs(self, preprocess_params: Mapping[str, Any]) -> dict[str, Any] | None:
        return {} if set(preprocess_params) <= {"candidate_labels", "hypothesis_template"} else None

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        if not preprocess_params.get("candidate_labels"):
            return "no candidate labels (transformers raises its own error)"
        return super().unsupported(pipe, preprocess_params, postprocess_params)

    def rows(self, preprocess_params: Mapping[str, Any]) -> int:
        return len(preprocess_params["candidate_labels"])

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        labels = preprocess_params["candidate_labels"]
        template = preprocess_params.get("hypothesis_template", "This example is {}.")  # the preprocess default
        pairs: list[Any] = []
        for item in items:
            item_pairs, _ = pipe._args_parser(item, labels, template)  # transformers' checks and errors
            pairs.extend(item_pairs)
        inputs = {k: v for k, v in _zero_shot_tokens(pipe, pairs).items() if k in pipe.tokenizer.model_input_names}
        return Encoded(inputs, host={"sequences": list(items), "labels": list(labels)})

    def forward(self, pipe: Any, inputs: dict[str, Any], forward_params: Mapping[str, Any]) -> Any:
        import inspect

        kwargs = dict(inputs)
        if "use_cache" in inspect.signature(pipe.model.forward).parameters:  # as the pipeline's _forward
            kwargs["use_cache"] = False
        return pipe.model(**kwargs)

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": outputs["logits"]}

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        logits, labels = host["logits"], encoded.host["labels"]
        results = []
        for index, sequence in enumerate(encoded.host["sequences"]):
            first = index * len(labels)  # this input's rows: one per label, in label order
            outputs = [{"candidate_label": label, "sequence": sequence, "logits": logits[first + j:first + j + 1]}
                       for j, label in enumerate(labels)]
            results.append(pipe.postprocess(outputs, **postprocess_params))
        return results


class ImageClassificationBatcher(Batcher):
    """``image-classification``: one image-processor call per batch, the top-k labels per image."""

    task = "image-classification"
    pipeline_class = "ImageClassificationPipeline"

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        if getattr(pipe, "image_processor", None) is None:
            return "no image processor"
        if set(preprocess_params) - {"timeout"}:
            return f"preprocess arguments {', '.join(sorted(preprocess_params))}"
        return None

    def accepts(self, item: Any) -> bool:
        import numpy as np
        import torch

        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - transformers' image pipelines need Pillow anyway
            return False
        return isinstance(item, (str, Image.Image, np.ndarray, torch.Tensor))

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        import numpy as np
        import torch
        from transformers.image_utils import load_image

        timeout = preprocess_params.get("timeout")
        images = [item if isinstance(item, (np.ndarray, torch.Tensor)) else load_image(item, timeout=timeout)
                  for item in items]
        try:
            inputs = pipe.image_processor(images=images, return_tensors="pt")
        except ValueError as exc:  # processed images of different sizes do not stack: one at a time, as there
            raise BatchDeclined(str(exc)) from exc
        return Encoded(dict(inputs.to(pipe.dtype)))

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        return {"scores": _class_scores(pipe, outputs["logits"], postprocess_params.get("function_to_apply"))}

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        config = pipe.model.config
        top_k = min(postprocess_params.get("top_k", 5), config.num_labels)
        results: list[Any] = []
        for row in host["scores"].tolist():
            scored = [{"label": config.id2label[i], "score": score} for i, score in enumerate(row)]
            scored.sort(key=lambda x: x["score"], reverse=True)
            results.append(scored[:top_k])
        return results


def _class_scores(pipe: Any, logits: Any, given: Any) -> Any:
    """Float32 scores after the function transformers' classification pipelines apply, with their
    precedence: the caller's; else regression: none, multi-label or one label: sigmoid, else softmax."""
    import torch

    function = given
    if function is None:
        config = pipe.model.config
        if config.problem_type == "regression":
            function = "none"
        elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
            function = "sigmoid"
        elif config.problem_type == "single_label_classification" or config.num_labels > 1:
            function = "softmax"
        else:
            function = getattr(config, "function_to_apply", None) or "none"
    name = str(getattr(function, "value", function)).lower()  # a ClassificationFunction, or its value
    logits = logits.float()
    if name == "sigmoid":
        return torch.sigmoid(logits)
    if name == "softmax":
        return torch.softmax(logits, dim=-1)
    if name == "none":
        return logits
    raise ValueError(f"Unrecognized function_to_apply argument: {function!r}; pass 'softmax', 'sigmoid' or "
                     "'none' (transformers' classification pipelines raise ValueError for it too)")


def _text_or_pair(item: Any) -> Any:
    """What the tokenizer gets for one input, as the per-input preprocess gives it: a text, or a
    ``(text, pair)`` tuple (an empty pair is no pair: the tokenizer encodes the text alone then)."""
    if isinstance(item, str):
        return item
    return (item["text"], item["text_pair"]) if item["text_pair"] else item["text"]


def _zero_shot_tokens(pipe: Any, pairs: list[Any]) -> Any:
    """``pipe._parse_and_tokenize(pairs)`` as if each pair were tokenized alone: where truncating the
    premise cannot make a pair fit, transformers tokenizes that pair without truncation; a batch call
    would do so for the whole batch, so such a batch is tokenized pair by pair and padded."""
    try:
        return pipe.tokenizer(pairs, add_special_tokens=True, return_tensors="pt", padding=True,
                              truncation="only_first")
    except Exception as exc:
        if "too short" not in str(exc):
            raise
    singles = [pipe._parse_and_tokenize([pair]) for pair in pairs]
    return pipe.tokenizer.pad([{k: v[0] for k, v in single.items()} for single in singles], padding=True,
                              return_tensors="pt")


class TextGenerationBatcher(Batcher):
    """``text-generation``: one ``generate`` per batch of left-padded prompts, each result what a call
    with that prompt alone returns.

    Each prompt goes through the pipeline's own ``preprocess`` (prefix, chat template, tokenizer
    arguments), the batch is left-padded (masked) and run by the pipeline's ``_forward``; then each
    row loses the batch's padding -- on the left, and the pad tokens after the step where a call of
    that prompt alone would have stopped (all its sequences past an EOS) -- and goes through the
    pipeline's ``postprocess``. Greedy float32 decoding gives the same tokens as one prompt at a
    time; sampling draws from the same distribution, with other random numbers.
    """

    task = "text-generation"
    pipeline_class = "TextGenerationPipeline"
    # transformers' batched generation is not the per-prompt one (max_length counts the padding, pads
    # follow a stop string) and streamers and assisted generation take one prompt: a declined call
    # runs its prompts one at a time, as without fastpath.
    declined_batch_size = 1
    # generate() arguments whose batched results differ from per-prompt calls, or that need one prompt.
    _PER_PROMPT = {
        "streamer": "a streamer follows one prompt",
        "assistant_model": "assisted generation takes one prompt",
        "prompt_lookup_num_tokens": "assisted generation takes one prompt",
        "assistant_early_exit": "assisted generation takes one prompt",
        "use_mtp": "assisted generation takes one prompt",
        "custom_generate": "a custom generate() may assume one prompt",
        "stop_strings": "stop strings end rows at steps the batch does not mark",
        "stopping_criteria": "custom stopping criteria end rows at steps the batch does not mark",
        "max_time": "max_time bounds the whole batch, not each prompt",
        "logits_processor": "custom logits processors see the padded batch",
        "prefix_allowed_tokens_fn": "it is called with the batch's row index and padded ids",
        "negative_prompt_ids": "one negative prompt per call",
        "no_repeat_ngram_size": "it reads the padded prompt",
        "return_dict_in_generate": "generate's extra outputs hold the batch's padding",
        "num_beams": "beam search",
    }
    # Architectures whose forward ignores the attention mask, so left padding changes their outputs
    # (found by comparing every causal family of transformers' pipeline tests; the others matched).
    _IGNORE_THE_MASK = frozenset({"rwkv"})

    def unsupported(self, pipe: Any, preprocess_params: Mapping[str, Any],
                    postprocess_params: Mapping[str, Any]) -> str | None:
        if getattr(pipe, "tokenizer", None) is None:
            return "no tokenizer"
        config = getattr(pipe.model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return "an encoder-decoder model"
        if getattr(config, "model_type", None) in self._IGNORE_THE_MASK:
            return f"{config.model_type} ignores the attention mask, so padding would change its outputs"
        return None

    def unsupported_forward(self, pipe: Any, forward_params: Mapping[str, Any]) -> str | None:
        try:
            settings = generation_settings(pipe, forward_params)
        except Exception as exc:  # noqa: BLE001 - private transformers API: never fail the user's call on it
            return f"cannot read the call's generation settings ({type(exc).__name__}: {exc})"
        for name, reason in self._PER_PROMPT.items():
            value = settings.get(name)
            if value not in (None, False, [], ()) and not (name == "num_beams" and value == 1):
                return f"{name}: {reason}"
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if settings.get(total) and settings.get(new) is None:
                return f"{total} without {new}: in a batch it would count the padding"
        return None

    def accepts(self, item: Any) -> bool:
        return isinstance(item, str) or hasattr(item, "messages")  # text, or transformers' Chat

    def encode(self, pipe: Any, items: Sequence[Any], preprocess_params: Mapping[str, Any]) -> Encoded:
        singles = [pipe.preprocess(item, **preprocess_params) for item in items]
        rows = [single["input_ids"][0] for single in singles]
        if any(len(row) == 0 for row in rows):
            raise BatchDeclined("an empty prompt: generate() starts it from the BOS token alone")
        if any("attention_mask" in s and not bool(s["attention_mask"].all()) for s in singles):
            raise BatchDeclined("a prompt with masked tokens of its own: left padding would add more")
        # Other tokenizer outputs (a BERT tokenizer's token_type_ids) are dropped: _forward reads only these.
        pad = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0  # masked out
        ids, mask = left_pad(rows, pad)
        return Encoded({"input_ids": ids, "attention_mask": mask, "prompt_text": None},
                       [len(row) for row in rows], "left",
                       {"prompts": [single["prompt_text"] for single in singles], "rows": rows})

    def filled(self, encoded: Encoded, rows: int) -> Encoded:
        """Copies of the batch's last prompt up to ``rows``: its decode step has the shape of the full
        batches (a compiled step per batch size would cost a compile), at the price of the extra rows."""
        inputs = dict(encoded.inputs)
        for key in ("input_ids", "attention_mask"):
            inputs[key] = fill_rows(inputs[key], rows)
        return Encoded(inputs, encoded.lengths, encoded.padding_side, encoded.host)

    def forward(self, pipe: Any, inputs: dict[str, Any], forward_params: Mapping[str, Any]) -> Any:
        from ..errors import is_out_of_memory

        try:
            outputs = pipe._forward(inputs, **forward_params)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise  # the resilience layer splits the batch
            # Whatever fails on the batch runs one prompt at a time: a prompt that fails alone raises
            # its own error there (and is isolated as usual); the others get their results.
            raise BatchDeclined(f"generate() failed on the batch ({type(exc).__name__}: {exc})") from exc
        return {**outputs, "eos": eos_list(generation_settings(pipe, forward_params).get("eos_token_id"))}

    def select(self, pipe: Any, outputs: Any, encoded: Encoded, postprocess_params: Mapping[str, Any]) -> dict[str, Any]:
        # (batch, sequences per prompt, length), and the EOS ids of the call's settings
        return {"sequences": outputs["generated_sequence"], "eos": outputs["eos"]}

    def decode(self, pipe: Any, host: dict[str, Any], encoded: Encoded,
               postprocess_params: Mapping[str, Any]) -> list[Any]:
        import torch

        sequences = host["sequences"]
        width = encoded.inputs["input_ids"].shape[1]
        eos = host["eos"]
        results: list[Any] = []
        for row, own in enumerate(encoded.lengths):
            new = sequences[row, :, width:]
            keep = _steps_alone(new, eos)
            sequence = torch.cat([sequences[row, :, width - own:width], new[:, :keep]], dim=1)
            outputs = {"generated_sequence": sequence.unsqueeze(0), "input_ids": encoded.host["rows"][row][None],
                       "prompt_text": encoded.host["prompts"][row]}
            results.append(pipe.postprocess(outputs, **postprocess_params))
        return results


def generation_settings(pipe: Any, forward_params: Mapping[str, Any]) -> dict[str, Any]:
    """The generation parameters a text-generation call with ``forward_params`` sets: the call's, on
    the pipeline's defaults, on the model's generation config (the non-default fields only)."""
    kwargs = dict(forward_params)
    if hasattr(pipe, "_prepare_generate_kwargs") and hasattr(pipe, "_get_set_generation_params"):
        kwargs = pipe._prepare_generate_kwargs(kwargs)  # transformers >= 5.2x: its own resolution
        settings = pipe._get_set_generation_params(kwargs)
    else:  # earlier 5.x: the pipeline's generation_config (a copy of the model's) unless the call passes one
        config = kwargs.get("generation_config") or getattr(pipe, "generation_config", None) \
            or pipe.model.generation_config
        settings = config.to_diff_dict()
    settings.update({k: v for k, v in kwargs.items() if k != "generation_config"})
    return settings


def _steps_alone(new: Any, eos: list[int]) -> int:
    """How many new tokens a call of this prompt alone makes: it stops when every one of its
    sequences (rows of ``new``) has passed an EOS; the batch goes on, padding them."""
    import torch

    if not eos or new.shape[1] == 0:
        return int(new.shape[1])
    hits = torch.isin(new, torch.tensor(eos, dtype=new.dtype))
    if not bool(hits.any(dim=1).all()):
        return int(new.shape[1])  # a sequence still running at the end
    return int(hits.int().argmax(dim=1).max()) + 1


BATCHERS: dict[str, Batcher] = {b.task: b for b in (
    FeatureExtractionBatcher(), TextClassificationBatcher(), TokenClassificationBatcher(), FillMaskBatcher(),
    ZeroShotClassificationBatcher(), ImageClassificationBatcher(), TextGenerationBatcher())}
BATCHERS["sentiment-analysis"] = BATCHERS["text-classification"]  # transformers' aliases
BATCHERS["ner"] = BATCHERS["token-classification"]


def batcher_for(pipe: Any) -> Batcher | None:
    """The batcher of ``pipe``'s task, when its class is transformers' own for that task (a subclass
    that overrides ``preprocess`` or ``postprocess`` keeps its own per-input path)."""
    import transformers.pipelines

    batcher = BATCHERS.get(getattr(pipe, "task", ""))
    if batcher is None:
        return None
    expected = getattr(transformers.pipelines, batcher.pipeline_class, None)
    return batcher if expected is not None and _transformers_class(type(pipe)) is expected else None


def _transformers_class(cls: type) -> type:
    """The first class of ``cls``'s MRO that is not one of fastpath's swaps (the pipeline's real class)."""
    for klass in cls.__mro__:
        if not any(name.startswith("_fastpath_") for name in vars(klass)):  # each swap keeps its base there
            return klass
    return cls
