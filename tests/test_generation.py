"""Fast generate: static bucketed KV cache + transformers' compile, resolved per hardware, reversible.

CPU only: the GPU path is forced through the policy (``static_cache = true``, ``compile = true``).
Tiny decoder families are built from configs; greedy output must equal transformers' default
``generate`` token for token (fp32), single prompts and left-padded batches.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import transformers_fastpath as fp
from transformers_fastpath import Hardware, StrictModeError
from transformers_fastpath.passes.generation import (
    COMPILE_PASS,
    DECODE_LOOP_PASS,
    STATIC_PASS,
    FastGenerate,
    bucket_cache_len,
)
from transformers_fastpath.passes.instance_methods import LAYERS_ATTR

CPU = Hardware(device="cpu", memory_gib=24, cpu_count=2)
H100 = Hardware.from_profile("h100")
STATIC = {"defaults": {"static_cache": True}}
VOCAB = 200
PAD = 0

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, intermediate_size=128,
                                                       max_position_embeddings=256)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, num_key_value_heads=2,
                                                             intermediate_size=128, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, intermediate_size=128,
                                                       max_position_embeddings=256)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, max_position_embeddings=256)),
}


def build(family: str) -> torch.nn.Module:
    config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**_COMMON, **kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the first left-padded by 3."""
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = PAD, 0
    return ids, mask


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                              **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build("llama")


@pytest.fixture
def fresh_llama() -> torch.nn.Module:
    return build("llama")


# -- resolution and explain -------------------------------------------------------------

def test_cpu_default_keeps_generate_dynamic_with_reasons(llama) -> None:
    plan = fp.resolve(llama, task="text-generation", hardware=CPU)
    for key in ("compile", "static_cache"):
        assert plan[key] is False
        assert plan.settings[key].reason == "auto: compile pays off on GPUs; CPU generate stays dynamic"
    assert plan.pass_status(STATIC_PASS).status == "off"
    assert plan.pass_status(COMPILE_PASS).status == "off"
    text = str(plan)
    assert "compile pays off on GPUs; CPU generate stays dynamic" in text
    assert not any("static KV cache" in note for note in plan.notes)


def test_gpu_default_plans_static_cache_and_compile(llama) -> None:
    plan = fp.resolve(llama, task="text-generation", hardware=H100)
    assert plan["static_cache"] is True and plan["compile"] is True
    assert plan.pass_status(STATIC_PASS).status == "planned"
    assert plan.pass_status(COMPILE_PASS).status == "planned"
    assert "reduce-overhead" in plan.settings["compile"].reason
    data = plan.to_dict()
    assert data["settings"]["static_cache"]["value"] is True
    assert any("power of two" in note and "multiple of 512" in note for note in data["notes"])
    assert "static KV cache sized per call" in str(plan)


def test_non_generative_models_say_why(tiny_model_factory) -> None:
    plan = fp.resolve(tiny_model_factory("bert", "seq-cls"), task="text-classification", hardware=H100)
    assert plan["static_cache"] is False and plan["compile"] is False
    assert "not a generation task" in plan.settings["static_cache"].reason
    bare = fp.resolve(tiny_model_factory("bert"), hardware=H100)
    assert "not a generative model" in bare.settings["compile"].reason


def test_compile_true_turns_the_static_cache_on(llama) -> None:
    plan = fp.resolve(llama, hardware=CPU, policy={"defaults": {"compile": True}})
    assert plan["static_cache"] is True
    assert "compiled decode step" in plan.settings["static_cache"].reason
    assert plan.pass_status(COMPILE_PASS).status == "planned"
    assert any("tens of seconds" in note for note in plan.notes)


def test_compile_without_static_cache_is_skipped_and_strict_raises(fresh_llama) -> None:
    policy = {"defaults": {"compile": True, "static_cache": False}}
    plan = fp.resolve(fresh_llama, hardware=H100, policy=policy)
    status = plan.pass_status(COMPILE_PASS)
    assert status.status == "skipped"
    assert "only with a static cache" in status.reason
    with pytest.raises(StrictModeError, match="generate_compile"):
        fp.apply(fresh_llama, {"defaults": {**policy["defaults"], "strict": True}}, hardware=H100)


def test_architecture_without_static_cache_support_is_skipped(monkeypatch, llama) -> None:
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_can_compile_fullgraph", False)
    plan = fp.resolve(llama, task="text-generation", hardware=H100)
    assert plan.pass_status(STATIC_PASS).status == "skipped"
    assert "_can_compile_fullgraph" in plan.pass_status(STATIC_PASS).reason
    assert "static cache does not run" in plan.pass_status(COMPILE_PASS).reason


# -- bucketing ------------------------------------------------------------------------------

@pytest.mark.parametrize("needed, expected", [
    (1, 64), (19, 64), (64, 64), (65, 128), (256, 256), (257, 512), (1000, 1024), (1024, 1024),
    (1025, 1536), (1536, 1536), (1537, 2048), (5000, 5120),
])
def test_bucket_cache_len(needed: int, expected: int) -> None:
    assert bucket_cache_len(needed) == expected


def test_bucket_respects_the_model_limit_but_never_the_request() -> None:
    assert bucket_cache_len(300, limit=400) == 400
    assert bucket_cache_len(300, limit=256) == 300
    assert bucket_cache_len(19, limit=40) == 40
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            bucket_cache_len(bad)  # type: ignore[arg-type]


# -- outputs identical to transformers' default generate --------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_cache_generate_equals_default_greedy(family: str) -> None:
    model = build(family)
    ids, mask = prompts()
    ref_single = greedy(model, ids[1:])
    ref_batch = greedy(model, ids, mask)

    fp.apply(model, STATIC, hardware=CPU)
    plan = fp.plan_of(model)
    assert plan.pass_status(STATIC_PASS).status == "applied"
    assert plan.pass_status("sdpa_backends").status == "applied"
    assert torch.equal(greedy(model, ids[1:]), ref_single)
    assert torch.equal(greedy(model, ids, mask), ref_batch)
    runtime_request = _runtime(model).last_request
    assert runtime_request.static and runtime_request.cache_len == 64  # 9 + 12 -> 64

    fp.revert(model)
    assert "generate" not in vars(model) and "forward" not in vars(model)
    assert torch.equal(greedy(model, ids, mask), ref_batch)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_cpu_plan_leaves_generate_alone(family: str) -> None:
    model = build(family)
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, None, task="text-generation", hardware=CPU)
    assert fp.plan_of(model).pass_status(STATIC_PASS).status == "off"
    assert LAYERS_ATTR not in vars(model) or "generate" not in vars(model)[LAYERS_ATTR] or \
        _runtime(model) is None
    assert torch.equal(greedy(model, ids, mask), ref)


def test_the_cache_is_static_and_bucketed(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    fp.apply(model, STATIC, hardware=CPU)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                         return_dict_in_generate=True)
    assert type(out.cache).__name__ == "StaticCache"
    assert out.cache.get_max_length() == 64
    longer = model.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False, pad_token_id=PAD,
                            return_dict_in_generate=True)
    assert longer.cache.get_max_length() == 128  # 9 + 100 -> 128
    # transformers keeps the largest cache a model had: a short call after a long one reuses 128.
    again = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                           return_dict_in_generate=True)
    assert again.cache.get_max_length() == 128


def test_the_callers_generation_arguments_win(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, STATIC, hardware=CPU)
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                             cache_implementation="dynamic", return_dict_in_generate=True)
    assert type(dynamic.cache).__name__ == "DynamicCache"
    assert torch.equal(dynamic.sequences, ref)
    assert "cache_implementation = 'dynamic'" in _runtime(model).last_request.reason
    sized = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                           max_cache_len=200, return_dict_in_generate=True)
    assert sized.cache.get_max_length() == 200
    assert torch.equal(greedy(model, ids, mask, use_cache=False), ref)
    assert "use_cache = False" in _runtime(model).last_request.reason


def test_a_passed_generation_config_is_copied_not_mixed_with_kwargs(fresh_llama, caplog) -> None:
    model = fresh_llama
    ids, mask = prompts()
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, generation_config=config)
    fp.apply(model, STATIC, hardware=CPU)
    with caplog.at_level(logging.WARNING):
        out = model.generate(ids, attention_mask=mask, generation_config=config)
        positional = model.generate(ids, config, attention_mask=mask)
    assert torch.equal(out, ref) and torch.equal(positional, ref)
    assert _runtime(model).last_request.static
    assert config.cache_implementation is None  # the caller's object is untouched
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    returning = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    assert type(model.generate(ids, attention_mask=mask, generation_config=returning).cache).__name__ == "StaticCache"


def test_sampling_stopping_criteria_and_streamers_keep_working(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)

    class StopAfter(StoppingCriteria):
        def __init__(self, length: int) -> None:
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks: list[torch.Tensor] = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    ref_stopped = greedy(model, ids, mask, stopping_criteria=StoppingCriteriaList([StopAfter(13)]))
    fp.apply(model, STATIC, hardware=CPU)
    # top_k=1 sampling is greedy: the caller's sampling settings reach generate.
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1,
                             temperature=0.7, pad_token_id=PAD)
    assert torch.equal(sampled, ref)
    stopped = greedy(model, ids, mask, stopping_criteria=StoppingCriteriaList([StopAfter(13)]))
    assert stopped.shape[1] == 13 and torch.equal(stopped, ref_stopped)
    streamer = Collect()
    single = greedy(model, ids[1:], streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), single[0])
    assert _runtime(model).last_request.static


def test_revert_and_deepcopy_while_applied(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    keys = list(model.state_dict())
    fp.apply(model, STATIC, hardware=CPU)
    assert list(model.state_dict()) == keys  # nothing touches parameters
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin and twin.forward.__self__ is twin
    assert torch.equal(greedy(twin, ids, mask), greedy(model, ids, mask))
    assert _runtime(twin) is not _runtime(model)
    fp.revert(model)
    assert LAYERS_ATTR not in vars(model) and "generate" not in vars(model)
    assert "generate" in vars(twin)  # the copy keeps its own overrides


def test_from_pretrained_with_fastpath_applies_the_generation_passes(fresh_llama, tmp_path) -> None:
    fresh_llama.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, fastpath=STATIC)
    plan = fp.plan_of(model)
    assert plan.pass_status(STATIC_PASS).status == "applied"
    assert plan.pass_status(COMPILE_PASS).status == "off"
    ids, mask = prompts()
    assert torch.equal(greedy(model, ids, mask), greedy(fresh_llama, ids, mask))


def test_text_generation_pipeline_with_a_static_cache(tiny_model_factory) -> None:
    path = tiny_model_factory("llama", "causal")
    plain = transformers.pipeline("text-generation", model=str(path))
    fast = fp.pipeline("text-generation", model=str(path), fastpath=STATIC)
    assert fp.plan_of(fast).pass_status(STATIC_PASS).status == "applied"
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert fast("hello world", **kwargs) == plain("hello world", **kwargs)
    assert _runtime(fast.model).last_request.static


def test_text2text_encoder_decoder_with_a_static_cache() -> None:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, STATIC, task="text2text-generation", hardware=CPU)
    assert fp.plan_of(model).pass_status(STATIC_PASS).status == "applied"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.cache.get_max_length() == 64  # decoder side: 1 start token + 12


# -- compile --------------------------------------------------------------------------------

def test_compile_failure_falls_back_once_and_is_recorded(fresh_llama, monkeypatch, caplog) -> None:
    import torch._dynamo.exc

    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    calls = []

    def broken_compiled_call(compile_config):
        def run(*args, **kwargs):
            calls.append(1)
            raise torch._dynamo.exc.InternalTorchDynamoError("simulated compiler crash")
        return run

    monkeypatch.setattr(model, "get_compiled_call", broken_compiled_call)
    fp.apply(model, {"defaults": {"compile": True, "decode_loop": False}}, hardware=CPU)
    assert fp.plan_of(model).pass_status(COMPILE_PASS).status == "applied"
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        assert torch.equal(greedy(model, ids, mask), ref)
    assert calls == [1]
    assert [r for r in caplog.records if "simulated compiler crash" in r.getMessage()]
    status = fp.plan_of(model).pass_status(COMPILE_PASS)
    assert status.status == "failed" and "simulated compiler crash" in status.reason
    assert torch.equal(greedy(model, ids, mask), ref)
    assert calls == [1]  # compile stays off for this model
    request = _runtime(model).last_request  # static_cache was auto (for compile's sake): dynamic now
    assert not request.static and "compile does not run" in request.reason


def test_compile_failure_raises_in_strict_mode(fresh_llama, monkeypatch) -> None:
    import torch._dynamo.exc

    def broken_compiled_call(compile_config):
        def run(*args, **kwargs):
            raise torch._dynamo.exc.InternalTorchDynamoError("simulated compiler crash")
        return run

    model = fresh_llama
    monkeypatch.setattr(model, "get_compiled_call", broken_compiled_call)
    fp.apply(model, {"defaults": {"compile": True, "decode_loop": False, "strict": True}}, hardware=CPU)
    ids, mask = prompts()
    with pytest.raises(StrictModeError, match="simulated compiler crash"):
        greedy(model, ids, mask)


def test_compile_on_cpu_when_forced_matches_default(fresh_llama) -> None:
    """One real torch.compile (inductor on CPU, tens of seconds): the decode step is compiled by
    transformers' own mechanism, and the tokens are unchanged."""
    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, {"defaults": {"compile": True, "decode_loop": False}}, hardware=CPU)
    assert fp.plan_of(model).pass_status(COMPILE_PASS).status == "applied"
    assert torch.equal(greedy(model, ids, mask), ref)
    assert hasattr(model, "_compiled_call")  # transformers' get_compiled_call ran
    request = _runtime(model).last_request
    assert request.compiles and request.updates["compile_config"].mode == "default"
    assert fp.plan_of(model).pass_status(COMPILE_PASS).status == "applied"


def _runtime(model: torch.nn.Module) -> FastGenerate | None:
    from transformers_fastpath.passes.instance_methods import get_layer

    layer = get_layer(model, "generate", STATIC_PASS)
    return getattr(layer, "__self__", None)


# -- the lean greedy decode loop ---------------------------------------------------------------

LOOP = {"defaults": {"static_cache": True, "decode_loop": True}}


def _loop_ran(model: torch.nn.Module) -> bool:
    runtime = _runtime(model)
    return runtime is not None and runtime.decode_loop and runtime.last_loop_reason is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_loop_gives_default_greedy_tokens(family: str) -> None:
    """Left padding, EOS in the middle of one row, EOS ending every row early: the same tokens as
    transformers' greedy search, and the lean loop (not transformers') produced them."""
    model = build(family)
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    ref_single = greedy(model, ids[1:])
    new = greedy(model, ids, mask, eos_token_id=VOCAB + 1)[:, ids.shape[1]:]  # an EOS no row ever emits
    one_row_eos = int(new[0, 3])
    every_row_eos = [int(new[0, 2]), int(new[1, 4])]  # both rows stop early: the output is shorter
    ref_one = greedy(model, ids, mask, eos_token_id=one_row_eos)
    ref_every = greedy(model, ids, mask, eos_token_id=every_row_eos)
    assert ref_every.shape[1] < ref.shape[1]

    fp.apply(model, LOOP, hardware=CPU)
    assert fp.plan_of(model).pass_status(DECODE_LOOP_PASS).status == "applied"
    assert torch.equal(greedy(model, ids, mask), ref) and _loop_ran(model)
    assert torch.equal(greedy(model, ids[1:]), ref_single) and _loop_ran(model)
    assert torch.equal(greedy(model, ids, mask, eos_token_id=one_row_eos), ref_one) and _loop_ran(model)
    assert torch.equal(greedy(model, ids, mask, eos_token_id=every_row_eos), ref_every) and _loop_ran(model)


def test_decode_loop_leaves_other_calls_to_transformers(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    ref_ngram = greedy(model, ids, mask, no_repeat_ngram_size=2)
    fp.apply(model, LOOP, hardware=CPU)
    runtime = _runtime(model)
    assert torch.equal(greedy(model, ids, mask, no_repeat_ngram_size=2), ref_ngram)
    assert runtime.last_loop_reason == "generation setting no_repeat_ngram_size = 2"
    torch.manual_seed(0)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, typical_p=0.9, pad_token_id=PAD)
    assert runtime.last_loop_reason == "generation setting typical_p = 0.9"
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, return_dict_in_generate=True)
    assert runtime.last_loop_reason == "generation setting return_dict_in_generate = True"


def test_decode_loop_failure_falls_back_once_and_strict_raises(fresh_llama, monkeypatch, caplog) -> None:
    from transformers_fastpath.passes.generation.decode_loop import DecodeLoop

    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, LOOP, hardware=CPU)

    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(DecodeLoop, "_run", broken)
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        assert torch.equal(greedy(model, ids, mask), ref)
        assert torch.equal(greedy(model, ids, mask), ref)
    warnings_ = [r for r in caplog.records if "lean decode loop failed" in r.getMessage()]
    assert len(warnings_) == 1
    assert fp.plan_of(model).pass_status(DECODE_LOOP_PASS).status == "failed"

    strict = build("llama")
    fp.apply(strict, {"defaults": {**LOOP["defaults"], "strict": True}}, hardware=CPU)
    with pytest.raises(StrictModeError, match="simulated kernel failure"):
        greedy(strict, ids, mask)



def test_a_token_choice_that_fails_to_compile_holds_back_only_its_calls(fresh_llama, monkeypatch, caplog) -> None:
    """A compile error in one token choice's step (torch 2.11's inductor failed on the top-p cumsum at
    batch 16 on a GPU) sends that call and later ones with the same choice to transformers' loop,
    with the reason; greedy calls and other choices keep the lean loop, and the pass is not failed."""
    import torch._dynamo.exc as dynamo_exc

    from transformers_fastpath.passes.generation.decode_loop import DecodeLoop

    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    ref_sampled = _sampled(model, ids, mask, 0, top_p=0.9)
    ref_penalty = greedy(model, ids, mask, repetition_penalty=1.3)
    fp.apply(model, LOOP, hardware=CPU)
    real_step = DecodeLoop._step

    def step(self, model, rule, *args, **kwargs):
        if rule.top_p:
            def fails(*a, **k):
                raise dynamo_exc.TorchDynamoException("simulated codegen failure")
            return fails
        return real_step(self, model, rule, *args, **kwargs)

    monkeypatch.setattr(DecodeLoop, "_step", step)
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        assert torch.equal(_sampled(model, ids, mask, 0, top_p=0.9), ref_sampled)  # re-run in transformers
        assert torch.equal(_sampled(model, ids, mask, 0, top_p=0.9), ref_sampled)
    assert "this token choice failed to compile on this model" in _runtime(model).last_loop_reason
    warned = [r.getMessage() for r in caplog.records if "lean decode loop failed" in r.getMessage()]
    assert len(warned) == 1 and "(sampling, top_k=50, top_p)" in warned[0], warned
    assert torch.equal(greedy(model, ids, mask), ref) and _loop_ran(model)
    assert torch.equal(greedy(model, ids, mask, repetition_penalty=1.3), ref_penalty) and _loop_ran(model)
    assert fp.plan_of(model).pass_status(DECODE_LOOP_PASS).status == "applied"

def test_decode_loop_auto_follows_compile() -> None:
    config = build("llama").config
    on_gpu = fp.resolve(config, task="text-generation", hardware=H100)
    on_cpu = fp.resolve(config, task="text-generation", hardware=CPU)
    assert on_gpu["decode_loop"] is True and on_gpu.pass_status(DECODE_LOOP_PASS).will_run
    assert on_cpu["decode_loop"] is False and "only where compile is on" in on_cpu.settings["decode_loop"].reason


def test_compiled_decode_loop_on_cpu_matches_default(fresh_llama) -> None:
    """The lean loop's step through a real torch.compile (fullgraph, inductor on CPU; tens of
    seconds): the tokens are transformers' greedy ones, and a second call reuses the compiled step."""
    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, {"defaults": {"compile": True}}, hardware=CPU)  # decode_loop auto: on with compile
    assert fp.plan_of(model)["decode_loop"] is True
    assert torch.equal(greedy(model, ids, mask), ref) and _loop_ran(model)
    compiled = dict(_runtime(model).loop._compiled)
    assert len(compiled) == 1
    assert torch.equal(greedy(model, ids, mask), ref) and _runtime(model).loop._compiled == compiled


def test_an_automatic_static_cache_is_dropped_when_compile_cannot_run(fresh_llama, monkeypatch) -> None:
    """static_cache = auto exists for compile: where compile is skipped, generate keeps transformers'
    dynamic cache (an uncompiled static cache is slower); an explicit static_cache = true stays."""
    import transformers_fastpath.passes.generation.passes as gen_passes

    monkeypatch.setattr(gen_passes, "_compile_problem", lambda model: "inductor needs triton (simulated)")
    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    fp.apply(model, {"defaults": {"compile": True, "decode_loop": False}}, hardware=CPU)
    assert fp.plan_of(model).pass_status(COMPILE_PASS).status == "skipped"
    assert torch.equal(greedy(model, ids, mask), ref)
    request = _runtime(model).last_request
    assert not request.static and "the compile pass is not applied" in request.reason

    explicit = build("llama")
    fp.apply(explicit, {"defaults": {"compile": True, "static_cache": True, "decode_loop": False}}, hardware=CPU)
    greedy(explicit, ids, mask)
    assert _runtime(explicit).last_request.static


def test_bitsandbytes_weights_turn_compile_off_in_the_plan() -> None:
    pytest.importorskip("bitsandbytes")
    config = build("llama").config
    plan = fp.resolve(config, task="text-generation", policy={"defaults": {"quantization": "bnb-nf4"}},
                      hardware=H100)
    assert plan["quantization"] == "bnb-nf4"
    assert plan["compile"] is False and "bitsandbytes" in plan.settings["compile"].reason
    assert plan["static_cache"] is False and plan["decode_loop"] is False


def test_a_bad_call_is_not_blamed_on_the_decode_loop(fresh_llama) -> None:
    """An id outside the vocabulary fails in transformers' loop too: that error reaches the caller
    and the lean loop stays on."""
    model = fresh_llama
    ids, mask = prompts()
    fp.apply(model, LOOP, hardware=CPU)
    bad = ids.clone()
    bad[1, 4] = VOCAB + 50
    with pytest.raises(IndexError):
        greedy(model, bad, mask)
    assert _runtime(model).decode_loop
    assert fp.plan_of(model).pass_status(DECODE_LOOP_PASS).status == "applied"
    assert torch.equal(greedy(model, ids, mask), greedy(build("llama"), ids, mask)) and _loop_ran(model)


def test_seeded_sampling_equals_transformers_where_the_docs_say(tiny_model_factory) -> None:
    """docs/generation.md 'Seeded sampling': model.generate over a sequence of prompts and a pipeline
    called one prompt at a time draw what plain transformers draws; with batched_processing off, a
    list of prompts matches for the first prompt (later chunks each build a DataLoader iterator,
    one extra draw each)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = tiny_model_factory("llama", "causal")
    prompts = ["hello there", "a longer prompt about many things", "x"]
    sample = {"do_sample": True, "max_new_tokens": 6, "top_k": 50}
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {on: AutoModelForCausalLM.from_pretrained(path, fastpath=on) for on in (False, True)}
    generated = {}
    for on, model in models.items():
        torch.manual_seed(0)
        generated[on] = [model.generate(**tokenizer([p], return_tensors="pt", return_token_type_ids=False),
                                        **sample).tolist() for p in prompts]
    assert generated[True] == generated[False]

    per_prompt = {"defaults": {"batched_processing": False}}  # a list in batches draws in another order
    pipes = {on: pipeline("text-generation", model=str(path), fastpath=per_prompt if on else False)
             for on in (False, True)}
    one_at_a_time, as_list = {}, {}
    for on, pipe in pipes.items():
        torch.manual_seed(1)
        one_at_a_time[on] = [pipe(p, **sample)[0]["generated_text"] for p in prompts]
        torch.manual_seed(1)
        as_list[on] = [r[0]["generated_text"] for r in pipe(prompts, **sample)]
    assert one_at_a_time[True] == one_at_a_time[False]
    assert as_list[True][0] == as_list[False][0]


# -- the lean loop's token choice: sampling, penalties, lengths, streamers -----------------------

CHOICES = {
    "temperature": dict(do_sample=True, temperature=0.7),
    "top_k": dict(do_sample=True, top_k=5),
    "top_p": dict(do_sample=True, top_p=0.8),
    "min_p": dict(do_sample=True, min_p=0.1),
    "repetition_penalty": dict(repetition_penalty=1.3),
    "min_new_tokens": dict(min_new_tokens=3),
    "min_length": dict(min_length=12),
    "everything": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                       min_new_tokens=2),
}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_token_choice_equals_transformers_processors(llama, name: str) -> None:
    """For fixed logits, the loop's scores after its processors give the probabilities transformers'
    own processor list gives for the same settings (``_get_logits_processor``), step after step,
    within 1e-6 -- the same tokens filtered out, the repetition penalty skipping the left padding
    exactly where this transformers does, EOS blocked for exactly the same steps."""
    from transformers_fastpath.passes.generation.selection import (
        Selection,
        eos_unblock_step,
        processed_scores,
        rule_for,
    )

    config = GenerationConfig(eos_token_id=2, pad_token_id=PAD, **CHOICES[name])
    config._eos_token_tensor = torch.tensor([2])  # what generate's _prepare_special_tokens sets
    ids, mask = prompts()
    processors = llama._get_logits_processor(config, input_ids_seq_length=ids.shape[1], device="cpu",
                                             model_kwargs={"attention_mask": mask})
    assert len(processors) >= 1
    rule = rule_for(config, prompt_len=ids.shape[1], eos=[2])
    selection = Selection(rule, config, ids=ids, mask=mask, vocab=VOCAB, eos=[2],
                          unblock_at=eos_unblock_step(config, ids.shape[1], [2]))
    gen = torch.Generator().manual_seed(3)
    sequence, changed = ids, False
    for step in range(6):
        logits = torch.randn(2, VOCAB, generator=gen) * 4
        logits[:, 2] += 8  # EOS near the top: blocked or not matters
        ours = processed_scores(rule, logits, *selection.tensors())
        theirs = processors(sequence, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), f"step {step}: other tokens filtered out"
        torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-6, rtol=0)
        changed |= not torch.equal(ours, logits)
        token = sequence[:, -1:] if step % 2 else torch.randint(3, VOCAB, (2, 1), generator=gen)  # repeats too
        sequence = torch.cat([sequence, token], dim=1)
        selection.after_token(step, token)
    assert changed, "the processors never changed the scores: the comparison proves nothing"


def _sampled(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, seed: int, **settings) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, pad_token_id=PAD,
                              **settings)


SAMPLED = {
    "temperature-top_k-top_p": dict(temperature=0.7, top_k=20, top_p=0.9),
    "min_p-repetition_penalty": dict(min_p=0.05, repetition_penalty=1.2),
    "return_sequences-several_eos": dict(num_return_sequences=3, top_k=10, eos_token_id=list(range(3, 33)),
                                         min_new_tokens=2),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_seeded_sampling_in_the_lean_loop_is_transformers_draw_for_draw(family: str, name: str) -> None:
    """Uncompiled, the loop's sampling is bit-identical to transformers' under the same seed:
    same processors, ``argmax(p / Exp(1))`` being what ``torch.multinomial(p, 1)`` computes, rows
    finishing at their EOS and the output trimmed where transformers stops."""
    settings = SAMPLED[name]
    ids, mask = prompts()
    plain = build(family)
    refs = [_sampled(plain, ids, mask, seed, **settings) for seed in (0, 1)]
    model = build(family)
    fp.apply(model, LOOP, hardware=CPU)
    for seed, ref in zip((0, 1), refs):
        assert torch.equal(_sampled(model, ids, mask, seed, **settings), ref) and _loop_ran(model)
    if "several_eos" in name:
        assert any(r.shape[1] < ids.shape[1] + 12 for r in refs) or any(
            bool(torch.isin(r[:, ids.shape[1]:], torch.arange(3, 33)).any()) for r in refs)


def test_greedy_with_penalty_and_minimum_lengths_in_the_lean_loop(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    new = greedy(model, ids, mask, eos_token_id=VOCAB + 1)[:, ids.shape[1]:]
    early_eos = [int(new[0, 1]), int(new[1, 2])]  # both rows would stop within three tokens
    calls = [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7),
             dict(eos_token_id=early_eos, min_new_tokens=6), dict(eos_token_id=early_eos, min_length=14),
             dict(eos_token_id=early_eos),
             dict(eos_token_id=early_eos, min_new_tokens=2, min_length=15),  # min_new_tokens replaces min_length
             dict(eos_token_id=early_eos, min_new_tokens=0, min_length=14)]
    refs = [greedy(model, ids, mask, **kwargs) for kwargs in calls]
    assert refs[4].shape[1] < refs[2].shape[1]  # min_new_tokens changed transformers' output
    unset = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD)  # 20 new tokens
    fp.apply(model, LOOP, hardware=CPU)
    for kwargs, ref in zip(calls, refs):
        assert torch.equal(greedy(model, ids, mask, **kwargs), ref), kwargs
        assert _loop_ran(model), kwargs
    assert unset.shape[1] == ids.shape[1] + 20
    assert torch.equal(model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD), unset)
    assert _loop_ran(model)


def test_top_p_keeps_the_boundary_token_transformers_keeps() -> None:
    """transformers compares the cumulative probability with 1 - top_p computed in double: a token
    whose mass sits exactly at the boundary stays (with 1 - float32(top_p) it would go)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from transformers_fastpath.passes.generation.selection import Rule, Selection, processed_scores

    config = GenerationConfig(do_sample=True, top_p=0.9)
    logits = torch.tensor([[-2.1972244, 0.0]])
    ids = torch.tensor([[5]])
    selection = Selection(Rule(sample=True, top_p=True), config, ids=ids, mask=torch.ones_like(ids), vocab=2,
                          eos=[], unblock_at=0)
    ours = processed_scores(Rule(sample=True, top_p=True), logits, *selection.tensors())
    theirs = TopPLogitsWarper(0.9)(ids, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)) and not bool(torch.isinf(theirs).any())



def test_top_p_filter_compiled_equals_transformers() -> None:
    """The top-p filter through a real torch.compile (its cumulative sum is a custom op inductor does
    not lower) keeps exactly the tokens transformers' TopPLogitsWarper keeps, with the same scores."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from transformers_fastpath.passes.generation.selection import Rule, Selection, processed_scores

    rule = Rule(sample=True, top_p=True)
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    ids = torch.tensor([[5]] * 4)
    compiled = torch.compile(processed_scores, fullgraph=True, dynamic=False)
    for top_p in (0.5, 0.9):
        selection = Selection(rule, GenerationConfig(do_sample=True, top_p=top_p), ids=ids,
                              mask=torch.ones_like(ids), vocab=1000, eos=[], unblock_at=0)
        theirs = TopPLogitsWarper(top_p)(ids, logits.clone())
        ours = compiled(rule, logits, *selection.tensors())
        kept = ~torch.isinf(theirs)
        assert 1 < int(kept.sum(-1).min()) < 1000, "the filter must keep some tokens and drop others"
        assert torch.equal(~torch.isinf(ours), kept) and torch.equal(ours[kept], theirs[kept]), top_p

class _Collect(BaseStreamer):
    """Records every put, as transformers' streamers receive them."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = False
        self.fail_at = fail_at

    def put(self, value: torch.Tensor) -> None:
        if self.fail_at is not None and len(self.puts) == self.fail_at:
            raise ValueError("the caller's streamer is full")
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True


def test_streamers_get_what_transformers_gives_them(fresh_llama) -> None:
    """The same puts (the prompt, then one tensor per new token, up to where generation stops) and
    one end(), for greedy and sampled calls and a batch; a streamer that raises is the caller's
    error and leaves the loop on."""
    from transformers import TextStreamer

    model = fresh_llama
    ids, mask = prompts()
    new = greedy(model, ids, mask, eos_token_id=VOCAB + 1)[:, ids.shape[1]:]
    cases = [(ids[1:], None, dict(do_sample=False)), (ids, mask, dict(do_sample=False, eos_token_id=int(new[0, 6]))),
             (ids[1:], None, dict(do_sample=True, top_k=10))]
    refs = []
    for prompt, prompt_mask, kwargs in cases:
        streamer = _Collect()
        torch.manual_seed(4)
        refs.append((model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=12, pad_token_id=PAD,
                                    streamer=streamer, **kwargs), streamer.puts))
    fp.apply(model, LOOP, hardware=CPU)
    for (prompt, prompt_mask, kwargs), (ref, ref_puts) in zip(cases, refs):
        streamer = _Collect()
        torch.manual_seed(4)
        out = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=12, pad_token_id=PAD,
                             streamer=streamer, **kwargs)
        assert _loop_ran(model) and streamer.ended
        assert torch.equal(out, ref)
        assert len(streamer.puts) == len(ref_puts) and all(map(torch.equal, streamer.puts, ref_puts))

    with pytest.raises(ValueError, match="streamer is full"):
        greedy(model, ids[1:], streamer=_Collect(fail_at=3))
    assert _runtime(model).decode_loop
    assert isinstance(TextStreamer, type)  # the documented streamers are BaseStreamer subclasses like _Collect


def test_a_loop_failure_after_streaming_is_not_rerun(fresh_llama, monkeypatch) -> None:
    """Tokens already streamed would be streamed twice by a re-run: the call raises, saying so, and
    later calls use transformers' loop."""
    from transformers_fastpath.passes.generation import selection

    model = fresh_llama
    ids, _ = prompts()
    fp.apply(model, LOOP, hardware=CPU)
    original = selection.Selection.after_token

    def failing(self, index, token, valid=None):
        if index == 6:
            raise RuntimeError("simulated device failure")
        return original(self, index, token, valid)

    monkeypatch.setattr(selection.Selection, "after_token", failing)
    streamer = _Collect()
    with pytest.raises(RuntimeError, match="already received tokens"):
        greedy(model, ids[1:], streamer=streamer)
    assert len(streamer.puts) == 6  # the prompt and the first burst of tokens
    assert not _runtime(model).decode_loop
    assert fp.plan_of(model).pass_status(DECODE_LOOP_PASS).status == "failed"


def test_settings_transformers_rejects_still_raise_its_error(fresh_llama) -> None:
    model = fresh_llama
    ids, mask = prompts()
    with pytest.raises(ValueError) as plain:
        _sampled(model, ids, mask, 0, top_p=-0.5)
    fp.apply(model, LOOP, hardware=CPU)
    with pytest.raises(ValueError) as fast:
        _sampled(model, ids, mask, 0, top_p=-0.5)
    assert str(fast.value) == str(plain.value)
    with pytest.raises(ValueError):
        greedy(model, ids, mask, num_return_sequences=2)  # greedy with several sequences: transformers rejects
    assert _runtime(model).last_loop_reason.startswith("transformers rejects the generation settings")


def test_compiled_sampling_step_on_cpu(fresh_llama) -> None:
    """The sampling step through a real torch.compile: top_k = 1 sampling is the argmax (so it must
    equal greedy), and so is top_p = 1e-6 (only the most likely token is left: the nucleus's
    cumulative sum runs in the compiled step), a penalty call equals transformers', and the three
    compile as three steps."""
    model = fresh_llama
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    ref_penalty = greedy(model, ids, mask, repetition_penalty=1.3)
    fp.apply(model, {"defaults": {"compile": True}}, hardware=CPU)
    assert torch.equal(_sampled(model, ids, mask, 0, top_k=1, temperature=0.5), ref) and _loop_ran(model)
    assert torch.equal(greedy(model, ids, mask, repetition_penalty=1.3), ref_penalty) and _loop_ran(model)
    assert torch.equal(_sampled(model, ids, mask, 0, top_k=0, top_p=1e-6), ref) and _loop_ran(model), \
        (_runtime(model).last_loop_reason, fp.plan_of(model).pass_status("generate_decode_loop"))
    assert len(_runtime(model).loop._compiled) == 3



def test_a_zero_exponential_draw_never_picks_a_filtered_token(monkeypatch) -> None:
    """An Exp(1) draw of exactly 0 (ATen's kernel never returns one; a compiled step's generator does
    not promise it) would make p / q = 0 / 0 = NaN at a filtered token, which argmax would pick. The
    choice scores filtered tokens 0 instead; a zero draw at a kept token (p / 0 = inf) picks it, as
    the limit of the draw does."""
    from transformers_fastpath.passes.generation import selection

    rule = selection.Rule(sample=True, top_k=2)
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    state = (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(4, dtype=torch.bool), torch.tensor(False),
             torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0))

    def exponential_(self, lambd=1.0, generator=None):  # a zero at a filtered token, another at a kept one
        draws = torch.ones_like(self)
        draws[0, 1] = 0.0
        draws[1, 2] = 0.0
        return self.copy_(draws)

    monkeypatch.setattr(torch.Tensor, "exponential_", exponential_)
    token, valid = selection.choose(rule, logits, *state)
    assert token.tolist() == [0, 2] and bool(valid)

def test_stop_strings_end_rows_where_transformers_ends_them(tiny_model_factory) -> None:
    """Stop strings are checked on the host every few tokens with transformers' StopStringCriteria:
    a matching row is cut at the token that completed the string, later tokens are pad, and the
    output ends where the last row ended; greedy and seeded sampling, one row and every row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory("llama", "causal")
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    fp.apply(model, LOOP, hardware=CPU)
    tokenizer.padding_side = "left"
    batch = tokenizer(["the weather today is", "a much longer prompt about many things"], return_tensors="pt",
                      padding=True, return_token_type_ids=False)

    def run(m, seed=0, **kwargs):
        torch.manual_seed(seed)
        with torch.no_grad():
            return m.generate(**batch, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                              **kwargs)

    free = run(plain, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    words = [tokenizer.decode(free[row, prompt_len + 5: prompt_len + 7]).strip() for row in (0, 1)]
    cases = [dict(do_sample=False, stop_strings=words[0]), dict(do_sample=False, stop_strings=words),
             dict(do_sample=True, top_k=20, stop_strings=words)]
    ended_early = False
    for kwargs in cases:
        for seed in (0, 1):
            ref = run(plain, seed, **kwargs)
            ended_early |= ref.shape[1] < free.shape[1] or bool((ref[:, prompt_len:] == tokenizer.pad_token_id).any())
            assert torch.equal(run(model, seed, **kwargs), ref), kwargs
            assert _loop_ran(model), _runtime(model).last_loop_reason
    assert ended_early, "no stop string ever matched: the comparison proves nothing"
    # Without an EOS token transformers pads nothing: a stopped row keeps its tokens until all have stopped.
    plain.generation_config.eos_token_id = model.generation_config.eos_token_id = None
    ref = run(plain, do_sample=False, stop_strings=words[0])
    assert torch.equal(run(model, do_sample=False, stop_strings=words[0]), ref) and _loop_ran(model)


def test_token_choice_in_cuda_graphs_can_be_held_to_the_argmax(fresh_llama, monkeypatch) -> None:
    """With CHOICE_IN_CUDA_GRAPHS off, a compiled step on CUDA takes only the plain argmax: sampled
    and penalized calls there go to transformers' loop with the reason; greedy and CPU calls do not."""
    from transformers_fastpath.passes.generation import decode_loop

    assert decode_loop.CHOICE_IN_CUDA_GRAPHS  # on since its GPU test passed
    monkeypatch.setattr(decode_loop, "CHOICE_IN_CUDA_GRAPHS", False)
    ids, mask = prompts()
    call = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4, "pad_token_id": PAD}
    assert decode_loop.ineligible(fresh_llama, {**call, "do_sample": True}, compiled=True) is None  # on the CPU
    monkeypatch.setattr(type(fresh_llama), "device", property(lambda self: torch.device("cuda")))
    assert decode_loop.ineligible(fresh_llama, call, compiled=True) is None
    assert "held out of the compiled CUDA-graph step" in decode_loop.ineligible(fresh_llama, {**call, "do_sample": True}, compiled=True)
    assert "held out of the compiled CUDA-graph step" in decode_loop.ineligible(fresh_llama, {**call, "repetition_penalty": 1.2},
                                                            compiled=True)
    monkeypatch.setattr(decode_loop, "CHOICE_IN_CUDA_GRAPHS", True)
    assert decode_loop.ineligible(fresh_llama, {**call, "do_sample": True}, compiled=True) is None


def test_non_finite_logits_fail_sampling_as_in_transformers(fresh_llama) -> None:
    """torch.multinomial raises on inf/NaN probabilities; the loop's draw (no multinomial) checks the
    same condition on the device and raises at its next host sync; the caller gets transformers'
    error (the re-run in transformers' loop raises it too) and the loop stays on."""
    from transformers_fastpath.passes.generation.selection import Rule, Selection, choose

    rule = Rule(sample=True)
    ids = torch.tensor([[5, 6]])
    selection = Selection(rule, GenerationConfig(do_sample=True), ids=ids, mask=torch.ones_like(ids), vocab=4,
                          eos=[], unblock_at=0)
    token, valid = choose(rule, torch.tensor([[0.0, 1.0, 2.0, 3.0]]), *selection.tensors())
    selection.after_token(0, token[:, None], valid)
    selection.check()  # finite: fine
    token, valid = choose(rule, torch.tensor([[0.0, float("nan"), 2.0, 3.0]]), *selection.tensors())
    selection.after_token(1, token[:, None], valid)
    with pytest.raises(RuntimeError, match="probability tensor contains either"):
        selection.check()

    model = fresh_llama
    prompt, mask = prompts()
    fp.apply(model, LOOP, hardware=CPU)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor contains either"):
        _sampled(model, prompt, mask, 0)
    assert _runtime(model).decode_loop


# -- many prompts ---------------------------------------------------------------------------------

def test_generate_many_keeps_the_callers_order_and_each_prompts_tokens() -> None:
    """Prompts of lengths 1-30 in a shuffled order, batches of 4 after sorting by length: each result
    is that prompt alone through plain transformers' greedy generate (float32), EOS cuts included,
    in the caller's order; the batches ran the lean loop."""
    plain = build("llama")
    model = build("llama")
    fp.apply(model, LOOP, hardware=CPU)
    gen = torch.Generator().manual_seed(5)
    lengths = [int(n) for n in torch.randint(1, 31, (11,), generator=gen)]
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]
    free = [greedy(plain, p[None], eos_token_id=VOCAB + 1)[0] for p in prompts]
    eos = [int(free[0][lengths[0] + 3]), int(free[5][lengths[5] + 1])]  # two prompts end early
    refs = [greedy(plain, p[None], eos_token_id=eos)[0] for p in prompts]
    assert any(len(r) < len(f) for r, f in zip(refs, free))
    rows: list[int] = []
    original = model.generate

    def counted(input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        rows.append(int(input_ids.shape[0]))
        return original(input_ids, **kwargs)

    model.generate = counted
    out = fp.generate_many(model, [p.tolist() if i % 2 else p for i, p in enumerate(prompts)], batch_size=4,
                           max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    del model.generate
    assert len(out) == len(prompts)
    for got, ref in zip(out, refs):
        assert torch.equal(got, ref)
    assert _loop_ran(model)
    assert rows == [4, 4, 4]  # 11 prompts: the static cache's last batch is filled with copies of its last prompt


def test_generate_many_rejects_what_it_cannot_do(llama) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fp.generate_many(llama, [[5]], batch_size=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        fp.generate_many(llama, [[5], []])
    with pytest.raises(ValueError, match="num_return_sequences = 2 is not supported"):
        fp.generate_many(llama, [[5]], num_return_sequences=2, do_sample=True)
    with pytest.raises(ValueError, match="attention_mask= is built from the prompts"):
        fp.generate_many(llama, [[5]], attention_mask=torch.ones(1, 1))
    assert fp.generate_many(llama, []) == []
