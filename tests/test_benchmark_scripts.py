"""Smoke runs of the standalone benchmark scripts that the next GPU or CPU measurement depends on.

Not timing gates: no speed-up is asserted. Each script runs at its smallest size and must write
a report whose figures are consistent with each other, so a script broken by an API change is
caught here rather than in a GPU session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_decode_step_ab_runs_its_variants_and_reports_both_limits(tmp_path: Path) -> None:
    report = _run("decode_step_ab.py", "--tiny", "--rounds", "1", "--variants", "today,freezing", tmp_path=tmp_path)
    assert list(report["variants"]) == ["today", "freezing"]
    for row in report["variants"].values():
        assert "error" not in row, row.get("error")
        assert len(row["decode_ms"]) == 1 and row["median_decode_ms"] > 0
        assert row["tokens_equal_first_variant"] is True  # the same greedy tokens under every setting
        # the step reads all weights but the input embedding's table: the second share is the smaller one
        assert 0 < row["share_of_bytes_read"] < row["share_of_weight_streaming"]
    assert 0 < report["bytes_read_per_decode_step"] < report["weights_bytes"]


def test_cpu_main_job_ceiling_reports_rates_and_a_bound(tmp_path: Path, minilm: Path) -> None:
    report = _run("cpu_main_job_ceiling.py", "--texts", "32", "--repeats", "1", tmp_path=tmp_path)
    assert report["texts"] == 32 and report["batch_rows"] == [report["tokens"]]  # one batch of 32
    assert 0 < report["linear_share_of_profiled_time"] < 1
    rates = report["gflop_per_s"]
    assert set(rates) == {"in the pipeline (profiled)", "alone, module weights", "alone, pre-packed weights",
                          "2048x2048x2048 mm"}
    assert all(rate > 0 for rate in rates.values())
    # the bound assumes only the linear layers get faster, and never slower than they are
    assert 1 <= report["most_the_job_could_gain"] < 1 / (1 - report["linear_share_of_profiled_time"])

