"""Reports of the benchmark suite: JSON files, a terminal table, markdown, PNG charts.

A report (one workload on one machine) is a JSON object::

    {"schema", "workload", "description", "date", "device": {"kind", "name", "count", ...},
     "versions": {"torch", "transformers", "transformers-fastpath", "python", ...},
     "quick", "repeats", "config", "definitions": {variant: meaning}, "omitted": {variant: reason},
     "failed": {variant: error}, "cases": [{"case", "params", "variants": {variant: {"median_s",
     "speedup_vs_default", "speedup_vs_expert", "peak_memory_mib", ...}}, "check": {...}}],
     "skipped": reason (only when skipped), "error": text (only when the workload crashed)}

Charts need matplotlib (the ``plot`` extra); without it they are skipped and the caller is told.
"""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CHART_COLORS", "chart_available", "device_slug", "draw_chart", "draw_headline", "headline_rows",
           "load", "render", "report_filename", "save", "status", "to_markdown"]

CHART_COLORS = {"default": "#9e9e9e", "expert": "#4a78b5", "compile": "#e0913b", "fastpath": "#3f9c5a"}
_OTHER_COLOR = "#8c6bb1"
METRIC_LABELS = {"ttft_ms": ("TTFT", "ms"), "decode_ms_per_token": ("decode/token", "ms"),
                 "forward_s": ("in forward", "s"), "around_s": ("around it", "s"),
                 "forward_share": ("forward share", "")}


# -- files ------------------------------------------------------------------------------------------

def device_slug(report: dict[str, Any]) -> str:
    """A short file-name-safe name of the report's device: ``cpu``, ``h100-80gb-hbm3``, ``2xh100-80gb-hbm3``."""
    device = report.get("device") or {}
    if device.get("kind") != "cuda":
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", str(device.get("name", "gpu")).strip(), flags=re.I).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    count = int(device.get("count") or 1)
    return f"{count}x{slug}" if count > 1 else slug


def report_filename(report: dict[str, Any]) -> str:
    """``bench_<workload>_<device-slug>.json``, the name ``--out-dir`` writes."""
    return f"bench_{report['workload']}_{device_slug(report)}.json"


def save(report: dict[str, Any] | list[dict[str, Any]], path: str | Path) -> Path:
    """Write a report (or a list of reports) as indented JSON; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def load(path: str | Path) -> dict[str, Any] | list[dict[str, Any]]:
    """Read what :func:`save` wrote."""
    return json.loads(Path(path).read_text())


# -- formatting -------------------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0 s"
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def _throughput(value: float | None, unit: str | None) -> str:
    if value is None or not unit:
        return "-"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def _check_cell(variant: str, check: dict[str, Any]) -> str:
    if variant == check.get("reference"):
        return "reference"
    result = (check.get("variants") or {}).get(variant)
    if result is None:
        return "n/a" if check.get("reason") else "-"
    verdict = "pass" if result.get("passed") else "FAIL"
    detail = ""
    if "error" in result:
        detail = result["error"][:60]
    elif "identical_rows" in result:
        detail = f"{result['identical_rows']}/{result['rows']} rows identical"
    elif "mean_cosine" in result:
        detail = f"logits cos >= {result['min_cosine']:.3f}"
    elif "rows_in_top_k" in result:
        detail = f"{result['rows_in_top_k']}/{result['rows']} first tokens in top 5"
    elif "min_cosine" in result and "cosine" in result.get("criterion", ""):
        detail = f"min cos {result['min_cosine']:.6f}"
    elif "max_abs_diff" in result:
        detail = f"max diff {result['max_abs_diff']:.1e}"
        if "label_agreement" in result:
            detail += f", labels {result['label_agreement']:.1%}"
    elif "abs_diff" in result:
        detail = f"loss diff {max(result['abs_diff'].values()):.1e}"
    return f"{verdict} ({detail})" if detail else verdict


def _metric_names(case: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for row in case["variants"].values():
        for key in row.get("metrics", {}):
            if key not in names:
                names.append(key)
    return names


def _metric(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    unit = METRIC_LABELS.get(key, (key, ""))[1]
    if unit == "s":
        return _seconds(value)
    text = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def _case_table(case: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metrics = _metric_names(case)
    header = ["variant", "median", "throughput", "vs default", "vs expert", "peak memory", "one-time",
              *(METRIC_LABELS.get(m, (m, ""))[0] for m in metrics), "check"]
    rows = []
    for name, row in case["variants"].items():
        throughput = _throughput(row.get("throughput"), case.get("throughput_unit"))
        rows.append([name, _seconds(row.get("median_s")), throughput,
                     _ratio(row.get("speedup_vs_default")), _ratio(row.get("speedup_vs_expert")),
                     _mib(row.get("peak_memory_mib")), _seconds(row.get("one_time_s")),
                     *(_metric(row.get("metrics", {}).get(m), m) for m in metrics),
                     _check_cell(name, case.get("check", {}))])
    return header, rows


def environment_line(report: dict[str, Any]) -> str:
    """Device, versions and date in one line."""
    device = report.get("device") or {}
    versions = report.get("versions") or {}
    what = device.get("description") or device.get("name", "?")
    if device.get("kind") == "cpu" and device.get("name"):
        what = f"{what}, {device['name']}"
    libs = ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "transformers-fastpath", "python")
                     if versions.get(k))
    if versions.get("cuda"):
        libs += f", CUDA {versions['cuda']}"
    return f"{what}; {libs}; {str(report.get('date', '?'))[:10]}"


def status(report: dict[str, Any]) -> str:
    """``ok``, ``skipped: ...``, ``error: ...`` or ``check failed``."""
    if report.get("skipped"):
        return f"skipped: {report['skipped']}"
    if report.get("error"):
        return f"error: {report['error']}"
    if report.get("failed"):
        return "variant failed: " + ", ".join(f"{name} ({why})" for name, why in report["failed"].items())
    if any((case.get("check") or {}).get("passed") is False for case in report.get("cases", [])):
        return "check failed"
    return "ok"


# -- terminal ---------------------------------------------------------------------------------------

def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def render(report: dict[str, Any]) -> str:
    """A plain-text summary for the terminal."""
    lines = [f"{report['workload']}: {report.get('description', '')}", f"  {environment_line(report)}"]
    if report.get("skipped"):
        return "\n".join([*lines, f"  skipped: {report['skipped']}"])
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
    lines.append(f"  repeats: {report.get('repeats')}" + ("  (--quick)" if report.get("quick") else ""))
    for case in report.get("cases", []):
        lines += ["", f"  [{case['case']}]"]
        header, rows = _case_table(case)
        lines += ["  " + line for line in _text_table(header, rows)]
    lines += _notes(report, bullet="  - ")
    return "\n".join(lines)


def _notes(report: dict[str, Any], bullet: str) -> list[str]:
    lines = []
    if report.get("definitions"):
        lines += ["", "Variants:"]
        lines += [f"{bullet}{name}: {meaning}" for name, meaning in report["definitions"].items()]
    for name, reason in (report.get("omitted") or {}).items():
        lines.append(f"{bullet}{name} omitted: {reason}")
    for name, error in (report.get("failed") or {}).items():
        lines.append(f"{bullet}{name} FAILED: {error}")
    for case in report.get("cases", []):
        check = case.get("check") or {}
        if check.get("passed") is None and check.get("reason"):
            lines.append(f"{bullet}check ({case['case']}): {check['reason']}")
    return lines


# -- markdown ---------------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(report: dict[str, Any], *, heading: str = "###", chart: str | None = None) -> str:
    """The report as markdown: heading, environment, one table per case, variant meanings, chart link."""
    device = device_label(report)
    lines = [f"{heading} {report['workload']} on {device}", "", report.get("description", ""), "",
             f"- Environment: {environment_line(report)}"]
    if report.get("skipped"):
        lines += [f"- Skipped: {report['skipped']}", ""]
        return "\n".join(lines)
    if report.get("error"):
        lines.append(f"- Error: `{_md_escape(report['error'])[:300]}`")
    config = report.get("config") or {}
    if config.get("model"):
        lines.append(f"- Model: {config['model']}")
    quick = " (`--quick`)" if report.get("quick") else ""
    lines.append(f"- Repeats: {report.get('repeats')} interleaved rounds{quick}")
    lines.append("")
    for case in report.get("cases", []):
        params = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (case.get("params") or {}).items())
        lines += [f"**{case['case']}**" + (f" ({params})" if params else ""), ""]
        header, rows = _case_table(case)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
        lines.append("")
    notes = [line for line in _notes(report, bullet="- ") if line]
    if notes:
        if notes[0] == "Variants:":
            notes = ["Variants:", "", *notes[1:]]
        lines += [*notes, ""]
    if chart:
        lines += [f"![{report['workload']} on {device}]({chart})", ""]
    return "\n".join(lines)


# -- charts -----------------------------------------------------------------------------------------

def chart_available() -> bool:
    """Whether matplotlib (the ``plot`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot (no global backend switch in the caller's process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    return path


def draw_chart(report: dict[str, Any], path: str | Path) -> Path | None:
    """Speed-up vs default and peak memory per variant, one column per case; None if nothing to draw.

    Needs matplotlib (check :func:`chart_available` first).
    """
    cases = [c for c in report.get("cases", []) if c.get("variants")]
    if not cases:
        return None
    width = max(5.0, 3.6 * len(cases))
    fig = _figure(width, 5.6)
    device = device_label(report)
    subtitle = "\n".join(textwrap.wrap(environment_line(report), int(width * 16)))
    fig.suptitle(f"{report['workload']} on {device}\n{subtitle}", fontsize=7)
    for index, case in enumerate(cases):
        names = list(case["variants"])
        colors = [CHART_COLORS.get(n, _OTHER_COLOR) for n in names]
        speed = [case["variants"][n].get("speedup_vs_default") or 0.0 for n in names]
        memory = [case["variants"][n].get("peak_memory_mib") or 0.0 for n in names]
        top = fig.add_subplot(2, len(cases), index + 1)
        bars = top.bar(range(len(names)), speed, color=colors)
        top.axhline(1.0, color="#444444", linewidth=0.8, linestyle="--")
        top.margins(y=0.15)
        top.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        top.set_title(case["case"], fontsize=8)
        top.set_ylabel("speed-up vs default" if index == 0 else "", fontsize=8)
        top.tick_params(axis="y", labelsize=7)
        for bar, value in zip(bars, speed):
            top.annotate(f"{value:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                         va="bottom", fontsize=7)
        bottom = fig.add_subplot(2, len(cases), len(cases) + index + 1)
        bottom.bar(range(len(names)), memory, color=colors)
        bottom.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        bottom.set_ylabel("peak memory (MiB)" if index == 0 else "", fontsize=8)
        bottom.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def device_label(report: dict[str, Any]) -> str:
    """The report's device by name, with the count when it had several (``2x NVIDIA H100 80GB HBM3``)."""
    device = report.get("device") or {}
    name = str(device.get("name", "?"))
    count = device.get("count") or 1
    return f"{count}x {name}" if count > 1 else name


def headline_rows(reports: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload case that has a fastpath result: its speed-ups vs default and vs expert."""
    rows = []
    for report in reports:
        if report.get("skipped") or not report.get("cases"):
            continue
        device = device_label(report)
        for case in report["cases"]:
            fast = case["variants"].get("fastpath")
            if not fast:
                continue
            options = report.get("options") or {}
            # the case's size where the run set one (--set texts=...), and output forms that change the job
            shown = [case["case"]] if len(report["cases"]) > 1 or options.get("texts") else []
            shown += [f"{flag}=1" for flag in ("return_tensors",) if options.get(flag)]
            label = report["workload"] + (f" ({', '.join(shown)})" if shown else "")
            rows.append({"label": label, "device": device, "workload": report["workload"], "case": case["case"],
                         "vs_default": fast.get("speedup_vs_default"), "vs_expert": fast.get("speedup_vs_expert")})
    return rows


def draw_headline(reports: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """One horizontal bar chart: fastpath's speed-up vs default and vs expert per workload (case)."""
    rows = headline_rows(reports)
    if not rows:
        return None
    devices = sorted({r["device"] for r in rows})
    fig = _figure(8.0, 1.2 + 0.42 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.38
    extremes: list[float] = [1.0]
    labels = [r["label"] + (f" [{r['device']}]" if len(devices) > 1 else "") for r in rows]
    positions = list(range(len(rows)))[::-1]
    for offset, key, color, name in ((height / 2, "vs_default", CHART_COLORS["fastpath"], "fastpath vs default"),
                                     (-height / 2, "vs_expert", CHART_COLORS["expert"], "fastpath vs expert")):
        values = [r[key] for r in rows]
        drawn = [v if v else 1.0 for v in values]
        # log scale around 1x: speed-ups grow right, slow-downs left, 2x and 0.5x equally long
        bars = ax.barh([p + offset for p in positions], [v - 1.0 for v in drawn], left=1.0, height=height,
                       color=color, label=name)
        for bar, value, end in zip(bars, values, drawn):
            ax.annotate("n/a" if value is None else f"{value:.2f}x", (end, bar.get_y() + bar.get_height() / 2),
                        va="center", ha="left" if end >= 1.0 else "right", fontsize=7,
                        xytext=(2 if end >= 1.0 else -2, 0), textcoords="offset points")
        extremes.extend(drawn)
    ax.axvline(1.0, color="#444444", linewidth=0.8, linestyle="--")
    ax.set_yticks(positions, labels, fontsize=8)
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.set_xlim(min(extremes) / 1.6, max(extremes) * 1.6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.set_xlabel("speed-up (median time ratio, log scale; > 1x is faster)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("\n".join(textwrap.wrap("transformers-fastpath: " + ", ".join(devices), 70)), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
