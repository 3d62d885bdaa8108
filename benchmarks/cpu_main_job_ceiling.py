"""How close the CPU main job's linear layers are to this CPU's own GEMM speed (issue 20's 1.3x).

The main job: the bundled all-MiniLM-L6-v2 feature-extraction pipeline, ``pipeline(...,
fastpath={"defaults": {"backend": "torch"}})``, over 320 varied sentences (length-sorted batches of
32, each packed to its real tokens). This script measures, on this machine, in one process:

* the pipeline's wall time, and the share of it spent in oneDNN's linear layers (torch.profiler);
* the rate those linear layers reach (their FLOPs over their profiled time);
* the same GEMMs alone, shape by shape (the real row counts of the job's batches), with the
  module's weights and with weights pre-packed in oneDNN's blocked layout (what a cache of
  packed copies could gain), and one large square GEMM: this CPU's fp32 GEMM rate;
* from these, the most the whole job could gain if its linear layers ran at the best GEMM rate
  measured and everything else cost nothing extra.

    python benchmarks/cpu_main_job_ceiling.py --out benchmarks/results/cpu_main_job_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
        flags = " ".join(sorted({w for w in line.split() if w.startswith(("avx", "amx"))}))
    except OSError:
        pass
    return f"{names[0] if names else platform.machine()} ({flags or 'no AVX flags read'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer, pipeline

    from transformers_fastpath.bench.models import required_bundled_minilm, varied_sentences

    path = required_bundled_minilm()
    texts = varied_sentences(args.texts)
    pipe = pipeline("feature-extraction", model=path, fastpath={"defaults": {"backend": "torch"}})
    config = pipe.model.config
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = sorted(len(ids) for ids in AutoTokenizer.from_pretrained(str(path))(texts)["input_ids"])
    batch_rows = [sum(lengths[i:i + 32]) for i in range(0, len(lengths), 32)]
    # (in, out) of each linear layer of one encoder layer: q, k, v, attention output, FFN in, FFN out
    shapes = [(hidden, hidden)] * 4 + [(hidden, inner), (inner, hidden)]
    flops = sum(2 * rows * k * n for rows in batch_rows for k, n in shapes) * layers

    wall = _seconds(lambda: pipe(texts), args.repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe(texts)
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    profiled_total = sum(ops.values())
    linear_s = ops.get("mkldnn::_linear_pointwise", 0.0)  # the encoder's linear layers (not the pooler's addmm)

    linear_op = torch.ops.mkldnn._linear_pointwise
    alone = {"module weights": 0.0, "pre-packed weights": 0.0}
    generator = torch.Generator().manual_seed(0)
    for k, n in set(shapes):
        weight, bias = torch.randn(n, k, generator=generator), torch.randn(n, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        count = shapes.count((k, n)) * layers
        for rows in batch_rows:
            x = torch.randn(rows, k, generator=generator)
            for name, w in (("module weights", weight), ("pre-packed weights", packed)):
                alone[name] += count * _seconds(lambda: linear_op(x, w, bias, "none", [], ""), args.repeats)
    a, b = torch.randn(2048, 2048, generator=generator), torch.randn(2048, 2048, generator=generator)
    square_rate = 2 * 2048 ** 3 / _seconds(lambda: a @ b, args.repeats) / 1e9

    rates = {"in the pipeline (profiled)": flops / linear_s / 1e9,
             **{f"alone, {name}": flops / s / 1e9 for name, s in alone.items()},
             "2048x2048x2048 mm": square_rate}
    best_rate = max(rates.values())
    linear_share = linear_s / profiled_total
    # Everything but the linear layers kept, the linear layers at the best rate measured:
    best_wall = wall * (1 - linear_share) + wall * linear_share * rates["in the pipeline (profiled)"] / best_rate
    report = {
        "script": "benchmarks/cpu_main_job_ceiling.py", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{_cpu_model()}, {torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "texts": len(texts), "tokens": sum(lengths), "batch_rows": batch_rows,
        "linear_gflop": flops / 1e9, "wall_s": wall, "linear_share_of_profiled_time": linear_share,
        "gflop_per_s": rates, "most_the_job_could_gain": wall / best_wall,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
