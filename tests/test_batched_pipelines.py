"""Batched pre- and post-processing (transformers_fastpath.pipelines.batched): what each input gets is
what the plain pipeline returns for it, for lists, generators and datasets, with every call form
the batchers take; what they decline runs transformers' own path; lazy inputs stay lazy."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_pipeline_parity import assert_same, pair

import transformers_fastpath as fp
from transformers_fastpath.pipelines.batched import (
    BATCHES_PER_CALL,
    batched_processing_of,
)
from transformers_fastpath.pipelines.batched_tasks import BATCHERS
from transformers_fastpath.planning.tasks import BATCHED_PROCESSING_TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [("word " * (1 + (i * 7) % 23)).strip() + f" number {i}." for i in range(45)]


@pytest.fixture(scope="module")
def extractor(tiny_model_factory) -> tuple[Any, Any]:
    return pair("feature-extraction", tiny_model_factory("bert", "base"))


@pytest.fixture(scope="module")
def classifier(tiny_model_factory) -> tuple[Any, Any]:
    return pair("text-classification", tiny_model_factory("bert", "seq-cls"))


def no_per_input_preprocess(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
    """Fail the test if transformers' per-input ``preprocess`` runs (the batched path never calls it)."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("per-input preprocess ran")

    monkeypatch.setattr(pipe, "preprocess", refuse)


def generator(items: list[Any], pulled: list[int] | None = None) -> Iterator[Any]:
    for item in items:
        if pulled is not None:
            pulled.append(1)
        yield item


def test_the_batchers_and_the_plans_task_list_agree() -> None:
    assert set(BATCHERS) == BATCHED_PROCESSING_TASKS


@pytest.mark.parametrize("kwargs", [{}, {"return_tensors": True}, {"truncation": True, "max_length": 8},
                                    {"tokenize_kwargs": {"add_special_tokens": False}}])
def test_feature_extraction_matches_the_plain_pipeline(extractor, monkeypatch, kwargs: dict[str, Any]) -> None:
    plain, fast = extractor
    want = plain(list(TEXTS), **kwargs)  # batch 1: each input's own tokens
    before = batched_processing_of(fast).batches
    no_per_input_preprocess(monkeypatch, fast)
    assert_same(want, fast(list(TEXTS), **kwargs))
    assert batched_processing_of(fast).batches - before == math.ceil(len(TEXTS) / fast._batch_size)


@pytest.mark.parametrize("kwargs", [{}, {"top_k": None}, {"top_k": 2}, {"top_k": 1},
                                    {"function_to_apply": "sigmoid", "top_k": None}, {"function_to_apply": "none"}])
def test_text_classification_matches_the_plain_pipeline(classifier, monkeypatch, kwargs: dict[str, Any]) -> None:
    plain, fast = classifier
    no_per_input_preprocess(monkeypatch, fast)
    assert_same(plain(list(TEXTS), **kwargs), fast(list(TEXTS), **kwargs))


def test_text_pairs_match_the_plain_pipeline(classifier, monkeypatch) -> None:
    plain, fast = classifier
    pairs = [{"text": a, "text_pair": b} for a, b in zip(TEXTS, reversed(TEXTS))]
    no_per_input_preprocess(monkeypatch, fast)
    assert_same(plain(pairs, top_k=None), fast(pairs, top_k=None))


def test_left_padding_cuts_the_batchs_pads_on_the_left(tiny_model_factory, monkeypatch) -> None:
    """Against transformers' per-input path of the same fastpath pipeline (same sorted batches): BERT's
    absolute positions make a left-padded row differ from the row alone, with or without fastpath."""
    from transformers import pipeline

    path = str(tiny_model_factory("bert", "base"))
    per_input = pipeline("feature-extraction", model=path, fastpath={"defaults": {"batched_processing": False}})
    fast = pipeline("feature-extraction", model=path, fastpath=True)
    for pipe in (per_input, fast):
        pipe.tokenizer.padding_side = "left"
    no_per_input_preprocess(monkeypatch, fast)
    want = per_input(list(TEXTS), return_tensors=True)
    assert_same(want, fast(list(TEXTS), return_tensors=True))
    assert [x.shape[1] for x in want] == [len(ids) for ids in fast.tokenizer(TEXTS)["input_ids"]]


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_a_generator_stays_lazy_and_results_keep_its_order(extractor, classifier, task: str) -> None:
    plain, fast = extractor if task == "feature-extraction" else classifier
    pulled: list[int] = []
    results = fast(generator(TEXTS, pulled))
    assert not pulled or len(pulled) == 1  # transformers peeks at the first item; nothing more yet
    first = next(results)
    assert len(pulled) <= 2  # the first window is one input (so the first result comes back at once)
    rest = list(results)
    assert len(pulled) == len(TEXTS)
    assert_same(plain(list(TEXTS)), [first, *rest])


def test_a_generator_is_read_in_bounded_windows(classifier) -> None:
    _, fast = classifier
    pulled: list[int] = []
    texts = TEXTS * 12  # 540 inputs
    results = fast(generator(texts, pulled))
    largest = fast._batch_size * BATCHES_PER_CALL
    for count in range(1, len(texts) + 1):
        next(results)
        # at most the current window (up to `largest`) and the first peeked item ahead of the results
        assert len(pulled) - count < largest + 1, (count, len(pulled))
    assert len(pulled) == len(texts)


def test_a_torch_dataset_is_read_lazily_and_has_a_length(classifier) -> None:
    plain, fast = classifier

    class Texts(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.read: list[int] = []

        def __len__(self) -> int:
            return len(TEXTS)

        def __getitem__(self, i: int) -> str:
            self.read.append(i)
            return TEXTS[i]

    data = Texts()
    results = fast(data, top_k=None)
    assert len(results) == len(TEXTS)
    first = next(iter(results))
    assert len(data.read) <= 2
    assert_same(plain(list(TEXTS), top_k=None), [first, *results])


def test_what_a_batcher_declines_runs_transformers_path(extractor, classifier) -> None:
    plain, fast = extractor
    state = batched_processing_of(fast)
    before = state.batches
    kwargs = {"tokenize_kwargs": {"padding": "max_length", "max_length": 40, "truncation": True}}
    want, got = plain(list(TEXTS), return_tensors=True, **kwargs), fast(list(TEXTS), return_tensors=True, **kwargs)
    assert [x.shape for x in got] == [x.shape for x in want] == [(1, 40, want[0].shape[2])] * len(TEXTS)
    real = [len(ids) for ids in fast.tokenizer(TEXTS, truncation=True, max_length=40)["input_ids"]]
    assert_same([w[:, :n] for w, n in zip(want, real)], [g[:, :n] for g, n in zip(got, real)])  # pads are 0 there
    assert state.batches == before and state.declined.get("padding='max_length'", 0) >= 1

    plain, fast = classifier
    mixed = [*TEXTS[:5], [[TEXTS[5], TEXTS[6]]], *TEXTS[7:9]]  # transformers' legacy pair form among texts
    assert_same(plain(mixed), fast(mixed))


def test_inputs_of_another_kind_in_a_generator_window_run_transformers_path(classifier) -> None:
    plain, fast = classifier
    pairs = [{"text": TEXTS[0], "text_pair": TEXTS[1]}, [[TEXTS[2], TEXTS[3]]], TEXTS[4]]
    assert_same(plain(list(pairs)), list(fast(generator(pairs))))


def test_a_subclass_with_its_own_postprocess_keeps_it(tiny_model_factory) -> None:
    from transformers import FeatureExtractionPipeline, pipeline

    class Pooled(FeatureExtractionPipeline):
        def postprocess(self, model_outputs: Any, **kwargs: Any) -> Any:
            return model_outputs[0].mean(dim=1).tolist()

    fast = pipeline("feature-extraction", model=str(tiny_model_factory("bert", "base")), pipeline_class=Pooled,
                    fastpath=True)
    assert batched_processing_of(fast) is None
    assert [len(x) for x in fast(TEXTS[:3])] == [1, 1, 1]  # its own postprocess ran


def test_the_policy_can_turn_it_off(tiny_model_factory) -> None:
    from transformers import pipeline

    path = str(tiny_model_factory("bert", "base"))
    off = pipeline("feature-extraction", model=path, fastpath={"defaults": {"batched_processing": False}})
    assert batched_processing_of(off) is None
    assert fp.plan_of(off).settings["batched_processing"].value is False
    on = pipeline("feature-extraction", model=path, fastpath=True)
    assert fp.plan_of(on).settings["batched_processing"].value is True
    one = pipeline("feature-extraction", model=path, fastpath={"defaults": {"batch_size": 1}})
    assert batched_processing_of(one) is None
    assert "batch size" in fp.plan_of(one).settings["batched_processing"].reason


# -- fill-mask and image-classification -------------------------------------------------------------

MASKED = [text.replace("word", "[MASK]", 1) for text in TEXTS[:20]]


@pytest.fixture(scope="module")
def filler(tiny_model_factory) -> tuple[Any, Any]:
    return pair("fill-mask", tiny_model_factory("bert", "mlm"))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 2}, {"targets": ["word", "number", "the"]},
                                    {"targets": ["word", "number"], "top_k": 5}])
def test_fill_mask_matches_the_plain_pipeline(filler, monkeypatch, kwargs: dict[str, Any]) -> None:
    plain, fast = filler
    no_per_input_preprocess(monkeypatch, fast)
    texts = [*MASKED, "two [MASK] in one [MASK] text."]  # several masks: a list per mask, specials kept
    assert_same(plain(texts, **kwargs), fast(texts, **kwargs))


def test_fill_mask_without_a_mask_raises_transformers_error(filler) -> None:
    from transformers.pipelines import PipelineException

    plain, fast = filler
    texts = [*MASKED[:6], "no mask here."]
    with pytest.raises(PipelineException, match="No mask_token"):
        plain(texts)
    with pytest.raises(PipelineException, match="No mask_token") as info:
        fast(texts)
    assert info.value.fastpath_failed_indices == [6]  # the others completed (resilience), as for any input error
    assert_same(plain(MASKED[:6]), info.value.fastpath_results[:6])


@pytest.fixture(scope="module")
def image_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit-cls")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=7)
    ViTForImageClassification(config).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return pair("image-classification", path)


def images(n: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20 + 7 * (i % 5), 30 + 3 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3}, {"top_k": 20}, {"function_to_apply": "sigmoid"}])
def test_image_classification_matches_the_plain_pipeline(image_classifier, monkeypatch,
                                                         kwargs: dict[str, Any]) -> None:
    plain, fast = image_classifier
    assert batched_processing_of(fast) is not None and fast._batch_size > 1
    no_per_input_preprocess(monkeypatch, fast)
    pictures = images(37)
    assert_same(plain(pictures, **kwargs), fast(pictures, **kwargs))
    assert_same(plain(pictures[:5], **kwargs), list(fast(generator(pictures[:5]), **kwargs)))


# -- token classification and zero-shot (transformers' chunk pipelines) ---------------------------

@pytest.fixture(scope="module")
def tagger(tiny_model_factory) -> tuple[Any, Any]:
    return pair("token-classification", tiny_model_factory("bert", "token-cls"))


@pytest.mark.parametrize("kwargs", [{"ignore_labels": []}, {"aggregation_strategy": "simple", "ignore_labels": []},
                                    {"aggregation_strategy": "first"}, {"aggregation_strategy": "average"},
                                    {"aggregation_strategy": "max", "ignore_labels": []}])
def test_token_classification_matches_the_plain_pipeline(tagger, monkeypatch, kwargs: dict[str, Any]) -> None:
    plain, fast = tagger
    texts = [t.replace("word", "Wordsworth's", 2) for t in TEXTS]  # sub-words, punctuation, offsets
    no_per_input_preprocess(monkeypatch, fast)
    assert_same(plain(texts, **kwargs), fast(texts, **kwargs))


def test_token_classification_with_a_stride_runs_transformers_path(tagger, monkeypatch) -> None:
    plain, fast = tagger
    for pipe in (plain, fast):
        monkeypatch.setattr(pipe.tokenizer, "model_max_length", 64)  # within the tiny model's 128 positions
    state = batched_processing_of(fast)
    before = state.batches
    long_texts = [" ".join(["word"] * 150)] * 2  # longer than model_max_length: chunks with a stride
    kwargs = {"aggregation_strategy": "simple", "stride": 16, "ignore_labels": []}
    assert_same(plain(long_texts, **kwargs), fast(long_texts, **kwargs))
    assert state.batches == before


@pytest.fixture(scope="module")
def zero_shot(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = tiny_model_factory("bert", "seq-cls")
    path = tmp_path_factory.mktemp("nli")
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=3, id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
        label2id={"contradiction": 0, "neutral": 1, "entailment": 2}, ignore_mismatched_sizes=True)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return pair("zero-shot-classification", path)


@pytest.mark.parametrize("kwargs", [{"candidate_labels": ["sports", "politics", "cooking"]},
                                    {"candidate_labels": "sports, politics", "multi_label": True},
                                    {"candidate_labels": ["weather"], "hypothesis_template": "It is about {}."}])
def test_zero_shot_matches_the_plain_pipeline(zero_shot, monkeypatch, kwargs: dict[str, Any]) -> None:
    plain, fast = zero_shot
    no_per_input_preprocess(monkeypatch, fast)
    assert_same(plain(list(TEXTS), **kwargs), fast(list(TEXTS), **kwargs))
    assert_same(plain(TEXTS[:7], **kwargs), list(fast(generator(TEXTS[:7]), **kwargs)))


def test_zero_shot_batches_hold_about_batch_size_rows(zero_shot, monkeypatch) -> None:
    _, fast = zero_shot
    rows: list[int] = []
    inner = fast.model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        rows.append(kwargs["input_ids"].shape[0])
        return inner(*args, **kwargs)

    monkeypatch.setattr(fast.model, "forward", forward)
    labels = ["a", "b", "c", "d", "e"]
    fast(list(TEXTS), candidate_labels=labels)
    per_batch = fast._batch_size // len(labels) * len(labels)
    assert rows[:-1] == [per_batch] * (len(rows) - 1) and sum(rows) == len(TEXTS) * len(labels)
