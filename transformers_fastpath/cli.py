"""The ``transformers-fastpath`` command: explain, bench, doctor, plugins."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_explain(args: argparse.Namespace) -> int:
    from .errors import FastpathError, PolicyError
    from .hardware import Hardware
    from .resolution import resolve

    try:
        hardware = Hardware.from_profile(args.hardware) if args.hardware else Hardware.detect()
    except ValueError as exc:
        print(f"transformers-fastpath explain: --hardware: {exc}", file=sys.stderr)
        return 2
    try:
        plan = resolve(args.model, task=args.task, policy=args.policy, hardware=hardware)
    except PolicyError as exc:
        print(f"transformers-fastpath explain: invalid policy: {exc}", file=sys.stderr)
        return 2
    except FastpathError as exc:  # e.g. quantization_fallback = "error" and the method cannot run
        print(f"transformers-fastpath explain: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"transformers-fastpath explain: cannot read the config of {args.model!r}: {exc}", file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else plan)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.list:
        for workload in bench.WORKLOADS.values():
            print(f"{workload.name:<22} {workload.description}")
        return 0
    options = {"model": args.model} if args.model else {}
    if args.batch_size:
        options["batch_size"] = args.batch_size
    report = bench.run_workload(args.workload, repeats=args.repeats, quick=args.quick, options=options,
                                progress=not args.json)
    if args.out:
        bench.save(report, args.out)
    print(json.dumps(report, indent=2) if args.json else bench.render(report))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    p = sub.add_parser("bench", help="run a workload with fastpath off and on, interleaved")
    p.add_argument("workload", nargs="?", default="feature-extraction")
    p.add_argument("--list", action="store_true", help="list workloads")
    p.add_argument("--quick", action="store_true", help="small and short (a smoke run)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 7, 2 with --quick)")
    p.add_argument("--model", help="model directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, help="pipeline batch size, the same both ways (default 32)")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="what this machine supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("plugins", help="list loaded plugins and where they come from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("transformers_fastpath").setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
