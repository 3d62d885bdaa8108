"""The supported transformers range: declared once, checked before patching, APIs picked by version.

CI runs this file on the lowest supported transformers and on the latest (.ci/run).
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from pathlib import Path

import pytest
import transformers
from conftest import REPO

import transformers_fastpath as fp
from transformers_fastpath.errors import FastpathError
from transformers_fastpath.interception import bootstrap, compat, guard, patches
from transformers_fastpath.loading.placement import tensor_parallel_kwargs


@pytest.fixture(autouse=True)
def _leave_transformers_as_found(clean_fastpath: None) -> None:
    """Every test here restores the patches and installed policy it found (conftest's clean_fastpath)."""


def _live() -> object:  # import transformers.pipelines first: it is what re-executes the __init__
    """The ``transformers`` module object the package sees now (transformers re-executes its lazy
    ``__init__`` on some imports, so the name imported at the top of a test file can be an older one)."""
    return sys.modules["transformers"]


def _text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def test_parse_version() -> None:
    assert compat.parse_version("5.18.0") == (5, 18, 0)
    assert compat.parse_version("5.24.0.dev0") == (5, 24, 0)
    assert compat.parse_version("5.3") == (5, 3, 0)
    assert compat.parse_version("6") == (6, 0, 0)
    assert compat.parse_version("not-a-version") is None


def test_supported_range_is_the_one_pyproject_declares() -> None:
    """compat.MIN/MAX_TRANSFORMERS and the dependency pip enforces must say the same thing."""
    text = (REPO / "pyproject.toml").read_text()
    spec = re.search(r'"transformers\s*(>=[^"]*)"', text).group(1)
    low = re.search(r">=\s*([\d.]+)", spec).group(1)
    high = re.search(r"<\s*([\d.]+)", spec).group(1)
    assert compat.parse_version(low) == compat.MIN_TRANSFORMERS, (
        f"pyproject.toml says transformers{spec}; interception/compat.py says >={_text(compat.MIN_TRANSFORMERS)}")
    assert compat.parse_version(high) == compat.MAX_TRANSFORMERS


def test_the_installed_transformers_is_supported() -> None:
    assert compat.unsupported_transformers() is None, transformers.__version__


@pytest.mark.parametrize("version, supported", [
    (_text(compat.MIN_TRANSFORMERS), True), ("5.24.0", True), ("5.99.1.dev0", True),
    ("5.0.0", False), ("4.57.6", False), ("6.0.0", False), ("6.1.0rc1", False),
])
def test_unsupported_transformers_wording(version: str, supported: bool) -> None:
    problem = compat.unsupported_transformers(version)
    assert (problem is None) is supported
    if not supported:
        assert version in problem and "pip install 'transformers>=" in problem


@pytest.mark.parametrize("version", ["5.0.0", "6.0.0"])
def test_install_on_an_unsupported_transformers_raises_and_patches_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                          version: str) -> None:
    fp.uninstall()
    patches.import_targets()  # first, as it can replace sys.modules["transformers"]
    monkeypatch.setattr(_live(), "__version__", version)
    for turn_on in (fp.install, lambda: fp.enabled().__enter__(), lambda: fp.pipeline("text-classification")):
        with pytest.raises(FastpathError, match=re.escape(f"transformers {version}")):
            turn_on()
        assert not patches.is_patched() and not fp.is_installed()


def test_bootstrap_on_an_unsupported_transformers_warns_once_and_stays_unpatched(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_factory) -> None:
    fp.uninstall()
    patches.import_targets()
    monkeypatch.setattr(_live(), "__version__", "5.0.0")
    monkeypatch.setenv("TRANSFORMERS_FASTPATH", "1")
    monkeypatch.delenv("TRANSFORMERS_FASTPATH_POLICY", raising=False)
    monkeypatch.chdir(tmp_path)
    for name, value in (("_booted", False), ("_mode", "passive"), ("_disabled_reason", None), ("_warned", set()),
                        ("_user_decided", False)):
        monkeypatch.setattr(bootstrap, name, value)
    meta_path = list(sys.meta_path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bootstrap.boot()  # both modules are imported: both post-import callbacks run now
    finally:
        sys.meta_path[:] = meta_path
    messages = [str(w.message) for w in caught if "transformers-fastpath" in str(w.message)]
    assert len(messages) == 1 and "transformers 5.0.0 is older than" in messages[0], messages
    assert not patches.is_patched() and not fp.is_installed()
    # fastpath is off for the process: a fastpath= argument is dropped with the reason, not a TypeError
    assert guard.is_active()
    monkeypatch.setattr(guard, "_warned", False)
    with pytest.warns(UserWarning, match=r"fastpath=True ignored in from_pretrained\(\).*transformers 5\.0\.0 is "
                                         r"older than.*Install a transformers release in the range"):
        model = transformers.AutoModel.from_pretrained(tiny_model_factory("bert"), fastpath=True)
    assert fp.plan_of(model) is None


# -- APIs that differ between releases ----------------------------------------------------------------

def test_tensor_parallel_kwargs_are_what_the_installed_transformers_reads() -> None:
    """The key tensor_parallel_kwargs picks (distributed_config from 5.18, tp_plan before) is one this
    transformers' from_pretrained actually consumes."""
    (key,) = tensor_parallel_kwargs(2)
    source = inspect.getsource(transformers.PreTrainedModel.from_pretrained)
    assert re.search(rf"""\b{key}\b""", source), f"{transformers.__version__}: from_pretrained does not read {key}"
    if key == "distributed_config":
        assert tensor_parallel_kwargs(2)[key].tp_plan == "auto"


@pytest.mark.parametrize("version, fields, expected", [
    ("5.17.0", None, {"tp_plan": "auto"}),  # no DistributedConfig at all
    ("5.17.0", ("fsdp_size",), {"tp_plan": "auto"}),  # a DistributedConfig without tp_plan
    ("5.18.0", ("tp_size", "tp_plan"), "distributed_config"),
    ("5.24.0", ("tp_size", "tp_plan", "ep_plan"), "distributed_config"),
])
def test_tensor_parallel_selection_per_release(monkeypatch: pytest.MonkeyPatch, version: str,
                                               fields: tuple[str, ...] | None, expected: object) -> None:
    """A release simulated by its version and its DistributedConfig fields."""
    monkeypatch.setattr(_live(), "__version__", version)
    if fields is None:
        monkeypatch.setattr(_live(), "DistributedConfig", None, raising=False)
    else:
        namespace: dict[str, object] = {}
        exec(f"def __init__(self, {', '.join(f + '=None' for f in fields)}):\n"  # noqa: S102 - test-only
             f"    self.__dict__.update({{{', '.join(repr(f) + ': ' + f for f in fields)}}})", namespace)
        monkeypatch.setattr(_live(), "DistributedConfig", type("DistributedConfig", (), namespace), raising=False)
    chosen = tensor_parallel_kwargs(2)
    if expected == "distributed_config":
        assert set(chosen) == {"distributed_config"}
        assert chosen["distributed_config"].tp_plan == "auto" and chosen["distributed_config"].tp_size == 2
    else:
        assert chosen == expected


def test_warnings_as_errors_never_break_importing_transformers(tmp_path: Path) -> None:
    """Under -W error the start-up hook's warning would be an exception inside transformers' import:
    it is printed instead."""
    from conftest import run_python

    code = ("import transformers; transformers.__version__ = '5.12.1'\n"
            "from transformers import pipeline\n"
            "print('imported', pipeline.__name__)")
    proc = run_python(code, env={"PYTHONWARNINGS": "error::RuntimeWarning"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported pipeline" in proc.stdout
    assert "is older than" in proc.stderr
