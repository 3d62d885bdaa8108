"""The shared runner: variants of one workload timed in one process, interleaved, with medians and ratios.

A workload function receives a :class:`Bench`. It builds its variants (``bench.build``), says
what each one means (``bench.define``) or why one is left out (``bench.omit``), and hands the
callables of each case to ``bench.measure``, which

1. warms every variant up once (timed: the first call's time less the steady median is the
   one-time cost, e.g. ``torch.compile``),
2. runs ``repeats`` rounds; in each round every variant runs once, round-robin, starting one
   variant later each round, so drift of the machine (clocks, other jobs) hits all alike,
3. records per variant the median, every time, the ratios to ``default`` and ``expert``
   (speed-ups: > 1 is faster), peak memory, and custom metrics (time to first token...),
4. compares each variant's output with ``default``'s through the workload's check.

Machines are noisy: only the ratios between variants of one run are meant to be compared.
A variant that fails to build or run is recorded (``failed``) and dropped; the others go on.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import logging
import platform
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .models import weights_bytes

__all__ = ["BASELINE", "EXPERT", "VARIANT_ORDER", "Bench", "Sample", "Variant", "describe_error", "environment",
           "sync"]

logger = logging.getLogger("transformers_fastpath.bench")

BASELINE = "default"
EXPERT = "expert"
VARIANT_ORDER = ("default", "expert", "compile", "fastpath")
MIB = 2**20


@dataclass
class Sample:
    """What a variant's callable may return instead of its bare output.

    Attributes:
        output: what the check compares with the default variant's output.
        seconds: the time to record, when the variant times itself (a Trainer step without data
            loading); None: the runner's wall time of the call, device-synchronised, is used.
        metrics: extra numbers of this sample (``ttft_ms``...); the report keeps their medians.
    """

    output: Any = None
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Variant:
    """One variant of a case.

    Attributes:
        run: one timed sample (returns the output, or a :class:`Sample`).
        warmup: the first call, timed apart from the median (one-time costs land in it);
            None: ``run`` itself. Its time less the steady median is reported as the one-time
            cost unless the case says it is not comparable (``measure(..., one_time=False)``).
    """

    run: Callable[[], Any]
    warmup: Callable[[], Any] | None = None


def sync() -> None:
    """Wait for every CUDA device (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def describe_error(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, short enough for a report."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:600]}{where}"


# -- environment ------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def distribution_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The device, library versions and date of a run (the keys every report carries)."""
    import torch
    import transformers

    from .. import __version__
    from ..planning.hardware import Hardware

    hw = Hardware.detect()
    if hw.device == "cuda":
        device = {"kind": "cuda", "name": torch.cuda.get_device_name(0), "count": hw.count,
                  "memory_gib": hw.memory_gib, "description": hw.describe()}
    else:
        device = {"kind": "cpu", "name": _cpu_name(), "count": hw.cpu_count, "memory_gib": hw.memory_gib,
                  "description": hw.describe() + (f" (accelerator {hw.device} not used)" if hw.device != "cpu" else "")}
    device["torch_threads"] = torch.get_num_threads()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "transformers-fastpath": __version__, "python": platform.python_version(),
                "accelerate": distribution_version("accelerate"), "bitsandbytes": distribution_version("bitsandbytes"),
                "cuda": torch.version.cuda if hw.device == "cuda" else None}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "versions": versions}


# -- memory -----------------------------------------------------------------------------------------

class _PeakMemory:
    """Peak memory of a block above what was allocated when it began, in bytes.

    CUDA: the allocator's peak over every device (reset per block). CPU: resident set size
    sampled every 5 ms (needs psutil; None without it).
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peak: int | None = None
        self._proc: Any = None

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.cuda:
            self._base = 0
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
                self._base += torch.cuda.memory_allocated(index)
            return self
        try:
            import psutil
        except ImportError:
            self._proc = None
            return self
        self._proc = psutil.Process()
        self._base = self._max = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        proc = self._proc
        while proc is not None and not self._stop.wait(0.005):
            self._max = max(self._max, proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            sync()
            peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            self.peak = max(peak - self._base, 0)
        elif self._proc is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak = max(self._max - self._base, 0)


def _allocated() -> int:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


# -- the bench --------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(base: float | None, value: float | None) -> float | None:
    return base / value if base and value else None


class Bench:
    """The context a workload function runs in; collects its report.

    Args:
        name: the workload's name.
        description: one line on what it measures.
        quick: tiny sizes and one repeat (a smoke run).
        repeats: interleaved rounds per case (None: 1 with ``quick``, else the workload's default).
        options: ``--set key=value`` overrides of the workload's sizes (see :meth:`pick`).
        progress: show a tqdm bar per case.
    """

    def __init__(self, name: str, description: str, *, quick: bool = False, repeats: int | None = None,
                 options: dict[str, Any] | None = None, progress: bool = True) -> None:
        from ..planning.hardware import Hardware

        self.name = name
        self.description = description
        self.quick = quick
        self.progress = progress
        self.hardware = Hardware.detect()
        self.on_gpu = self.hardware.device == "cuda"
        self.device = "cuda:0" if self.on_gpu else "cpu"
        self._repeats = repeats
        self.options = dict(options or {})
        self._used_options: set[str] = set()
        self.definitions: dict[str, str] = {}
        self.omitted: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.config: dict[str, Any] = {}
        self.cases: list[dict[str, Any]] = []
        self.skipped: str | None = None
        self._resident: dict[str, int] = {}
        self._weights: dict[str, int] = {}

    # -- sizes and options --------------------------------------------------------------------
    def pick(self, name: str, *, gpu: Any, cpu: Any, quick: Any) -> Any:
        """A size: ``--set name=...`` if given, else the quick, GPU or CPU default."""
        if name in self.options:
            self._used_options.add(name)
            return self.options[name]
        return quick if self.quick else gpu if self.on_gpu else cpu

    def option(self, name: str, default: Any = None) -> Any:
        """``--set name=...`` (or ``--model``/``--batch-size``) if given, else ``default``."""
        if name in self.options:
            self._used_options.add(name)
            return self.options[name]
        return default

    def repeats(self, *, gpu: int = 3, cpu: int = 3) -> int:
        """The number of interleaved rounds: ``--repeats``, else 1 with ``--quick``, else the default."""
        if self._repeats:
            return max(1, int(self._repeats))
        return 1 if self.quick else gpu if self.on_gpu else cpu

    @property
    def unused_options(self) -> list[str]:
        """Options this workload did not read (a typo, or a size of another workload)."""
        return sorted(set(self.options) - self._used_options - {"tokenizer"})

    # -- variants ---------------------------------------------------------------------------------
    def define(self, variant: str, meaning: str) -> None:
        """What ``variant`` means in this workload on this machine (goes into the report)."""
        self.definitions[variant] = meaning

    def omit(self, variant: str, reason: str) -> None:
        """Leave ``variant`` out of this workload, with the reason (goes into the report)."""
        self.omitted[variant] = reason
        self.definitions.pop(variant, None)
        logger.info("bench %s: %s omitted: %s", self.name, variant, reason)

    def skip(self, reason: str) -> None:
        """Skip the whole workload (the report gets ``"skipped": reason``)."""
        self.skipped = reason

    def wanted(self, variant: str) -> bool:
        """Whether ``variant`` is neither omitted (by the workload or ``--set omit=a,b``) nor failed."""
        if variant not in self.omitted and variant in self._omitted_by_option():
            self.omit(variant, "--set omit=...")
        return variant not in self.omitted and variant not in self.failed

    def _omitted_by_option(self) -> list[str]:
        names = self.option("omit", [])
        return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]

    def build(self, variant: str, make: Callable[[], Any]) -> Any:
        """``make()`` for ``variant``, recording its memory; None (and the error) if it fails or is omitted."""
        if not self.wanted(variant):
            return None
        if self.on_gpu:
            gc.collect()  # what the previous build left behind must not count as this one's memory
        before = _allocated()
        try:
            obj = make()
        except Exception as exc:  # a variant that cannot be built is reported, the others run
            self.failed[variant] = f"build: {describe_error(exc)}"
            logger.info("bench %s: %s failed to build: %s", self.name, variant, self.failed[variant])
            return None
        sync()
        self._resident[variant] = self._resident.get(variant, 0) + max(_allocated() - before, 0)
        try:
            self._weights[variant] = weights_bytes(obj)
        except Exception:  # noqa: BLE001 - a size is optional
            logger.debug("bench %s: cannot size %s", self.name, variant, exc_info=True)
        return obj

    # -- measuring ------------------------------------------------------------------------------
    def measure(self, case: str, variants: dict[str, Variant], *, check: Callable[[str, Any, Any], dict] | None = None,
                params: dict[str, Any] | None = None, calls: int = 1, work: float | None = None,
                work_unit: str | None = None, one_time: bool = True) -> dict[str, Any]:
        """Warm up, then time ``variants`` interleaved for this case; append and return the case report.

        Args:
            case: a short name (``"batch 16"``).
            variants: name -> :class:`Variant`; variants already failed or omitted are ignored.
            check: ``check(variant, default_output, variant_output) -> dict`` with a ``"passed"`` bool.
            params: the case's parameters for the report (batch, lengths...).
            calls: calls made by one ``run`` (times are divided by it: ``median_s`` is per call).
            work: units of work per call (tokens, texts) for a throughput figure.
            work_unit: the unit's name (``"tokens"``); throughput is ``work_unit/s``.
            one_time: whether warm-up time less the median is a meaningful one-time cost.
        """
        from tqdm.auto import tqdm

        order = [v for v in self._ordered(variants) if self.wanted(v)]
        repeats = self.repeats()
        times: dict[str, list[float]] = {v: [] for v in order}
        metrics: dict[str, dict[str, list[float]]] = {v: {} for v in order}
        peaks: dict[str, int | None] = {v: None for v in order}
        warmup_s: dict[str, float] = {}
        warm_calls = {v: calls if variants[v].warmup is None else 1 for v in order}
        outputs: dict[str, Any] = {}
        bar = tqdm(total=len(order) * (repeats + 1), desc=f"{self.name} [{case}]", unit="call",
                   disable=not self.progress, leave=False)
        try:
            gc.collect()
            for v in order:  # warm-up: one-time costs (compile, CUDA graphs, allocator) land here
                bar.set_postfix_str(f"warm-up {v}")
                fn = variants[v].warmup or variants[v].run
                before = _allocated()
                try:
                    seconds, sample = self._call(fn, 1)
                except Exception as exc:  # noqa: BLE001 - recorded, the variant is dropped
                    self.failed[v] = f"warm-up ({case}): {describe_error(exc)}"
                    logger.info("bench %s: %s failed: %s", self.name, v, self.failed[v])
                    bar.update(1 + repeats)
                    continue
                self._resident[v] = self._resident.get(v, 0) + max(_allocated() - before, 0)
                warmup_s[v] = seconds
                outputs[v] = sample.output
                bar.update(1)
            live = [v for v in order if v in warmup_s]
            for round_ in range(repeats):
                shift = round_ % len(live) if live else 0
                gc.collect()  # between rounds; the collector is off during each timed call (as timeit does)
                for v in live[shift:] + live[:shift]:
                    if v in self.failed:
                        continue
                    bar.set_postfix_str(f"round {round_ + 1}/{repeats} {v}")
                    try:
                        with _PeakMemory(self.on_gpu) as memory:
                            seconds, sample = self._call(variants[v].run, calls)
                    except Exception as exc:  # noqa: BLE001 - recorded, the variant is dropped
                        self.failed[v] = f"round {round_ + 1} ({case}): {describe_error(exc)}"
                        logger.info("bench %s: %s failed: %s", self.name, v, self.failed[v])
                        bar.update(repeats - round_)
                        continue
                    times[v].append(seconds)
                    for key, value in sample.metrics.items():
                        metrics[v].setdefault(key, []).append(float(value))
                    if memory.peak is not None:
                        peaks[v] = max(peaks[v] or 0, memory.peak)
                    outputs[v] = sample.output
                    bar.update(1)
        finally:
            bar.close()
        ran = [v for v in order if times[v] and v not in self.failed]  # a variant that broke midway is dropped
        report = self._case_report(case, params or {}, ran, times, metrics, peaks, warmup_s, warm_calls, calls,
                                   work, work_unit, one_time)
        report["check"] = self._check(check, ran, outputs)
        self.cases.append(report)
        return report

    @staticmethod
    def _ordered(variants: Mapping[str, Any]) -> list[str]:
        known = [v for v in VARIANT_ORDER if v in variants]
        return known + [v for v in variants if v not in known]

    def _call(self, fn: Callable[[], Any], calls: int) -> tuple[float, Sample]:
        collecting = gc.isenabled()
        gc.disable()
        try:
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            elapsed = time.perf_counter() - start
        finally:
            if collecting:
                gc.enable()
        sample = result if isinstance(result, Sample) else Sample(output=result)
        seconds = sample.seconds if sample.seconds is not None else elapsed / max(calls, 1)
        return seconds, sample

    def _case_report(self, case: str, params: dict[str, Any], order: list[str], times: dict[str, list[float]],
                     metrics: dict[str, dict[str, list[float]]], peaks: dict[str, int | None],
                     warmup_s: dict[str, float], warm_calls: dict[str, int], calls: int, work: float | None,
                     work_unit: str | None, one_time: bool) -> dict[str, Any]:
        medians = {v: _median(times[v]) for v in order}
        base, expert = medians.get(BASELINE), medians.get(EXPERT)
        base_peak = None
        rows: dict[str, dict[str, Any]] = {}
        for v in order:
            median = medians[v]
            resident = self._resident.get(v) if self.on_gpu else self._weights.get(v)
            peak_run = peaks[v]
            total = (resident or 0) + peak_run if peak_run is not None else None
            warm = warmup_s.get(v)
            row: dict[str, Any] = {
                "median_s": median,
                "times_s": times[v],
                "speedup_vs_default": _ratio(base, median),
                "speedup_vs_expert": _ratio(expert, median),
                "throughput": (work / median) if work and median else None,
                "warmup_s": warm,
                # the warm-up made warm_calls calls; what it took beyond that many steady calls is one-time
                "one_time_s": (max(warm - warm_calls[v] * median, 0.0)
                               if one_time and warm is not None and median else None),
                "peak_memory_mib": total / MIB if total is not None else None,
                "peak_run_mib": peak_run / MIB if peak_run is not None else None,
                "resident_mib": resident / MIB if resident is not None else None,
                "weights_mib": self._weights[v] / MIB if v in self._weights else None,
                "metrics": {k: statistics.median(vals) for k, vals in metrics[v].items()},
            }
            if v == BASELINE:
                base_peak = row["peak_memory_mib"]
            rows[v] = row
        for row in rows.values():
            row["memory_vs_default"] = _ratio(row["peak_memory_mib"], base_peak) if base_peak else None
        return {"case": case, "params": params, "calls_per_sample": calls,
                "throughput_unit": f"{work_unit}/s" if work_unit else None, "variants": rows}

    def _check(self, check: Callable[[str, Any, Any], dict] | None, ran: list[str],
               outputs: dict[str, Any]) -> dict[str, Any]:
        if check is None:
            return {"reference": BASELINE, "passed": None, "reason": "this workload has no output check"}
        if BASELINE not in ran:
            return {"reference": BASELINE, "passed": None, "reason": "the default variant did not run"}
        results: dict[str, Any] = {}
        for v in ran:
            if v == BASELINE:
                continue
            try:
                results[v] = check(v, outputs[BASELINE], outputs[v])
            except Exception as exc:  # noqa: BLE001 - a check that cannot run fails, visibly
                results[v] = {"passed": False, "error": describe_error(exc)}
        verdicts = [r.get("passed") for r in results.values()]
        return {"reference": BASELINE, "passed": all(bool(x) for x in verdicts) if verdicts else None,
                "variants": results}

    # -- the report -------------------------------------------------------------------------------
    def report(self, *, elapsed_s: float | None = None, error: str | None = None) -> dict[str, Any]:
        """The workload's JSON-safe report (see :mod:`transformers_fastpath.bench.report`)."""
        data: dict[str, Any] = {
            "schema": "transformers-fastpath-bench/1",
            "workload": self.name,
            "description": self.description,
            **environment(),
            "quick": self.quick,
            "repeats": self.repeats() if not self.skipped else None,
            "options": self.options,
            "config": self.config,
            "definitions": {v: self.definitions[v] for v in self._ordered(dict.fromkeys(self.definitions))},
            "omitted": self.omitted,
            "failed": self.failed,
            "cases": self.cases,
        }
        if self.unused_options:
            data["unused_options"] = self.unused_options
        if self.skipped:
            data["skipped"] = self.skipped
        if error:
            data["error"] = error
        if elapsed_s is not None:
            data["elapsed_s"] = round(elapsed_s, 2)
        return data
