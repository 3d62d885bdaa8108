"""Pipelines created with fastpath never lose inputs: OOM batches split, bad inputs isolated, order kept.

Faults are injected into a tiny BERT text-classification pipeline: a wrapper on the model's
forward raises ``torch.OutOfMemoryError`` for batches larger than N (or for one huge input), or
another error for one poisoned input or for every call; malformed inputs (``None``, an int)
sit in the middle of the list. Results of good inputs are compared with fastpath off.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import transformers

import transformers_fastpath as fp
from transformers_fastpath.errors import StrictModeError, is_out_of_memory
from transformers_fastpath.pipelines.resilience import (
    _splittable,
    enable_resilience,
    gather_shards,
    resilience_of,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest: tiny models on one thread
]

TEXTS = [
    "Hello world.",
    "A much longer sentence that has quite a few more tokens than the first one does, by far.",
    "Short.",
    "Medium length text goes here, with a clause.",
    "x",
    "Another sentence of a middling sort of length.",
    "Tiny one.",
    "The quick brown fox jumps over the lazy dog and keeps running into the distance.",
    "ok",
    "Yet another input to classify today.",
    "Last.",
]


@pytest.fixture(scope="module")
def classifier(tiny_model_factory) -> tuple[str, Any]:
    """The model path, and a fastpath-off pipeline for reference outputs."""
    path = str(tiny_model_factory("bert", "seq-cls"))
    return path, transformers.pipeline("text-classification", model=path, fastpath=False)


def fast(path: str, **policy: Any) -> Any:
    return fp.pipeline("text-classification", model=path, batch_size=4,
                       fastpath={"defaults": policy} if policy else True)


def same(results: list[Any], reference: list[Any]) -> None:
    assert len(results) == len(reference)
    for got, want in zip(results, reference):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)


def wrap_forward(monkeypatch: pytest.MonkeyPatch, pipe: Any, fault: Any) -> list[tuple[int, bool]]:
    """``fault(input_ids)`` returns an exception to raise, or None; returns (batch, ok) per call."""
    inner = pipe.model.forward
    calls: list[tuple[int, bool]] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        error = fault(ids)
        calls.append((ids.shape[0], error is None))
        if error is not None:
            raise error
        return inner(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "forward", forward)
    return calls


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def fastpath_warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("transformers_fastpath")
            and needle in r.getMessage()]


# -- out of memory ------------------------------------------------------------------------------

def test_oom_batches_are_split_and_every_output_arrives_in_order(
        classifier, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path, off = classifier
    pipe = fast(path)
    calls = wrap_forward(monkeypatch, pipe, lambda ids: oom() if ids.shape[0] > 2 else None)
    with caplog.at_level(logging.DEBUG, logger="transformers_fastpath"):
        first = pipe(list(TEXTS))
        second = pipe(list(TEXTS))
    reference = off(list(TEXTS))
    same(first, reference)
    same(second, reference)
    assert max(size for size, ok in calls if ok) <= 2
    # Every input ran once per call on the successful path: nothing done twice beyond the split.
    assert sum(size for size, ok in calls if ok) == 2 * len(TEXTS)
    assert len(fastpath_warnings(caplog, "ran out of memory")) == 1  # once per pipeline
    assert resilience_of(pipe).oom_logged


def test_oom_even_at_batch_size_one_before_anything_completed_raises(classifier, monkeypatch) -> None:
    path, _ = classifier
    pipe = fast(path)
    calls = wrap_forward(monkeypatch, pipe, lambda ids: oom())
    with pytest.raises(torch.OutOfMemoryError) as info:
        pipe(list(TEXTS))
    assert any("before any input completed" in note and "nothing fits" in note for note in info.value.__notes__)
    # Halves down to one input; a second input and the last (shortest) one alone fail too:
    # nothing fits, raised at once.
    assert [size for size, _ in calls] == [4, 2, 1, 1, 1]


@pytest.mark.parametrize("mode", ["raise", "return"])
def test_one_input_too_big_even_alone_is_reported_for_that_input(classifier, monkeypatch, mode: str) -> None:
    path, off = classifier
    pipe = fast(path, input_errors=mode)
    huge = 1  # the longest text: out of memory whenever it is in the batch
    longest = len(pipe.tokenizer(TEXTS[huge])["input_ids"])
    wrap_forward(monkeypatch, pipe, lambda ids: oom() if ids.shape[1] >= longest else None)
    reference = off(list(TEXTS))
    if mode == "raise":
        with pytest.raises(torch.OutOfMemoryError) as info:
            pipe(list(TEXTS))
        results = info.value.fastpath_results
        assert info.value.fastpath_failed_indices == [huge]
        assert any(f"input {huge} ran out of memory even alone" in n for n in info.value.__notes__)
    else:
        results = pipe(list(TEXTS))
    assert isinstance(results[huge], torch.OutOfMemoryError)
    same([r for i, r in enumerate(results) if i != huge], [r for i, r in enumerate(reference) if i != huge])


# -- inputs that fail on their own ------------------------------------------------------------

BAD = {2: None, 5: 7}


def with_bad_inputs() -> list[Any]:
    inputs: list[Any] = list(TEXTS)
    for index, value in BAD.items():
        inputs[index] = value
    return inputs


def test_malformed_inputs_raise_the_original_error_after_the_rest_complete(classifier) -> None:
    path, off = classifier
    pipe = fast(path)
    with pytest.raises(ValueError) as plain:
        off(with_bad_inputs())  # what transformers raises (and loses every result)
    with pytest.raises(ValueError) as info:
        pipe(with_bad_inputs())
    exc = info.value
    assert type(exc) is type(plain.value) and str(exc) == str(plain.value)  # the original error, unmasked
    assert exc.fastpath_failed_indices == [2, 5]
    assert set(exc.fastpath_errors) == {2, 5} and exc.fastpath_errors[2] is exc
    note = exc.__notes__[-1]
    assert "2 of 11 pipeline inputs failed" in note and "2: ValueError" in note and "5: ValueError" in note
    assert 'input_errors = "return"' in note
    results = exc.fastpath_results
    assert isinstance(results[2], ValueError) and isinstance(results[5], ValueError)
    good = [i for i in range(len(TEXTS)) if i not in BAD]
    same([results[i] for i in good], off([TEXTS[i] for i in good]))


def test_malformed_inputs_are_returned_in_place_with_input_errors_return(
        classifier, caplog: pytest.LogCaptureFixture) -> None:
    path, off = classifier
    pipe = fast(path, input_errors="return")
    assert fp.plan_of(pipe)["input_errors"] == "return"
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        results = pipe(with_bad_inputs())
        pipe(with_bad_inputs())
    assert len(results) == len(TEXTS)
    assert isinstance(results[2], ValueError) and isinstance(results[5], ValueError)
    good = [i for i in range(len(TEXTS)) if i not in BAD]
    same([results[i] for i in good], off([TEXTS[i] for i in good]))
    assert len(fastpath_warnings(caplog, "input_errors")) == 1


def test_an_input_failing_inside_a_batch_is_isolated(classifier, monkeypatch) -> None:
    """An error only the model sees (no type check catches it): the batch is bisected."""
    path, off = classifier
    pipe = fast(path)
    poisoned = 7
    poison = pipe.tokenizer("fox")["input_ids"][1]
    calls = wrap_forward(monkeypatch, pipe, lambda ids: ValueError("cannot embed token")
                         if bool((ids == poison).any()) else None)
    with pytest.raises(ValueError, match="cannot embed token") as info:
        pipe(list(TEXTS))
    assert info.value.fastpath_failed_indices == [poisoned]
    results = info.value.fastpath_results
    good = [i for i in range(len(TEXTS)) if i != poisoned]
    same([results[i] for i in good], off([TEXTS[i] for i in good]))
    # The failing call (several batches: batched processing), its batch, the batch's half, quarter, the input.
    assert sum(1 for _, ok in calls if not ok) <= 5


def test_several_bad_inputs_sorted_together_are_still_inputs_errors(classifier, monkeypatch) -> None:
    """The three longest inputs are too long for the model; length sorting puts them in the first
    batch, whose halves then both fail: one short input that runs shows they are input errors."""
    path, off = classifier
    pipe = fast(path)
    lengths = [len(ids) for ids in pipe.tokenizer(TEXTS)["input_ids"]]
    limit = sorted(lengths, reverse=True)[2]
    too_long = [i for i in range(len(TEXTS)) if lengths[i] >= limit]
    assert 3 <= len(too_long) < len(TEXTS) // 2
    wrap_forward(monkeypatch, pipe, lambda ids: IndexError("index out of range in self")
                 if ids.shape[1] >= limit else None)
    with pytest.raises(IndexError) as info:
        pipe(list(TEXTS))
    assert info.value.fastpath_failed_indices == too_long
    results = info.value.fastpath_results
    good = [i for i in range(len(TEXTS)) if i not in too_long]
    same([results[i] for i in good], off([TEXTS[i] for i in good]))


def test_errors_that_are_not_about_one_input_propagate_at_once(classifier, monkeypatch) -> None:
    path, _ = classifier
    pipe = fast(path)
    raised: list[BaseException] = []

    def broken(ids: torch.Tensor) -> BaseException:
        raised.append(AttributeError("'NoneType' object has no attribute 'weight'"))
        return raised[-1]

    calls = wrap_forward(monkeypatch, pipe, broken)
    with pytest.raises(AttributeError) as info:
        pipe(list(TEXTS))
    assert info.value is raised[0]  # the first error, as raised: no note, nothing attached
    assert not getattr(info.value, "__notes__", None) and not hasattr(info.value, "fastpath_results")
    # The call (several batches: batched processing), its first batch, the batch's two halves, one
    # last input alone: not retried input by input.
    assert len(calls) == 5


def test_fastpath_errors_are_never_retried(classifier, monkeypatch) -> None:
    path, _ = classifier
    pipe = fast(path)
    calls = wrap_forward(monkeypatch, pipe, lambda ids: StrictModeError("strict mode says no"))
    with pytest.raises(StrictModeError):
        pipe(list(TEXTS))
    assert len(calls) == 1


# -- what is left alone --------------------------------------------------------------------------

def test_single_inputs_keyword_calls_and_chats_pass_through(classifier) -> None:
    path, off = classifier
    pipe = fast(path)
    same(pipe(TEXTS[0]), off(TEXTS[0]))
    same(pipe(inputs=list(TEXTS)), off(list(TEXTS)))
    assert not _splittable([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert _splittable([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]])
    assert not _splittable([]) and not _splittable("text") and not _splittable(("a", "b"))


class _CountingPipeline:
    """A stand-in pipeline: ``fn(items)`` computes a batch; records every call."""

    def __init__(self, fn: Any, batch_size: int = 4) -> None:
        self.fn = fn
        self._batch_size = batch_size
        self.calls: list[list[Any]] = []
        self.call_count = 0

    def __call__(self, inputs: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        self.call_count += 1
        self.calls.append(list(inputs))
        return self.fn(list(inputs))


def test_a_pipeline_without_one_result_per_input_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    pipe = _CountingPipeline(lambda items: {"n": len(items)}, batch_size=2)
    enable_resilience(pipe)
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        assert pipe([1, 2, 3, 4, 5]) == {"n": 5}
        assert pipe([1, 2, 3]) == {"n": 3}
    assert resilience_of(pipe).passthrough
    assert pipe.calls == [[1, 2], [1, 2, 3, 4, 5], [1, 2, 3]]
    assert len(fastpath_warnings(caplog, "one result per input")) == 1
    assert pipe.call_count == 2  # once per user call


def test_call_count_grows_once_per_user_call() -> None:
    pipe = _CountingPipeline(lambda items: [x * 2 for x in items], batch_size=2)
    enable_resilience(pipe)
    assert pipe([1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
    assert [len(c) for c in pipe.calls] == [2, 2, 1] and pipe.call_count == 1


def test_gather_shards_merges_partial_results_of_replicas() -> None:
    shards = [range(3), range(3, 5)]
    error = ValueError("bad input")
    error.fastpath_results = ["b0", error]
    error.fastpath_failed_indices = [1]
    error.fastpath_errors = {1: error}
    assert gather_shards(shards, [["a0", "a1", "a2"], ["b0", "b1"]], 5) == ["a0", "a1", "a2", "b0", "b1"]
    with pytest.raises(ValueError) as info:
        gather_shards(shards, [["a0", "a1", "a2"], error], 5)
    assert info.value.fastpath_results == ["a0", "a1", "a2", "b0", error]
    assert info.value.fastpath_failed_indices == [4] and set(info.value.fastpath_errors) == {4}
    other = RuntimeError("replica crashed")
    with pytest.raises(RuntimeError) as plain:
        gather_shards(shards, [other, ["b0", "b1"]], 5)
    assert plain.value is other


def test_out_of_memory_detection() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 1 bytes"))
    assert is_out_of_memory(MemoryError())
    wrapped = ValueError("batch failed")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_resilience_keeps_the_pipeline_class(classifier) -> None:
    path, _ = classifier
    pipe = fast(path)
    assert isinstance(pipe, transformers.TextClassificationPipeline)
    assert type(pipe).__name__ == "TextClassificationPipeline"
    assert resilience_of(pipe) is not None and resilience_of(pipe).input_errors == "raise"
    assert resilience_of(transformers.pipeline("text-classification", model=path, fastpath=False)) is None


def test_policy_rejects_an_unknown_input_errors_value(classifier) -> None:
    with pytest.raises(fp.PolicyError, match="input_errors"):
        fp.load_policy({"defaults": {"input_errors": "ignore"}})
    with pytest.raises(fp.PolicyError, match="verify"):
        fp.load_policy({"defaults": {"verify": "yes"}})
