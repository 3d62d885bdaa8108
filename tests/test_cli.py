"""The console script: explain, doctor, plugins, bench."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transformers_fastpath.cli import main


def test_explain_prints_a_table_for_another_machine(tiny_model_factory, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_model_factory("bert", "seq-cls")
    assert main(["explain", str(path), "--task", "text-classification", "--hardware", "2xh100"]) == 0
    out = capsys.readouterr().out
    assert "2x NVIDIA H100 80GB" in out
    assert "bfloat16" in out and "built-in default" in out
    assert "batch_size" in out and "64" in out


def test_explain_json(tiny_model_factory, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(tiny_model_factory("bert")), "--json", "--hardware", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["dtype"]["value"] == "float32"
    assert data["model"]["model_type"] == "bert"
    assert isinstance(data["passes"], list)


def test_explain_never_loads_weights(tiny_model_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(tiny_model_factory("llama", "causal") / "config.json", tmp_path / "config.json")
    assert main(["explain", str(tmp_path), "--task", "text-generation", "--hardware", "cpu"]) == 0
    assert "llama" in capsys.readouterr().out


def test_explain_reports_bad_input_clearly(tiny_model_factory, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text('[[rules]]\nname = "x"\nmatch = {}\nbatch_size = 0\n')
    assert main(["explain", str(tiny_model_factory("bert")), "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rule #0 ('x')" in err and "batch_size" in err
    assert main(["explain", str(tmp_path / "missing-model")]) == 2
    assert f"no such directory: {tmp_path / 'missing-model'}" in capsys.readouterr().err
    assert main(["explain", str(tiny_model_factory("bert")), "--hardware", "abacus"]) == 2
    assert "unknown hardware profile" in capsys.readouterr().err


def test_bad_cli_arguments_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "transformers_fastpath.cli", "explode"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sdpa_backends"]["math"] == "ok"  # the math backend runs everywhere
    assert "bitsandbytes" in report["packages"]
    assert report["fused_encoder_op"] is True
    assert main(["doctor"]) == 0
    assert "SDPA backends on" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    exe = shutil.which("transformers-fastpath", path=str(Path(sys.executable).parent))
    assert exe, "the transformers-fastpath console script is not installed next to this python"
    result = subprocess.run([exe, "plugins"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "transformers_fastpath.builtin.defaults" in result.stdout
    assert "passes:" in result.stdout


def test_bench_quick_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], minilm: Path) -> None:
    """A smoke run, not a timing gate: the variants run and their embeddings agree."""
    out = tmp_path / "bench.json"
    assert main(["bench", "feature-extraction", "--quick", "--json", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert {"default", "expert", "fastpath"} <= set(case["variants"])
    assert case["check"]["passed"] is True and case["variants"]["fastpath"]["speedup_vs_default"] > 0
    assert main(["bench", "--list"]) == 0
    assert "feature-extraction" in capsys.readouterr().out


def test_explain_refuses_a_task_typo_naming_the_close_match(tiny_model_factory,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tiny_model_factory("bert"))
    capsys.readouterr()  # building the tiny model writes progress bars
    assert main(["explain", path, "--task", "feature-extractoin", "--hardware", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--task 'feature-extractoin' is not a pipeline task of transformers" in err
    assert "did you mean 'feature-extraction'?" in err and "transformers.pipelines.SUPPORTED_TASKS" in err
    assert "TASK_ALIASES" in err and "\n" not in err.strip()
    assert main(["explain", path, "--task", "summarization", "--hardware", "cpu"]) == 2  # removed in transformers 5
    assert "was removed from transformers" in capsys.readouterr().err
    assert main(["explain", path, "--task", "sentiment-analysis", "--hardware", "cpu"]) == 0  # an alias


def test_explain_reports_a_missing_local_directory_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("./nope", "../nope", str(tmp_path / "nope"), "~/surely-no-such-dir-here"):
        assert main(["explain", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"transformers-fastpath explain: no such directory: {name} "), err
        assert "config.json" in err and "Repo id" not in err


def test_doctor_explains_the_bootstrap_state() -> None:
    from transformers_fastpath.doctor import bootstrap_meaning

    passive = bootstrap_meaning({"booted": True, "mode": "passive", "disabled_reason": None})
    assert passive.startswith("passive: transformers accepts fastpath= per call")
    assert "TRANSFORMERS_FASTPATH=1" in passive
    assert bootstrap_meaning({"booted": True, "mode": "install", "disabled_reason": None}).startswith(
        "on for the whole process")
    off = bootstrap_meaning({"booted": True, "mode": "passive", "disabled_reason": "TRANSFORMERS_FASTPATH=0"})
    assert off.startswith("off (TRANSFORMERS_FASTPATH=0): ") and "warning" in off
    assert "not loaded" in bootstrap_meaning({"booted": False, "mode": "passive", "disabled_reason": None})


def test_doctor_never_cuts_a_message_mid_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers_fastpath.doctor import first_sentences

    torch_message = ("No viable backend for scaled_dot_product_attention was found. This is likely due to turning "
                     "off both the math kernel and the fused kernels.")
    assert first_sentences(torch_message + "\nmore detail") == torch_message  # whole, first line only
    long = "First sentence here. " * 20
    cut = first_sentences(long, limit=100)
    assert cut.endswith("here. ...") and len(cut) <= 104
    assert first_sentences("word " * 100, limit=50).endswith("word ...")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "start-up bootstrap: passive: transformers accepts fastpath= per call" in out
    for line in out.splitlines():
        if line.strip().startswith(("efficient", "cudnn", "flash")) and "no: " in line:
            assert line.rstrip().endswith((".", "...", ")")), line
