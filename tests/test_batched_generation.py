"""The text-generation pipeline fed a list (transformers_fastpath.pipelines.batched_tasks.TextGenerationBatcher):
prompts run in length-sorted, left-padded batches, one generate() each, and every result is what
the plain pipeline returns for that prompt alone; what it cannot batch runs one prompt at a time."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_pipeline_parity import assert_same, pair

import transformers_fastpath as fp
from transformers_fastpath.pipelines.batched import batched_processing_of
from transformers_fastpath.pipelines.batching import sorted_order

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [("word " * (1 + (i * 5) % 17)).strip() + f" number {i}." for i in range(11)]
GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def generators(request: pytest.FixtureRequest, tiny_model_factory) -> tuple[Any, Any]:
    return pair("text-generation", tiny_model_factory(request.param, "causal"))


def count_generate_calls(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> list[int]:
    """The batch size of every ``generate`` call of ``pipe``'s model, in order."""
    rows: list[int] = []
    original = pipe.model.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows.append(0 if ids is None else int(ids.shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "generate", counted)
    return rows


def one_at_a_time(plain: Any, prompts: list[Any], **call: Any) -> list[Any]:
    return [plain(p, **call) for p in prompts]


def early_eos(plain: Any) -> list[int]:
    """Two token ids the greedy continuations of PROMPTS make early, so rows end at different steps."""
    first = plain(PROMPTS[0], max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    third = plain(PROMPTS[2], max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    return [int(first[-6]), int(third[-2])]


@pytest.mark.parametrize("call", [{}, {"return_tensors": True}, {"return_full_text": False}],
                         ids=["text", "tensors", "new-text"])
def test_a_list_runs_in_batches_and_each_result_is_its_prompt_alone(generators, monkeypatch,
                                                                      call: dict[str, Any]) -> None:
    plain, fast = generators
    expected = one_at_a_time(plain, PROMPTS, **GREEDY, **call)
    rows = count_generate_calls(monkeypatch, fast)
    assert_same(expected, fast(PROMPTS, **GREEDY, **call))
    assert rows == [len(PROMPTS)]  # one generate() for the whole list: batch size 16
    assert fp.plan_of(fast)["batch_size"] == 16


def test_rows_that_end_early_lose_the_batchs_padding(generators, monkeypatch) -> None:
    plain, fast = generators
    eos = early_eos(plain)
    call = {**GREEDY, "eos_token_id": eos, "return_tensors": True}
    expected = one_at_a_time(plain, PROMPTS, **call)
    lengths = {len(r[0]["generated_token_ids"]) - len(plain.tokenizer(p)["input_ids"])
               for r, p in zip(expected, PROMPTS)}
    assert len(lengths) > 1  # some rows stop before others: the batch pads them
    rows = count_generate_calls(monkeypatch, fast)
    assert_same(expected, fast(PROMPTS, **call))
    assert_same(one_at_a_time(plain, PROMPTS, **GREEDY, eos_token_id=eos), fast(PROMPTS, **GREEDY, eos_token_id=eos))
    assert len(rows) == 2 and max(rows) > 1


def test_several_sequences_per_prompt(generators) -> None:
    plain, fast = generators
    eos = early_eos(plain)
    torch.manual_seed(0)
    results = fast(PROMPTS, max_new_tokens=6, do_sample=True, num_return_sequences=3, eos_token_id=eos,
                   return_tensors=True)
    assert len(results) == len(PROMPTS)
    for prompt, records in zip(PROMPTS, results):
        ids = plain.tokenizer(prompt)["input_ids"]
        assert len(records) == 3
        widths = {len(r["generated_token_ids"]) for r in records}
        assert len(widths) == 1  # the sequences of one prompt share a length, as in a call of it alone
        width = widths.pop()
        assert ids == records[0]["generated_token_ids"][:len(ids)]  # the prompt, without padding
        new = torch.tensor([r["generated_token_ids"][len(ids):] for r in records])
        ended = torch.isin(new, torch.tensor(eos)).any(dim=1)
        # a call of this prompt alone stops when all of its sequences have ended, not later
        assert width - len(ids) == 6 or (ended.all() and width - len(ids) <= 6)


def test_chats_are_batched_through_the_chat_template(generators, monkeypatch) -> None:
    plain, fast = generators
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    for pipe in (plain, fast):
        monkeypatch.setattr(pipe.tokenizer, "chat_template", template, raising=False)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:5]]
    assert sorted_order(chats) == sorted(range(5), key=lambda i: -len(PROMPTS[i]))  # sorted by their text
    expected = [plain(c, **GREEDY) for c in chats]
    rows = count_generate_calls(monkeypatch, fast)
    assert_same(expected, fast(chats, **GREEDY))
    assert rows == [5]


class _Penalty:
    """A logits processor that reads the context (so the batch's padding would change what it does)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return scores - 0.5 * torch.nn.functional.one_hot(input_ids[:, 0], scores.shape[-1]).to(scores.dtype)


DECLINED = {  # call -> the start of the reason fastpath records
    "stop-strings": ({"stop_sequence": "word"}, "stop_strings"),
    "max-length": ({"max_length": 24}, "max_length without"),
    "max-length-new-none": ({"max_length": 24, "max_new_tokens": None}, "max_length without"),
    "min-length": ({"min_length": 16}, "min_length without"),
    "streamer": ({"streamer": "text"}, "streamer"),
    "no-repeat-ngram": ({"no_repeat_ngram_size": 1}, "no_repeat_ngram_size"),
    "logits-processor": ({"logits_processor": "penalty"}, "logits_processor"),
    "prefix-allowed-tokens": ({"prefix_allowed_tokens_fn": "batch-id"}, "prefix_allowed_tokens_fn"),
    "assistant-early-exit": ({"assistant_early_exit": 1}, "assistant_early_exit"),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_what_cannot_be_batched_runs_one_prompt_at_a_time(generators, monkeypatch, case: str) -> None:
    from transformers import LogitsProcessorList, TextStreamer

    plain, fast = generators
    if case == "assistant-early-exit" and plain.model.config.model_type == "gpt2":
        pytest.skip("transformers' own early-exit assisted generation fails on GPT-2 (its cache)")
    call, reason = DECLINED[case]
    made = {"text": TextStreamer(plain.tokenizer),  # transformers raises for a streamer on a batch
            "penalty": LogitsProcessorList([_Penalty()]),
            "batch-id": lambda batch_id, ids: list(range(1000 + 10 * batch_id, 1100))}
    call = {k: made.get(v, v) if isinstance(v, str) else v for k, v in call.items()}
    call = {"do_sample": False, **({} if "max_length" in call else {"max_new_tokens": 6}), **call}
    expected = one_at_a_time(plain, PROMPTS[:4], **call)
    rows = count_generate_calls(monkeypatch, fast)
    assert_same(expected, fast(PROMPTS[:4], **call))
    assert set(rows) == {1} and len(rows) >= 4  # assisted generation calls generate() again, for its draft
    assert any(r.startswith(reason) for r in batched_processing_of(fast).declined), batched_processing_of(fast)


def test_one_chat_of_several_messages_is_one_input(generators, monkeypatch) -> None:
    plain, fast = generators
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    for pipe in (plain, fast):
        monkeypatch.setattr(pipe.tokenizer, "chat_template", template, raising=False)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    assert_same(plain(chat, **GREEDY), fast(chat, **GREEDY))


def test_a_model_that_ignores_the_attention_mask_runs_one_prompt_at_a_time(tmp_path, tokenizer_dir,
                                                                             monkeypatch) -> None:
    from transformers import AutoTokenizer, RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    RwkvForCausalLM(RwkvConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                               intermediate_size=64, context_length=64)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    plain, fast = pair("text-generation", tmp_path)
    rows = count_generate_calls(monkeypatch, fast)
    assert_same(one_at_a_time(plain, PROMPTS[:3], **GREEDY), fast(PROMPTS[:3], **GREEDY))
    assert rows == [1, 1, 1]
    assert any("ignores the attention mask" in r for r in batched_processing_of(fast).declined)


def test_the_plan_says_so_and_the_policy_can_turn_it_off(tiny_model_factory, monkeypatch) -> None:
    path = tiny_model_factory("llama", "causal")
    plain, fast = pair("text-generation", path)
    plan = fp.plan_of(fast)
    assert plan["batched_processing"] is True and plan["length_bucketing"] is True
    assert "left-padded batches" in plan.settings["batch_size"].reason
    off = fp.pipeline("text-generation", model=str(path), fastpath={"defaults": {"batched_processing": False}})
    assert fp.plan_of(off)["batch_size"] == "keep"
    rows = count_generate_calls(monkeypatch, off)
    assert_same(one_at_a_time(plain, PROMPTS[:3], **GREEDY), off(PROMPTS[:3], **GREEDY))
    assert rows == [1, 1, 1]


def test_generation_settings_on_a_transformers_without_the_pipelines_resolution() -> None:
    """transformers releases before the pipeline's ``_prepare_generate_kwargs`` (5.17 on the GPU
    machine): the pipeline's generation_config, then the call's arguments, decide."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from transformers_fastpath.pipelines.batched_tasks import generation_settings

    pipe = SimpleNamespace(generation_config=GenerationConfig(max_new_tokens=7, eos_token_id=3),
                           model=SimpleNamespace(generation_config=GenerationConfig()))
    settings = generation_settings(pipe, {"do_sample": False, "stop_strings": ["x"]})
    assert settings["max_new_tokens"] == 7 and settings["eos_token_id"] == 3 and settings["stop_strings"] == ["x"]
    own = GenerationConfig(max_length=30)
    settings = generation_settings(pipe, {"generation_config": own})
    assert settings["max_length"] == 30 and "max_new_tokens" not in settings


def test_with_a_static_cache_a_short_batch_is_filled_to_the_batch_size(tiny_model_factory, monkeypatch) -> None:
    """A compiled static-cache step is specialised on the batch size: the last batch of a list gets
    copies of its last prompt, so it runs the full batches' shape; the copies' results are dropped."""
    path = tiny_model_factory("llama", "causal")
    plain = fp.pipeline("text-generation", model=str(path), fastpath=False)
    fast = fp.pipeline("text-generation", model=str(path), fastpath={"defaults": {"static_cache": True}})
    assert batched_processing_of(fast).fill_batches
    prompts = PROMPTS + PROMPTS[:9]  # 20 prompts: a batch of 16 and one of 4
    rows = count_generate_calls(monkeypatch, fast)
    assert_same(one_at_a_time(plain, prompts, **GREEDY, return_tensors=True),
                fast(prompts, **GREEDY, return_tensors=True))
    assert rows == [16, 16]
    default = fp.pipeline("text-generation", model=str(path), fastpath=True)  # CPU: no static cache
    assert not batched_processing_of(default).fill_batches
    rows = count_generate_calls(monkeypatch, default)
    default(prompts, **GREEDY)
    assert rows == [16, 4]


def test_a_batch_that_fails_runs_one_prompt_at_a_time(generators, monkeypatch) -> None:
    """Whatever fails on a batch only (not on its prompts alone) still gives every result."""
    plain, fast = generators
    original = fast.model.generate

    def fails_on_batches(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[0] > 1:
            raise RuntimeError("a batch-only failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(fast.model, "generate", fails_on_batches)
    assert_same(one_at_a_time(plain, PROMPTS, **GREEDY), fast(PROMPTS, **GREEDY))
    assert any("a batch-only failure" in r for r in batched_processing_of(fast).declined)
