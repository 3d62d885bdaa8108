"""The ``transformers-fastpath`` command: explain, bench, doctor, plugins."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["main"]


def _cmd_explain(args: argparse.Namespace) -> int:
    from .errors import FastpathError, PolicyError
    from .planning.hardware import Hardware
    from .planning.model_info import ModelInfo
    from .planning.policy import load_policy
    from .planning.resolution import resolve
    from .planning.tasks import UnknownTaskError, check_task

    def fail(message: str) -> int:
        print(f"transformers-fastpath explain: {_one_line(message)}", file=sys.stderr)
        return 2

    try:
        hardware = Hardware.from_profile(args.hardware) if args.hardware else Hardware.detect()
    except ValueError as exc:
        return fail(f"--hardware: {exc}")
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        return fail(f"invalid policy: {exc}")
    try:
        # Only the config is read, and never with remote code: a config that needs it is reported.
        model = ModelInfo.from_pretrained(args.model, task=args.task, trust_remote_code=False)
    except FileNotFoundError as exc:  # ./nope is not a Hub repo id: the message says what it is
        return fail(str(exc))
    except (OSError, ValueError, LookupError) as exc:
        return fail(f"cannot read the config of {args.model!r}: {exc}")
    try:  # a typo must not plan for a task nobody can run; nor a task this transformers removed
        check_task(args.task, config=model.config, removed=False, where="--task")
    except UnknownTaskError as exc:
        return fail(str(exc))
    try:
        plan = resolve(model, task=args.task, policy=policy, hardware=hardware)
    except PolicyError as exc:
        return fail(f"invalid policy: {exc}")
    except FastpathError as exc:  # e.g. quantization_fallback = "error" and the method cannot run
        return fail(str(exc))
    print(plan.to_json() if args.json else plan)
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(f"not a positive integer: {text}")
    return value


_positive_int.__name__ = "positive integer"  # argparse: "invalid positive integer value: '-3'"


def _parse_value(text: str) -> Any:
    """``--set`` values: integers, floats, true/false, comma-separated lists of those, else the string."""
    if "," in text:
        return [_parse_value(part) for part in text.split(",") if part.strip()]
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import bench

    parser: argparse.ArgumentParser = args.bench_parser
    options: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set takes KEY=VALUE (e.g. --set texts=500), got {item!r}")
        options[key.strip()] = _parse_value(value.strip())
    for key in ("model", "batch_size", "tokenizer"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    if args.list:
        available = bench.availability(options)
        width = max(len(name) for name in bench.WORKLOADS)
        for name, workload in bench.WORKLOADS.items():
            reason = available[name]
            print(f"{name:<{width}}  {'runs here' if reason is None else 'skipped here'}")
            print(f"{'':<{width}}  {workload.description}")
            if reason is not None:
                print(f"{'':<{width}}  why not: {reason}")
        return 0
    names = list(args.workloads) or ["feature-extraction"]
    if args.all or "all" in names:
        names = list(bench.WORKLOADS)
    unknown = [n for n in names if n not in bench.WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from: all, {', '.join(bench.WORKLOADS)} "
                     "(see --list)")

    reports = []
    for name in names:
        report = bench.run_workload(name, repeats=args.repeats, quick=args.quick, options=options,
                                    progress=not (args.json or args.no_progress), threads=args.threads)
        reports.append(report)
        written: list[Path] = []
        json_path = None
        if args.out_dir:
            json_path = bench.save(report, Path(args.out_dir) / bench.report_filename(report))
            written.append(json_path)
        elif args.out and len(names) == 1:
            json_path = Path(args.out)
        note = None
        if json_path is not None and not args.no_chart and report.get("cases"):
            if bench.chart_available():
                chart = bench.draw_chart(report, json_path.with_suffix(".png"))
                if chart is not None:
                    written.append(chart)
            else:
                note = "chart skipped: matplotlib is not installed (pip install 'transformers-fastpath[plot]')"
        if not args.json:
            print(bench.to_markdown(report) if args.markdown else bench.render(report))
            for path in written:
                print(f"wrote {path}")
            if note:
                print(note)
            print()
    if args.out:
        bench.save(reports[0] if len(reports) == 1 else reports, args.out)
        if not args.json:
            print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    statuses = {r["workload"]: bench.status(r) for r in reports}
    if len(reports) > 1 and not args.json:
        print("summary: " + "; ".join(f"{name}: {state}" for name, state in statuses.items()))
    # 1 when a workload crashed or a check failed (its report is written all the same); skips are fine
    return 1 if any(state != "ok" and not state.startswith("skipped") for state in statuses.values()) else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, render

    report = diagnose()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_passes, list_plugins

    infos = list_plugins()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2, default=list))
        return 0
    for info in infos:
        origin = info.distribution or "-"
        print(f"{info.name}\n  kind: {info.kind}; module: {info.module}; distribution: {origin}")
        if info.error:
            print(f"  FAILED TO LOAD: {info.error}")
        else:
            print(f"  hooks: {', '.join(info.hooks) or '-'}")
    passes = get_passes()
    print(f"\npasses: {', '.join(p.name for p in passes) or '-'}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``transformers-fastpath CMD: error: ... (see --help)``, exit 2.

    Sub-command parsers are made with the parent's class, so every sub-command gets it too.
    """

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        print(f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="transformers-fastpath",
        description="Make Hugging Face transformers fast with one declarative policy.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fastpath does (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="show the plan for a model (reads only its config)")
    p.add_argument("model", help="local model directory (or a Hub id already in the cache)")
    p.add_argument("--task", help="pipeline task, e.g. text-classification")
    p.add_argument("--policy", help="policy TOML file (default: the discovery order)")
    p.add_argument("--hardware", help="profile instead of this machine: cpu, h100, 2xh100, cuda:4x24:sm86 ...")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "bench", help="time named workloads: transformers default vs expert settings vs compile (where it applies) "
                      "vs fastpath",
        description="Run workloads with the variants default (transformers out of the box), expert (hand-set "
                    "device, dtype, batch size, sdpa), compile and fastpath (pipeline(..., fastpath=True), "
                    "from_pretrained(..., fastpath=True) or FastpathCallback, with no further calls on the model), "
                    "interleaved in one process; report medians, speed-ups vs default and vs expert, peak memory, "
                    "versions and a correctness check against default. compile is the expert plus: torch.compile "
                    "of the encoder's forward (encoder-latency, encoder-padded; not with --quick on a CPU); "
                    "transformers' cache_implementation='static', which compiles the decode step (generate, "
                    "quantized-generate; GPU only: transformers compiles generate only on accelerators); "
                    "TrainingArguments(torch_compile=True) (trainer-step; GPU only). The pipeline workloads "
                    "(feature-extraction, pipeline-text-classification, multi-gpu-pipeline) have no compile "
                    "variant: each batch is padded to another shape, so a compiled forward would recompile or run "
                    "dynamic shapes; the report says why a variant is left out.")
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help="workload names, or 'all' (default: feature-extraction); see --list")
    p.add_argument("--all", action="store_true", help="run every workload (same as the name 'all')")
    p.add_argument("--list", action="store_true", help="list workloads and whether they can run here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run (seconds on a CPU)")
    p.add_argument("--repeats", type=_positive_int, help="interleaved rounds per case (default 3, 1 with --quick)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a workload size, e.g. --set texts=500 --set batches=1,16 (see docs/benchmarks.md)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads for the run (default: torch's; 1 with --quick on a CPU)")
    p.add_argument("--model", help="feature-extraction: model directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="pipeline workloads: the expert's batch size (default 64 GPU, 32 CPU)")
    p.add_argument("--tokenizer", help="BERT tokenizer directory for the text workloads when the bundled "
                                       "all-MiniLM-L6-v2 is not installed")
    p.add_argument("--out", help="write the JSON report here (a list for several workloads), and a PNG chart "
                                 "next to it for one workload")
    p.add_argument("--out-dir", help="write bench_<workload>_<device>.json and .png per workload into this directory")
    p.add_argument("--no-chart", action="store_true", help="do not draw PNG charts")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of plain text")
    p.add_argument("--json", action="store_true", help="print the JSON report(s) instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench, bench_parser=p)

    p = sub.add_parser("doctor", help="what this machine supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("plugins", help="list loaded plugins and where they come from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0 ok, 1 a command's own failure (bench problems, internal errors),
    2 bad input (arguments, policy, model path, hardware profile), each reported on one stderr line
    (``-v`` shows the traceback of an unexpected error)."""
    from .errors import FastpathError

    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("transformers_fastpath").setLevel(logging.INFO)
    where = f"transformers-fastpath {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # raise SystemExit("message") inside a command: bad input, one line
        if isinstance(exc.code, str):
            print(f"{where}: {_one_line(exc.code)}", file=sys.stderr)
            return 2
        raise
    except (FastpathError, OSError, ValueError, LookupError) as exc:
        if args.verbose:
            raise
        print(f"{where}: {_one_line(exc)} ({type(exc).__name__})", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.verbose:
            raise
        print(f"{where}: internal error: {type(exc).__name__}: {_one_line(exc)} (run with -v for the traceback "
              "and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
