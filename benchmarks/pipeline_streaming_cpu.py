"""Streamed input on the CPU: time to the first result, and to the first 500, of a generator of 10,000 texts.

Two pipelines over the bundled all-MiniLM-L6-v2 (feature-extraction), side by side in one process:

* ``plain``    -- ``pipeline("feature-extraction", model=path)``: transformers' own lazy iterator,
  batch size 1, the default a user has;
* ``fastpath`` -- ``pipeline("feature-extraction", model=path, fastpath=True)`` and nothing else
  (batch size 32, batched processing: windows of 1, 2, 4... inputs up to 8 batches, sorted inside).

Each round makes a fresh generator of the same 10,000 varied sentences, calls the pipeline on it
and reads results until the first one, then until the 500th; rounds are interleaved and the
medians compared. The first results are checked against each other (cosine of mean-pooled
embeddings on real tokens).

    python benchmarks/pipeline_streaming_cpu.py --out benchmarks/results/pipeline_streaming_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--read", type=int, default=500, help="results read per round after the first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    import transformers

    import transformers_fastpath  # noqa: F401 - pipeline(..., fastpath=) without the .pth bootstrap too
    from transformers_fastpath.bench.models import (
        minilm_checkpoint,
        quiet_transformers,
        varied_sentences,
    )
    from transformers_fastpath.interception.patches import patch_all

    patch_all()  # what the .pth start-up hook does (it may not run from a source checkout)
    warnings.filterwarnings("ignore")
    path, what = minilm_checkpoint()
    texts = varied_sentences(args.texts, seed=3)
    with quiet_transformers():
        pipes = {"plain": transformers.pipeline("feature-extraction", model=str(path)),
                 "fastpath": transformers.pipeline("feature-extraction", model=str(path), fastpath=True)}

    def stream() -> Iterator[str]:
        yield from texts

    first: dict[str, list[float]] = {k: [] for k in pipes}
    many: dict[str, list[float]] = {k: [] for k in pipes}
    outputs: dict[str, list[Any]] = {}
    for name, pipe in pipes.items():  # warm-up
        list(pipe(t for t in texts[:64]))
    for round_ in range(args.rounds):
        order = list(pipes) if round_ % 2 == 0 else list(reversed(pipes))
        for name in order:
            start = time.perf_counter()
            results = iter(pipes[name](stream()))
            got = [next(results)]
            first[name].append(time.perf_counter() - start)
            got.extend(next(results) for _ in range(args.read - 1))
            many[name].append(time.perf_counter() - start)
            outputs[name] = got
            del results

    def pooled(x: Any) -> torch.Tensor:
        return torch.tensor(x[0]).mean(0)

    cosines = [float(torch.nn.functional.cosine_similarity(pooled(a), pooled(b), dim=0))
               for a, b in zip(outputs["plain"], outputs["fastpath"])]
    medians = {k: {"first_result_s": statistics.median(first[k]), f"first_{args.read}_s": statistics.median(many[k])}
               for k in pipes}
    report = {
        "benchmark": "pipeline-streaming-cpu",
        "date": _dt.date.today().isoformat(),
        "device": {"kind": "cpu", "name": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "model": what, "texts": args.texts, "rounds": args.rounds,
        "batch_size": {k: getattr(p, "_batch_size", None) or 1 for k, p in pipes.items()},
        "times_s": {"first_result": first, f"first_{args.read}": many},
        "medians": medians,
        "first_result_ratio_fastpath_vs_plain": medians["fastpath"]["first_result_s"] / medians["plain"]["first_result_s"],
        f"first_{args.read}_speedup": medians["plain"][f"first_{args.read}_s"] / medians["fastpath"][f"first_{args.read}_s"],
        "check": {"min_cosine": min(cosines), "same_lengths": all(
            len(a[0]) == len(b[0]) for a, b in zip(outputs["plain"], outputs["fastpath"]))},
    }
    print(json.dumps({k: report[k] for k in ("medians", "first_result_ratio_fastpath_vs_plain",
                                             f"first_{args.read}_speedup", "check")}, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
