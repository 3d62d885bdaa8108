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


# -- regressions found in review -----------------------------------------------------------------

def test_texts_and_pairs_mixed_and_empty_pairs_match_the_plain_pipeline(classifier) -> None:
    plain, fast = classifier
    mixed = [TEXTS[i] if i % 2 else {"text": TEXTS[i], "text_pair": TEXTS[i + 1] if i % 3 else ""}
             for i in range(16)]  # an empty pair is no pair (the text alone), as per input
    assert_same(plain(mixed, top_k=None), fast(mixed, top_k=None))
    assert_same(plain(mixed[:4], top_k=None), list(fast(generator(mixed[:4]), top_k=None)))


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_max_length_without_truncation_truncates_as_per_input(extractor, classifier, task: str) -> None:
    plain, fast = extractor if task == "feature-extraction" else classifier
    kwargs = {"tokenize_kwargs": {"max_length": 8}} if task == "feature-extraction" else {"max_length": 8}
    assert_same(plain(list(TEXTS), **kwargs), fast(list(TEXTS), **kwargs))


def test_a_tokenizer_without_attention_mask_is_declined(tiny_model_factory, monkeypatch) -> None:
    plain, fast = pair("feature-extraction", tiny_model_factory("bert", "base"))
    for pipe in (plain, fast):  # as FNet's tokenizer: the pads would be attended to
        monkeypatch.setattr(pipe.tokenizer, "model_input_names", ["input_ids", "token_type_ids"])
    got = fast(TEXTS[:6], return_tensors=True)  # transformers' batches (its own padding, attended to)
    assert [x.shape for x in got] == [x.shape for x in plain(TEXTS[:6], return_tensors=True)]
    assert any("attention mask" in reason for reason in batched_processing_of(fast).declined)


def test_a_generator_yields_what_came_before_a_failing_input_or_a_failing_source(filler) -> None:
    from transformers.pipelines import PipelineException

    plain, fast = filler
    texts = [*MASKED[:10], "no mask here.", *MASKED[10:14]]
    for pipe in (plain, fast):
        got = []
        with pytest.raises(PipelineException):
            got.extend(pipe(generator(texts)))
        assert len(got) == 10, pipe  # every result before the failing input, as a batch-1 pipeline yields them

    def source() -> Iterator[str]:
        yield from MASKED[:9]
        raise RuntimeError("the source broke")

    for pipe in (plain, fast):
        got = []
        with pytest.raises(RuntimeError, match="the source broke"):
            got.extend(pipe(source()))
        assert len(got) == 9, pipe


def test_fill_mask_single_inputs_keep_resilience_on(filler) -> None:
    from transformers.pipelines import PipelineException

    from transformers_fastpath.pipelines.resilience import resilience_of

    plain, fast = filler
    assert_same(plain([MASKED[0]]), fast([MASKED[0]]))  # a one-item list: fill-mask unwraps its result
    assert not resilience_of(fast).passthrough
    texts = [*MASKED[:12], "no mask here.", *MASKED[12:]]
    with pytest.raises(PipelineException) as info:
        fast(texts)
    assert info.value.fastpath_failed_indices == [12]
    assert_same(plain(MASKED), [r for i, r in enumerate(info.value.fastpath_results) if i != 12])


def test_two_batches_each_with_a_bad_input_are_input_errors(classifier, monkeypatch) -> None:
    """A call of exactly two batches (no input outside them for a canary) whose batches both fail:
    each batch is run again as its own chunk, so the bad inputs are found and the rest complete."""
    plain, fast = classifier
    texts = [t.replace("number", "fox") if i in (3, 20) else t for i, t in enumerate(TEXTS[:40])]
    poison = fast.tokenizer("fox")["input_ids"][1]
    inner = fast.model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if bool((kwargs["input_ids"] == poison).any()):
            raise ValueError("cannot embed token")
        return inner(*args, **kwargs)

    monkeypatch.setattr(fast.model, "forward", forward)
    with pytest.raises(ValueError, match="cannot embed token") as info:
        fast(texts, batch_size=32)
    assert info.value.fastpath_failed_indices == [3, 20]
    good = [i for i in range(40) if i not in (3, 20)]
    assert_same(plain([texts[i] for i in good]), [info.value.fastpath_results[i] for i in good])


def test_images_the_processor_cannot_stack_run_one_at_a_time(tmp_path: Any) -> None:
    import numpy as np
    from PIL import Image
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=5)).eval().save_pretrained(tmp_path)
    ConvNextImageProcessor(do_resize=False).save_pretrained(tmp_path)  # keeps each image's size
    plain, fast = pair("image-classification", tmp_path)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (32 + 8 * (i % 2), 32, 3), dtype=np.uint8)) for i in range(6)]
    assert_same(plain(pictures), fast(pictures))
    assert_same(plain(pictures), list(fast(generator(pictures))))
    assert any("ImageClassificationPipeline" in reason for reason in batched_processing_of(fast).declined)


def test_zero_shot_with_more_labels_than_the_batch_size_runs_transformers_path(zero_shot) -> None:
    plain, fast = zero_shot
    labels = [f"label {i}" for i in range(6)]
    assert_same(plain(TEXTS[:5], candidate_labels=labels), fast(TEXTS[:5], candidate_labels=labels, batch_size=4))
    assert batched_processing_of(fast).declined.get("more model rows per input than the batch size", 0) >= 1


def test_zero_shot_pairs_too_long_to_truncate_are_tokenized_as_alone(zero_shot, monkeypatch) -> None:
    plain, fast = zero_shot
    for pipe in (plain, fast):
        monkeypatch.setattr(pipe.tokenizer, "model_max_length", 24)
    texts = [" ".join(["word"] * 40) + f" {i}" for i in range(4)]  # premises that need truncating
    labels = ["sports", " ".join(["topic"] * 30)]  # this hypothesis alone is longer than 24 tokens
    assert_same(plain(texts, candidate_labels=labels), fast(texts, candidate_labels=labels))
