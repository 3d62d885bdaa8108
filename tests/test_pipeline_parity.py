"""``pipeline(..., fastpath=True)`` returns what the same call without it returns: the same
structure, types and shapes for every task the project accelerates, values within 1e-4 in float32
and the same labels, tokens and generated text.

Each case runs the plain pipeline (transformers' own batch size of 1) and the fastpath one (the
plan's batch size, length sorting, the fused encoder) on the same tiny saved model and inputs of
varied length, including a single input and a caller's ``batch_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import transformers_fastpath as fp

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["short", "a somewhat longer sentence about nothing", "mid length text here",
         "the longest sentence of all of them, by far, with many more words than the rest", "x y"]
ATOL = 1e-4


def assert_same(plain: Any, fast: Any, where: str = "output") -> None:
    """Recursive equality: containers and types exactly, numbers within :data:`ATOL`."""
    if isinstance(plain, torch.Tensor):
        assert isinstance(fast, torch.Tensor) and fast.shape == plain.shape and fast.dtype == plain.dtype, where
        torch.testing.assert_close(fast, plain, atol=ATOL, rtol=0, msg=where)
    elif isinstance(plain, np.ndarray):
        assert isinstance(fast, np.ndarray) and fast.shape == plain.shape, where
        np.testing.assert_allclose(fast, plain, atol=ATOL, rtol=0, err_msg=where)
    elif isinstance(plain, dict):
        assert isinstance(fast, dict) and list(fast) == list(plain), (where, list(fast), list(plain))
        for key in plain:
            assert_same(plain[key], fast[key], f"{where}[{key!r}]")
    elif isinstance(plain, (list, tuple)):
        assert type(fast) is type(plain) and len(fast) == len(plain), (where, type(fast), len(fast), len(plain))
        for i, (a, b) in enumerate(zip(plain, fast)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(plain, (float, np.floating)):
        assert type(fast) is type(plain) and abs(fast - plain) <= ATOL, (where, fast, plain)
    else:
        assert type(fast) is type(plain) and fast == plain, (where, fast, plain)


def pair(task: str, model: Path | str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import pipeline

    plain = pipeline(task, model=str(model), fastpath=False, **kwargs)
    fast = pipeline(task, model=str(model), fastpath=True, **kwargs)
    assert fp.plan_of(fast) is not None and fp.plan_of(plain) is None
    return plain, fast


def check(plain: Any, fast: Any, inputs: Any, **call: Any) -> None:
    assert_same(plain(inputs, **call), fast(inputs, **call), f"{plain.task}({call})")


def test_feature_extraction(tiny_model_factory) -> None:
    plain, fast = pair("feature-extraction", tiny_model_factory("bert"))
    assert fp.plan_of(fast)["batch_size"] > 1  # batched and sorted: pads would show if kept
    for call in ({}, {"return_tensors": True}):
        check(plain, fast, TEXTS, **call)
        check(plain, fast, TEXTS[3], **call)
    shapes = [np.array(o).shape for o in fast(TEXTS)]
    assert shapes == [np.array(plain(t)).shape for t in TEXTS] and len(set(shapes)) > 1


def test_feature_extraction_with_a_callers_batch_size(tiny_model_factory) -> None:
    """transformers pads each output to its batch when the caller batches; fastpath returns each
    input's own tokens at any batch size (the pad rows never carried meaning)."""
    from transformers import pipeline

    path = str(tiny_model_factory("bert"))
    plain = pipeline("feature-extraction", model=path, fastpath=False)
    padded = pipeline("feature-extraction", model=path, fastpath=False, batch_size=4)
    fast = pipeline("feature-extraction", model=path, fastpath=True, batch_size=4)
    assert [np.array(o).shape for o in padded(TEXTS)] != [np.array(o).shape for o in plain(TEXTS)]
    assert_same(plain(TEXTS), fast(TEXTS))


def test_feature_extraction_keeps_the_padding_the_input_asked_for(tiny_model_factory) -> None:
    """Only the rows the batch added go: ``padding="max_length"`` gives every input 24 rows, as plain;
    real tokens equal."""
    plain, fast = pair("feature-extraction", tiny_model_factory("bert"))
    tokenize = {"padding": "max_length", "max_length": 24, "truncation": True}
    want, got = plain(TEXTS, tokenize_kwargs=tokenize), fast(TEXTS, tokenize_kwargs=tokenize)
    assert [np.array(o).shape for o in got] == [np.array(o).shape for o in want] == [(1, 24, 64)] * len(TEXTS)
    for text, a, b in zip(TEXTS, want, got):  # values on real tokens (pad rows carry no meaning)
        real = np.array(fast.tokenizer(text, **tokenize)["attention_mask"], dtype=bool)
        np.testing.assert_allclose(np.array(b)[0][real], np.array(a)[0][real], atol=ATOL, rtol=0)


def test_feature_extraction_replicas_run_their_own_model(tiny_model_factory) -> None:
    """Copies of a fastpath feature-extraction pipeline (replicas in threads) compute with their own
    model, and give the same own-token outputs."""
    from transformers_fastpath.pipelines.replicas import enable_replicas, replicas_of

    plain, fast = pair("feature-extraction", tiny_model_factory("bert"))
    enable_replicas(fast, ["cpu", "cpu"])
    second = replicas_of(fast)[1]
    assert second.model is not fast.model
    calls: list[str] = []
    fast.model.register_forward_hook(lambda *_: calls.append("first"))
    second.model.register_forward_hook(lambda *_: calls.append("second"))
    assert_same(plain(TEXTS), fast(TEXTS))
    assert_same(plain(TEXTS), second(TEXTS))
    assert "second" in calls and "first" in calls


def test_text_classification(tiny_model_factory) -> None:
    plain, fast = pair("text-classification", tiny_model_factory("bert", "seq-cls"))
    for call in ({}, {"top_k": None}, {"top_k": 2}):
        check(plain, fast, TEXTS, **call)
        check(plain, fast, TEXTS[0], **call)


@pytest.mark.parametrize("aggregation_strategy", ["none", "simple"])
def test_token_classification(tiny_model_factory, aggregation_strategy: str) -> None:
    plain, fast = pair("token-classification", tiny_model_factory("bert", "token-cls"))
    check(plain, fast, TEXTS, aggregation_strategy=aggregation_strategy, ignore_labels=[])


def test_fill_mask(tiny_model_factory) -> None:
    plain, fast = pair("fill-mask", tiny_model_factory("bert", "mlm"))
    masked = [t.replace(" ", " [MASK] ", 1) if " " in t else t + " [MASK]" for t in TEXTS]
    check(plain, fast, masked, top_k=3)


def test_question_answering(tiny_model_factory) -> None:
    """transformers 5 removes the question-answering pipeline (5.17 and 5.25 no longer have it); where a
    release still has it, fastpath's answers equal the plain ones."""
    import transformers.pipelines as pipelines

    if "question-answering" not in pipelines.SUPPORTED_TASKS:
        pytest.skip(f"transformers {transformers_version()} has no question-answering pipeline")
    plain, fast = pair("question-answering", tiny_model_factory("bert", "qa"))
    questions = [{"question": "what is it?", "context": t} for t in TEXTS]
    check(plain, fast, questions)
    check(plain, fast, questions[3])


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def test_zero_shot_classification(tiny_model_factory, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = tiny_model_factory("bert", "seq-cls")
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=3, id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
        label2id={"contradiction": 0, "neutral": 1, "entailment": 2}, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)
    plain, fast = pair("zero-shot-classification", tmp_path)
    check(plain, fast, TEXTS, candidate_labels=["sports", "politics", "cooking"])


def test_image_classification(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=5)
    ViTForImageClassification(config).eval().save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 30), (32, 64), (50, 50))]
    plain, fast = pair("image-classification", tmp_path)
    check(plain, fast, images, top_k=3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_generation_greedy(tiny_model_factory, family: str) -> None:
    plain, fast = pair("text-generation", tiny_model_factory(family, "causal"))
    check(plain, fast, TEXTS[:3], max_new_tokens=6, do_sample=False)
    check(plain, fast, TEXTS[1], max_new_tokens=6, do_sample=False, return_full_text=False)
