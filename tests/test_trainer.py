"""FastpathCallback and canonical Trainer checkpoints (issue 4).

Real ``Trainer`` runs on the CPU, a few steps each, with tiny random BERT (sequence
classification) and Llama (causal LM) models. Besides the built-in passes, a test-only pass
that *does* change the state_dict (it wraps every attention module and adds a buffer) is
registered for the whole module, so every save path is exercised with non-canonical live
weights. Every checkpoint is then loaded in one fresh interpreter with the plugin off
(``TRANSFORMERS_FASTPATH=0``) and must have no missing/unexpected keys and give the outputs the
in-memory model gave when it was saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import torchrun_env
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import transformers_fastpath as fp
from transformers_fastpath import plugins
from transformers_fastpath.errors import FastpathError, PassSkipped, PolicyError

TESTS = Path(__file__).resolve().parent
VOCAB, SEQ, PAD = 200, 12, 0
WRAP = "test_wrap_attention"
WRAP_PLUGIN = "test-trainer-wrap-attention"
OUT_ATOL, OUT_RTOL = 1e-5, 1e-4


# -- a test-only pass that changes the state_dict ------------------------------------------

class _Wrapped(nn.Module):
    """Puts a module one level down (``x.inner``) and adds a buffer: new keys, same parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("fastpath_marker", torch.ones(1))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # attribute reads (layer_idx, query...) reach the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class WrapAttentionPass:
    """Wraps every attention module (one with a ``query`` or ``q_proj`` child): ``changes_state_dict``."""

    name = WRAP
    setting = WRAP
    changes_state_dict = True

    def supports(self, info: Any, plan: Any) -> str | None:
        return None

    def apply(self, model: nn.Module, plan: Any) -> None:
        targets = [(parent, name, child) for parent in list(model.modules())
                   for name, child in list(parent.named_children())
                   if not isinstance(child, _Wrapped) and {"query", "q_proj"} & {n for n, _ in child.named_children()}]
        if not targets:
            raise PassSkipped("no attention module with a query projection")
        for parent, name, child in targets:
            setattr(parent, name, _Wrapped(child))

    def revert(self, model: nn.Module) -> None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _Wrapped):
                    setattr(parent, name, child.inner)


class WrapPlugin:
    @fp.hookimpl
    def fastpath_register_passes(self) -> list[Any]:
        return [WrapAttentionPass()]


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, _Wrapped) for m in model.modules())


# -- data, models, probes ----------------------------------------------------------------

class TinyDataset(Dataset):
    """Right-padded random token sequences; class labels, or next-token labels with -100 at pads."""

    def __init__(self, n: int, causal: bool, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            length = int(torch.randint(4, SEQ + 1, (1,), generator=g))
            ids = torch.full((SEQ,), PAD, dtype=torch.long)
            ids[:length] = torch.randint(3, VOCAB, (length,), generator=g)
            mask = (torch.arange(SEQ) < length).long()
            labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor(i % 2)
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def probe() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


def probe_logits(model: nn.Module, causal: bool) -> list:
    """The model's eval-mode logits on :func:`probe` (real tokens only for a causal LM), as lists."""
    batch = probe()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch)["logits"]
    model.train(was_training)
    return (logits[batch["attention_mask"].bool()] if causal else logits).tolist()


class ProbeRecorder(TrainerCallback):
    """Records the in-memory model's outputs at every checkpoint (``on_save`` follows the save)."""

    def __init__(self, causal: bool) -> None:
        self.causal = causal
        self.saved: dict[str, list] = {}

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.saved[os.path.join(args.output_dir, f"checkpoint-{state.global_step}")] = probe_logits(model, self.causal)


class Container(nn.Module):
    """A user's module around a transformers model: the Trainer saves it with ``safetensors.save_file``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=2, pad_token_id=PAD))


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


@dataclasses.dataclass
class Run:
    """One Trainer run: its trainer, logged losses, and the outputs recorded at each save (dir -> logits)."""

    trainer: Trainer
    out: Path
    losses: list[float]
    saved: dict[str, list]
    kind: str  # how a fresh process loads its checkpoints: "seq-cls", "causal", "peft", "container"


def train(model: nn.Module, out: Path, *, kind: str, callback: bool, train_n: int = 16, eval_n: int = 0,
          resume: str | None = None, compute_metrics: Any = None, **overrides: Any) -> Run:
    causal = kind == "causal"
    settings: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-3, save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0)
    settings.update(overrides)
    recorder = ProbeRecorder(causal)
    trainer = Trainer(
        model=model, args=TrainingArguments(**settings), train_dataset=TinyDataset(train_n, causal),
        eval_dataset=TinyDataset(eval_n, causal, seed=1) if eval_n else None, compute_metrics=compute_metrics,
        callbacks=[recorder, *([fp.FastpathCallback()] if callback else [])])
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return Run(trainer, out, losses, recorder.saved, kind)


def save_final(run: Run, name: str = "final") -> Path:
    """``trainer.save_model()`` (fires no callback event), with the outputs it should reload to."""
    target = run.out / name
    run.trainer.save_model(str(target))
    run.saved[str(target)] = probe_logits(run.trainer.model, run.kind == "causal")
    return target


def weights(directory: str | Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(directory) / name))


def assert_same_files(a: str | Path, b: str | Path, name: str = "model.safetensors") -> None:
    """Same keys, shapes and dtypes, and (nearly) the same values: what a never-converted run saves."""
    x, y = weights(a, name), weights(b, name)
    assert sorted(x) == sorted(y)
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-5, msg=key)


def plan_status(model: nn.Module, name: str = WRAP) -> str | None:
    plan = fp.plan_of(model)
    status = plan.pass_status(name) if plan is not None else None
    return status.status if status is not None else None


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def quick_runs() -> Any:
    """Tiny models: one intra-op thread avoids thread hand-offs, and a frozen heap makes the
    ``gc.collect()`` accelerate runs after every ``train()`` cheap (it dominated the runtime)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def wrap_pass() -> Any:
    plugins.register(WrapPlugin(), name=WRAP_PLUGIN)
    yield
    plugins.unregister(WRAP_PLUGIN)


@contextlib.contextmanager
def wrap_pass_off() -> Any:
    """Without the test pass (its wrapper makes the fused encoder see changed layers and fall back)."""
    plugins.unregister(WRAP_PLUGIN)
    try:
        yield
    finally:
        plugins.register(WrapPlugin(), name=WRAP_PLUGIN)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Never-converted tiny models on disk (the reference for keys and outputs)."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    tiny_bert().save_pretrained(root / "bert")
    tiny_llama().save_pretrained(root / "llama")
    return {"bert": root / "bert", "llama": root / "llama"}


class _Background:
    """A subprocess started now, read later (so it runs while the in-process Trainer runs do)."""

    def __init__(self, code: str, env: dict[str, str], out: Path) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_FASTPATH")}
        full_env.update(env)
        self.out = out
        self.log = (out / "log.txt").open("w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=full_env, cwd=str(TESTS.parent),
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def result(self, timeout: int = 300) -> dict[str, Any]:
        returncode = self.proc.wait(timeout=timeout)
        self.log.flush()
        assert returncode == 0, (self.out / "log.txt").read_text()[-4000:]
        return json.loads((self.out / "result.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def env_var_training(base: str, out: str) -> None:
    """Run in a subprocess with ``TRANSFORMERS_FASTPATH=1``: no callback; the only fastpath call
    registers the test pass."""
    plugins.register(WrapPlugin(), name=WRAP_PLUGIN)
    gc.freeze()  # see quick_runs
    model = BertForSequenceClassification.from_pretrained(base)  # the env var makes this a fastpath load
    status, wrapped = plan_status(model), is_wrapped(model)
    run = train(model, Path(out), kind="seq-cls", callback=False)
    save_final(run)
    result = {"installed": fp.is_installed(), "status": status, "wrapped": wrapped, "saved": run.saved}
    (Path(out) / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module", autouse=True)
def env_run(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Started first, so the subprocess trains while this process does; read by ``fresh_load``."""
    out = tmp_path_factory.mktemp("env-var")
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_trainer as t; "
            f"t.env_var_training({str(bases['bert'])!r}, {str(out)!r})")
    background = _Background(code, {"TRANSFORMERS_FASTPATH": "1", "OMP_NUM_THREADS": "1"}, out)
    yield background
    background.stop()


@pytest.fixture(scope="module")
def bert_steps(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """save_strategy="steps", with and without the callback, plus ``save_model`` and ``evaluate``."""
    root = tmp_path_factory.mktemp("bert-steps")
    runs = {}
    for label, callback in (("plain", False), ("fast", True)):
        model = BertForSequenceClassification.from_pretrained(bases["bert"])
        runs[label] = train(model, root / label, kind="seq-cls", callback=callback, eval_n=8)
        save_final(runs[label])
    return runs


@pytest.fixture(scope="module")
def llama_epoch(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """save_strategy="epoch" on a causal LM, with and without the callback."""
    root = tmp_path_factory.mktemp("llama-epoch")
    runs = {}
    for label, callback in (("plain", False), ("fast", True)):
        model = LlamaForCausalLM.from_pretrained(bases["llama"])
        runs[label] = train(model, root / label, kind="causal", callback=callback, train_n=8, max_steps=-1,
                            num_train_epochs=2, save_strategy="epoch")
    return runs


class _EvalCounter:
    """compute_metrics whose metric falls at each evaluation: with greater_is_better the first one is best."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prediction: Any) -> dict[str, float]:
        self.calls += 1
        return {"order": -float(self.calls)}


@pytest.fixture(scope="module")
def bert_best(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """save_strategy="best" + load_best_model_at_end: the best (first) checkpoint is loaded back into
    the converted model at the end, through ``load_state_dict``."""
    model = BertForSequenceClassification.from_pretrained(bases["bert"])
    return train(model, tmp_path_factory.mktemp("bert-best"), kind="seq-cls", callback=True, eval_n=8,
                 max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="best",
                 metric_for_best_model="order", greater_is_better=True, load_best_model_at_end=True,
                 compute_metrics=_EvalCounter())


@pytest.fixture(scope="module")
def bert_resumed(bases: dict[str, Path], bert_steps: dict[str, Run], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Resume the callback run from its first checkpoint into a model the callback already converted."""
    model = BertForSequenceClassification.from_pretrained(bases["bert"])
    first = sorted(bert_steps["fast"].saved)[0]
    return train(model, tmp_path_factory.mktemp("bert-resume"), kind="seq-cls", callback=True, eval_n=8,
                 resume=first)


@pytest.fixture(scope="module")
def container_run(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    model = Container(BertForSequenceClassification.from_pretrained(bases["bert"]))
    return train(model, tmp_path_factory.mktemp("container"), kind="container", callback=True)


@pytest.fixture(scope="module")
def installed_run(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, str | None]:
    """``fp.install()`` and a plain Trainer: the load attaches the plan, the saves stay canonical."""
    fp.install()
    try:
        model = LlamaForCausalLM.from_pretrained(bases["llama"])
        status = plan_status(model)
        run = train(model, tmp_path_factory.mktemp("installed"), kind="causal", callback=False)
    finally:
        fp.uninstall()
    return run, status


def _lora(model: nn.Module) -> nn.Module:
    import peft

    torch.manual_seed(1)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["query", "value"])
    return peft.get_peft_model(model, config)


@pytest.fixture(scope="module")
def peft_runs(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """LoRA on an encoder converted at load (``fp.enabled()``), on one the callback converts, and plain."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("peft")
    with fp.enabled():
        converted = BertForSequenceClassification.from_pretrained(bases["bert"])
    assert is_wrapped(converted)
    plain = BertForSequenceClassification.from_pretrained(bases["bert"])
    return {
        "converted": train(_lora(converted), root / "converted", kind="peft", callback=True, eval_n=8),
        "by-callback": train(_lora(BertForSequenceClassification.from_pretrained(bases["bert"])),
                             root / "by-callback", kind="peft", callback=True, eval_n=8),
        "plain": train(_lora(plain), root / "plain", kind="peft", callback=False, eval_n=8),
    }


_VERIFY = r'''
import json, sys
manifest = json.load(open(sys.argv[1]))
import torch, safetensors.torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
plugin_modules = sorted(m for m in sys.modules if m.startswith("transformers_fastpath.")
                        and m not in ("transformers_fastpath._version", "transformers_fastpath.interception",
                                      "transformers_fastpath.interception.bootstrap"))
probe = {k: torch.tensor(v) for k, v in manifest["probe"].items()}

def logits_of(model, causal):
    model.eval()
    with torch.no_grad():
        logits = model(**probe)["logits"]
    return (logits[probe["attention_mask"].bool()] if causal else logits).tolist()

results = {}
for entry in manifest["entries"]:
    path, kind, base = entry["path"], entry["kind"], entry["base"]
    if kind in ("seq-cls", "causal"):
        cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        model, info = cls.from_pretrained(path, output_loading_info=True)
        missing = list(info["missing_keys"])
        unexpected = list(info["unexpected_keys"]) + [str(k) for k in info["mismatched_keys"]]
    elif kind == "peft":
        from peft import PeftModel, get_peft_model_state_dict
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), path)
        saved = set(safetensors.torch.load_file(path + "/adapter_model.safetensors"))
        expected = set(get_peft_model_state_dict(model))
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    else:  # a user's container: model.safetensors of Container(backbone=...)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(base))
        saved = safetensors.torch.load_file(path + "/model.safetensors")
        inner = {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}
        result = model.load_state_dict(inner, strict=False)
        missing = list(result.missing_keys)
        unexpected = list(result.unexpected_keys) + [k for k in saved if not k.startswith("backbone.")]
    results[path] = {"missing": sorted(missing), "unexpected": sorted(unexpected),
                     "logits": logits_of(model, kind == "causal")}
json.dump({"plugin_modules": plugin_modules, "results": results}, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def fresh_load(request: pytest.FixtureRequest, bases: dict[str, Path], env_run: _Background,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every checkpoint of every run, loaded in ONE fresh interpreter with the plugin off."""
    scenarios: dict[str, tuple[str, dict[str, list]]] = {}  # name -> (kind, saved)
    base_of = {"seq-cls": bases["bert"], "peft": bases["bert"], "container": bases["bert"], "causal": bases["llama"]}
    try:
        peft_runs = request.getfixturevalue("peft_runs")
    except pytest.skip.Exception:  # peft not installed: verify the others
        peft_runs = {}
    for fixture, runs in (("bert_steps", request.getfixturevalue("bert_steps")),
                          ("llama_epoch", request.getfixturevalue("llama_epoch")), ("peft_runs", peft_runs)):
        for label, run in runs.items():
            scenarios[f"{fixture}-{label}"] = (run.kind, run.saved)
    for fixture in ("bert_best", "bert_resumed", "container_run"):
        run = request.getfixturevalue(fixture)
        scenarios[fixture] = (run.kind, run.saved)
    installed, _ = request.getfixturevalue("installed_run")
    scenarios["installed"] = (installed.kind, installed.saved)
    env = env_run.result()
    scenarios["env-var"] = ("seq-cls", env["saved"])

    entries = [{"path": path, "kind": kind, "base": str(base_of[kind])}
               for kind, saved in scenarios.values() for path in saved if os.path.isdir(path)]
    root = tmp_path_factory.mktemp("verify")
    (root / "manifest.json").write_text(json.dumps(
        {"entries": entries, "probe": {k: v.tolist() for k, v in probe().items()}}))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_FASTPATH")}
    full_env.update({"TRANSFORMERS_FASTPATH": "0", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-c", _VERIFY, str(root / "manifest.json"), str(root / "out.json")],
                          env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    verified = json.loads((root / "out.json").read_text())
    return {"scenarios": scenarios, "env": env, **verified}


SCENARIOS = ["bert_steps-plain", "bert_steps-fast", "llama_epoch-plain", "llama_epoch-fast", "bert_best",
             "bert_resumed", "container_run", "installed", "env-var", "peft_runs-converted",
             "peft_runs-by-callback", "peft_runs-plain"]


# -- every checkpoint loads, without the plugin, to the in-memory outputs ------------------------

def test_fresh_process_never_imports_the_plugin(fresh_load: dict[str, Any]) -> None:
    assert fresh_load["plugin_modules"] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_checkpoints_load_without_plugin_to_the_same_outputs(fresh_load: dict[str, Any], scenario: str) -> None:
    if scenario.startswith("peft") and scenario not in fresh_load["scenarios"]:
        pytest.skip("peft not installed")
    kind, saved = fresh_load["scenarios"][scenario]
    assert saved, f"{scenario}: no checkpoint was saved"
    for path, expected in saved.items():
        got = fresh_load["results"][path]
        assert got["missing"] == [] and got["unexpected"] == [], path
        torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected), atol=OUT_ATOL,
                                   rtol=OUT_RTOL, msg=f"{scenario}: {path}")


# -- the callback converts, and the checkpoints are those of the never-converted run -----------

def test_callback_converts_and_keeps_training_losses(bert_steps: dict[str, Run]) -> None:
    fast, plain = bert_steps["fast"], bert_steps["plain"]
    assert plan_status(fast.trainer.model) == "applied" and is_wrapped(fast.trainer.model)
    assert fp.plan_of(plain.trainer.model) is None
    assert len(fast.losses) == 4
    assert fast.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    assert fast.losses[0] != pytest.approx(fast.losses[-1])  # it trained


def test_evaluation_matches_with_the_converted_model(bert_steps: dict[str, Run]) -> None:
    fast = bert_steps["fast"].trainer.evaluate()
    plain = bert_steps["plain"].trainer.evaluate()
    assert fast["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def test_step_checkpoints_and_save_model_equal_the_unconverted_run(bert_steps: dict[str, Run]) -> None:
    fast, plain = bert_steps["fast"], bert_steps["plain"]
    names = ["checkpoint-2", "checkpoint-4", "final"]
    for name in names:
        assert_same_files(fast.out / name, plain.out / name)
        assert json.loads((fast.out / name / "config.json").read_text()) == json.loads(
            (plain.out / name / "config.json").read_text())
    assert is_wrapped(fast.trainer.model)  # the passes are back after every save


def test_epoch_checkpoints_of_a_causal_lm(llama_epoch: dict[str, Run], bases: dict[str, Path]) -> None:
    fast, plain = llama_epoch["fast"], llama_epoch["plain"]
    assert plan_status(fast.trainer.model) == "applied"
    assert fast.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    saved = sorted(p.name for p in fast.out.glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    for name in saved:
        assert_same_files(fast.out / name, plain.out / name)
    assert sorted(weights(fast.out / saved[0])) == sorted(weights(bases["llama"]))


def test_best_checkpoint_is_canonical_and_loads_back_into_the_converted_model(bert_best: Run,
                                                                              bases: dict[str, Path]) -> None:
    state = bert_best.trainer.state
    assert state.best_model_checkpoint is not None and state.best_model_checkpoint.endswith("checkpoint-2")
    assert sorted(p.name for p in bert_best.out.glob("checkpoint-*")) == ["checkpoint-2"]  # later evals were worse
    best = weights(state.best_model_checkpoint)
    assert sorted(best) == sorted(weights(bases["bert"]))
    model = bert_best.trainer.model
    assert is_wrapped(model)
    live = model.state_dict()  # canonical keys while converted
    assert sorted(live) == sorted(best)
    for key, value in best.items():  # load_best_model_at_end really loaded step 2, not left step 6
        torch.testing.assert_close(live[key], value, msg=key)


def test_resume_from_checkpoint_with_the_callback(bert_steps: dict[str, Run], bert_resumed: Run) -> None:
    fast = bert_steps["fast"]
    assert plan_status(bert_resumed.trainer.model) == "applied"
    assert len(bert_resumed.losses) == 4  # steps 1-2 come from the checkpoint's trainer_state.json
    assert bert_resumed.losses[2:] == pytest.approx(fast.losses[2:], rel=1e-5, abs=1e-6)
    assert_same_files(bert_resumed.out / "checkpoint-4", fast.out / "checkpoint-4")


def test_container_module_saved_with_safetensors_is_canonical(container_run: Run) -> None:
    model = container_run.trainer.model
    assert isinstance(model, Container) and plan_status(model.backbone) == "applied"
    saved = weights(container_run.out / "checkpoint-4")
    with_wrapper = set(model.state_dict(keep_vars=True))  # taken through the hooks: canonical
    fp.revert(model.backbone)
    assert set(saved) == set(model.state_dict()) == with_wrapper
    assert not any("inner" in k or "fastpath_marker" in k for k in saved)


def test_install_covers_a_trainer_without_the_callback(installed_run: tuple[Run, str | None],
                                                       bases: dict[str, Path]) -> None:
    run, status = installed_run
    assert status == "applied"
    assert sorted(weights(run.out / "checkpoint-4")) == sorted(weights(bases["llama"]))


def test_env_var_covers_a_trainer_without_the_callback(fresh_load: dict[str, Any]) -> None:
    env = fresh_load["env"]
    assert env["installed"] and env["status"] == "applied" and env["wrapped"]
    assert len(env["saved"]) == 3  # checkpoint-2, checkpoint-4, save_model


def test_fused_encoder_falls_back_in_training_and_runs_in_evaluation(bases: dict[str, Path], tmp_path: Path) -> None:
    if "fused_encoder" not in {p.name for p in plugins.get_passes()}:
        pytest.skip("the fused_encoder pass is not registered")
    from transformers_fastpath.passes.fused_encoder import runtime_of

    with wrap_pass_off():
        model = BertForSequenceClassification.from_pretrained(bases["bert"])
        trainer = Trainer(model=model, args=TrainingArguments(
            output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True),
            train_dataset=TinyDataset(8, False), eval_dataset=TinyDataset(8, False, seed=1),
            callbacks=[fp.FastpathCallback()])
        assert plan_status(model, "fused_encoder") == "applied"  # at on_init_end, before train()
        stats = runtime_of(model).stats
        trainer.train()
        assert stats and all(key.startswith("original: ") for key in stats), dict(stats)
        stats.clear()
        trainer.evaluate()
        assert not any("training" in key or "grad" in key for key in stats), dict(stats)
        assert any(not key.startswith("original: ") for key in stats), dict(stats)  # a fused route ran
        trainer.save_model(str(tmp_path / "final"))
        stats.clear()
        fused_logits = torch.tensor(probe_logits(model, causal=False))
        assert any(not key.startswith("original: ") for key in stats), dict(stats)
    reloaded, info = BertForSequenceClassification.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and fp.plan_of(reloaded) is None
    torch.testing.assert_close(torch.tensor(probe_logits(reloaded, causal=False)), fused_logits,
                               atol=OUT_ATOL, rtol=OUT_RTOL)


# -- PEFT -----------------------------------------------------------------------------------

def test_lora_on_a_converted_encoder_trains_and_saves_canonical_adapters(peft_runs: dict[str, Run]) -> None:
    plain = peft_runs["plain"]
    for label in ("converted", "by-callback"):
        run = peft_runs[label]
        base = run.trainer.model.get_base_model()
        assert plan_status(base) == "applied" and is_wrapped(base), label
        assert run.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6), label
        for name in ("checkpoint-2", "checkpoint-4"):
            assert_same_files(run.out / name, plain.out / name, "adapter_model.safetensors")
        adapter = weights(run.out / "checkpoint-4", "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # lora_B starts at 0
        assert run.trainer.evaluate()["eval_loss"] == pytest.approx(plain.trainer.evaluate()["eval_loss"], rel=1e-5)


# -- what the callback does to a model, event by event ---------------------------------------------

@pytest.fixture
def bert(bases: dict[str, Path]) -> BertForSequenceClassification:
    return BertForSequenceClassification.from_pretrained(bases["bert"])


def test_attention_is_switched_on_the_loaded_model(bases: dict[str, Path]) -> None:
    model = BertForSequenceClassification.from_pretrained(bases["bert"], attn_implementation="eager")
    fp.FastpathCallback().prepare(model)
    plan = fp.plan_of(model)
    assert model.config._attn_implementation == "sdpa"
    assert plan.settings["attn_implementation"].source == "FastpathCallback"
    assert "switched from eager" in plan.settings["attn_implementation"].reason

    kept = BertForSequenceClassification.from_pretrained(bases["bert"], attn_implementation="eager")
    fp.FastpathCallback(policy={"defaults": {"attn_implementation": "keep"}}).prepare(kept)
    assert kept.config._attn_implementation == "eager"


def test_attention_that_cannot_be_switched_is_kept_with_a_reason(bert: nn.Module, monkeypatch: Any,
                                                                 caplog: Any) -> None:
    def refuse(self: Any, implementation: str) -> None:
        raise ValueError("not here")

    monkeypatch.setattr(type(bert), "set_attn_implementation", refuse)
    fp.FastpathCallback(policy={"defaults": {"attn_implementation": "eager"}}).prepare(bert)
    decision = fp.plan_of(bert).settings["attn_implementation"]
    assert bert.config._attn_implementation == "sdpa" and decision.value == "sdpa"
    assert "ValueError: not here" in decision.reason
    assert "not applied" in caplog.text


def test_dtype_and_load_time_settings_are_left_to_the_trainer(bert: nn.Module) -> None:
    fp.FastpathCallback(policy={"defaults": {"dtype": "bfloat16"}}).prepare(bert)
    plan = fp.plan_of(bert)
    assert all(p.dtype == torch.float32 for p in bert.parameters())
    for key in ("dtype", "quantization", "placement", "device"):
        assert plan.settings[key].value == "keep" and plan.settings[key].source == "FastpathCallback", key
    assert "mixed precision belongs to TrainingArguments" in plan.settings["dtype"].reason
    assert any("left as the Trainer has them" in note for note in plan.notes)


def test_a_model_loaded_with_fastpath_keeps_its_plan(bases: dict[str, Path]) -> None:
    with fp.enabled():
        model = BertForSequenceClassification.from_pretrained(bases["bert"])
    plan = fp.plan_of(model)
    assert plan is not None
    fp.FastpathCallback(policy={"defaults": {"attn_implementation": "eager"}}).prepare(model)
    assert fp.plan_of(model) is plan and model.config._attn_implementation == "sdpa"


def test_a_half_precision_fastpath_load_is_kept_with_a_warning(bases: dict[str, Path], caplog: Any) -> None:
    with fp.enabled(policy={"defaults": {"dtype": "bfloat16"}}):
        model = BertForSequenceClassification.from_pretrained(bases["bert"])
    assert model.dtype == torch.bfloat16
    fp.FastpathCallback().prepare(model)
    assert model.dtype == torch.bfloat16  # kept: the callback never changes dtype
    assert "without a float32 master copy" in caplog.text


def test_the_model_is_found_under_wrappers(bert: nn.Module) -> None:
    from transformers_fastpath.trainer import trained_transformers_models

    assert trained_transformers_models(torch.compile(bert)) == [bert]
    assert trained_transformers_models(Container(bert)) == [bert]
    pytest.importorskip("peft")
    lora = _lora(bert)
    assert trained_transformers_models(lora) == [bert]
    assert trained_transformers_models(nn.Linear(2, 2)) == []


def test_invalid_policy_fails_when_the_callback_is_made() -> None:
    with pytest.raises(PolicyError):
        fp.FastpathCallback(policy={"defaults": {"dtype": "float64"}})


class _CloneParametersPass:
    """Replaces the classifier's parameters with copies: unsafe once an optimizer holds them."""

    name, setting, changes_state_dict = "test_clone_parameters", "test_clone_parameters", False

    def supports(self, info: Any, plan: Any) -> str | None:
        return None

    def apply(self, model: nn.Module, plan: Any) -> None:
        head = model.classifier
        object.__setattr__(head, "_test_original_weight", head.weight)
        head.weight = nn.Parameter(head.weight.detach().clone())

    def revert(self, model: nn.Module) -> None:
        head = model.classifier
        if "_test_original_weight" in head.__dict__:
            head.weight = head.__dict__.pop("_test_original_weight")


class _EvalOnlyPass:
    name, setting, changes_state_dict, training_safe = "test_eval_only", "test_eval_only", False, False

    def supports(self, info: Any, plan: Any) -> str | None:
        return None

    def apply(self, model: nn.Module, plan: Any) -> None:
        model._test_eval_only = True

    def revert(self, model: nn.Module) -> None:
        model.__dict__.pop("_test_eval_only", None)


@pytest.mark.parametrize("extra_pass", [_CloneParametersPass], indirect=True)
def test_a_pass_that_replaces_parameters_is_reverted(extra_pass: Any, bert: nn.Module) -> None:
    before = [id(p) for p in bert.parameters()]
    fp.FastpathCallback().prepare(bert)
    status = fp.plan_of(bert).pass_status(extra_pass.name)
    assert status.status == "failed" and "re-created model parameters" in status.reason
    assert [id(p) for p in bert.parameters()] == before and not is_wrapped(bert)


@pytest.mark.parametrize("extra_pass", [_EvalOnlyPass], indirect=True)
def test_a_pass_that_is_not_training_safe_is_left_off(extra_pass: Any, bases: dict[str, Path]) -> None:
    trained = BertForSequenceClassification.from_pretrained(bases["bert"])
    fp.FastpathCallback().prepare(trained)
    assert fp.plan_of(trained).pass_status(extra_pass.name).status == "skipped"
    assert not hasattr(trained, "_test_eval_only") and is_wrapped(trained)
    served = fp.apply(BertForSequenceClassification.from_pretrained(bases["bert"]))
    assert fp.plan_of(served).pass_status(extra_pass.name).status == "applied"


def test_passes_that_change_the_state_dict_are_off_under_deepspeed_or_fsdp(bert: nn.Module) -> None:
    args = SimpleNamespace(deepspeed=None, fsdp="full_shard", device=torch.device("cpu"))
    fp.FastpathCallback().prepare(bert, args)
    status = fp.plan_of(bert).pass_status(WRAP)
    assert status.status == "skipped" and "FSDP" in status.reason and not is_wrapped(bert)


def test_on_save_stops_training_when_parameters_were_replaced(bert: nn.Module) -> None:
    callback = fp.FastpathCallback()
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None, model=bert)
    callback.on_save(None, SimpleNamespace(global_step=2), None)  # nothing changed
    bert.classifier.weight = nn.Parameter(bert.classifier.weight.detach().clone())
    with pytest.raises(FastpathError, match="optimizer would stop training them"):
        callback.on_save(None, SimpleNamespace(global_step=4), None)


# -- the core's state_dict / load_state_dict hooks (passes/runner.py) -----------------------------

def test_state_dict_and_load_state_dict_are_canonical_while_converted(bert: nn.Module, tmp_path: Path,
                                                                      bases: dict[str, Path]) -> None:
    canonical = weights(bases["bert"])
    fp.apply(bert)
    assert is_wrapped(bert)
    assert sorted(bert.state_dict()) == sorted(canonical)
    assert sorted(Container(bert).state_dict()) == sorted(f"backbone.{k}" for k in canonical)
    assert is_wrapped(bert)

    shifted = {k: v + 1 for k, v in canonical.items()}
    result = bert.load_state_dict(shifted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys and is_wrapped(bert)
    query = bert.bert.encoder.layer[0].attention.self.inner.query.weight
    torch.testing.assert_close(query, shifted["bert.encoder.layer.0.attention.self.query.weight"])

    bert.save_pretrained(tmp_path / "explicit", state_dict=bert.state_dict())  # Trainer._save's non-PreTrainedModel path
    assert sorted(weights(tmp_path / "explicit")) == sorted(canonical)
    fp.revert(bert)
    assert not is_wrapped(bert) and sorted(bert.state_dict()) == sorted(canonical)


def test_canonical_state_dict_under_threads(bert: nn.Module, tmp_path: Path, bases: dict[str, Path]) -> None:
    """Threads calling state_dict() at once each see canonical keys, and the model ends converted:
    the canonical sections nest across threads (one counter, under a lock), so a later save is
    canonical and the converted model keeps running."""
    import threading

    canonical = weights(bases["bert"])
    fp.apply(bert)
    assert is_wrapped(bert)
    start, seen, errors = threading.Barrier(4), [], []

    def worker() -> None:
        try:
            start.wait()
            for _ in range(25):
                seen.append(sorted(bert.state_dict()) == sorted(canonical))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race showed about one run in three without
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and seen and all(seen)
    assert is_wrapped(bert), "left unconverted after concurrent state_dict() calls"
    bert.save_pretrained(tmp_path / "after")
    assert sorted(weights(tmp_path / "after")) == sorted(canonical)
    assert is_wrapped(bert)


@pytest.mark.slow
def test_trainer_under_torchrun_ddp(tiny_model_factory, tmp_path: Path) -> None:
    """Two CPU processes (gloo) under torchrun: the Trainer wraps the model in
    DistributedDataParallel; with the callback both ranks train to the same weights, and the
    checkpoint rank 0 saves is those weights under the unconverted model's names."""
    from transformers import AutoModelForSequenceClassification

    model_path = tiny_model_factory("bert", "seq-cls")
    env = torchrun_env(OMP_NUM_THREADS="1")
    worker = Path(__file__).parent / "trainer_ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), "--model", str(model_path), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["wrapped"] == "DistributedDataParallel"
        assert "fused_encoder" in rank["applied"]
        assert len(rank["losses"]) == 3 and all(torch.isfinite(torch.tensor(rank["losses"])))
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    untrained = AutoModelForSequenceClassification.from_pretrained(model_path).state_dict()
    assert set(states[0]) == set(untrained)
    assert any(not torch.equal(states[0][k], untrained[k]) for k in untrained)  # it did train
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key  # DDP kept the ranks in step
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").state_dict()
    for key, value in states[0].items():
        assert torch.equal(saved[key], value), key
