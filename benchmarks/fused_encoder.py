"""Benchmark the fused encoder pass against transformers' own forward, side by side in one process.

Variants (same weights, same inputs, interleaved repeats, medians):

* ``sdpa``      -- transformers default (``attn_implementation="sdpa"``): the baseline;
* ``eager``     -- ``attn_implementation="eager"``;
* ``compile``   -- ``torch.compile`` of the default model (``--compile``; skipped with a reason on failure);
* ``fastpath``  -- the converted model, routes chosen per call (``auto``);
* ``fastpath-<route>`` -- the converted model with one route forced (``--routes dense,nested,packed``).

Inputs: ``BxT`` batches whose lengths are drawn so the mean fill hits each target (at least one
full-length row). Outputs are checked against the default on real tokens (max abs diff).

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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
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
    p.add_argument("--routes", default="", help="also time forced routes, e.g. dense,nested,packed")
    p.add_argument("--cache-qkv", action="store_true", help="convert with cache_qkv=True")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="free text stored in the report (conditions of the run)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p.parse_args(argv)


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
    """One inference forward; ``runtime`` (the converted model's) gets the route to force, or auto."""
    if runtime is not None:
        runtime.route = route or "auto"
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


def build_models(args: argparse.Namespace, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, str], Any]:
    from transformers import AutoModel, BertConfig, BertModel

    from transformers_fastpath.passes.fused_encoder import FusedEncoderPass

    if args.model_path:
        base = AutoModel.from_pretrained(args.model_path, attn_implementation="sdpa", dtype=dtype)
    else:
        shape = SHAPES[args.shape or ("bert-base" if args.device == "cuda" else "minilm")]
        torch.manual_seed(args.seed)
        config = BertConfig(**shape)
        base = BertModel._from_config(config, attn_implementation="sdpa", dtype=dtype)
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
    fast = copy.deepcopy(base)
    FusedEncoderPass(cache_qkv=args.cache_qkv).apply(fast, None)
    models["fastpath"] = fast
    return models, skipped, base.config


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    from transformers_fastpath.passes.fused_encoder import runtime_of

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    repeats = args.repeats or (30 if args.device == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (5 if args.device == "cuda" else 1)
    models, skipped, config = build_models(args, dtype)
    fast_runtime = runtime_of(models["fastpath"])
    forced = [r for r in args.routes.split(",") if r]
    variants: list[tuple[str, Any, str | None]] = [(name, m, None) for name, m in models.items()]
    variants += [(f"fastpath-{r}", models["fastpath"], r) for r in forced]
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
            mask = (torch.arange(length)[None, :] < lens[:, None]).long().to(args.device)
            ids = torch.randint(5, config.vocab_size, (batch, length), generator=gen).to(args.device)
            keep = mask.bool()
            real_fill = float(keep.float().mean())
            outs: dict[str, torch.Tensor] = {}
            times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            routes_seen: dict[str, dict[str, int]] = {}
            failed: dict[str, str] = {}

            fast_model = models["fastpath"]
            for name, model, route in variants:
                call = functools.partial(forward_once, model, ids, mask,
                                         fast_runtime if model is fast_model else None, route)
                try:
                    for _ in range(max(warmup, 1)):
                        outs[name] = call()
                except Exception as exc:  # noqa: BLE001 - e.g. compile failing on this shape: reported
                    failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            live = [(n, m, r) for n, m, r in variants if n not in failed]
            for _ in range(repeats):
                for name, model, route in live:  # interleaved: drift hits every variant alike
                    runtime = fast_runtime if model is fast_model else None
                    before = dict(runtime.stats) if runtime is not None else {}
                    times[name].append(timer(functools.partial(forward_once, model, ids, mask, runtime, route)))
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
                        diff = (outs[name].float() - ref.float())[keep].abs().max().item()
                        row["max_abs_diff_real_tokens"] = diff
                    if name in routes_seen:
                        row["routes"] = routes_seen[name]
                rows.append(row)
                shown = row.get("skipped") or (f"{row['median_ms']:9.2f} ms  x{row['ratio_to_default']:.2f}  "
                                               f"diff {row.get('max_abs_diff_real_tokens', float('nan')):.2e}  "
                                               f"{row.get('routes', '')}")
                print(f"{batch:>3}x{length:<4} fill {real_fill:4.2f}  {name:<18} {shown}", flush=True)

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
