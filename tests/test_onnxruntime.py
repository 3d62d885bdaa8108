"""The ``backend`` setting and the ``onnxruntime`` pass (extra ``[onnx]``): every supported family
equal to the unconverted model on padded batches, canonical state, the export cache (reuse,
staleness, partial folders), fallbacks, pipelines and pickling.

Skipped when the extra is not installed; CI runs this module in a stage that installs it.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="pip install 'transformers-fastpath[onnx]'")
pytest.importorskip("onnxscript", reason="pip install 'transformers-fastpath[onnx]'")

import torch  # noqa: E402
import transformers  # noqa: E402

import transformers_fastpath as fp  # noqa: E402
from transformers_fastpath import Hardware, StrictModeError  # noqa: E402
from transformers_fastpath.passes.onnxruntime import (
    ort_pass,  # noqa: E402
    runtime_of,  # noqa: E402
)
from transformers_fastpath.passes.onnxruntime import runtime as ort_runtime  # noqa: E402
from transformers_fastpath.passes.onnxruntime.cache import MANIFEST, cache_root  # noqa: E402
from transformers_fastpath.passes.onnxruntime.export import exported_graph  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ORT = {"defaults": {"backend": "onnxruntime"}}
CPU = Hardware(device="cpu")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, vocab_size=300)
FAMILIES = {
    "bert": {}, "roberta": {"pad_token_id": 1}, "xlm-roberta": {"pad_token_id": 1}, "camembert": {"pad_token_id": 1},
    "data2vec-text": {"pad_token_id": 1}, "electra": {"embedding_size": 16}, "ernie": {}, "mpnet": {"pad_token_id": 1},
    "distilbert": None,  # its own config names
}


def config_of(family: str) -> transformers.PretrainedConfig:
    if family == "distilbert":
        return transformers.DistilBertConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                             max_position_embeddings=64)
    return transformers.AutoConfig.for_model(family, **SMALL, **FAMILIES[family])


def saved(tmp_path: Path, family: str, head: str = "AutoModel") -> Path:
    torch.manual_seed(0)
    model = getattr(transformers, head).from_config(config_of(family)).eval()
    out = tmp_path / f"{family}-{head}"
    model.save_pretrained(out)
    return out


def batch(padding_side: str = "right", rows: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (rows, length))
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        pad = length * row // (rows + 1)
        if padding_side == "right":
            mask[row, length - pad:] = 0
        else:
            mask[row, :pad] = 0
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def assert_same(out, ref, mask) -> None:
    assert type(out) is type(ref)
    keep = mask.bool()
    for name, value in ref.items():
        if not isinstance(value, torch.Tensor):
            continue
        got = out[name]
        assert got.shape == value.shape, name
        if got.dim() >= 2 and got.shape[:2] == mask.shape:  # per-token outputs: real tokens only
            got, value = got[keep], value[keep]
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-4, msg=name)


@pytest.fixture
def every_batch_in_the_session(monkeypatch):
    """Send every batch to the session, whatever its size (padded ones are the route that must be right)."""
    monkeypatch.setattr(ort_runtime, "SMALL_CALL_TOKENS", 1 << 30)
    monkeypatch.setattr(ort_runtime, "SMALL_CALL_MIN_FILL", 0.0)


# -- equality -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_equals_the_unconverted_model_on_padded_batches(family, tmp_path,
                                                                     every_batch_in_the_session) -> None:
    path = saved(tmp_path, family)
    plain = transformers.AutoModel.from_pretrained(path).eval()
    model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    assert fp.plan_of(model).pass_status("onnxruntime").status == "applied"
    runtime = runtime_of(model)
    for side in ("right", "left"):
        inputs = batch(side)
        with torch.no_grad():
            assert_same(model(**inputs), plain(**inputs), inputs["attention_mask"])
    assert runtime.served == 2 and not runtime.fallbacks


@pytest.mark.parametrize("head", ["AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                                  "AutoModelForMaskedLM", "AutoModelForQuestionAnswering"])
def test_task_heads_equal_the_unconverted_model(head, tmp_path, every_batch_in_the_session) -> None:
    path = saved(tmp_path, "bert", head)
    plain = getattr(transformers, head).from_pretrained(path).eval()
    model = getattr(transformers, head).from_pretrained(path, fastpath=ORT)
    inputs = batch("right")
    with torch.no_grad():
        assert_same(model(**inputs), plain(**inputs), inputs["attention_mask"])
        as_tuple, plain_tuple = model(**inputs, return_dict=False), plain(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(plain_tuple)
    torch.testing.assert_close(as_tuple[0], plain_tuple[0], rtol=1e-4, atol=1e-4)
    assert runtime_of(model).served == 2


def test_small_full_calls_go_to_the_session_and_large_or_padded_ones_to_torch(tmp_path) -> None:
    path = saved(tmp_path, "bert")
    plain = transformers.AutoModel.from_pretrained(path).eval()
    model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    runtime = runtime_of(model)
    large = batch("right", rows=8, length=40)  # 320 tokens > SMALL_CALL_TOKENS
    padded = batch("left", rows=4, length=12)  # 48 tokens, 70% real < SMALL_CALL_MIN_FILL
    single, full = batch(rows=1, length=60), batch(rows=4, length=12)
    full["attention_mask"][:] = 1
    with torch.no_grad():
        assert_same(model(**large), plain(**large), large["attention_mask"])
        assert runtime.served == 0
        assert runtime.fallbacks["a call of more than 128 tokens: no faster in the session than in torch"] == 1
        assert_same(model(**padded), plain(**padded), padded["attention_mask"])
        assert runtime.served == 0
        assert runtime.fallbacks["a call with under 90% real tokens: faster in torch, which skips the pad tokens"] == 1
        assert_same(model(**single), plain(**single), single["attention_mask"])
        assert runtime.served == 1
        assert_same(model(**full), plain(**full), full["attention_mask"])  # small and unpadded: the session
        assert runtime.served == 2


def test_calls_the_graph_does_not_compute_run_the_models_own_forward(tmp_path) -> None:
    path = saved(tmp_path, "bert")
    model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    runtime = runtime_of(model)
    inputs = batch(rows=1)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True)
        assert hidden.hidden_states is not None
        embeds = model(inputs_embeds=torch.randn(1, 12, 32), attention_mask=inputs["attention_mask"])
        assert embeds.last_hidden_state.shape == (1, 12, 32)
    out = model(**inputs)  # autograd recording
    assert out.last_hidden_state.requires_grad
    model.train()
    with torch.no_grad():
        model(**inputs)
    model.eval()
    assert runtime.served == 0
    assert {"argument output_hidden_states given", "training mode"} <= set(runtime.fallbacks)
    assert any(reason.startswith("autograd is recording") for reason in runtime.fallbacks)


# -- canonical state, revert, save, pickle --------------------------------------------------------

def test_state_dict_save_and_revert_stay_canonical(tmp_path) -> None:
    path = saved(tmp_path, "bert", "AutoModelForSequenceClassification")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, fastpath=ORT)
    reference = plain.state_dict()
    state = model.state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]  # nothing written beside the checkpoint
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    inputs = batch(rows=1)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, plain(**inputs).logits)
    fp.revert(model)
    assert "forward" not in vars(model) and runtime_of(model) is None
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_pickled_model_opens_its_session_again(tmp_path) -> None:
    """The session does not pickle: the copy opens it again from the cache, after checking that its
    weights are the exported ones."""
    path = saved(tmp_path, "bert")
    model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    copy = pickle.loads(pickle.dumps(model))
    assert runtime_of(copy) is not runtime_of(model) and runtime_of(copy)._session is None
    inputs = batch(rows=1)
    with torch.no_grad():
        torch.testing.assert_close(copy(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    assert runtime_of(copy).served == 1 and runtime_of(copy)._session is not None, runtime_of(copy).fallbacks


# -- the export cache --------------------------------------------------------------------------

def test_the_export_is_reused_and_rebuilt_only_for_other_weights(tmp_path, monkeypatch) -> None:
    from transformers_fastpath.passes.onnxruntime import export

    path = saved(tmp_path, "bert")
    first = runtime_of(transformers.AutoModel.from_pretrained(path, fastpath=ORT)).graph
    assert first.path.is_file() and cache_root() in first.path.parents
    builds = []
    real_build = export._build
    monkeypatch.setattr(export, "_build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    second = runtime_of(transformers.AutoModel.from_pretrained(path, fastpath=ORT)).graph
    assert second.reused and second.key == first.key and not builds
    tuned = transformers.AutoModel.from_pretrained(path)
    with torch.no_grad():
        tuned.pooler.dense.bias.add_(0.5)
    tuned.save_pretrained(tmp_path / "tuned")
    third = runtime_of(transformers.AutoModel.from_pretrained(tmp_path / "tuned", fastpath=ORT)).graph
    assert not third.reused and third.key != first.key and builds == [1]
    (third.path.parent / MANIFEST).unlink()  # a half-written export (no manifest) is never used
    fourth = runtime_of(transformers.AutoModel.from_pretrained(tmp_path / "tuned", fastpath=ORT)).graph
    assert not fourth.reused and fourth.key == third.key and builds == [1, 1] and (fourth.path.parent / MANIFEST).exists()


def test_weights_changed_after_loading_run_in_torch_until_they_match_again(tmp_path, caplog) -> None:
    path = saved(tmp_path, "bert")
    model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    plain = transformers.AutoModel.from_pretrained(path).eval()
    runtime = runtime_of(model)
    inputs = batch(rows=1)
    bias = model.pooler.dense.bias
    with torch.no_grad():
        bias.add_(1.0)
        plain.pooler.dense.bias.add_(1.0)
        changed = model(**inputs)
        torch.testing.assert_close(changed.pooler_output, plain(**inputs).pooler_output)
        assert runtime.served == 0 and runtime.fallbacks["the weights changed since the ONNX export"] == 1
        assert "weights changed since the ONNX export" in caplog.text
        bias.sub_(1.0)
        model(**inputs)
    assert runtime.served == 1  # hashed again: the exported weights, the session serves again


# -- fallbacks ------------------------------------------------------------------------------------

def test_auto_picks_onnxruntime_only_for_cpu_float32_encoders(tmp_path, monkeypatch) -> None:
    path = saved(tmp_path, "bert")
    assert fp.resolve(path, hardware=CPU)["backend"] == "onnxruntime"
    on_gpu = fp.resolve(path, hardware=Hardware(device="cuda", count=1, memory_gib=80, capability=(9, 0)))
    assert on_gpu["backend"] == "torch" and "onnxruntime serves CPU models" in on_gpu.settings["backend"].reason
    half = fp.resolve(path, hardware=CPU, policy={"defaults": {"dtype": "bfloat16"}})
    assert half["backend"] == "torch" and half.pass_status("onnxruntime").status == "off"
    llama = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=300, architectures=["LlamaForCausalLM"])
    assert "no ONNX Runtime encoder export" in fp.resolve(llama, hardware=CPU).settings["backend"].reason
    monkeypatch.setattr(ort_pass, "missing_packages", lambda: ["onnxruntime"])
    missing = fp.resolve(path, hardware=CPU)
    assert missing["backend"] == "torch" and "onnxruntime not installed" in missing.settings["backend"].reason


def test_an_explicit_backend_that_cannot_run_warns_once_and_loads_in_torch(tmp_path, monkeypatch) -> None:
    path = saved(tmp_path, "bert")
    monkeypatch.setattr(ort_pass, "missing_packages", lambda: ["onnxruntime"])
    with pytest.warns(UserWarning, match="backend = 'onnxruntime' cannot run .* onnxruntime not installed"):
        model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    assert runtime_of(model) is None and fp.plan_of(model).pass_status("fused_encoder").status == "applied"
    with pytest.raises(StrictModeError, match="onnxruntime"):
        transformers.AutoModel.from_pretrained(path, fastpath={"defaults": {"backend": "onnxruntime", "strict": True}})


def test_a_failed_export_is_rolled_back_with_one_warning_or_raises_in_strict_mode(tmp_path, monkeypatch,
                                                                                  caplog) -> None:
    path = saved(tmp_path, "electra")  # not exported yet in this run's cache

    def broken_export(*args, **kwargs):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    plain = transformers.AutoModel.from_pretrained(path).eval()
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        model = transformers.AutoModel.from_pretrained(path, fastpath=ORT)
    failures = [r.getMessage() for r in caplog.records if "pass onnxruntime failed" in r.getMessage()]
    assert len(failures) == 1 and "simulated exporter failure" in failures[0] and "rolled back" in failures[0]
    assert fp.plan_of(model).pass_status("onnxruntime").status == "failed"
    inputs = batch(rows=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, plain(**inputs).last_hidden_state)
    assert not list((cache_root() / "onnx").glob("*.*"))  # no staging folder or lock left behind
    with pytest.raises(Exception, match="simulated exporter failure"):
        transformers.AutoModel.from_pretrained(path, fastpath={"defaults": {"backend": "onnxruntime", "strict": True}})


# -- pipelines and int8 ---------------------------------------------------------------------------

def test_pipelines_return_what_plain_pipelines_return(tiny_model_factory) -> None:
    texts = ["short", "a somewhat longer sentence here", "x " * 40, "the end"]
    for task, head in (("feature-extraction", "base"), ("text-classification", "seq-cls")):
        path = str(tiny_model_factory("bert", head))
        plain = transformers.pipeline(task, model=path)
        fast = transformers.pipeline(task, model=path, fastpath=ORT)
        runtime = runtime_of(fast.model)
        assert runtime is not None
        for inputs in (texts, texts[1]):
            expected, got = plain(inputs), fast(inputs)
            if task == "feature-extraction":
                pairs = zip(expected, got) if isinstance(inputs, list) else [(expected, got)]
                for want, have in pairs:
                    torch.testing.assert_close(torch.tensor(have), torch.tensor(want), rtol=1e-4, atol=1e-4)
            else:
                assert [r["label"] for r in (got if isinstance(got, list) else [got])] == \
                       [r["label"] for r in (expected if isinstance(expected, list) else [expected])]
                for want, have in zip(expected if isinstance(expected, list) else [expected],
                                      got if isinstance(got, list) else [got]):
                    assert have["score"] == pytest.approx(want["score"], abs=1e-5)
        assert runtime.served >= 1


def test_int8_serves_every_call_and_stays_close(tmp_path) -> None:
    path = saved(tmp_path, "bert")
    plain = transformers.AutoModel.from_pretrained(path).eval()
    model = transformers.AutoModel.from_pretrained(path, fastpath={"defaults": {"backend": "onnxruntime-int8"}})
    runtime = runtime_of(model)
    assert runtime.graph.path.name == "model.int8.onnx"
    inputs = batch("right", rows=4)
    with torch.no_grad():
        got, want = model(**inputs).pooler_output, plain(**inputs).pooler_output
    assert runtime.served == 1  # the padded batch too: one numeric regime per model
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9
    assert not torch.allclose(got, want, atol=1e-6)  # int8 weights change the outputs: why it is opt-in


def test_the_exported_graph_is_traced_from_the_unconverted_model(tmp_path) -> None:
    path = saved(tmp_path, "bert")
    model = transformers.AutoModel.from_pretrained(path, fastpath={"defaults": {"backend": "torch"}})
    assert fp.plan_of(model).pass_status("fused_encoder").status == "applied"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, output_type, _ = exported_graph(model, tmp_path / "cache", quantize="none", progress=False)
    assert graph.outputs == ("last_hidden_state", "pooler_output") and output_type.__name__.startswith("BaseModelOutput")
    assert fp.plan_of(model).pass_status("fused_encoder").status == "applied"  # the model itself is untouched
