"""Benchmark the fused encoder against transformers' own forward, side by side in one process.

Variants (same weights, same inputs, interleaved repeats, medians):

* ``sdpa``      -- transformers default (``attn_implementation="sdpa"``) in ``--dtype``, moved to
  ``--device`` by hand: the baseline;
* ``eager``     -- ``attn_implementation="eager"``;
* ``compile``   -- ``torch.compile`` of the default model (``--compile``; skipped with a reason on failure);
* ``fastpath``  -- the headline, created only through the user entry point:
  ``AutoModel.from_pretrained(checkpoint, fastpath={"defaults": {"dtype": --dtype}})`` (plus
  ``"device"`` when ``--device`` is given) and nothing else: not moved, not converted by hand, its
  routes chosen per call by the plan's fused encoder. The dtype is pinned so that every variant
  compares one precision; device, attention and the fused encoder come from the plan. Random
  weights are saved once as a checkpoint for it (``--model-path``: that checkpoint);
* ``route-<route>`` -- the route micro-benchmark (``--routes dense,nested,packed``): a copy of
  the ``sdpa`` model converted by hand with ``FusedEncoderPass`` (``--cache-qkv`` applies here)
  and one route forced per call. These compare the fused layers' routes with each other; they
  are not what a user gets (that is ``fastpath``).

Inputs: ``BxT`` batches whose lengths are drawn so the mean fill hits each target (at least one
full-length row), sent to each model's device. Outputs are checked against the default on real
tokens (max abs diff).

GPU (BERT-base shape, random weights, fp16)::

    python benchmarks/fused_encoder.py --device cuda --compile --routes dense,nested,packed \\
        --out benchmarks/results/fused_encoder_h100.json

CPU (MiniLM shape, fp32)::

    python benchmarks/fused_encoder.py --device cpu --shape minilm --batches 8x128,32x128,16x256 \\
        --out benchmarks/results/fused_encoder_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    "bert-base": {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072},
    "minilm": {"hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 6, "intermediate_size": 1536},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="default: cuda when available, else cpu (given: also pinned in the fastpath policy)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="config shape with random weights (default: bert-base on cuda, minilm on cpu)")
    p.add_argument("--model-path", default=None, help="load real BERT-family weights instead of a random config")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--batches", default="8x128,64x256,32x512", help="comma-separated BxT")
    p.add_argument("--fills", default="1.0,0.5,0.25", help="comma-separated target mean fill ratios")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 30 cuda, 5 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant and shape (default 5 cuda, 1 cpu)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the default model")
    p.add_argument("--no-eager", action="store_true", help="skip the eager variant")
    p.add_argument("--routes", default="", help="also time forced routes (route-<name>, the pass applied by hand "
                                                "to a copy of the sdpa model), e.g. dense,nested,packed")
    p.add_argument("--cache-qkv", action="store_true", help="route variants: convert with cache_qkv=True")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="free text stored in the report (conditions of the run)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    args.device_given = args.device is not None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def draw_lengths(batch: int, length: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Lengths in [1, length], one row full, mean fill as close to ``fill`` as integers allow
    (the suite's rule, :func:`transformers_fastpath.bench.models.draw_lengths`, drawing from ``gen``)."""
    from transformers_fastpath.bench.models import draw_lengths as suite_draw_lengths

    return torch.tensor(suite_draw_lengths(batch, length, fill, generator=gen), dtype=torch.long)


class Timer:
    """Times one call: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0


def forward_once(model: Any, ids: torch.Tensor, mask: torch.Tensor, runtime: Any, route: str | None) -> torch.Tensor:
    """One inference forward; ``runtime`` (a route variant's) gets the route to force, else it is left alone."""
    if runtime is not None and route is not None:
        runtime.route = route
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def cpu_model_name() -> str | None:
    """The CPU's marketing name (Linux), for the report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def fastpath_policy(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """The policy of the headline variant: the run's dtype (and ``--device`` when given); the rest is the plan's."""
    defaults: dict[str, Any] = {"dtype": str(dtype).replace("torch.", "")}
    if args.device_given:
        defaults["device"] = args.device
    return {"defaults": defaults}


def build_models(args: argparse.Namespace, dtype: torch.dtype,
                 workdir: Path) -> tuple[dict[str, Any], dict[str, str], Any, Any]:
    """(variant -> model, skipped variants, the config, the route model or None)."""
    from transformers import AutoModel, BertConfig, BertModel

    import transformers_fastpath as fp
    from transformers_fastpath.bench.workloads._common import enable_fastpath_kwarg
    from transformers_fastpath.passes.fused_encoder import FusedEncoderPass

    enable_fastpath_kwarg()  # fastpath= accepted even where the .pth bootstrap is not installed
    if args.model_path:
        path = args.model_path
        base = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, fastpath=False)
    else:
        shape = SHAPES[args.shape or ("bert-base" if args.device == "cuda" else "minilm")]
        torch.manual_seed(args.seed)
        config = BertConfig(**shape)
        base = BertModel._from_config(config, attn_implementation="sdpa", dtype=dtype)
        base.save_pretrained(workdir)  # the checkpoint the fastpath variant loads, as its user would
        path = str(workdir)
    base = base.to(args.device).eval()
    models: dict[str, Any] = {"sdpa": base}
    skipped: dict[str, str] = {}
    if not args.no_eager:
        eager = copy.deepcopy(base)
        eager.set_attn_implementation("eager")
        models["eager"] = eager
    if args.compile:
        try:
            models["compile"] = torch.compile(base)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            skipped["compile"] = f"{type(exc).__name__}: {exc}"
    fast = AutoModel.from_pretrained(path, fastpath=fastpath_policy(args, dtype))  # and no further call on it
    if fp.plan_of(fast) is None:
        sys.exit("fused_encoder: from_pretrained(..., fastpath=...) returned a model without a plan")
    models["fastpath"] = fast
    route_model = None
    if any(r for r in args.routes.split(",")):
        route_model = copy.deepcopy(base)
        FusedEncoderPass(cache_qkv=args.cache_qkv).apply(route_model, None)
    return models, skipped, base.config, route_model


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import transformers_fastpath as fp
    from transformers_fastpath.passes.fused_encoder import runtime_of

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    repeats = args.repeats or (30 if args.device == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (5 if args.device == "cuda" else 1)
    workdir = tempfile.TemporaryDirectory(prefix="fastpath-fused-encoder-")
    models, skipped, config, route_model = build_models(args, dtype, Path(workdir.name))
    fast = models["fastpath"]
    plan = fp.plan_of(fast)
    fast_device = str(next(fast.parameters()).device)
    fast_dtype = str(next(fast.parameters()).dtype).replace("torch.", "")
    if torch.device(fast_device).type != args.device:
        print(f"note: the fastpath model runs on {fast_device} (its plan's placement), the baselines on "
              f"{args.device}", flush=True)
    runtimes = {"fastpath": runtime_of(fast)}
    forced = [r for r in args.routes.split(",") if r]
    variants: list[tuple[str, Any, str | None]] = [(name, m, None) for name, m in models.items()]
    variants += [(f"route-{r}", route_model, r) for r in forced]
    for r in forced:
        runtimes[f"route-{r}"] = runtime_of(route_model)
    timer = Timer(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[dict[str, Any]] = []

    for spec in args.batches.split(","):
        batch, length = (int(x) for x in spec.lower().split("x"))
        seen_lengths: set[tuple[int, ...]] = set()
        for fill in (float(f) for f in args.fills.split(",")):
            lens = draw_lengths(batch, length, fill, gen)
            if tuple(lens.tolist()) in seen_lengths:  # batch 1 has one fill only
                continue
            seen_lengths.add(tuple(lens.tolist()))
            mask_cpu = (torch.arange(length)[None, :] < lens[:, None]).long()
            ids_cpu = torch.randint(5, config.vocab_size, (batch, length), generator=gen)
            inputs = {}  # model device -> (ids, mask): every model gets the inputs where it runs
            for _, model, _ in variants:
                where = str(next(model.parameters()).device)
                if where not in inputs:
                    inputs[where] = (ids_cpu.to(where), mask_cpu.to(where))
            keep = mask_cpu.bool()
            real_fill = float(keep.float().mean())
            outs: dict[str, torch.Tensor] = {}
            times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            routes_seen: dict[str, dict[str, int]] = {}
            failed: dict[str, str] = {}

            def call_of(name: str, model: Any, route: str | None) -> Any:
                ids, mask = inputs[str(next(model.parameters()).device)]
                return functools.partial(forward_once, model, ids, mask, runtimes.get(name), route)

            for name, model, route in variants:
                call = call_of(name, model, route)
                try:
                    for _ in range(max(warmup, 1)):
                        outs[name] = call()
                except Exception as exc:  # noqa: BLE001 - e.g. compile failing on this shape: reported
                    failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            live = [(n, m, r) for n, m, r in variants if n not in failed]
            for _ in range(repeats):
                for name, model, route in live:  # interleaved: drift hits every variant alike
                    runtime = runtimes.get(name)
                    before = dict(runtime.stats) if runtime is not None else {}
                    times[name].append(timer(call_of(name, model, route)))
                    if runtime is not None:
                        for key, count in runtime.stats.items():
                            if count != before.get(key, 0):
                                seen = routes_seen.setdefault(name, {})
                                seen[key] = seen.get(key, 0) + 1
            base_ms = statistics.median(times["sdpa"]) if times["sdpa"] else float("nan")
            ref = outs.get("sdpa")
            for name, _, _ in variants:
                row: dict[str, Any] = {"batch": batch, "length": length, "target_fill": fill,
                                       "fill": round(real_fill, 4), "real_tokens": int(keep.sum()),
                                       "variant": name}
                if name in failed:
                    row["skipped"] = failed[name]
                else:
                    ms = statistics.median(times[name])
                    row.update(median_ms=round(ms, 4), ratio_to_default=round(base_ms / ms, 3),
                               min_ms=round(min(times[name]), 4))
                    if ref is not None and name in outs:
                        diff = (outs[name].float().cpu() - ref.float().cpu())[keep].abs().max().item()
                        row["max_abs_diff_real_tokens"] = diff
                    if name in routes_seen:
                        row["routes"] = routes_seen[name]
                rows.append(row)
                shown = row.get("skipped") or (f"{row['median_ms']:9.2f} ms  x{row['ratio_to_default']:.2f}  "
                                               f"diff {row.get('max_abs_diff_real_tokens', float('nan')):.2e}  "
                                               f"{row.get('routes', '')}")
                print(f"{batch:>3}x{length:<4} fill {real_fill:4.2f}  {name:<18} {shown}", flush=True)

    workdir.cleanup()

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"CPU ({os.cpu_count()} cores) {platform.processor() or platform.machine()}".strip()
    return {
        "benchmark": "fused_encoder",
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model_name(),
        "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "dtype": str(dtype).replace("torch.", ""),
        "model": args.model_path or (args.shape or ("bert-base" if args.device == "cuda" else "minilm")),
        "repeats": repeats,
        "warmup": warmup,
        "cache_qkv": args.cache_qkv,
        "fastpath": {"created_by": f"AutoModel.from_pretrained(checkpoint, fastpath={fastpath_policy(args, dtype)!r})",
                     "device": fast_device, "dtype": fast_dtype,
                     "settings": {k: plan.settings[k].value for k in ("device", "dtype", "attn_implementation",
                                                                       "encoder_fastpath") if k in plan.settings},
                     "passes": {p.name: p.status for p in plan.passes}},
        "skipped_variants": skipped,
        "note": args.note,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
