"""Trust: no remote code, no downloads, policies are data, plugins only when allowed.

test_plugins.py covers autoload off (=1), an allow-list that excludes or includes a real installed
plugin, and a plugin that raises ImportError; here: the edges (garbage values, unknown names, a
plugin that exits or fails to register, nothing run at start-up) and the source scans.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import transformers
from conftest import run_python
from transformers import AutoConfig, AutoModel

import transformers_fastpath as fp
from transformers_fastpath import plugins
from transformers_fastpath.interception import patches

PACKAGE = Path(fp.__file__).parent


@pytest.fixture(autouse=True)
def _leave_transformers_as_found(clean_fastpath: None) -> None:
    """Every test here restores the patches and installed policy it found (conftest's clean_fastpath)."""

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
raise RuntimeError("remote code ran")
"""


@pytest.fixture
def auto_map_models(tmp_path: Path, tiny_model_factory) -> dict[str, Any]:
    """Two local model dirs whose config.json has auto_map pointing at code that must never run:
    ``known`` (model_type bert: transformers uses its own class) and ``custom`` (model_type unknown)."""
    import shutil

    marker = tmp_path / "REMOTE_CODE_RAN"
    dirs = {}
    for kind, model_type in (("known", "bert"), ("custom", "evil-custom-type")):
        d = tmp_path / kind
        shutil.copytree(tiny_model_factory("bert", "seq-cls"), d)
        config = json.loads((d / "config.json").read_text())
        config["model_type"] = model_type
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                              "AutoModel": "modeling_evil.EvilModel",
                              "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
        (d / "config.json").write_text(json.dumps(config))
        for name in ("configuration_evil.py", "modeling_evil.py"):
            (d / name).write_text(EVIL_CODE.format(marker=str(marker)))
        dirs[kind] = d
    return {"marker": marker, **dirs}


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """Record the kwargs of every config read and of every call reaching transformers' from_pretrained."""
    fp.uninstall()
    calls: dict[str, list[dict[str, Any]]] = {"config": [], "load": []}
    real_config = AutoConfig.from_pretrained.__func__
    real_load = transformers.PreTrainedModel.__dict__["from_pretrained"].__func__

    def config_spy(cls: type, *args: Any, **kwargs: Any) -> Any:
        calls["config"].append(kwargs)
        return real_config(cls, *args, **kwargs)

    def load_spy(cls: type, *args: Any, **kwargs: Any) -> Any:
        calls["load"].append(kwargs)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(config_spy))
    # the spy sits under fastpath's wrapper: it sees exactly what fastpath hands transformers
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(load_spy))
    yield calls
    fp.uninstall()


def _never_true(calls: list[dict[str, Any]]) -> None:
    assert calls
    assert all(kw.get("trust_remote_code") is not True for kw in calls), calls


def test_auto_map_model_loads_local_code_and_fastpath_never_trusts_remote_code(auto_map_models, spies) -> None:
    path = str(auto_map_models["known"])
    fp.install()
    model = AutoModel.from_pretrained(path)
    pipe = transformers.pipeline("text-classification", model=path)
    also = AutoModel.from_pretrained(path, fastpath={"defaults": {"batch_size": 2}})
    assert type(model).__name__ == "BertModel" and fp.plan_of(model) is not None
    assert fp.plan_of(pipe) is not None and fp.plan_of(also) is not None
    _never_true(spies["load"])
    _never_true(spies["config"])
    # fastpath's own config reads say False explicitly (no terminal prompt to run custom code)
    assert any(kw.get("trust_remote_code") is False for kw in spies["config"])
    assert not auto_map_models["marker"].exists()


def test_custom_code_model_fails_exactly_as_without_fastpath(auto_map_models, spies) -> None:
    """Only remote code could load it: transformers' own refusal reaches the user, nothing runs."""
    path = str(auto_map_models["custom"])
    with pytest.raises(ValueError) as plain:
        AutoModel.from_pretrained(path)
    patches.patch_all()
    with pytest.raises(ValueError) as fast:
        AutoModel.from_pretrained(path, fastpath=True)
    with pytest.raises(ValueError) as pipe:
        fp.pipeline("text-classification", model=path)
    assert "trust_remote_code=True" in str(plain.value)
    assert str(fast.value) == str(plain.value)
    assert "trust_remote_code=True" in str(pipe.value)
    _never_true(spies["config"])
    assert not auto_map_models["marker"].exists()


def test_explain_never_runs_remote_code(auto_map_models, spies, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers_fastpath.cli import main

    assert main(["explain", str(auto_map_models["known"]), "--hardware", "cpu"]) == 0
    assert main(["explain", str(auto_map_models["custom"]), "--hardware", "cpu"]) == 2
    assert "trust_remote_code=True" in capsys.readouterr().err
    assert all(kw.get("trust_remote_code") is False for kw in spies["config"])
    assert not auto_map_models["marker"].exists()


def test_no_network_use_while_loading_explaining_and_running(monkeypatch: pytest.MonkeyPatch, tiny_model_factory,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every socket connect and huggingface_hub download function fails; fastpath works on a local dir."""
    import huggingface_hub

    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[:2])
        raise OSError("network use in a test that forbids it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("hf_hub_download", "snapshot_download", "try_to_load_from_cache", "model_info"):
        if hasattr(huggingface_hub, name):
            monkeypatch.setattr(huggingface_hub, name, refuse)

    path = str(tiny_model_factory("bert", "seq-cls"))
    from transformers_fastpath.cli import main

    assert main(["explain", path, "--hardware", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["model_type"] == "bert"
    assert fp.resolve(path, task="text-classification", hardware=fp.Hardware()) is not None
    pipe = fp.pipeline("text-classification", model=path)
    assert pipe(["hello world"])[0]["label"]
    fp.install()
    try:
        assert fp.plan_of(AutoModel.from_pretrained(path)) is not None
    finally:
        fp.uninstall()
    assert attempts == []


# -- source scans ----------------------------------------------------------------------------------

def _sources() -> dict[str, ast.AST]:
    return {str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


# pickle may serialise (replica workers check picklability; multiprocessing talks to its own
# children), never load; the network and YAML are not touched at all.
FORBIDDEN_MODULES = {"dill", "marshal", "shelve", "yaml", "requests", "urllib", "urllib3", "httpx", "http", "socket",
                     "aiohttp", "ftplib", "huggingface_hub"}
FORBIDDEN_NAMES = {"hf_hub_download", "snapshot_download", "urlopen", "eval", "exec", "__import__", "run_path",
                   "run_module"}
UNPICKLE = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch", "load"), ("yaml", "load")}
# importlib.import_module may only run on the package's own constant tables.
IMPORT_MODULE_ALLOWED = {("transformers_fastpath/plugins.py", "get_plugin_manager"),
                         ("transformers_fastpath/__init__.py", "__getattr__")}


def test_source_never_downloads_evaluates_or_unpickles() -> None:
    problems = []
    for file, tree in _sources().items():
        functions = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    functions.setdefault(id(inner), node.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom):
                bad = [node.module] if node.module and node.module.split(".")[0] in FORBIDDEN_MODULES else []
                bad += [a.name for a in node.names if a.name in FORBIDDEN_NAMES
                        or (node.module, a.name) in UNPICKLE]
            elif isinstance(node, ast.Name):
                bad = [node.id] if node.id in FORBIDDEN_NAMES else []
            elif isinstance(node, ast.Attribute):
                bad = [node.attr] if node.attr in FORBIDDEN_NAMES - {"eval"} else []
                if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in UNPICKLE:
                    bad.append(f"{node.value.id}.{node.attr}")  # torch.load unpickles too
                if node.attr == "import_module" and (file, functions.get(id(node))) not in IMPORT_MODULE_ALLOWED:
                    bad.append(f"importlib.import_module in {functions.get(id(node))}")
            elif isinstance(node, ast.keyword):
                value = node.value
                bad = (["trust_remote_code=True"] if node.arg == "trust_remote_code"
                       and not (isinstance(value, ast.Constant) and value.value is False) else [])
            elif isinstance(node, ast.Dict):
                bad = ["{'trust_remote_code': ...}" for k, v in zip(node.keys, node.values)
                       if isinstance(k, ast.Constant) and k.value == "trust_remote_code"
                       and not (isinstance(v, ast.Constant) and v.value is False)]
            else:
                bad = []
            problems += [f"{file}:{getattr(node, 'lineno', '?')}: {b}" for b in bad]
    assert problems == [], "\n".join(problems)


def test_policies_are_read_as_toml_data_only(tmp_path: Path) -> None:
    """Python, YAML and pickle content is not a policy; string values are validated, never evaluated."""
    marker = tmp_path / "EVALUATED"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    import pickle

    files = {"policy.py": f"import os\n{payload}\n", "policy.yaml": "defaults:\n  batch_size: !!python/object/apply:os.system ['true']\n",
             "policy.pkl": pickle.dumps({"defaults": {"batch_size": 2}})}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(fp.PolicyError):
            fp.load_policy(path)
    from transformers_fastpath.planning.policy import SETTINGS

    for key in SETTINGS:
        for where in ({"defaults": {key: payload}},
                      {"rules": [{"name": payload, "match": {"model_type": payload, "task": payload}, key: payload}]}):
            try:
                fp.load_policy(where)
            except fp.PolicyError:
                pass
    assert not marker.exists()


# -- third-party plugins ---------------------------------------------------------------------------

@pytest.fixture
def fake_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``install(**modules) -> None``: entry points in the fastpath group backed by modules in tmp_path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD", "TRANSFORMERS_FASTPATH_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    eps: list[metadata.EntryPoint] = []

    def install(**modules: str) -> None:
        for name, source in modules.items():
            (tmp_path / f"tfp_trust_{name}.py").write_text(source)
            eps.append(metadata.EntryPoint(name=name, value=f"tfp_trust_{name}", group=plugins.ENTRY_POINT_GROUP))

    def entry_points(**kwargs: Any) -> list[metadata.EntryPoint]:
        return list(eps) if kwargs.get("group") == plugins.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(plugins.metadata, "entry_points", entry_points)
    monkeypatch.setattr(plugins, "_env_warned", set())
    plugins.reset_plugin_manager()
    yield install
    plugins.reset_plugin_manager()


GOOD_PLUGIN = """
import transformers_fastpath as fp

@fp.hookimpl
def fastpath_resolve_plan(plan):
    plan.note("good plugin ran")
"""


def _load_plugins() -> tuple[dict[str, plugins.PluginInfo], list[str]]:
    plugins.reset_plugin_manager()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = {i.name: i for i in plugins.list_plugins()}
    return infos, [str(w.message) for w in caught]


def test_garbage_disable_value_warns_and_keeps_plugins_off(fake_plugins, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_plugins(good=GOOD_PLUGIN)
    assert "good" in _load_plugins()[0]
    for value, loaded in (("0", True), ("off", True), ("1", False), ("TRUE", False), ("please", False),
                          ("x" * 100_000, False)):
        monkeypatch.setenv("TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD", value)
        infos, messages = _load_plugins()
        assert ("good" in infos) is loaded, value
        assert all(m in plugins.BUILTIN_PLUGINS for m in infos if m != "good")
        garbage = value not in ("0", "off", "1", "TRUE")
        assert len(messages) == (1 if garbage else 0), (value, messages)
        assert all(len(m) < 1000 for m in messages)
    # the warning lists exactly the values the parser accepts
    monkeypatch.setenv("TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD", "please, no")
    (message,) = _load_plugins()[1]
    listed = re.search(r"'please, no' is not an accepted value: (.*) \(disable autoload\); (.*) or blank "
                       r"\(load plugins\), in any case", message)
    assert listed is not None, message
    assert listed.group(1).split(", ") == list(plugins._TRUE)
    assert listed.group(2).split(", ") == [v for v in plugins._FALSE if v]


def test_allow_list_edges(fake_plugins, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_plugins(good=GOOD_PLUGIN, other=GOOD_PLUGIN)
    cases = {"good": {"good"}, " good , other ": {"good", "other"}, ",, ,": set(), "typo": set(),
             "good,typo": {"good"}}
    for value, expected in cases.items():
        monkeypatch.setenv("TRANSFORMERS_FASTPATH_PLUGINS", value)
        infos, messages = _load_plugins()
        assert {n for n in infos if n in ("good", "other")} == expected, value
        if value == "typo":  # ("good,typo" names the same unknown plugin: not warned twice)
            assert any("no installed plugin has that name" in m and "typo" in m for m in messages), messages
        if value == ",, ,":
            assert any("names no plugin" in m for m in messages), messages


def test_plugins_that_exit_or_fail_to_register_are_reported_and_skipped(fake_plugins, tiny_model_factory) -> None:
    fake_plugins(
        exits="import sys\nsys.exit('plugin gives up')\n",
        badhook="import transformers_fastpath as fp\n\n@fp.hookimpl\ndef fastpath_resolve_plan(plan, not_an_argument):\n"
                "    pass\n",
        good=GOOD_PLUGIN,
    )
    infos, messages = _load_plugins()
    assert infos["exits"].error == "SystemExit: plugin gives up"
    assert "PluginValidationError" in infos["badhook"].error
    assert infos["good"].error is None
    assert sum("failed to load and is skipped" in m for m in messages) == 2
    plan = fp.resolve(tiny_model_factory("bert"), hardware=fp.Hardware())
    assert "good plugin ran" in plan.notes


def test_no_plugin_code_runs_at_interpreter_start(tmp_path: Path) -> None:
    """The .pth bootstrap never loads plugins: installing one does not run its code in every Python process."""
    marker = tmp_path / "PLUGIN_IMPORTED"
    dist = tmp_path / "marker_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: marker-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[transformers_fastpath]\nmarker = marker_fastpath_plugin\n")
    (tmp_path / "marker_fastpath_plugin.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    for env in ({}, {"TRANSFORMERS_FASTPATH": "1"}):
        result = run_python("import transformers_fastpath; print(1)", env={"PYTHONPATH": str(tmp_path), **env})
        assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
    assert not marker.exists()
    listed = run_python("from transformers_fastpath.plugins import list_plugins; print([p.name for p in list_plugins()])",
                        env={"PYTHONPATH": str(tmp_path)})
    assert "marker" in listed.stdout and marker.exists()  # loaded on first use, as designed
