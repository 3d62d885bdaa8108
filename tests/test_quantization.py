"""Quantization from the policy: plans per hardware and model size, fallbacks, real bitsandbytes loads on CPU."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import transformers_fastpath as fp
from transformers_fastpath import Hardware, resolve
from transformers_fastpath.errors import FastpathError
from transformers_fastpath.loading import quantization as q

GPU16 = Hardware.from_profile("cuda:1x16:sm89")
GPU80 = Hardware.from_profile("h100")
GPU80x2 = Hardware.from_profile("2xh100")
CPU32 = Hardware.from_profile("cpu")
T4 = Hardware.from_profile("t4")

LLAMA_SIZES = {  # Llama-3-shaped configs; resolve reads configs only (parameters counted on the meta device)
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}


def llama(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, architectures=["LlamaForCausalLM"], **LLAMA_SIZES[size])


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch):
    """Pretend a set of quantization packages is installed (plans are about hardware, not this venv)."""

    def set_installed(*packages: str, bnb_version: tuple[int, ...] = (0, 50, 2)) -> None:
        versions = {"bitsandbytes": bnb_version, "torchao": (0, 18, 0)}
        monkeypatch.setattr(q, "_version", lambda package: versions[package] if package in packages else None)

    set_installed("bitsandbytes")
    q._warned.clear()
    yield set_installed
    q._warned.clear()


def plan_for(size: str, hardware: Hardware, quantization: str = "auto", **defaults: object) -> fp.Plan:
    return resolve(llama(size), task="text-generation", hardware=hardware,
                   policy={"defaults": {"quantization": quantization, **defaults}})


# -- plans: hardware x model size ------------------------------------------------------------

@pytest.mark.parametrize("size, hardware, placement, method", [
    ("1B", GPU16, "single", "none"),
    ("1B", GPU80, "single", "none"),
    ("1B", GPU80x2, "single", "none"),       # generation is not a batched task: no replicas
    ("1B", CPU32, "single", "none"),
    ("8B", GPU16, "single", "bnb-int8"),     # 15.0 GiB > 12.8 GiB budget; int8 (8.5 GiB) fits
    ("8B", GPU80, "single", "none"),
    ("8B", GPU80x2, "single", "none"),
    ("8B", CPU32, "single", "bnb-int8"),     # 29.9 GiB at float32 > 25.6 GiB of RAM budget
    ("70B", GPU16, "balanced", "none"),      # nothing fits: offload, said in the plan
    ("70B", GPU80, "single", "bnb-nf4"),     # int8 (67.7 GiB) > 64 GiB; nf4 (36.8 GiB) fits
    ("70B", GPU80x2, "balanced", "bnb-int8"),  # int8 over two GPUs before nf4 on one: least lossy first
    ("70B", CPU32, "single", "none"),
], ids=lambda v: v.describe() if isinstance(v, Hardware) else str(v))
def test_auto_plans(installed, size: str, hardware: Hardware, placement: str, method: str) -> None:
    plan = plan_for(size, hardware)
    assert (plan["placement"], plan["quantization"]) == (placement, method), str(plan)
    if method != "none":
        assert plan.load_kwargs["quantization_config"] is not None


def test_auto_reason_states_the_numbers(installed) -> None:
    plan = plan_for("8B", GPU16)
    reason = plan.settings["quantization"].reason
    assert re.search(r"needs 15\.0 GiB at bfloat16, budget 12\.8 GiB \(16 GiB CUDA x 0\.8\) -> bnb-int8 \(8\.\d GiB\)",
                     reason), reason
    assert "fits (" in plan_for("1B", GPU16).settings["quantization"].reason


def test_headroom_changes_the_budget(installed) -> None:
    assert plan_for("8B", GPU16, memory_headroom=0.0)["quantization"] == "none"  # 15.0 GiB < 16 GiB
    assert plan_for("8B", GPU16, memory_headroom=0.5)["quantization"] == "bnb-nf4"  # int8 8.5 GiB > 8 GiB


def test_auto_uses_only_methods_that_run_here(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers_fastpath.builtin import quantization as plugin

    monkeypatch.setattr(plugin, "build_quantization_config", lambda method, **kw: f"<{method} config>")
    installed("torchao")
    plan = plan_for("8B", GPU16)
    assert plan["quantization"] == "torchao-int8"
    installed()  # nothing installed
    plan = plan_for("8B", GPU16)
    assert plan["quantization"] == "none"
    reason = plan.settings["quantization"].reason
    assert "bnb-int8 would fit" in reason and "pip install 'transformers-fastpath[bnb]'" in reason


def test_explicit_method_sets_the_config(installed) -> None:
    plan = plan_for("8B", GPU80, quantization="bnb-nf4")
    config = plan.load_kwargs["quantization_config"]
    import torch

    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.bnb_4bit_use_double_quant
    assert config.llm_int8_skip_modules == ["lm_head"]
    assert plan.load_kwargs["device_map"] == {"": "cuda:0"}
    # explain prints one line per kwarg, not the config's multi-line JSON
    line = next(x for x in str(plan).splitlines() if x.startswith("from_pretrained kwargs"))
    assert "quantization_config=BitsAndBytesConfig(" in line and "bnb_4bit_quant_type=nf4" in line


# -- cannot run here: quantization_fallback ------------------------------------------------------

def test_missing_package_warns_and_loads_unquantized(installed) -> None:
    installed()
    with pytest.warns(UserWarning, match=r"quantization = 'bnb-nf4' cannot run here: bitsandbytes is not installed"):
        plan = plan_for("1B", GPU80, quantization="bnb-nf4")
    assert plan["quantization"] == "none"
    assert "pip install" in plan.settings["quantization"].reason
    assert "quantization_config" not in plan.load_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_for("1B", GPU80, quantization="bnb-nf4")  # once per process


def test_missing_package_error(installed) -> None:
    installed()
    with pytest.raises(q.QuantizationUnavailable) as info:
        plan_for("1B", GPU80, quantization="bnb-int8", quantization_fallback="error")
    err = info.value
    assert isinstance(err, FastpathError)
    assert err.method == "bnb-int8" and "not installed" in err.reason and "pip install" in err.fix
    assert "quantization = 'bnb-int8'" in str(err) and "[defaults]" in str(err)


@pytest.mark.parametrize("fallback", ["warn", "error"])
def test_bnb_4bit_on_cpu_with_old_bitsandbytes(installed, fallback: str) -> None:
    """bitsandbytes before 0.48 has no CPU backend in its wheels: the policy decides."""
    installed("bitsandbytes", bnb_version=(0, 45, 5))
    if fallback == "error":
        with pytest.raises(q.QuantizationUnavailable, match=r"bnb-nf4.*older than 0\.48.*pip install -U"):
            plan_for("1B", CPU32, quantization="bnb-nf4", quantization_fallback="error")
        return
    with pytest.warns(UserWarning, match="older than 0.48"):
        plan = plan_for("1B", CPU32, quantization="bnb-nf4")
    assert plan["quantization"] == "none"
    assert plan_for("1B", GPU80, quantization="bnb-nf4")["quantization"] == "bnb-nf4"  # fine on CUDA


def test_hardware_obstacles(installed) -> None:
    installed("bitsandbytes", "torchao")
    assert "sm89" in q.obstacle("torchao-float8", T4).reason
    assert q.obstacle("torchao-float8", GPU80) is None
    assert "CUDA" in q.obstacle("torchao-int4", CPU32).reason
    assert q.obstacle("bnb-nf4", Hardware(device="mps")) is not None
    with pytest.warns(UserWarning, match="float8 matmuls need an sm89"):
        plan = resolve(llama("1B"), hardware=T4, policy={"defaults": {"quantization": "torchao-float8"}})
    assert plan["quantization"] == "none"


def test_tensor_parallel_and_quantization_do_not_mix(installed) -> None:
    world2 = Hardware(device="cuda", count=2, memory_gib=80, capability=(9, 0), distributed_world_size=2)
    with pytest.warns(UserWarning, match="tensor parallel cannot shard quantized weights"):
        plan = resolve(llama("8B"), hardware=world2,
                       policy={"defaults": {"quantization": "bnb-int8", "placement": "tensor-parallel"}})
    assert (plan["placement"], plan["quantization"]) == ("tensor-parallel", "none")
    # placement auto with quantization on under torchrun: data parallel, not tensor parallel
    plan = resolve(llama("8B"), hardware=world2, policy={"defaults": {"quantization": "bnb-int8"}})
    assert (plan["placement"], plan["quantization"]) == ("single", "bnb-int8")


# -- what stays dense ------------------------------------------------------------------------------

def test_kernel_shape_rules() -> None:
    layer = q.LinearLayer("x", in_features=64, out_features=48, bias=True)
    assert "% 32" in q.kernel_shape_problem("bnb-nf4", layer, CPU32)
    assert q.kernel_shape_problem("bnb-nf4", layer, GPU80) is None
    assert q.kernel_shape_problem("bnb-int8", layer, CPU32) is None
    assert q.kernel_shape_problem("torchao-int4", layer, GPU80) is not None  # 64 % 128
    assert q.kernel_shape_problem("torchao-float8", layer, GPU80) is None


def test_heads_stay_dense() -> None:
    from transformers import BertConfig

    inventory = q.inventory_of(BertConfig(architectures=["BertForSequenceClassification"], num_labels=3))
    assert inventory is not None and inventory.heads == ("classifier",)
    assert q.dense_modules(inventory, "bnb-int8", GPU80) == {"classifier": "head"}
    causal = q.inventory_of(llama("1B"))
    assert causal.heads == ("lm_head",)
    assert "lm_head" in q.dense_modules(causal, "bnb-nf4", CPU32)
    assert causal.total_params == fp.ModelInfo.from_config(llama("1B")).num_params  # tied weights counted once


def test_fused_encoder_is_vetoed_by_quantization(installed) -> None:
    from transformers import BertConfig

    from transformers_fastpath import plugins

    registered = None
    if "fused_encoder" not in {p.name for p in plugins.get_passes()}:
        class FusedEncoderStub:
            name, setting, changes_state_dict = "fused_encoder", "encoder_fastpath", False

            def supports(self, info, plan):
                return None

            def apply(self, model, plan):
                pass

            def revert(self, model):
                pass

        class StubPlugin:
            @fp.hookimpl
            def fastpath_register_passes(self):
                return [FusedEncoderStub()]

        registered = plugins.register(StubPlugin(), name="test-fused-encoder-stub")
    try:
        config = BertConfig(architectures=["BertForSequenceClassification"])
        plain = resolve(config, task="text-classification", hardware=GPU80)
        assert plain.pass_status("fused_encoder").will_run
        plan = resolve(config, task="text-classification", hardware=GPU80,
                       policy={"defaults": {"quantization": "bnb-int8"}})
        status = plan.pass_status("fused_encoder")
        assert status.status == "skipped"
        assert status.reason == "needs dense weights; quantization=bnb-int8 has priority"
        assert plan["encoder_fastpath"] is False
    finally:
        if registered:
            plugins.unregister(registered)


def test_caller_and_checkpoint_quantization_win(installed) -> None:
    from transformers import BitsAndBytesConfig

    config = llama("8B")
    plan = resolve(config, hardware=GPU16, policy={"defaults": {"quantization": "bnb-nf4"}},
                   call_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=True)})
    assert plan["quantization"] == "keep" and "quantization_config" not in plan.load_kwargs
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    plan = resolve(config, hardware=GPU16, policy={"defaults": {"quantization": "auto"}})
    assert plan["quantization"] == "keep" and "already quantized (gptq)" in plan.settings["quantization"].reason


# -- real bitsandbytes on this CPU -----------------------------------------------------------------

def _save_llama(out: Path, tokenizer_dir: Path, **sizes: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, num_hidden_layers=2, max_position_embeddings=64,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0, **sizes)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny Llama with some layers the bnb 4-bit CPU kernel cannot take: k/v_proj have 16 output
    rows (% 32 != 0) and down_proj 96 inputs (% 64 != 0); q/o/gate/up are fine."""
    return _save_llama(tmp_path_factory.mktemp("odd-llama"), tokenizer_dir, hidden_size=64,
                       num_attention_heads=4, num_key_value_heads=1, intermediate_size=96)


@pytest.fixture(scope="module")
def hopeless_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """hidden 48: no Linear layer has in_features % 64 == 0, so bnb 4-bit on CPU has nothing to quantize."""
    return _save_llama(tmp_path_factory.mktemp("hopeless-llama"), tokenizer_dir, hidden_size=48,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)


@pytest.fixture
def patched() -> None:
    """``from_pretrained(..., fastpath=...)`` accepted (as the .pth bootstrap does for users)."""
    from transformers_fastpath.interception import patches

    patches.patch_all()


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.float()


def test_bnb_int8_load_and_forward_on_cpu(tiny_model_factory, patched) -> None:
    pytest.importorskip("bitsandbytes")
    import torch
    from bitsandbytes.nn import Linear8bitLt
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama", "causal")
    ids = torch.randint(200, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = {"defaults": {"quantization": "bnb-int8", "attn_implementation": "sdpa"}}
    # a caller's device_map composes with the policy's quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", fastpath=policy)
    plan = fp.plan_of(model)
    assert plan["quantization"] == "bnb-int8" and model.config._attn_implementation == "sdpa"
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear8bitLt)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays dense
    assert model.get_memory_footprint() < dense.get_memory_footprint()
    ref, out = _logits(dense, ids), _logits(model, ids)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    assert (ref - out).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4"])
def test_bnb_4bit_on_cpu_keeps_odd_layers_dense(odd_llama: Path, patched, method: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    import copy

    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(odd_llama, fastpath={"defaults": {"quantization": method}})
    plan = fp.plan_of(model)
    assert plan["quantization"] == method
    skip = set(plan.load_kwargs["quantization_config"].llm_int8_skip_modules)
    assert {"lm_head", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"} <= skip
    assert any("kernel packs 32 rows" in note for note in plan.notes)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear4bit) and isinstance(layer.mlp.up_proj, Linear4bit)
    assert type(layer.self_attn.k_proj) is torch.nn.Linear and type(layer.mlp.down_proj) is torch.nn.Linear
    ids = torch.randint(200, 30000, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(_logits(model, ids)).all()
    # On CPUs with AVX512-BF16 bitsandbytes repacks every 4-bit weight at its first forward, which fails
    # for the shapes we keep dense. Run that repacking on every layer we quantized, whatever this CPU has.
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU weight repacking")
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 8  # q, o, gate, up in each of the 2 layers
    for module in quantized:
        if not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            convert(module.weight.data.clone(), copy.deepcopy(module.weight.quant_state))


@pytest.mark.parametrize("fallback", ["warn", "error"])
def test_bnb_4bit_on_cpu_with_nothing_to_quantize(hopeless_llama: Path, patched, installed, fallback: str) -> None:
    """Every layer has a shape the CPU 4-bit kernel cannot take: the policy's fallback decides."""
    from transformers import AutoModelForCausalLM

    policy = {"defaults": {"quantization": "bnb-nf4", "quantization_fallback": fallback}}
    if fallback == "error":
        with pytest.raises(q.QuantizationUnavailable, match=r"bnb-nf4.*none of the 14 Linear layers.*kernel.*bnb-int8"):
            AutoModelForCausalLM.from_pretrained(hopeless_llama, fastpath=policy)
        return
    with pytest.warns(UserWarning, match="none of the 14 Linear layers has a shape"):
        model = AutoModelForCausalLM.from_pretrained(hopeless_llama, fastpath=policy)
    assert fp.plan_of(model)["quantization"] == "none"
    assert getattr(model, "hf_quantizer", None) is None


def test_torchao_int8_on_cpu(tiny_model_factory, patched) -> None:
    pytest.importorskip("torchao")
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama", "causal")
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, fastpath={"defaults": {"quantization": "torchao-int8"}})
    assert fp.plan_of(model)["quantization"] == "torchao-int8"
    assert "Int8" in type(model.model.layers[0].mlp.up_proj.weight).__name__
    assert type(model.lm_head.weight) is torch.nn.Parameter  # the head stays dense
    ids = torch.randint(200, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, out = _logits(dense, ids), _logits(model, ids)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
