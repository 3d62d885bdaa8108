"""Plugin system: hooks documented, built-ins registered like third parties, a real entry-point plugin."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_python

import transformers_fastpath as fp
from transformers_fastpath import hookspecs
from transformers_fastpath.plugins import BUILTIN_PLUGINS, get_plugin_manager, list_plugins


def _hookspec_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("fastpath_")]


def test_every_hook_is_documented_with_when_arguments_and_returns() -> None:
    doc = (REPO / "docs" / "hooks.md").read_text()
    sections = dict(re.findall(r"^## (fastpath_\w+)\n(.*?)(?=^## |\Z)", doc, flags=re.S | re.M))
    names = _hookspec_names()
    assert len(names) >= 8
    for name in names:
        assert name in sections, f"docs/hooks.md has no '## {name}' section"
        body = sections[name]
        for part in ("**When:**", "**Returns:**"):
            assert part in body, f"docs/hooks.md: {name} lacks {part}"
        for param in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f"`{param}`" in body, f"docs/hooks.md: {name} does not document argument {param!r}"
    assert not set(sections) - set(names), "docs/hooks.md documents hooks that do not exist"


def test_every_hookspec_has_a_docstring_and_the_prefix() -> None:
    pm = get_plugin_manager()
    for name in _hookspec_names():
        assert inspect.getdoc(getattr(hookspecs, name)), name
        assert hasattr(pm.hook, name)


def test_builtins_are_registered_as_ordinary_plugins() -> None:
    infos = {info.name: info for info in list_plugins()}
    for module in BUILTIN_PLUGINS:
        assert infos[module].kind == "builtin"
        assert infos[module].hooks, f"{module} implements no hook"


def test_runtime_registration_changes_a_plan(tiny_model_factory) -> None:
    from transformers_fastpath import Hardware, hookimpl, resolve
    from transformers_fastpath.plugins import register, unregister

    class ForceSmallBatches:
        @hookimpl
        def fastpath_resolve_plan(self, plan):
            plan.set("batch_size", 3, reason="test plugin", source="plugin force-small")

    path = tiny_model_factory("bert")
    before = resolve(path, task="feature-extraction", hardware=Hardware())
    name = register(ForceSmallBatches(), name="force-small")
    try:
        after = resolve(path, task="feature-extraction", hardware=Hardware())
    finally:
        unregister(name)
    assert before["batch_size"] == 32
    assert after["batch_size"] == 3
    assert after.settings["batch_size"].source == "plugin force-small"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install examples/fastpath-example-plugin for real into a target directory."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(REPO / "examples" / "fastpath-example-plugin")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert list(target.glob("fastpath_example_plugin-*.dist-info/entry_points.txt"))
    return target


PLAN_SCRIPT = """
import json, transformers_fastpath as fp
plan = fp.resolve({path!r}, task="feature-extraction", hardware=fp.Hardware())
print(json.dumps({{"batch_size": plan["batch_size"], "source": plan.settings["batch_size"].source,
                  "notes": list(plan.notes)}}))
"""


def test_entry_point_plugin_changes_the_plan(installed_example: Path, tiny_model_factory) -> None:
    import json

    code = PLAN_SCRIPT.format(path=str(tiny_model_factory("bert")))
    result = run_python(code, env={"PYTHONPATH": str(installed_example)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["batch_size"] == 8
    assert out["source"] == "plugin example rule #0 'example-small-bert-batches'"
    assert any("fastpath-example-plugin saw bert" in n for n in out["notes"])

    listed = run_python("from transformers_fastpath.cli import main; main(['plugins'])",
                        env={"PYTHONPATH": str(installed_example)})
    assert "example" in listed.stdout and "fastpath-example-plugin 0.1.0" in listed.stdout


def test_autoload_can_be_disabled_or_allow_listed(installed_example: Path, tiny_model_factory) -> None:
    import json

    code = PLAN_SCRIPT.format(path=str(tiny_model_factory("bert")))
    for env in ({"TRANSFORMERS_FASTPATH_DISABLE_PLUGIN_AUTOLOAD": "1"}, {"TRANSFORMERS_FASTPATH_PLUGINS": "other"}):
        result = run_python(code, env={"PYTHONPATH": str(installed_example), **env})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1])["batch_size"] == 32, env
    allowed = run_python(code, env={"PYTHONPATH": str(installed_example), "TRANSFORMERS_FASTPATH_PLUGINS": "example"})
    assert json.loads(allowed.stdout.strip().splitlines()[-1])["batch_size"] == 8


def test_plugin_that_raises_on_import_is_reported_and_skipped(tmp_path: Path, tiny_model_factory) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[transformers_fastpath]\nbroken = broken_fastpath_plugin\n")
    (tmp_path / "broken_fastpath_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    code = PLAN_SCRIPT.format(path=str(tiny_model_factory("bert")))
    result = run_python(code, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "broken" in result.stderr and "failed to load and is skipped" in result.stderr
    listed = run_python("from transformers_fastpath.cli import main; main(['plugins'])",
                        env={"PYTHONPATH": str(tmp_path)})
    assert "FAILED TO LOAD: ImportError: this plugin is broken on purpose" in listed.stdout


# -- a third-party plugin that raises at run time ----------------------------------------------

HOOKS_THAT_RAISE = ("fastpath_policy_defaults", "fastpath_policy_rules", "fastpath_resolve_plan",
                    "fastpath_load_kwargs", "fastpath_pipeline_kwargs", "fastpath_pipeline_created",
                    "fastpath_register_passes")


def _raising_plugin(hook: str) -> object:
    from transformers_fastpath import hookimpl

    def boom(**_: object) -> None:
        raise RuntimeError(f"boom in {hook}")

    params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    namespace: dict[str, object] = {}
    exec(f"def {hook}({', '.join(params)}):\n    boom()\n", {"boom": boom}, namespace)
    return type("Raising", (), {hook: staticmethod(hookimpl(namespace[hook]))})()


@pytest.mark.parametrize("hook", HOOKS_THAT_RAISE)
def test_a_plugin_raising_in_a_hook_is_reported_once_and_skipped(hook: str, tiny_model_factory) -> None:
    import warnings

    from transformers import AutoModel, pipeline

    from transformers_fastpath import plugins

    name = plugins.register(_raising_plugin(hook), name=f"raising-{hook}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = pipeline("feature-extraction", model=str(tiny_model_factory("bert")), fastpath=True)
            assert len(pipe(["one text", "another, longer text"])) == 2
            model = AutoModel.from_pretrained(tiny_model_factory("bert"), fastpath=True)
        assert fp.plan_of(pipe) is not None and fp.plan_of(model) is not None  # fastpath went on without it
        reports = [str(w.message) for w in caught if f"plugin {name!r} raised in {hook}" in str(w.message)]
        assert len(reports) == 1, [str(w.message) for w in caught]
        assert f"boom in {hook}" in reports[0] and "carries on without it" in reports[0]
    finally:
        plugins.unregister(name)


@pytest.mark.parametrize("hook", ["fastpath_resolve_plan", "fastpath_pipeline_created"])
def test_in_strict_mode_a_raising_plugin_is_a_plugin_error(hook: str, tiny_model_factory) -> None:
    from transformers import pipeline

    from transformers_fastpath import plugins
    from transformers_fastpath.errors import PluginError

    name = plugins.register(_raising_plugin(hook), name=f"strict-raising-{hook}")
    try:
        with pytest.raises(PluginError, match=f"plugin '{name}' raised in {hook}: RuntimeError: boom") as info:
            pipeline("feature-extraction", model=str(tiny_model_factory("bert")), fastpath={"defaults": {"strict": True}})
        assert (info.value.plugin, info.value.hook) == (name, hook)
    finally:
        plugins.unregister(name)
