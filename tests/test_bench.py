"""The benchmark suite (``transformers-fastpath bench``): a smoke run of every workload, the runner, reports.

Smoke tests, not timing gates: no speed-up is asserted anywhere. ``bench all --quick`` runs once
per session (tiny sizes, one round); the other tests read its reports or use a synthetic
workload whose times are injected, so they are exact and fast.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from transformers_fastpath import bench
from transformers_fastpath.bench import checks
from transformers_fastpath.bench.runner import Bench, Sample, Variant
from transformers_fastpath.bench.workloads import Workload
from transformers_fastpath.cli import main

ALL = list(bench.WORKLOADS)
QuickRun = tuple[int, Path, dict[str, dict[str, Any]]]
NEEDS_CUDA = {"quantized-generate", "multi-gpu-pipeline"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> QuickRun:
    """``bench all --quick --out-dir DIR`` once: (exit code, DIR, workload -> report)."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "all", "--quick", "--no-progress", "--out-dir", str(out)])
    reports = {}
    for path in sorted(out.glob("bench_*.json")):
        report = json.loads(path.read_text())
        reports[report["workload"]] = report
    return code, out, reports


def test_list_names_every_workload_and_why_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name, workload in bench.WORKLOADS.items():
        assert name in out and workload.description[:40] in out
    assert set(ALL) >= {"feature-extraction", "encoder-latency", "encoder-padded", "pipeline-text-classification",
                        "generate", "quantized-generate", "trainer-step", "multi-gpu-pipeline"}
    import torch

    if not torch.cuda.is_available():
        assert "why not: needs a CUDA GPU and bitsandbytes" in out
        assert "why not: needs >= 2 CUDA GPUs" in out


def test_bench_all_quick_runs_or_skips_every_workload(quick_run: QuickRun) -> None:
    """CI smoke run: every workload either ran its variants (check passed) or says why it was skipped."""
    code, out, reports = quick_run
    assert set(reports) == set(ALL), sorted(reports)
    for name, report in reports.items():
        assert "error" not in report, f"{name}: {report.get('error')}"
        for key in ("workload", "description", "date", "device", "versions", "definitions", "cases"):
            assert key in report, f"{name} lacks {key}"
        assert report["device"]["kind"] in ("cpu", "cuda") and report["device"]["name"]
        for lib in ("torch", "transformers", "transformers-fastpath", "python"):
            assert report["versions"][lib], f"{name}: no {lib} version"
        assert (out / bench.report_filename(report)).is_file()
        if report.get("skipped"):
            assert isinstance(report["skipped"], str) and len(report["skipped"]) > 10
            assert report["cases"] == []
            continue
        assert report["cases"], name
        for case in report["cases"]:
            rows = case["variants"]
            assert {"default", "expert", "fastpath"} <= set(rows), f"{name}: {sorted(rows)}"
            for variant, row in rows.items():
                assert row["median_s"] > 0 and len(row["times_s"]) == report["repeats"] == 1
                for key in ("speedup_vs_default", "speedup_vs_expert", "peak_memory_mib", "warmup_s"):
                    assert key in row, f"{name}/{variant} lacks {key}"
                assert row["speedup_vs_default"] > 0 and row["speedup_vs_expert"] > 0
            assert rows["default"]["speedup_vs_default"] == pytest.approx(1.0)
            assert rows["expert"]["speedup_vs_expert"] == pytest.approx(1.0)
            check = case["check"]
            assert check["reference"] == "default"
            assert set(check["variants"]) == set(rows) - {"default"}
            assert check["passed"] is True, f"{name}: {json.dumps(check, indent=1)[:2000]}"
        for variant in ("default", "expert", "compile", "fastpath"):
            assert variant in report["definitions"] or variant in report["omitted"], f"{name}: {variant}?"
        assert all(reason for reason in report["omitted"].values())
    import torch

    if not torch.cuda.is_available():
        for name in NEEDS_CUDA:
            assert "CUDA" in reports[name]["skipped"]
    assert code == 0


def test_quick_reports_carry_the_workload_specific_numbers(quick_run: QuickRun) -> None:
    _, out, reports = quick_run
    generate = reports["generate"]
    assert [(c["params"]["mode"], c["params"]["batch"]) for c in generate["cases"]] == [
        ("greedy", 1), ("greedy", 2), ("sampling", 1), ("sampling", 2)]
    for case in generate["cases"]:
        assert case["throughput_unit"] == "tokens/s"
        assert case["check"]["passed"] is True
        for row in case["variants"].values():
            assert row["metrics"]["ttft_ms"] > 0 and "decode_ms_per_token" in row["metrics"]
            assert row["one_time_s"] is not None and row["throughput"] > 0
    trainer = reports["trainer-step"]
    assert "expert+fastpath" in trainer["cases"][0]["variants"]
    assert "FastpathCallback" in trainer["definitions"]["fastpath"]
    for name in ("feature-extraction", "pipeline-text-classification"):
        assert "recompile" in reports[name]["omitted"]["compile"]
        assert reports[name]["config"]["fastpath_plan"]["applied"]
        assert reports[name]["config"]["fastpath_plan"]["settings"]["batched_processing"] is True
        for row in reports[name]["cases"][0]["variants"].values():  # time in the forward and around it
            metrics = row["metrics"]
            assert metrics["forward_s"] > 0 and metrics["around_s"] >= 0 and 0 < metrics["forward_share"] <= 1
            assert metrics["forward_s"] + metrics["around_s"] == pytest.approx(
                metrics["forward_s"] / metrics["forward_share"], rel=1e-6)
    if importlib.util.find_spec("matplotlib") is not None:
        for report in reports.values():
            png = out / bench.report_filename(report).replace(".json", ".png")
            assert png.is_file() == (not report.get("skipped")), png
            if png.is_file():
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- a synthetic workload: injected times, exact ratios ----------------------------------------------

TIMES = {"default": 2.0, "expert": 1.0, "compile": 0.8, "fastpath": 0.5}


def _synthetic(bench_: Bench, *, outputs: dict[str, Any] | None = None, calls: list[str] | None = None,
               broken: str | None = None) -> None:
    import torch

    outputs = outputs or {}
    for name in TIMES:
        bench_.define(name, f"the {name} variant")

    def variant(name: str) -> Variant:
        def run() -> Sample:
            if calls is not None:
                calls.append(name)
            if name == broken:
                raise RuntimeError("this variant breaks")
            return Sample(outputs.get(name, torch.ones(2, 3, 4)), seconds=TIMES[name], metrics={"ttft_ms": 1.0})

        return Variant(run)

    mask = torch.ones(2, 3, dtype=torch.bool)
    bench_.measure("case", {name: variant(name) for name in TIMES},
                   check=lambda v, ref, out: checks.compare_hidden(ref, out, mask, half=False),
                   work=10, work_unit="tokens")


def test_runner_interleaves_and_computes_medians_and_ratios() -> None:
    calls: list[str] = []
    runner = Bench("synthetic", "injected times", repeats=3, progress=False)
    _synthetic(runner, calls=calls)
    report = runner.report()
    rows = report["cases"][0]["variants"]
    assert rows["fastpath"]["median_s"] == 0.5
    assert rows["fastpath"]["speedup_vs_default"] == pytest.approx(4.0)
    assert rows["fastpath"]["speedup_vs_expert"] == pytest.approx(2.0)
    assert rows["compile"]["speedup_vs_expert"] == pytest.approx(1.25)
    assert rows["default"]["throughput"] == pytest.approx(5.0)
    assert rows["expert"]["metrics"] == {"ttft_ms": 1.0}
    # warm-up in order, then round-robin rounds, each starting one variant later
    order = list(TIMES)
    assert calls[:4] == order
    assert calls[4:8] == order and calls[8:12] == order[1:] + order[:1] and calls[12:16] == order[2:] + order[:2]
    assert report["cases"][0]["check"]["passed"] is True


def test_the_check_fails_on_mismatching_outputs() -> None:
    import torch

    runner = Bench("synthetic", "injected times", repeats=1, progress=False)
    _synthetic(runner, outputs={"fastpath": torch.ones(2, 3, 4) * 1.01})
    report = runner.report()
    check = report["cases"][0]["check"]
    assert check["passed"] is False
    assert check["variants"]["fastpath"]["passed"] is False and check["variants"]["expert"]["passed"] is True
    assert bench.status(report) == "check failed"
    assert "FAIL" in bench.render(report)


def test_each_check_can_fail() -> None:
    import torch

    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    hidden = torch.randn(1, 3, 8)
    assert checks.compare_hidden(hidden, hidden + 1e-6, mask, half=False)["passed"] is True
    assert checks.compare_hidden(hidden, hidden + 1e-2, mask, half=False)["passed"] is False
    garbage = hidden.clone()
    garbage[0, 1] = torch.randn(8)
    assert checks.compare_hidden(hidden, garbage, mask, half=True)["passed"] is False
    noisy_pad = hidden.clone()
    noisy_pad[0, 2] += 5.0  # padding positions are not compared
    assert checks.compare_hidden(hidden, noisy_pad, mask, half=False)["passed"] is True

    emb = [[[[0.1, 0.2], [0.3, 0.4]]]]
    assert checks.compare_embeddings(emb, emb, [2], half=False)["passed"] is True
    assert checks.compare_embeddings(emb, [[[[0.1, 0.2], [0.3, 0.5]]]], [2], half=False)["passed"] is False

    ref = [[{"label": "LABEL_0", "score": 0.7}, {"label": "LABEL_1", "score": 0.3}]]
    swapped = [[{"label": "LABEL_1", "score": 0.7}, {"label": "LABEL_0", "score": 0.3}]]
    assert checks.compare_probabilities(ref, ref, half=False)["passed"] is True
    result = checks.compare_probabilities(ref, swapped, half=True)
    assert result["passed"] is False and result["label_agreement"] == 0.0

    prompt = torch.tensor([[5, 6]])
    logits = -torch.arange(10.0).repeat(1, 3, 1)  # distinct logits: a clear order below the best token
    logits[0, :, 1] = 3.0  # token 1 clearly best at every step ...
    logits[0, 2, 2] = 3.0 - 1e-4  # ... except a near-tie with token 2 at step 2
    reference = torch.cat([prompt, torch.tensor([[1, 1, 1]])], dim=1)
    near_tie = torch.cat([prompt, torch.tensor([[1, 1, 2]])], dim=1)
    wrong = torch.cat([prompt, torch.tensor([[1, 7, 1]])], dim=1)
    assert checks.compare_greedy(reference, logits, reference, 2, half=False)["passed"] is True
    assert checks.compare_greedy(reference, logits, near_tie, 2, half=False)["passed"] is True
    assert checks.compare_greedy(reference, logits, wrong, 2, half=True)["passed"] is False
    assert checks.first_token_in_top_k(logits, reference, 2, k=1)["passed"] is True
    assert checks.first_token_in_top_k(logits, torch.cat([prompt, torch.tensor([[9, 1, 1]])], 1), 2,
                                       k=5)["passed"] is False

    assert checks.compare_losses({"train_loss": 0.69}, {"train_loss": 0.69}, half=False)["passed"] is True
    assert checks.compare_losses({"train_loss": 0.69}, {"train_loss": 0.70}, half=False)["passed"] is False
    assert checks.compare_losses({"train_loss": 0.69}, {"train_loss": float("nan")}, half=True)["passed"] is False


def test_a_failing_variant_is_recorded_and_the_others_go_on() -> None:
    runner = Bench("synthetic", "injected times", repeats=2, progress=False)
    _synthetic(runner, broken="compile")
    report = runner.report()
    assert "this variant breaks" in report["failed"]["compile"]
    assert set(report["cases"][0]["variants"]) == {"default", "expert", "fastpath"}


def _register(monkeypatch: pytest.MonkeyPatch, name: str, run: Any) -> None:
    monkeypatch.setitem(bench.WORKLOADS, name, Workload(name, f"{name} (test)", run))


def test_a_crashing_workload_does_not_end_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def boom(bench_: Bench) -> None:
        raise ValueError("the workload itself crashed")

    _register(monkeypatch, "boom", boom)
    _register(monkeypatch, "synthetic", _synthetic)
    code = main(["bench", "boom", "synthetic", "--no-progress", "--out-dir", str(tmp_path), "--no-chart"])
    assert code == 1
    crashed = json.loads(next(tmp_path.glob("bench_boom_*.json")).read_text())
    assert "the workload itself crashed" in crashed["error"]
    ok = json.loads(next(tmp_path.glob("bench_synthetic_*.json")).read_text())
    assert ok["cases"][0]["check"]["passed"] is True
    assert "summary: boom: error" in capsys.readouterr().out


def test_json_round_trip_markdown_and_chart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _register(monkeypatch, "synthetic", _synthetic)
    out = tmp_path / "r.json"
    assert main(["bench", "synthetic", "--no-progress", "--repeats", "2", "--out", str(out), "--markdown"]) == 0
    printed = capsys.readouterr().out
    report = bench.load(out)
    assert json.loads(json.dumps(report)) == report
    bench.save(report, tmp_path / "again.json")
    assert bench.load(tmp_path / "again.json") == report
    assert bench.report_filename(report) == f"bench_synthetic_{bench.device_slug(report)}.json"
    markdown = bench.to_markdown(report)
    assert markdown in printed
    assert "| variant | median | throughput | vs default | vs expert | peak memory |" in markdown
    assert "| fastpath | 500.00 ms | 20.0 tokens/s | 4.00x | 2.00x |" in markdown
    assert report["versions"]["torch"] in markdown and report["date"][:10] in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        assert bench.draw_headline([report], tmp_path / "headline.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_chart_is_skipped_and_said(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _register(monkeypatch, "synthetic", _synthetic)
    monkeypatch.setattr(bench, "chart_available", lambda: False)
    assert main(["bench", "synthetic", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    assert "chart skipped: matplotlib is not installed" in capsys.readouterr().out
    assert list(tmp_path.glob("*.png")) == [] and len(list(tmp_path.glob("*.json"))) == 1


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "no-such-workload"])
    assert exc.value.code == 2 and "unknown workload" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "generate", "--set", "novalue"])
    assert exc.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err


# -- docs --------------------------------------------------------------------------------------------

def _render_docs() -> Any:
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_docs_regenerates_the_page_deterministically(quick_run: QuickRun,
                                                            tmp_path: Path) -> None:
    _, results, all_reports = quick_run
    render_docs = _render_docs()
    local = tmp_path / "results"
    local.mkdir()
    reports = {name: all_reports[name] for name in ("generate", "trainer-step", "multi-gpu-pipeline")}
    for report in reports.values():  # a subset keeps the test short: two cases, one case, one skipped
        shutil.copy(results / bench.report_filename(report), local)
    outputs = []
    for attempt in ("a", "b"):
        page, charts = tmp_path / attempt / "benchmarks.md", tmp_path / attempt / "charts"
        assert render_docs.main(["--results", str(local), "--out", str(page), "--charts", str(charts)]) == 0
        outputs.append({p.relative_to(tmp_path / attempt).as_posix(): p.read_bytes()
                        for p in sorted((tmp_path / attempt).rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]
    text = outputs[0]["benchmarks.md"].decode()
    assert render_docs.MARKER not in text
    template = (REPO / "benchmarks" / "benchmarks.md.in").read_text()
    narrative = template.split(render_docs.MARKER)[1]
    assert narrative.strip() in text  # the hand-written sections are kept as written
    assert "Fused padding-free encoder" in text and "Earlier measurements" in text
    for report in reports.values():
        assert f"### {report['workload']} on" in text
        assert report["versions"]["transformers"] in text and report["date"][:10] in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert "charts/headline.png" in outputs[0] and "](charts/headline.png)" in text
        ran = [r for r in reports.values() if not r.get("skipped")]
        assert len([k for k in outputs[0] if k.startswith("charts/bench_")]) == len(ran)
    page = tmp_path / "a" / "benchmarks.md"
    check = ["--results", str(local), "--out", str(page), "--charts", str(tmp_path / "a" / "charts"), "--check"]
    assert render_docs.main(check) == 0
    page.write_text(page.read_text() + "\nedited by hand\n")
    assert render_docs.main(check) == 1


def test_render_docs_without_results_says_how_to_make_them(tmp_path: Path) -> None:
    render_docs = _render_docs()
    page = tmp_path / "benchmarks.md"
    assert render_docs.main(["--results", str(tmp_path / "none"), "--out", str(page),
                             "--charts", str(tmp_path / "charts")]) == 0
    assert "transformers-fastpath bench all --out-dir" in page.read_text()
