"""resolve(): layers and sources, hardware-dependent defaults, immutability, explain without weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import transformers_fastpath as fp
from transformers_fastpath import Hardware, resolve

CPU = Hardware(device="cpu", memory_gib=24, cpu_count=2)
H100x2 = Hardware(device="cuda", count=2, memory_gib=80, capability=(9, 0))
T4 = Hardware.from_profile("t4")


@pytest.fixture(scope="module")
def config_only_dir(tiny_model_factory, tmp_path_factory) -> Path:
    """A model directory holding only config.json: explain must not need weights."""
    out = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_model_factory("bert", "seq-cls") / "config.json", out / "config.json")
    return out


def test_resolve_reads_only_the_config(config_only_dir: Path) -> None:
    plan = resolve(config_only_dir, task="text-classification", hardware=CPU)
    assert plan.model.model_type == "bert"
    assert plan.model.num_params and plan.model.num_params > 1_000_000  # counted on the meta device
    assert plan["batch_size"] == 32


@pytest.mark.parametrize("hardware, dtype, device, batch", [
    (CPU, "float32", "cpu", 32),
    (H100x2, "float16", "cuda:0", 64),  # a BERT encoder the fused encoder converts: float16 (docs/policy.md)
    (T4, "float16", "cuda:0", 64),
])
def test_builtin_defaults_per_hardware(config_only_dir: Path, hardware: Hardware, dtype: str, device: str,
                                       batch: int) -> None:
    plan = resolve(config_only_dir, task="text-classification", hardware=hardware)
    assert plan["dtype"] == dtype
    assert plan["device"] == device
    assert plan["batch_size"] == batch
    assert plan["attn_implementation"] == "sdpa"
    assert plan.settings["dtype"].source == "built-in default"
    assert plan.settings["dtype"].reason.startswith("auto:")
    assert plan.load_kwargs["attn_implementation"] == "sdpa"


def test_every_decision_cites_its_layer(config_only_dir: Path, tmp_path: Path) -> None:
    policy = tmp_path / "fastpath.toml"
    policy.write_text(
        '[defaults]\nbatch_size = 16\n\n'
        '[[rules]]\nname = "never"\nmatch = { model_type = "llama" }\nbatch_size = 1\n\n'
        '[[rules]]\nname = "bert-gpu"\nmatch = { model_type = "bert", device = "cuda" }\ndtype = "float16"\n'
    )
    plan = resolve(config_only_dir, task="text-classification", policy=policy, hardware=H100x2,
                   call_kwargs={"attn_implementation": "eager"})
    assert plan["batch_size"] == 16
    assert plan.settings["batch_size"].source == f"{policy} [defaults]"
    assert plan["dtype"] == "float16"
    assert plan.settings["dtype"].source == f"{policy} rule #1 'bert-gpu'"
    assert plan["attn_implementation"] == "eager"
    assert plan.settings["attn_implementation"].source == "call argument"
    assert plan.settings["placement"].source == "built-in default"


def test_unmatched_rules_do_not_apply(config_only_dir: Path) -> None:
    policy = {"rules": [{"name": "gpu-only", "match": {"device": "cuda"}, "batch_size": 2}]}
    assert resolve(config_only_dir, task="text-classification", policy=policy, hardware=CPU)["batch_size"] == 32


def test_text_generation_batches_prompts_and_other_generation_tasks_keep_the_callers_batching(
        tiny_model_factory) -> None:
    plan = resolve(tiny_model_factory("gpt2", "causal"), task="text-generation", hardware=CPU)
    assert plan["batch_size"] == 16 and plan["batched_processing"] is True and plan["length_bucketing"] is True
    assert "cut to what its prompt alone gives" in plan.settings["batch_size"].reason
    plan = resolve(tiny_model_factory("gpt2", "causal"), task="text2text-generation", hardware=CPU)
    assert plan["batch_size"] == "keep"
    assert "left to the caller" in plan.settings["batch_size"].reason


def test_plan_is_immutable_and_json_safe(config_only_dir: Path) -> None:
    plan = resolve(config_only_dir, task="text-classification", hardware=H100x2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.policy_source = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.settings["dtype"] = None  # type: ignore[index]
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["settings"]["dtype"]["value"] == "float16"  # a fused BERT encoder on a GPU
    assert data["load_kwargs"]["dtype"] == "float16"
    assert data["hardware"]["count"] == 2
    text = str(plan)
    assert "setting" in text and "source" in text and "reason" in text
    assert "float16" in text and "2x NVIDIA" not in text  # a spec without a name prints generically
    assert "from_pretrained kwargs" in text


def test_unresolved_auto_settings_say_so(config_only_dir: Path) -> None:
    plan = resolve(config_only_dir, task="text-classification", hardware=CPU)
    for key, decision in plan.settings.items():
        if decision.value == "auto":
            assert "no installed plugin" in decision.reason, key


def test_resolve_accepts_model_config_and_info(tiny_model_factory) -> None:
    from transformers import AutoConfig, AutoModel

    path = tiny_model_factory("bert")
    model = AutoModel.from_pretrained(path)
    by_model = resolve(model, hardware=CPU)
    by_config = resolve(AutoConfig.from_pretrained(path), hardware=CPU)
    assert by_model.model.num_params == by_config.model.num_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        resolve(42, hardware=CPU)


def test_hardware_profiles() -> None:
    assert Hardware.from_profile("2xh100") == Hardware(device="cuda", count=2, memory_gib=80, capability=(9, 0),
                                                       name="NVIDIA H100 80GB")
    spec = Hardware.from_profile("cuda:4x24:sm86")
    assert (spec.count, spec.memory_gib, spec.capability) == (4, 24.0, (8, 6))
    assert Hardware.from_profile("cpu").device == "cpu"
    assert Hardware.detect().device in ("cpu", "cuda", "mps", "xpu")
    with pytest.raises(ValueError, match="unknown hardware profile"):
        Hardware.from_profile("quantum")
    with pytest.raises(ValueError, match="device"):
        Hardware(device="tpu")  # type: ignore[arg-type]


def test_apply_and_revert_on_a_model_loaded_elsewhere(tiny_model_factory) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_factory("bert"))
    assert fp.plan_of(model) is None
    assert fp.apply(model) is model
    plan = fp.plan_of(model)
    assert plan is not None
    assert fp.revert(model) is model
    assert all(p.status in ("reverted", "off", "skipped") for p in fp.plan_of(model).passes)


def test_public_names_are_functions_whatever_was_imported_first() -> None:
    """A submodule named like a public function would shadow it once imported (it used to: resolve)."""
    from conftest import run_python

    code = ("import transformers_fastpath.interception.patches, transformers_fastpath.api, transformers_fastpath.cli\n"
            "import transformers_fastpath as fp\n"
            "print(all(callable(getattr(fp, n)) and not isinstance(getattr(fp, n), type(fp)) for n in fp.__all__[1:]))")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


# -- bad arguments: a task typo, a local path that does not exist ----------------------------------

def test_resolve_refuses_an_unknown_task_naming_the_close_match(config_only_dir: Path) -> None:
    from transformers_fastpath.planning.tasks import UnknownTaskError

    with pytest.raises(UnknownTaskError) as info:
        resolve(config_only_dir, task="text-clasification", hardware=CPU)
    message = str(info.value)
    assert "task 'text-clasification' is not a pipeline task of transformers" in message
    assert "did you mean 'text-classification'?" in message and "SUPPORTED_TASKS" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)  # transformers raises KeyError
    assert isinstance(info.value, fp.FastpathError)


def test_resolve_accepts_aliases_removed_and_config_declared_tasks(config_only_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    for task in ("sentiment-analysis", "text2text-generation", "translation_en_to_fr"):
        assert resolve(config_only_dir, task=task, hardware=CPU).model.task == task
    config = AutoConfig.from_pretrained(config_only_dir)
    config.custom_pipelines = {"my-task": {"impl": "my_pipeline.MyPipeline", "pt": ["AutoModel"]}}
    assert resolve(config, task="my-task", hardware=CPU).model.task == "my-task"
    config.save_pretrained(tmp_path)  # declared in config.json: read before the task is checked
    assert resolve(tmp_path, task="my-task", hardware=CPU).model.task == "my-task"


def test_resolve_reports_a_missing_local_directory_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("./nope", str(tmp_path / "nope"), "models/bert/nope"):
        with pytest.raises(FileNotFoundError, match=r"no such directory: .*nope.*config\.json"):
            resolve(name, hardware=CPU)
