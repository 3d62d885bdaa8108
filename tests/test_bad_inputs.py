"""Bad input everywhere: environment variables, policy files, CLI arguments, broken model directories.

Policies are fuzzed in test_policy.py (dicts and UTF-8 text); here: bytes, special files, pyproject
shapes. Each row of docs/reliability.md ("Bad inputs") names the test that proves it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModel

import transformers_fastpath as fp
from transformers_fastpath import PolicyError, load_policy
from transformers_fastpath.interception import bootstrap, guard, patches, state


@pytest.fixture(autouse=True)
def _leave_transformers_as_found(clean_fastpath: None) -> None:
    """Every test here restores the patches and installed policy it found (conftest's clean_fastpath)."""

ENV_VARS = ("TRANSFORMERS_FASTPATH", "TRANSFORMERS_FASTPATH_POLICY", "TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD",
            "TRANSFORMERS_FASTPATH_PLUGINS", "TRANSFORMERS_FASTPATH_CACHE")
HUGE = "x" * 100_000  # Linux caps one environment string at 128 KiB


def test_every_environment_variable_the_package_reads_is_covered() -> None:
    """A new TRANSFORMERS_FASTPATH_* variable must be added to ENV_VARS (and so to the garbage tests)."""
    import re

    root = Path(fp.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        found |= set(re.findall(r'"(TRANSFORMERS_FASTPATH\w*)"', path.read_text(encoding="utf-8")))
    assert found == set(ENV_VARS)


@pytest.fixture(scope="module")
def garbage_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("garbage")
    (root / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (root / "invalid.toml").write_text("[defaults\nbatch_size = = 3\n")
    (root / "bad-value.toml").write_text('[defaults]\ndtype = "float64"\n')
    (root / "a-directory").mkdir()
    fifo = root / "a-fifo"
    os.mkfifo(fifo)
    return {name: str(root / name) for name in ("binary.toml", "invalid.toml", "bad-value.toml", "a-directory",
                                                "a-fifo")} | {"missing": str(root / "no-such-policy.toml")}


def _garbage_values(files: dict[str, str]) -> dict[str, str]:
    return {"word": "garbage-value", "two": "2", "minus-one": "-1", "spaces": "   \t ", "punctuation": "on!",
            "non-utf8": "caf\udce9", "huge": HUGE, **files}


# -- the bootstrap (what runs at every interpreter start-up) -------------------------------------

@pytest.fixture
def fresh_bootstrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., list[str]]]:
    """``boot(**env) -> warnings``: run the .pth bootstrap again as at start-up, with only ``env`` set."""
    meta_path = list(sys.meta_path)
    was_patched = patches.is_patched()
    monkeypatch.chdir(tmp_path)  # no fastpath.toml / pyproject.toml to discover
    patches.import_targets()  # already imported: boot() patches (and reads the policy) at once

    def boot(**env: str) -> list[str]:
        for var in ENV_VARS:
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setattr(bootstrap, "_booted", False)
        monkeypatch.setattr(bootstrap, "_mode", "passive")
        monkeypatch.setattr(bootstrap, "_disabled_reason", None)
        monkeypatch.setattr(bootstrap, "_warned", set())
        fp.uninstall()
        monkeypatch.setattr(bootstrap, "_user_decided", False)  # as in a fresh process
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bootstrap.boot()
            bootstrap.boot()  # idempotent: a second call changes and warns nothing
        return [str(w.message) for w in caught if "transformers-fastpath" in str(w.message)
                or "TRANSFORMERS_FASTPATH" in str(w.message)]

    yield boot
    sys.meta_path[:] = meta_path
    # boot() with a garbage value leaves transformers unpatched: later tests get the patched process back.
    monkeypatch.undo()  # the bootstrap's flags (and any fault a test injected) first
    if was_patched and not patches.is_patched():
        patches.patch_all()


@pytest.mark.parametrize("var", ["TRANSFORMERS_FASTPATH", "TRANSFORMERS_FASTPATH_POLICY"])
def test_garbage_switch_or_policy_variable_warns_once_and_leaves_the_process_unpatched(
        var: str, garbage_files: dict[str, str], fresh_bootstrap) -> None:
    for name, value in _garbage_values(garbage_files).items():
        if var == "TRANSFORMERS_FASTPATH" and name == "spaces":
            continue  # blank = unset: the passive bootstrap, as without the variable
        env = {var: value} if var == "TRANSFORMERS_FASTPATH" else {"TRANSFORMERS_FASTPATH": "1", var: value}
        if var == "TRANSFORMERS_FASTPATH_POLICY" and name == "spaces":
            env = {"TRANSFORMERS_FASTPATH": "1", var: value}  # blank policy = none: installs the default
            fresh_bootstrap(**env)
            assert fp.is_installed(), name
            continue
        messages = fresh_bootstrap(**env)
        assert len(messages) == 1, (name, messages)
        assert len(messages[0]) < 1000, "a huge value must not make a huge warning"
        assert not fp.is_installed(), name
        assert not patches.is_patched(), name
        reason = bootstrap.status()["disabled_reason"] or messages[0]
        assert var in reason or "policy" in reason, (name, reason)


def test_blank_and_off_values_are_quiet(fresh_bootstrap) -> None:
    for value in ("", "0", "off", " FALSE ", "no"):
        assert fresh_bootstrap(TRANSFORMERS_FASTPATH=value) == []
        assert not fp.is_installed()


def test_python_starts_and_prints_with_every_garbage_value(garbage_files: dict[str, str], tmp_path: Path) -> None:
    """Interpreter start-up (the .pth bootstrap) survives every value of every variable: 28 x 4 starts."""
    values = _garbage_values(garbage_files)
    env_base = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_FASTPATH")}
    for var in ENV_VARS:
        for name, value in values.items():
            # plugin variables are read when plugins load, so exercise that too (no torch import)
            code = ("print(1)" if var in ENV_VARS[:2] else
                    "from transformers_fastpath.plugins import list_plugins; list_plugins(); print(1)")
            extra = {"TRANSFORMERS_FASTPATH": "1"} if var == "TRANSFORMERS_FASTPATH_POLICY" else {}
            env = {**env_base, **extra, var: value}
            result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    timeout=60, cwd=tmp_path, errors="replace", check=False)
            assert result.returncode == 0, (var, name, result.stderr[-2000:])
            assert result.stdout == "1\n", (var, name)
            assert "Traceback" not in result.stderr, (var, name, result.stderr[-2000:])
            assert result.stderr.count("Warning") <= 1, (var, name, result.stderr[-2000:])


def test_garbage_policy_file_in_the_variable_end_to_end(garbage_files: dict[str, str]) -> None:
    """The file exists, so the bootstrap defers to first import: then it warns once and unpatches."""
    from conftest import run_python

    code = ("import transformers.modeling_utils as m, transformers.pipelines\n"
            "import transformers_fastpath as fp\n"
            "from transformers_fastpath.interception import guard, patches\n"
            "print(fp.is_installed(), patches.is_patched(), guard.is_active())")
    result = run_python(code, env={"TRANSFORMERS_FASTPATH": garbage_files["binary.toml"]})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False True"  # unpatched; only the guard that drops fastpath=
    assert result.stderr.count("policy is invalid") == 1 and "not valid TOML" in result.stderr


# -- policy files: gaps the fuzzers in test_policy.py leave -----------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_fuzzed_policy_bytes_raise_only_policy_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    with contextlib.suppress(PolicyError):
        load_policy(path)


_toml_scalars = st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=5), st.floats(allow_nan=False))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_toml_scalars, st.lists(_toml_scalars, max_size=3),
                 st.dictionaries(st.sampled_from(["transformers-fastpath", "other", "defaults"]),
                                 st.one_of(_toml_scalars, st.lists(_toml_scalars, max_size=2),
                                           st.dictionaries(st.text(max_size=6), _toml_scalars, max_size=3)),
                                 max_size=3)))
def test_fuzzed_pyproject_tool_tables(tmp_path: Path, tool: Any) -> None:
    """A pyproject.toml whose [tool] is any shape: load_policy raises only PolicyError, discovery never raises."""
    text = "tool = " + _toml_inline(tool) + "\n"
    (tmp_path / "pyproject.toml").write_text(text, encoding="utf-8")
    with contextlib.suppress(PolicyError):
        load_policy(tmp_path / "pyproject.toml")
    from transformers_fastpath.planning.policy.loading import discover_policy_source

    discover_policy_source(cwd=tmp_path)


def _toml_inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and abs(value) == float("inf"):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_inline(v)}" for k, v in value.items()) + "}"


def test_special_policy_paths_are_policy_errors(garbage_files: dict[str, str]) -> None:
    """A FIFO would block a reader forever; a name too long for the file system; a binary file."""
    cases = {"a-fifo": "not a regular file", "binary.toml": "not valid TOML", "invalid.toml": "not valid TOML",
             "a-directory": "is a directory", "missing": "not found"}
    for name, text in cases.items():
        with pytest.raises(PolicyError, match=text):
            load_policy(garbage_files[name])
    with pytest.raises(PolicyError, match="cannot read policy file|not found"):
        load_policy(HUGE)


# -- CLI arguments -------------------------------------------------------------------------------

def _cli(argv: list[str]) -> tuple[int, str, str]:
    from transformers_fastpath.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _assert_clean_exit(argv: list[str], code: int, err: str) -> None:
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert err.strip() and "\n" not in err.strip(), (argv, err)  # exactly one line


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    (root / "bad.toml").write_text('[defaults]\nbatch_size = 0\n')
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00" * 50)
    (root / "good.toml").write_text('[defaults]\nbatch_size = 4\n')
    (root / "no-config").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text("{nope")
    return {"model": str(tiny_model_factory("bert")), "missing": str(root / "missing-model"),
            "no-config": str(root / "no-config"), "corrupt": str(root / "corrupt"), "bad.toml": str(root / "bad.toml"),
            "binary.toml": str(root / "binary.toml"), "good.toml": str(root / "good.toml"), "dir": str(root)}


_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=24)
_flags = st.lists(st.sampled_from(["--json", "--task", "--policy", "--hardware", "--bogus", "-v", "-h", "--", "-"]),
                  max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_explain_argv(cli_paths: dict[str, str], data: st.DataObject) -> None:
    paths = st.sampled_from(list(cli_paths.values()))
    argv = ["explain", data.draw(st.one_of(paths, _text), label="model")]
    if data.draw(st.booleans(), label="has task"):
        argv += ["--task", data.draw(st.one_of(_text, st.sampled_from(["text-classification", "text-generation",
                                                                         "fill-mask", ""])), label="task")]
    if data.draw(st.booleans(), label="has policy"):
        argv += ["--policy", data.draw(st.one_of(paths, _text), label="policy")]
    if data.draw(st.booleans(), label="has hardware"):
        argv += ["--hardware", data.draw(st.one_of(_text, st.sampled_from(
            ["cpu", "2xh100", "cuda:0x24", "cuda:2x-1", "cuda:99999x99999:sm99", "0xh100", "h100:sm", "detect"])),
            label="hardware")]
    argv += data.draw(_flags, label="extra")
    code, _, err = _cli(argv)
    _assert_clean_exit(argv, code, err)


@settings(max_examples=40, deadline=None)
@given(command=st.sampled_from(["doctor", "plugins", "bench", "explode", ""]),
       rest=st.lists(st.one_of(_text, st.sampled_from(["--json", "--list", "--quick", "--repeats", "-1", "x",
                                                       "--set", "=", "k=", "--threads", "--out", "--help"])),
                     max_size=4))
def test_fuzzed_other_subcommands_argv(command: str, rest: list[str]) -> None:
    """doctor / plugins run for real; bench only as far as its argument checks (workloads are not run)."""
    from transformers_fastpath import bench

    argv = [command, *rest]
    with pytest.MonkeyPatch.context() as mp:
        def no_run(name: str, **kwargs: Any) -> dict[str, Any]:
            raise SystemExit(f"(test) workload {name!r} would run here")

        mp.setattr(bench, "run_workload", no_run)
        code, _, err = _cli(argv)
    if "(test) workload" in err:
        code = 0  # got past every argument check: fine
    _assert_clean_exit(argv, code, err)


def test_cli_bad_input_messages(cli_paths: dict[str, str]) -> None:
    """The exact one-line messages (docs/reliability.md quotes them)."""
    cases = [
        (["explain", cli_paths["model"], "--hardware", "abacus"], "--hardware: unknown hardware profile 'abacus'"),
        (["explain", cli_paths["model"], "--policy", cli_paths["missing"]], "invalid policy:"),
        (["explain", cli_paths["model"], "--policy", cli_paths["binary.toml"]], "not valid TOML"),
        (["explain", cli_paths["model"], "--policy", cli_paths["dir"]], "policy path is a directory"),
        (["explain", cli_paths["missing"]], f"explain: no such directory: {cli_paths['missing']} (resolved to "),
        (["explain", cli_paths["no-config"]], "Should have a `model_type` key in its config.json"),
        (["explain", cli_paths["corrupt"]], "is not a valid JSON file"),
        (["explain"], "error: the following arguments are required: model"),
        (["explode"], "error: argument command: invalid choice: 'explode'"),
        (["bench", "--repeats", "many"], "error: argument --repeats: invalid positive integer value: 'many'"),
    ]
    for argv, text in cases:
        code, _, err = _cli(argv)
        assert code == 2, (argv, err)
        assert text in err and "\n" not in err.strip(), (argv, err)


def test_cli_unexpected_error_is_one_line_and_v_shows_the_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                    cli_paths: dict[str, str]) -> None:
    from transformers_fastpath.planning import resolution

    def boom(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(resolution, "resolve", boom)
    code, _, err = _cli(["explain", cli_paths["model"], "--hardware", "cpu"])
    assert code == 1 and "internal error: ZeroDivisionError: a bug" in err and "\n" not in err.strip()
    with pytest.raises(ZeroDivisionError):
        from transformers_fastpath.cli import main

        main(["-v", "explain", cli_paths["model"], "--hardware", "cpu"])


# -- broken model directories: transformers' own error reaches the user -----------------------------

@pytest.fixture(scope="module")
def broken_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    good = tiny_model_factory("bert", "seq-cls")
    cases = {"missing directory": root / "missing"}
    cases["no config.json"] = root / "no-config"
    cases["no config.json"].mkdir()
    shutil.copy(good / "model.safetensors", cases["no config.json"] / "model.safetensors")
    cases["corrupt config.json"] = root / "corrupt-config"
    shutil.copytree(good, cases["corrupt config.json"])
    (cases["corrupt config.json"] / "config.json").write_text('{"model_type": "bert", ')
    cases["config without model_type"] = root / "no-model-type"
    cases["config without model_type"].mkdir()
    (cases["config without model_type"] / "config.json").write_text("{}")
    cases["truncated safetensors"] = root / "truncated"
    shutil.copytree(good, cases["truncated safetensors"])
    weights = cases["truncated safetensors"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["no weights"] = root / "no-weights"
    shutil.copytree(good, cases["no weights"])
    (cases["no weights"] / "model.safetensors").unlink()
    return cases


def _error_of(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


def test_broken_model_directories_give_transformers_own_errors(broken_models: dict[str, Path]) -> None:
    for name, path in broken_models.items():
        ref = str(path)
        fp.uninstall()
        plain_load = _error_of(lambda ref=ref: AutoModel.from_pretrained(ref))
        plain_pipe = _error_of(lambda ref=ref: transformers.pipeline("text-classification", model=ref))
        patches.patch_all()
        fast_load = _error_of(lambda ref=ref: AutoModel.from_pretrained(ref, fastpath=True))
        fast_pipe = _error_of(lambda ref=ref: fp.pipeline("text-classification", model=ref))
        fp.install()
        installed_load = _error_of(lambda ref=ref: AutoModel.from_pretrained(ref))
        installed_pipe = _error_of(lambda ref=ref: transformers.pipeline("text-classification", model=ref))
        fp.uninstall()
        for plain, fast in ((plain_load, fast_load), (plain_load, installed_load), (plain_pipe, fast_pipe),
                            (plain_pipe, installed_pipe)):
            assert type(fast) is type(plain), (name, plain, fast)
            assert str(plain).splitlines()[0] in str(fast), (name, str(plain), str(fast))
            assert not isinstance(fast, fp.FastpathError), name


def test_broken_model_with_policy_argument_and_enabled_scope(broken_models: dict[str, Path]) -> None:
    """The same through a policy dict argument and an enabled() scope, for the corrupt config."""
    path = str(broken_models["corrupt config.json"])
    plain = _error_of(lambda: AutoModel.from_pretrained(path))
    patches.patch_all()
    with fp.enabled(policy={"defaults": {"batch_size": 2}}):
        scoped = _error_of(lambda: AutoModel.from_pretrained(path))
    argument = _error_of(lambda: AutoModel.from_pretrained(path, fastpath={"defaults": {"dtype": "bfloat16"}}))
    for fast in (scoped, argument):
        assert type(fast) is type(plain) and str(fast) == str(plain)
    assert state.installed_policy() is None


def test_a_patch_that_fails_at_import_warns_once_and_leaves_transformers_unpatched(
        monkeypatch: pytest.MonkeyPatch, fresh_bootstrap, tiny_model_factory) -> None:
    """Fault injected into the post-import patch (a transformers that moved something fastpath wraps)."""
    def broken(module: Any) -> None:
        raise AttributeError("module 'transformers.pipelines' has no attribute 'load_model'")

    monkeypatch.setattr(patches, "patch_pipelines", broken)
    messages = fresh_bootstrap(TRANSFORMERS_FASTPATH="1")
    assert len(messages) == 1 and "could not patch transformers.pipelines and leaves it unpatched" in messages[0]
    assert not patches.is_patched()  # the modeling patch made before it is rolled back too
    assert fp.is_installed() is False
    assert guard.is_active()  # fastpath= is dropped with the reason, not a TypeError
    monkeypatch.setattr(guard, "_warned", False)
    with pytest.warns(UserWarning, match=r"ignored in from_pretrained\(\).*could not patch transformers\.pipelines "
                                         r"\(AttributeError: .*Report it"):
        assert fp.plan_of(AutoModel.from_pretrained(tiny_model_factory("bert"), fastpath=True)) is None


def test_the_switch_warning_lists_exactly_the_accepted_values(fresh_bootstrap) -> None:
    import re

    (message,) = fresh_bootstrap(TRANSFORMERS_FASTPATH="garbage-value")
    listed = re.search(r"'garbage-value' is not an accepted value: (.*) \(on\); (.*) \(off\), in any case; or the "
                       r"path of an existing policy file", message)
    assert listed is not None, message
    on, off = listed.group(1).split(", "), listed.group(2).split(", ")
    assert set(on) == set(bootstrap._ON) and set(off) == set(bootstrap._OFF)
    for value in on:  # each listed value really is accepted, in any case
        assert fresh_bootstrap(TRANSFORMERS_FASTPATH=value.upper()) == []
        assert bootstrap.status()["mode"] == "install" and fp.is_installed(), value
    for value in off:
        assert fresh_bootstrap(TRANSFORMERS_FASTPATH=value.title()) == []
        assert bootstrap.status()["disabled_reason"] == f"TRANSFORMERS_FASTPATH={value.title()}"
        assert not fp.is_installed() and not patches.is_patched()


# -- the Python API: what fp.apply / fp.revert take -----------------------------------------------

def test_apply_and_revert_refuse_what_is_not_a_model_and_say_what_to_do(tiny_model_factory) -> None:
    path = tiny_model_factory("bert")
    for bad in (str(path), path):
        for function, name in ((fp.apply, "apply"), (fp.revert, "revert")):
            with pytest.raises(TypeError, match=rf"fp\.{name}\(\) takes a loaded model, got the \w+ '") as info:
                function(bad)
            message = str(info.value)
            assert str(path) in message and "from_pretrained(path, fastpath=True)" in message
            assert f"fp.{name}(model)" in message
    for function, name in ((fp.apply, "apply"), (fp.revert, "revert")):
        with pytest.raises(TypeError, match=rf"fp\.{name}\(\) takes a loaded model .* got int; load the model"):
            function(42)
    pipe = fp.pipeline("feature-extraction", model=str(path))
    with pytest.raises(TypeError, match=r"got a pipeline \(FeatureExtractionPipeline\); pass its model, "
                                        r"fp\.apply\(pipe\.model\)"):
        fp.apply(pipe)
    assert fp.revert(pipe) is pipe  # a pipeline's model is reverted
    assert all(p.status != "applied" for p in fp.plan_of(pipe).passes)
