"""Regenerate docs/benchmarks.md and docs/charts/*.png from the suite's results.

Reads every ``bench_*.json`` (written by ``transformers-fastpath bench ... --out-dir``) under
``--results`` (default ``benchmarks/results/``), draws one chart per result
(``docs/charts/bench_<workload>_<device>.png``) and ``docs/charts/headline.png`` (fastpath's
speed-up vs default and vs expert per workload, shown by the README), and writes the page from
the template ``benchmarks/benchmarks.md.in``: its ``<!-- bench-suite-results -->`` marker is
replaced by a summary table, the headline chart and one section per result (device, versions
and date included). The rest of the template (the narrative, the earlier measurements) is kept
as written.

The output depends only on the JSON files and the template: the same inputs give the same
bytes (charts carry no version stamp), so ``--check`` can tell in CI whether the page is stale.

    python benchmarks/render_docs.py            # rewrite docs/benchmarks.md and docs/charts/
    python benchmarks/render_docs.py --check    # exit 1 if they would change
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- bench-suite-results -->"
HEADLINE = "headline.png"


def load_results(results: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The suite's reports under ``results``, in the suite's workload order, then by device and file name."""
    from transformers_fastpath.bench.workloads import WORKLOADS

    order = {name: i for i, name in enumerate(WORKLOADS)}
    found = []
    for path in sorted(results.glob("bench_*.json")):
        data = json.loads(path.read_text())
        for report in data if isinstance(data, list) else [data]:
            if isinstance(report, dict) and "workload" in report:
                found.append((path, report))
    found.sort(key=lambda item: (order.get(item[1]["workload"], len(order)), item[0].name))
    return found


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_table(reports: list[dict[str, Any]]) -> list[str]:
    """One row per result and case: fastpath vs default, vs expert, the check, the date."""
    from transformers_fastpath.bench.report import device_label, status

    lines = ["| workload | case | device | fastpath vs default | fastpath vs expert | check | date |",
             "|---|---|---|---|---|---|---|"]
    for report in reports:
        device = device_label(report)
        date = str(report.get("date", "?"))[:10]
        if report.get("skipped") or not report.get("cases"):
            lines.append(f"| {report['workload']} | - | {device} | - | - | {status(report)} | {date} |")
            continue
        for case in report["cases"]:
            fast = case["variants"].get("fastpath") or {}
            check = (case.get("check") or {}).get("passed")
            verdict = "pass" if check else "n/a" if check is None else "FAIL"
            if report.get("failed"):  # a variant that did not run has no check to pass
                verdict = "FAIL: " + ", ".join(sorted(report["failed"])) + " did not run"
            lines.append(f"| {report['workload']} | {case['case']} | {device} | {_fmt(fast.get('speedup_vs_default'))} "
                         f"| {_fmt(fast.get('speedup_vs_expert'))} | {verdict} | {date} |")
    return lines


def generated_section(results: list[tuple[Path, dict[str, Any]]], charts: Path, chart_link: str,
                      results_label: str) -> tuple[str, list[Path]]:
    """The markdown that replaces the marker, and the chart files it drew."""
    from transformers_fastpath.bench.report import chart_available, draw_chart, draw_headline, to_markdown

    if not results:
        return (f"No suite results under `{results_label}` yet: run `transformers-fastpath bench all --out-dir "
                f"{results_label}`, then `python benchmarks/render_docs.py`.\n", [])
    reports = [report for _, report in results]
    drawn: list[Path] = []
    can_draw = chart_available()
    rel = chart_link
    lines = [f"Results of the suite, from `{results_label}` (one file per workload and device):", ""]
    lines += summary_table(reports) + [""]
    if can_draw and draw_headline(reports, charts / HEADLINE) is not None:
        drawn.append(charts / HEADLINE)
        lines += [f"![fastpath speed-up vs default and vs expert]({rel}/{HEADLINE})", ""]
    elif not can_draw:
        lines += ["(Charts not drawn: matplotlib is not installed; `pip install 'transformers-fastpath[plot]'`.)", ""]
    for path, report in results:
        chart = None
        if can_draw:
            target = charts / (path.stem + ".png")
            if draw_chart(report, target) is not None:
                drawn.append(target)
                chart = f"{rel}/{target.name}"
        lines.append(to_markdown(report, heading="###", chart=chart).rstrip() + "\n")
        lines.append(f"Result file: `{results_label}{path.name}`.\n")
    return "\n".join(lines), drawn


def render(template: Path, results_dir: Path, out: Path, charts: Path, results_label: str,
           chart_link: str | None = None) -> list[Path]:
    """Write the page and charts; returns every file written. Stale ``bench_*.png`` charts are removed.

    ``chart_link``: how the page refers to the charts directory (default: its path relative to the page).
    """
    text = template.read_text()
    if MARKER not in text:
        sys.exit(f"render_docs: {template} has no {MARKER} marker where the results go")
    charts.mkdir(parents=True, exist_ok=True)
    link = chart_link or Path(os.path.relpath(charts, out.parent)).as_posix()
    section, drawn = generated_section(load_results(results_dir), charts, link, results_label)
    keep = {p.name for p in drawn}
    for stale in [*charts.glob("bench_*.png"), charts / HEADLINE]:
        if stale.exists() and stale.name not in keep:
            stale.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.replace(MARKER, section.rstrip()))
    return [out, *drawn]


def _snapshot(paths: list[Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                        help="directory of bench_*.json files (default benchmarks/results)")
    parser.add_argument("--template", type=Path, default=REPO / "benchmarks" / "benchmarks.md.in")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--charts", type=Path, default=REPO / "docs" / "charts")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page or charts are stale")
    args = parser.parse_args(argv)
    try:
        label = args.results.resolve().relative_to(REPO).as_posix() + "/"
    except ValueError:
        label = args.results.as_posix().rstrip("/") + "/"
    if not args.check:
        for path in render(args.template, args.results, args.out, args.charts, label):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "docs" / args.out.name
        link = Path(os.path.relpath(args.charts, args.out.parent)).as_posix()
        fresh = render(args.template, args.results, page, Path(tmp) / "charts", label, chart_link=link)
        current = [args.out, *(args.charts / p.name for p in fresh[1:])]
        stale_charts = {p.name for p in args.charts.glob("bench_*.png")} - {p.name for p in fresh[1:]}
        if _snapshot(fresh) != _snapshot(current) or stale_charts:
            print(f"{args.out} or {args.charts} is stale: run python benchmarks/render_docs.py")
            return 1
    print(f"{args.out} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
