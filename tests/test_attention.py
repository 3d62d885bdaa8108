"""Attention selection and the SDPA backend chain: per model and hardware, fallbacks, strict, reversible."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
import queue
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.generation.streamers import BaseStreamer

import transformers_fastpath as fp
from transformers_fastpath import Hardware, StrictModeError
from transformers_fastpath.builtin import attention as attention_plugin
from transformers_fastpath.passes.instance_methods import LAYERS_ATTR, add_layer, get_layer, remove_layer
from transformers_fastpath.passes.sdpa_backends import (
    AttentionGeometry,
    BackendChain,
    is_no_kernel_error,
    probe_backend,
    training_chain,
)

CPU = Hardware(device="cpu", memory_gib=24, cpu_count=2)
B200 = Hardware(device="cuda", memory_gib=180, capability=(10, 0), name="NVIDIA B200")
PASS = "sdpa_backends"
LOGGER = "transformers_fastpath.passes.sdpa_backends"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def llama_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  architectures=["LlamaForCausalLM"])
    return transformers.LlamaConfig(**{**kwargs, **overrides})


def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).eval()


class BackendSpy:
    """Records which SDPA backends (in priority order) are enabled whenever an attention layer runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[tuple[str, ...]] = []
        attention = model.model.layers[0].self_attn
        self.handle = attention.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        enabled = {
            SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
            SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
            SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
            SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
        }
        order = [SDPBackend(int(v)) for v in torch._C._get_sdp_priority_order()]
        self.seen.append(tuple(b.name for b in order if enabled.get(b)))


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


# -- resolution per hardware --------------------------------------------------------------

@pytest.mark.parametrize("profile, chain", [
    ("cpu", ("flash", "math")),
    ("h100", ("cudnn", "flash", "efficient", "math")),
    ("a100", ("flash", "efficient", "math")),
    ("t4", ("efficient", "math")),
    (B200, ("flash", "efficient", "math")),
])
def test_auto_chain_per_hardware(profile: str | Hardware, chain: tuple[str, ...]) -> None:
    hardware = profile if isinstance(profile, Hardware) else Hardware.from_profile(profile)
    plan = fp.resolve(llama_config(), task="text-generation", hardware=hardware)
    assert plan["attn_implementation"] == "sdpa"
    assert plan["sdpa_backends"] == chain
    decision = plan.settings[PASS]
    assert decision.reason.startswith("auto:") and decision.source == "built-in default"
    assert plan.pass_status(PASS).status == "planned"
    assert "[" + ", ".join(chain) + "]" in str(plan)
    assert plan.to_dict()["settings"][PASS]["value"] == list(chain)


def test_auto_chain_explains_its_exclusions() -> None:
    h100 = fp.resolve(llama_config(), hardware=Hardware.from_profile("h100"))
    assert "cuDNN" in h100.settings[PASS].reason and "Training calls skip cuDNN" in h100.settings[PASS].reason
    blackwell = fp.resolve(llama_config(), hardware=B200)
    assert "cuDNN attention is left out" in blackwell.settings[PASS].reason
    fp32 = fp.resolve(llama_config(), hardware=Hardware.from_profile("h100"), policy={"defaults": {"dtype": "float32"}})
    assert fp32[PASS] == ("efficient", "math")
    assert "half precision only" in fp32.settings[PASS].reason


def test_other_devices_leave_the_choice_to_torch() -> None:
    plan = fp.resolve(llama_config(), hardware=Hardware(device="mps", name="Apple MPS"))
    assert plan[PASS] == "keep"
    assert plan.pass_status(PASS).status == "skipped"
    assert "torch picks the SDPA kernel on mps" in plan.pass_status(PASS).reason


def test_explicit_chain_wins_and_non_sdpa_attention_skips_the_pass() -> None:
    plan = fp.resolve(llama_config(), hardware=CPU, policy={"defaults": {"sdpa_backends": ["math"]}})
    assert plan[PASS] == ("math",)
    assert plan.settings[PASS].source == "<dict> [defaults]"
    eager = fp.resolve(llama_config(), hardware=CPU, policy={"defaults": {"attn_implementation": "eager"}})
    status = eager.pass_status(PASS)
    assert status.status == "skipped"
    assert "attn_implementation is eager, not sdpa" in status.reason
    assert "unused: attention is eager" in eager.settings[PASS].reason
    assert "attn_implementation is eager, not sdpa" in str(eager)


# -- attention implementation ----------------------------------------------------------------

@pytest.fixture
def flash_installed(monkeypatch):
    """Pretend flash-attn 2 and 3 are installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("flash_attn", "flash_attn_interface"):
            return SimpleNamespace(name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(attention_plugin.importlib.util, "find_spec", find_spec)


def test_flash_attention_when_installed_supported_and_half(flash_installed) -> None:
    config = llama_config()
    no_compile = {"defaults": {"compile": False}}
    a100 = fp.resolve(config, hardware=Hardware.from_profile("a100"), policy=no_compile)
    assert a100["attn_implementation"] == "flash_attention_2"
    assert a100.load_kwargs["attn_implementation"] == "flash_attention_2"
    assert "sm80" in a100.settings["attn_implementation"].reason
    assert a100.pass_status(PASS).status == "skipped"
    h100 = fp.resolve(config, hardware=Hardware.from_profile("h100"), policy=no_compile)
    assert h100["attn_implementation"] == "flash_attention_3"
    encoder = fp.resolve(llama_config(architectures=["LlamaModel"]), hardware=Hardware.from_profile("h100"))
    assert encoder["compile"] is False and encoder["attn_implementation"] == "flash_attention_3"
    fp32 = fp.resolve(config, hardware=Hardware.from_profile("a100"), policy={"defaults": {"dtype": "float32"}})
    assert fp32["attn_implementation"] == "sdpa"
    assert "float32" in fp32.settings["attn_implementation"].reason
    assert fp.resolve(config, hardware=CPU)["attn_implementation"] == "sdpa"


def test_compiled_generation_prefers_sdpa_over_flash(flash_installed) -> None:
    plan = fp.resolve(llama_config(), task="text-generation", hardware=Hardware.from_profile("a100"))
    assert plan["compile"] is True
    assert plan["attn_implementation"] == "sdpa"
    assert "breaks the graph" in plan.settings["attn_implementation"].reason


def test_architecture_support_decides_sdpa_flex_or_eager(monkeypatch) -> None:
    class NoSdpa(transformers.LlamaForCausalLM):
        _supports_sdpa = False
        _supports_flex_attn = True

    # transformers re-executes its lazy __init__ once: patch the module object fastpath imports too.
    for module in {transformers, sys.modules["transformers"]}:
        monkeypatch.setattr(module, "NoSdpaForCausalLM", NoSdpa, raising=False)
    config = llama_config(architectures=["NoSdpaForCausalLM"])
    gpu = fp.resolve(config, hardware=Hardware.from_profile("a100"))
    assert gpu["attn_implementation"] == "flex_attention"
    cpu = fp.resolve(config, hardware=CPU)
    assert cpu["attn_implementation"] == "eager"
    assert cpu.pass_status(PASS).status == "skipped"


def test_policy_flash_that_cannot_run_here_falls_back_unless_strict() -> None:
    policy = {"defaults": {"attn_implementation": "flash_attention_2"}}
    plan = fp.resolve(llama_config(), hardware=CPU, policy=policy)
    assert plan["attn_implementation"] == "sdpa"
    assert "flash_attention_2 was asked for, but flash-attn runs on CUDA GPUs only" in \
        plan.settings["attn_implementation"].reason
    assert plan.settings["attn_implementation"].source == "<dict> [defaults]"
    strict = fp.resolve(llama_config(), hardware=CPU, policy={"defaults": {**policy["defaults"], "strict": True}})
    assert strict["attn_implementation"] == "flash_attention_2"
    assert any("strict mode keeps it" in note for note in strict.notes)
    argument = fp.resolve(llama_config(), hardware=CPU, call_kwargs={"attn_implementation": "flash_attention_2"})
    assert argument["attn_implementation"] == "flash_attention_2"  # the caller's argument is never changed


# -- the pass at run time -------------------------------------------------------------------

def test_chain_is_active_around_forward_and_generate_and_reverts() -> None:
    model = llama()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    signature = inspect.signature(model.forward)

    fp.apply(model, {"defaults": {"sdpa_backends": ["math", "flash"]}}, hardware=CPU)
    assert fp.plan_of(model).pass_status(PASS).status == "applied"
    assert inspect.signature(model.forward) == signature  # generate inspects forward's parameters
    spy = BackendSpy(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert spy.seen[-1][:2] == ("MATH", "FLASH_ATTENTION")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    spy.seen.clear()
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref_tokens)
    assert len(spy.seen) == 6 and all(seen[:2] == ("MATH", "FLASH_ATTENTION") for seen in spy.seen)
    assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)  # restored after the call

    keys = list(model.state_dict())
    fp.revert(model)
    assert not {"forward", "generate", "get_compiled_call", LAYERS_ATTR} & set(vars(model))
    assert list(model.state_dict()) == keys
    spy.seen.clear()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert spy.seen[-1][0] == "FLASH_ATTENTION"  # torch's own default again


def test_fallback_to_the_next_backend_logs_once_per_model(caplog) -> None:
    model = llama()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    fp.apply(model, {"defaults": {"sdpa_backends": ["efficient", "math"]}}, hardware=CPU)  # no CPU efficient kernel
    spy = BackendSpy(model)
    with caplog.at_level(logging.DEBUG, logger=LOGGER), torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        model(ids[:, 3:])  # another call kind: unpadded
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'efficient' has no kernel" in message and "'math', next in sdpa_backends" in message
    assert "Logged once per model" in message
    assert spy.seen[0][:2] == ("EFFICIENT_ATTENTION", "MATH")

    other = llama()  # a second model logs its own first fallback
    fp.apply(other, {"defaults": {"sdpa_backends": ["efficient", "math"]}}, hardware=CPU)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        other(ids, attention_mask=mask)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_strict_mode_raises_instead_of_falling_back() -> None:
    model = llama()
    fp.apply(model, {"defaults": {"sdpa_backends": ["efficient", "math"], "strict": True}}, hardware=CPU)
    ids, mask = ids_and_mask()
    with pytest.raises(StrictModeError, match="'efficient', first in \\[efficient, math\\], has no kernel"):
        model(ids, attention_mask=mask)


def test_a_chain_with_no_kernel_here_gets_torchs_other_backends(caplog) -> None:
    model = llama()
    ids, mask = ids_and_mask()
    fp.apply(model, {"defaults": {"sdpa_backends": ["efficient"]}}, hardware=CPU)
    spy = BackendSpy(model)
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        model(ids, attention_mask=mask)
    assert "no backend in sdpa_backends [efficient] has a kernel" in caplog.text
    assert spy.seen[-1][0] == "EFFICIENT_ATTENTION" and "MATH" in spy.seen[-1]


def test_auto_chain_runs_quietly_and_identically() -> None:
    model = llama()
    ids, mask = ids_and_mask()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fp.apply(model, None, hardware=CPU)
    assert fp.plan_of(model)[PASS] == ("flash", "math")
    runtime = get_layer(model, "forward", PASS).__self__
    assert runtime.quiet and runtime.grad_chain == ("flash", "math")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       ref)


def test_training_calls_use_the_grad_chain() -> None:
    assert training_chain(("cudnn", "flash", "efficient", "math")) == ("flash", "efficient", "math")
    assert training_chain(("cudnn",)) == ("cudnn",)
    model = llama()
    chain = BackendChain(("math", "flash"), strict=False, label="test", grad_chain=("flash", "math"))
    add_layer(model, "forward", "test", chain.around_forward)
    spy = BackendSpy(model)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        model(ids)
    model(ids).logits.sum().backward()
    assert spy.seen[0][0] == "MATH" and spy.seen[1][0] == "FLASH_ATTENTION"
    remove_layer(model, "forward", "test")


def test_a_no_kernel_error_at_run_time_is_retried_only_when_safe() -> None:
    model = llama()
    chain = BackendChain(("flash",), strict=False, label="test")
    calls = []

    def flaky(*args, **kwargs):
        calls.append(torch._C._get_sdp_priority_order()[:2])
        if len(calls) == 1:
            raise RuntimeError("No available kernel. Aborting execution.")
        return "ok"

    assert chain._run(model, flaky, (), {}, frozenset({"full"}), retry_safe=True) == "ok"
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(RuntimeError, match="Add 'math' to sdpa_backends"):
        chain._run(model, flaky, (), {}, frozenset({"full"}), retry_safe=False)
    strict = BackendChain(("flash",), strict=True, label="test")
    calls.clear()
    with pytest.raises(StrictModeError, match="strict mode does not fall back"):
        strict._run(model, flaky, (), {}, frozenset({"full"}), retry_safe=True)
    calls.clear()

    def other_error(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        chain._run(model, other_error, (), {}, frozenset({"full"}), retry_safe=True)


# -- threads: the chain is held per forward step, never while the caller's code runs -----------------

class QueueStreamer(BaseStreamer):
    """Hands each chunk of tokens to another thread through a bounded queue (the TextIteratorStreamer pattern),
    recording the SDPA priority order torch has while the caller's code runs."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.orders: list[tuple[int, ...]] = []

    def put(self, value: torch.Tensor) -> None:
        self.orders.append(tuple(int(v) for v in torch._C._get_sdp_priority_order()))
        self.queue.put(value, timeout=60)

    def end(self) -> None:
        self.queue.put(None, timeout=60)


def test_a_streamer_feeding_another_fastpath_model_in_another_thread_does_not_hang() -> None:
    """Thread A generates with a streamer that feeds thread B through a bounded queue; B runs an encoder under
    another chain on each chunk. Holding A's chain for the whole generate call made both wait forever."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(eos_token_id=None)).eval()  # all 8 new tokens, no early EOS
    ids, mask = ids_and_mask()
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.manual_seed(0)
    encoder = transformers.BertModel(transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
    with torch.no_grad():
        encoder_reference = encoder(input_ids=ids).last_hidden_state
    default_order = tuple(int(v) for v in torch._C._get_sdp_priority_order())
    fp.apply(model, None, hardware=CPU)  # ("flash", "math")
    fp.apply(encoder, {"defaults": {"sdpa_backends": ["math", "flash"], "encoder_fastpath": False}}, hardware=CPU)
    streamer = QueueStreamer()
    results: dict[str, object] = {}
    encoded: list[torch.Tensor] = []

    def generate() -> None:
        results["tokens"] = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=8, do_sample=False,
                                           pad_token_id=0, streamer=streamer)

    def encode() -> None:
        while streamer.queue.get(timeout=60) is not None:
            with torch.no_grad():
                encoded.append(encoder(input_ids=ids).last_hidden_state)

    threads = [threading.Thread(target=generate, daemon=True), threading.Thread(target=encode, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    hung = [thread.name for thread in threads if thread.is_alive()]
    assert not hung, f"threads {hung} still blocked after 60 s"
    assert torch.equal(results["tokens"], reference[:1, :results["tokens"].shape[1]])
    assert len(encoded) == 9  # the prompt, then 8 new tokens
    for hidden in encoded:
        torch.testing.assert_close(hidden, encoder_reference, rtol=1e-4, atol=1e-5)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], set_priority=True):
        generate_order = tuple(int(v) for v in torch._C._get_sdp_priority_order())
    assert len(streamer.orders) == 9 and generate_order not in streamer.orders  # A's chain not held in the streamer
    assert tuple(int(v) for v in torch._C._get_sdp_priority_order()) == default_order


def tracing_compile(monkeypatch):
    """A stand-in for ``torch.compile`` that runs the function as the compiler traces it (``is_compiling()``
    is true inside), so a test sees which chain a real compile would trace under."""
    def fake_compile(fn, **options):
        def traced(*args, **kwargs):
            with monkeypatch.context() as patch:
                patch.setattr(torch.compiler, "is_compiling", lambda: True)
                return fn(*args, **kwargs)
        return traced
    return fake_compile


def test_transformers_compiled_decode_step_runs_under_the_chain(monkeypatch) -> None:
    """transformers compiles ``__call__`` for decode steps; inside the compiled code our forward layer passes
    through, so the chain is held around the compiled call (a layer on get_compiled_call)."""
    model = llama()
    ids, mask = ids_and_mask()
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                               cache_implementation="static")
    fp.apply(model, {"defaults": {"sdpa_backends": ["math", "flash"], "compile": False}}, hardware=CPU)
    monkeypatch.setattr(torch, "compile", tracing_compile(monkeypatch))
    spy = BackendSpy(model)
    config = transformers.CompileConfig()
    config._compile_all_devices = True  # transformers compiles on GPUs only, unless told otherwise
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                            cache_implementation="static", compile_config=config, disable_compile=False)
    assert torch.equal(tokens, reference)
    assert len(spy.seen) == 5 and all(seen[:2] == ("MATH", "FLASH_ATTENTION") for seen in spy.seen)
    assert "_compiled_call" in vars(model)  # the decode steps did go through transformers' compiled call
    fp.revert(model)
    assert "get_compiled_call" not in vars(model)


def test_lean_decode_loop_compiled_step_runs_under_the_chain(monkeypatch) -> None:
    """fastpath's own lean loop calls its compiled step directly (not through get_compiled_call): the step is
    traced, so each call of it holds the model's chain; the prefill goes through the forward layer."""
    model = llama()
    ids, mask = ids_and_mask()
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    default_order = tuple(int(v) for v in torch._C._get_sdp_priority_order())
    fp.apply(model, {"defaults": {"sdpa_backends": ["math", "flash"], "compile": True}}, hardware=CPU)
    assert fp.plan_of(model)["decode_loop"] is True
    monkeypatch.setattr(torch, "compile", tracing_compile(monkeypatch))
    spy = BackendSpy(model)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, reference)
    loop = get_layer(model, "generate", "generate_static_cache").__self__.loop
    assert loop._compiled is not None  # the lean loop ran, with its (stand-in) compiled step
    assert len(spy.seen) == 5 and all(seen[:2] == ("MATH", "FLASH_ATTENTION") for seen in spy.seen)
    assert tuple(int(v) for v in torch._C._get_sdp_priority_order()) == default_order


def test_probe_and_error_helpers() -> None:
    geometry = AttentionGeometry.of(llama())
    assert geometry == AttentionGeometry(num_heads=4, num_kv_heads=2, head_dim=16)
    cpu = torch.device("cpu")
    assert probe_backend("math", "masked", geometry, cpu, torch.float32) is None
    assert probe_backend("flash", "decode", geometry, cpu, torch.float32) is None
    assert probe_backend("efficient", "full", geometry, cpu, torch.float32)  # no CPU kernel: a reason
    assert is_no_kernel_error(RuntimeError("No available kernel. Aborting execution."))
    wrapped = ValueError("outer")
    wrapped.__cause__ = RuntimeError("No viable backend for scaled_dot_product_attention was found.")
    assert is_no_kernel_error(wrapped)
    assert not is_no_kernel_error(RuntimeError("CUDA out of memory"))
    with pytest.raises(ValueError, match="unknown SDPA backends"):
        BackendChain(("turbo",), strict=False, label="x")


def test_model_loaded_with_eager_attention_skips_the_pass() -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    model.set_attn_implementation("eager")
    fp.apply(model, None, hardware=CPU)  # the plan says sdpa; the loaded model says eager
    status = fp.plan_of(model).pass_status(PASS)
    assert status.status == "skipped" and "runs eager attention" in status.reason
    assert "forward" not in vars(model)


def test_from_pretrained_applies_the_chain(tmp_path) -> None:
    llama().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, fastpath=True)
    plan = fp.plan_of(model)
    assert plan.load_kwargs["attn_implementation"] == "sdpa"
    assert plan.pass_status(PASS).status == "applied"
    assert model.config._attn_implementation == "sdpa"


# -- instance-level overrides ------------------------------------------------------------------

def test_layers_stack_remove_in_any_order_and_restore_a_previous_override() -> None:
    class Thing:
        def run(self, x: int) -> list[str]:
            return [f"base {x}"]

    thing = Thing()
    log: list[str] = []

    def layer(name):
        def around(obj, inner, x):
            log.append(name)
            return [*inner(x), name]
        return around

    add_layer(thing, "run", "a", layer("a"))
    add_layer(thing, "run", "b", layer("b"))
    assert thing.run(1) == ["base 1", "a", "b"] and log == ["b", "a"]  # last added runs outermost
    with pytest.raises(ValueError, match="already overrides"):
        add_layer(thing, "run", "a", layer("a"))
    assert remove_layer(thing, "run", "a") and thing.run(2) == ["base 2", "b"]
    assert get_layer(thing, "run", "a") is None and get_layer(thing, "run", "b") is not None
    assert remove_layer(thing, "run", "b") and "run" not in vars(thing) and LAYERS_ATTR not in vars(thing)
    assert not remove_layer(thing, "run", "b")

    thing.run = lambda x: ["hooked"]  # an earlier instance override (an accelerate hook, say)
    add_layer(thing, "run", "a", layer("a"))
    assert thing.run(3) == ["hooked", "a"]
    twin = copy.deepcopy(thing)
    assert twin.run.__self__ is twin
    remove_layer(thing, "run", "a")
    assert thing.run(4) == ["hooked"]
    with pytest.raises(ValueError, match="has no method"):
        add_layer(thing, "missing", "a", layer("a"))


def test_layers_follow_data_parallel_replicas(tiny_model_factory, cpu_data_parallel) -> None:
    """DataParallel (the Trainer on several GPUs without torchrun) copies __dict__ into each replica:
    the override must run the replica, not the original on GPU 0 (it crashed with a device mismatch)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_factory("bert", "seq-cls")).eval()
    seen: list[int] = []

    def around(module, inner, *args, **kwargs):
        seen.append(id(module))
        return inner(*args, **kwargs)

    ids = torch.tensor([[2, 5, 7, 9, 3]])
    reference = model(input_ids=ids).logits
    add_layer(model, "forward", "test", around)
    replica = cpu_data_parallel(model)
    assert not list(replica.parameters())  # as on a GPU: the replica's weights are plain attributes
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # the original changes: a replica still bound to it would change too
    assert torch.allclose(replica(input_ids=ids).logits, reference, atol=1e-6)  # (no grad: other kernels)
    assert seen == [id(replica)]
    assert not torch.allclose(model(input_ids=ids).logits, reference, atol=1e-3) and seen[-1] == id(model)
    assert get_layer(replica, "forward", "test") is around
    remove_layer(model, "forward", "test")
    assert not {"_replicate_for_data_parallel", "_fastpath_replica_fixes", "forward"} & set(vars(model))


def test_data_parallel_replicas_are_freed_without_the_garbage_collector(tiny_model_factory,
                                                                          cpu_data_parallel) -> None:
    """DataParallel makes new replicas every step. Bound to a replica strongly, the override made a
    reference cycle, so each step's weight copies waited for the cyclic collector (1.9x the peak
    memory of a Trainer step on two H100s)."""
    import gc
    import weakref

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_factory("bert", "seq-cls")).eval()
    fp.apply(model, {"defaults": {"sdpa_backends": ["math"]}}, hardware=CPU)
    plan = fp.plan_of(model)
    assert all(plan.pass_status(name).status == "applied" for name in ("fused_encoder", "sdpa_backends")), str(plan)
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    gc.disable()
    try:
        replica = cpu_data_parallel(model)
        assert "input_ids" in inspect.signature(replica.forward).parameters
        with torch.no_grad():
            torch.testing.assert_close(replica(input_ids=ids).logits, model(input_ids=ids).logits)
        freed = weakref.ref(replica)
        del replica
        assert freed() is None
    finally:
        gc.enable()


def test_sdpa_chain_reads_a_data_parallel_replicas_weights(cpu_data_parallel) -> None:
    """A DataParallel replica has no parameters (its weights are plain attributes): the chain's
    probe must still see their device and dtype, not fall back to CPU float32."""
    from transformers_fastpath.passes import sdpa_backends

    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).to(torch.float64)
    with torch.no_grad():
        replica = cpu_data_parallel(model)
    assert not list(replica.parameters())
    assert sdpa_backends._device_and_dtype(replica) == (torch.device("cpu"), torch.float64)
