"""The three opt-ins, pass-through when off, install/uninstall identity, and pipelines equal to transformers."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
import transformers
from conftest import run_python
from transformers import AutoModel, PreTrainedModel

import transformers_fastpath as fp
from transformers_fastpath.interception import patches

pytestmark = pytest.mark.usefixtures("clean_fastpath")


def _originals() -> dict[str, object]:
    import transformers.pipelines as pipelines

    fp.uninstall()
    return {
        "from_pretrained": PreTrainedModel.__dict__["from_pretrained"],
        "save_pretrained": PreTrainedModel.__dict__["save_pretrained"],
        "pipelines.pipeline": pipelines.__dict__["pipeline"],
        "pipelines.load_model": pipelines.__dict__["load_model"],
        "transformers.pipeline": transformers.pipeline,
    }


def _current() -> dict[str, object]:
    import transformers.pipelines as pipelines

    return {
        "from_pretrained": PreTrainedModel.__dict__["from_pretrained"],
        "save_pretrained": PreTrainedModel.__dict__["save_pretrained"],
        "pipelines.pipeline": pipelines.__dict__["pipeline"],
        "pipelines.load_model": pipelines.__dict__["load_model"],
        "transformers.pipeline": transformers.pipeline,
    }


def test_install_is_idempotent_and_uninstall_restores_the_original_objects(tiny_model_factory) -> None:
    before = _originals()
    fp.install()
    fp.install()
    patched = _current()
    assert all(patched[k] is not before[k] for k in before)
    assert fp.is_installed()
    model = AutoModel.from_pretrained(tiny_model_factory("bert"))
    assert fp.plan_of(model) is not None
    fp.uninstall()
    assert _current() == before
    assert all(_current()[k] is before[k] for k in before)
    assert not fp.is_installed()
    assert fp.plan_of(AutoModel.from_pretrained(tiny_model_factory("bert"))) is None


def test_invalid_policy_installs_nothing(tmp_path: Path) -> None:
    before = _originals()
    bad = tmp_path / "fastpath.toml"
    bad.write_text('[defaults]\ndtype = "float64"\n')
    with pytest.raises(fp.PolicyError):
        fp.install(bad)
    assert _current() == before and not fp.is_installed()


def test_from_pretrained_fastpath_argument(tiny_model_factory) -> None:
    path = tiny_model_factory("bert")
    patches.patch_all()
    plain = AutoModel.from_pretrained(path)
    assert fp.plan_of(plain) is None
    off = AutoModel.from_pretrained(path, fastpath=False)
    assert fp.plan_of(off) is None
    fast = AutoModel.from_pretrained(path, fastpath=True)
    plan = fp.plan_of(fast)
    assert plan is not None and plan["dtype"] == "float32"
    scoped = AutoModel.from_pretrained(path, fastpath={"defaults": {"encoder_fastpath": False}})
    assert fp.plan_of(scoped).pass_status("fused_encoder").status == "off"
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_caller_arguments_win_over_the_plan(tiny_model_factory) -> None:
    patches.patch_all()
    model = AutoModel.from_pretrained(tiny_model_factory("bert"), fastpath=True, dtype=torch.float16)
    assert model.dtype == torch.float16
    plan = fp.plan_of(model)
    assert plan.settings["dtype"].source == "call argument"
    assert "dtype" in plan.settings["dtype"].reason


def test_enabled_is_scoped_to_its_thread(tiny_model_factory) -> None:
    path = tiny_model_factory("bert")
    results: dict[str, object] = {}
    inside = threading.Event()
    done = threading.Event()

    def scoped() -> None:
        with fp.enabled():
            inside.set()
            results["inside"] = fp.plan_of(AutoModel.from_pretrained(path))
            done.wait(60)

    def outside() -> None:
        inside.wait(60)
        results["outside"] = fp.plan_of(AutoModel.from_pretrained(path))
        done.set()

    threads = [threading.Thread(target=scoped), threading.Thread(target=outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["inside"] is not None
    assert results["outside"] is None


def test_enabled_is_scoped_to_its_asyncio_task(tiny_model_factory) -> None:
    path = tiny_model_factory("bert")

    async def with_scope() -> object:
        with fp.enabled():
            await asyncio.sleep(0.01)
            return fp.plan_of(AutoModel.from_pretrained(path))

    async def without_scope() -> object:
        await asyncio.sleep(0.005)
        return fp.plan_of(AutoModel.from_pretrained(path))

    async def main() -> tuple[object, object]:
        return await asyncio.gather(with_scope(), without_scope())

    a, b = asyncio.run(main())
    assert a is not None and b is None


# -- pipelines ---------------------------------------------------------------------------

TEXTS = ["Hello world.", "A much longer sentence that has quite a few more tokens than the first one does.",
         "Short.", "Medium length text goes here.", "x"]


def _same_outputs(a, b, atol: float = 1e-4) -> None:
    """Compare nested pipeline outputs; floats within atol."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_outputs(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_outputs(x, y, atol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=atol)
    else:
        assert a == b


@pytest.mark.parametrize("task, family, head, inputs", [
    ("text-classification", "bert", "seq-cls", TEXTS),
    ("token-classification", "bert", "token-cls", TEXTS),
    ("fill-mask", "bert", "mlm", ["Paris is the [MASK] of France.", "The [MASK] sat on a long mat today."]),
    ("text-generation", "gpt2", "causal", ["Hello world", "The"]),
    ("text-generation", "llama", "causal", ["Hello world"]),
])
def test_pipeline_outputs_equal_fastpath_off(tiny_model_factory, task, family, head, inputs) -> None:
    path = str(tiny_model_factory(family, head))
    extra = {"max_new_tokens": 5, "do_sample": False} if task == "text-generation" else {}
    off = transformers.pipeline(task, model=path)
    patches.patch_all()
    on = transformers.pipeline(task, model=path, fastpath=True)
    assert fp.plan_of(on) is not None
    _same_outputs(off(list(inputs), **extra), on(list(inputs), **extra))


def test_feature_extraction_pipeline_on_real_minilm(minilm: Path) -> None:
    sentences = [TEXTS[i % len(TEXTS)] * (1 + i % 3) for i in range(12)]
    off = transformers.pipeline("feature-extraction", model=str(minilm), batch_size=4)
    on = fp.pipeline("feature-extraction", model=str(minilm), batch_size=4)
    lengths = [len(x) for x in off.tokenizer(sentences)["input_ids"]]
    out_off, out_on = off(sentences), on(sentences)
    for a, b, n in zip(out_off, out_on, lengths):
        torch.testing.assert_close(torch.tensor(b[0][:n]), torch.tensor(a[0][:n]), atol=1e-4, rtol=0)
    plan = fp.plan_of(on)
    assert plan["length_bucketing"] is True
    assert type(on).__name__ == "FeatureExtractionPipeline"
    assert isinstance(on, transformers.FeatureExtractionPipeline)


def test_pipeline_defaults_batch_size_and_keeps_caller_order(tiny_model_factory) -> None:
    path = str(tiny_model_factory("bert", "seq-cls"))
    on = fp.pipeline("text-classification", model=path)
    assert on._batch_size == 32
    calls: list[list[str]] = []
    base_call = transformers.TextClassificationPipeline.__call__

    def spy(self, inputs, *args, **kwargs):
        calls.append(list(inputs))
        return base_call(self, inputs, *args, **kwargs)

    off = transformers.pipeline("text-classification", model=path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.TextClassificationPipeline, "__call__", spy)
        result = on(list(TEXTS))
    assert calls[0] == sorted(TEXTS, key=len, reverse=True)  # the model saw them longest first
    _same_outputs(off(list(TEXTS)), result)  # the caller gets them in the original order
    explicit = fp.pipeline("text-classification", model=path, batch_size=2)
    assert explicit._batch_size == 2
    assert fp.plan_of(explicit).settings["batch_size"].source == "call argument"


def test_pipeline_with_a_loaded_model(tiny_model_factory) -> None:
    path = tiny_model_factory("bert", "seq-cls")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    pipe = fp.pipeline("text-classification", model=model, tokenizer=tok)
    assert fp.plan_of(pipe) is fp.plan_of(model)
    assert fp.plan_of(model).model.task == "text-classification"


def test_fastpath_key_never_reaches_transformers(tiny_model_factory) -> None:
    """Unpatched, transformers rejects the key (fill-mask) or leaks it into the tokenizer call
    (text-classification); patched, every form is accepted and removed."""
    mlm = str(tiny_model_factory("bert", "mlm"))
    cls = str(tiny_model_factory("bert", "seq-cls"))
    fp.uninstall()
    with pytest.raises(TypeError, match="fastpath"):
        transformers.pipeline("fill-mask", model=mlm, fastpath=True)
    assert "fastpath" in transformers.pipeline("text-classification", model=cls, fastpath=True)._preprocess_params
    patches.patch_all()
    for value in (True, False, {"defaults": {"batch_size": 4}}):
        for task, path in (("fill-mask", mlm), ("text-classification", cls)):
            pipe = transformers.pipeline(task, model=path, fastpath=value)
            params = {**pipe._preprocess_params, **pipe._forward_params, **pipe._postprocess_params}
            assert "fastpath" not in params
    assert transformers.pipeline("text-classification", model=cls, fastpath={"defaults": {"batch_size": 4}}
                                 )._batch_size == 4


def test_missing_model_directory_gives_transformers_own_error(tmp_path: Path) -> None:
    patches.patch_all()
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError) as plain_error:
        AutoModel.from_pretrained(missing)
    with pytest.raises(OSError) as fast_error:
        AutoModel.from_pretrained(missing, fastpath=True)
    assert type(fast_error.value) is type(plain_error.value)
    assert str(fast_error.value) == str(plain_error.value)


def test_names_imported_before_install_still_get_the_task(tiny_model_factory) -> None:
    fp.uninstall()
    from transformers.pipelines import pipeline as early_pipeline  # bound to the original

    fp.install()
    pipe = early_pipeline("text-classification", model=str(tiny_model_factory("bert", "seq-cls")))
    plan = fp.plan_of(pipe)
    assert plan is not None and plan.model.task == "text-classification"


# -- the environment variable and the .pth bootstrap (fresh interpreters) --------------------

ENV_SCRIPT = """
import json, sys, transformers
pipe = transformers.pipeline("text-classification", model={path!r})
plan = getattr(pipe.model, "_fastpath_plan", None)
print(json.dumps({{"plan": plan is not None, "batch": pipe._batch_size,
                  "out": pipe(["a b c", "hello there world"])}}))
"""


def test_env_var_opts_a_process_in_without_importing_the_plugin(tiny_model_factory) -> None:
    path = str(tiny_model_factory("bert", "seq-cls"))
    on = run_python(ENV_SCRIPT.format(path=path), env={"TRANSFORMERS_FASTPATH": "1"})
    off = run_python(ENV_SCRIPT.format(path=path))
    assert on.returncode == 0, on.stderr
    assert off.returncode == 0, off.stderr
    on_out, off_out = json.loads(on.stdout.splitlines()[-1]), json.loads(off.stdout.splitlines()[-1])
    assert on_out["plan"] is True and on_out["batch"] == 32
    assert off_out["plan"] is False
    _same_outputs(on_out["out"], off_out["out"])


def test_env_var_with_a_policy_path(tiny_model_factory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults]\nbatch_size = 5\n")
    result = run_python(ENV_SCRIPT.format(path=str(tiny_model_factory("bert", "seq-cls"))),
                        env={"TRANSFORMERS_FASTPATH": str(policy)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["batch"] == 5


def test_passive_bootstrap_accepts_the_fastpath_argument(tiny_model_factory) -> None:
    code = ("import transformers\n"
            f"p = transformers.pipeline('text-classification', model={str(tiny_model_factory('bert', 'seq-cls'))!r},"
            " fastpath=True)\nprint(p.model._fastpath_plan is not None)")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True")


def test_bootstrap_is_cheap_at_start_up() -> None:
    code = "import sys; print('transformers_fastpath' in sys.modules, 'torch' in sys.modules, 'transformers' in sys.modules)"
    result = run_python(code, env={"TRANSFORMERS_FASTPATH": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]  # bootstrap loaded, nothing heavy


# Whether fastpath's wrappers are in place, and whether only the guard is (fastpath off for the process).
PATCH_STATE = ("import transformers.modeling_utils, transformers.pipelines\n"
               "from transformers_fastpath.interception import bootstrap, guard, patches\n"
               "print(patches.is_patched(), guard.is_active(), bootstrap.status()['disabled_reason'])")


@pytest.mark.parametrize("value", ["garbage-value", "/no/such/policy.toml"])
def test_unusable_env_value_warns_and_leaves_the_process_unpatched(value: str, tiny_model_factory) -> None:
    assert run_python("print(1)", env={"TRANSFORMERS_FASTPATH": value}).stdout.strip() == "1"
    result = run_python(PATCH_STATE, env={"TRANSFORMERS_FASTPATH": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("False True TRANSFORMERS_FASTPATH=")  # not patched; only the guard
    assert "stays unpatched" in result.stderr


def test_invalid_policy_in_env_warns_and_leaves_transformers_unpatched(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults]\ndtype = "float64"\n')
    result = run_python(PATCH_STATE, env={"TRANSFORMERS_FASTPATH": str(bad)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("False True the policy TRANSFORMERS_FASTPATH found is invalid")
    assert "policy is invalid" in result.stderr and "dtype" in result.stderr


def test_switch_zero_disables_the_bootstrap() -> None:
    result = run_python(PATCH_STATE, env={"TRANSFORMERS_FASTPATH": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False True TRANSFORMERS_FASTPATH=0"
    assert result.stderr.strip() == ""  # =0 is quiet until a call asks for fastpath


OFF_SCRIPT = """
import json, warnings
import transformers
from transformers import AutoModel, PreTrainedModel
import transformers_fastpath as fp
from transformers_fastpath.interception import guard

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = AutoModel.from_pretrained({base!r}, fastpath=True)
    fill = transformers.pipeline("fill-mask", model={mlm!r}, fastpath=True)  # unguarded: TypeError
    cls = transformers.pipeline("text-classification", model={cls!r}, fastpath={{"defaults": {{"batch_size": 4}}}})
    quiet = AutoModel.from_pretrained({base!r}, fastpath=False)
ours = [w for w in caught if w.category is UserWarning and "transformers-fastpath" in str(w.message)]
params = {{**cls._preprocess_params, **cls._forward_params, **cls._postprocess_params}}
result = {{"plans": [fp.plan_of(x) is not None for x in (model, fill, cls, quiet)], "leaked": "fastpath" in params,
          "batch": cls._batch_size, "warnings": [(w.category.__name__, str(w.message), w.filename) for w in ours],
          "out": cls(["a b c", "hello there world"])}}
explicit = fp.pipeline("text-classification", model={cls!r}, fastpath={{}})  # explicit code still opts in
result["explicit"] = [fp.plan_of(explicit) is not None, guard.is_active()]  # ... and the guard goes
fp.install({{}})
result["installed"] = [fp.plan_of(AutoModel.from_pretrained({base!r})) is not None, guard.is_active()]
fp.uninstall()  # transformers' own function objects back: no guard either
result["uninstalled"] = ["fastpath" in PreTrainedModel.from_pretrained.__code__.co_varnames, guard.is_active()]
print(json.dumps(result))
"""


@pytest.mark.parametrize("env", [{"TRANSFORMERS_FASTPATH": "0"}, {"TRANSFORMERS_FASTPATH": "garbage-value"},
                                 {"TRANSFORMERS_FASTPATH_POLICY": "/no/such/policy.toml"}, "invalid policy"],
                         ids=["zero", "garbage", "missing-policy", "invalid-policy"])
def test_fastpath_argument_while_off_warns_once_with_the_reason_and_runs_plain(env, tiny_model_factory,
                                                                               tmp_path: Path) -> None:
    """Whenever the bootstrap leaves fastpath off, fastpath= is dropped with one UserWarning naming the reason
    (from_pretrained no longer raises TypeError, pipeline() no longer ignores it silently)."""
    if env == "invalid policy":
        bad = tmp_path / "bad.toml"
        bad.write_text('[defaults]\ndtype = "float64"\n')
        env = {"TRANSFORMERS_FASTPATH": str(bad)}
    paths = {"base": str(tiny_model_factory("bert")), "mlm": str(tiny_model_factory("bert", "mlm")),
             "cls": str(tiny_model_factory("bert", "seq-cls"))}
    result = run_python(OFF_SCRIPT.format(**paths), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["plans"] == [False, False, False, False] and not out["leaked"] and out["batch"] != 4
    assert len(out["warnings"]) == 1, out["warnings"]  # once per process, for both entry points
    category, message, filename = out["warnings"][0]
    assert category == "UserWarning" and filename == "<string>"  # points at the caller's line
    assert "fastpath=True ignored in from_pretrained()" in message and "runs as plain transformers" in message
    name, value = next(iter(env.items()))
    assert name in message, message  # the reason: which variable
    assert ("Unset TRANSFORMERS_FASTPATH" in message if value == "0" else "Fix the" in message or "Set " in message)
    plain = run_python(ENV_SCRIPT.format(path=paths["cls"]))
    _same_outputs(json.loads(plain.stdout.splitlines()[-1])["out"], out["out"])
    assert out["explicit"] == [True, False] and out["installed"] == [True, False]
    assert out["uninstalled"] == [False, False]


def test_uninstall_is_not_undone_by_a_later_import(tmp_path) -> None:
    """With TRANSFORMERS_FASTPATH=1, uninstall() before the first import of transformers.pipelines:
    that import must not patch again or reinstall the policy."""
    code = ("import transformers.modeling_utils, transformers_fastpath as fp\n"
            "fp.uninstall()\n"
            "from transformers import pipeline\n"
            "from transformers_fastpath.interception import patches\n"
            "print('state', fp.is_installed(), patches.is_patched())")
    proc = run_python(code, env={"TRANSFORMERS_FASTPATH": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "state False False" in proc.stdout
