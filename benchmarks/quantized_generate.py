"""Quantized generation on one GPU: bf16 vs bnb nf4 vs bnb int8 vs torchao int8 weight-only, via the policy.

For each variant the same checkpoint (random weights of the 0.85B Llama shape: hidden 2048,
16 layers, 32 heads, 8 KV heads, intermediate 5632, vocab 32000) is loaded through
``from_pretrained`` with a fastpath policy ``quantization = <method>`` (and
``quantization_fallback = "error"``, so a method that cannot run is reported as skipped with
its reason, never silently timed unquantized). Generation settings are held fixed across
variants (``compile = false``, ``static_cache = false``, sdpa) so only the weights differ. The
policy names the device (``device = "cuda:0"`` on a GPU); the model is used as ``from_pretrained``
returns it, never moved by hand (the prompts go to its device, which the report records).

Reported per variant: ``model.get_memory_footprint()``, ``torch.cuda.max_memory_allocated``
(load + generation peak), and greedy-generation tokens/s at each batch size (prompt 128 tokens,
128 new tokens; median of ``--repeats`` after a warm-up).

GPU::

    python benchmarks/quantized_generate.py --out benchmarks/results/quantized_generate_h100.json

CPU smoke check (tiny model, seconds)::

    python benchmarks/quantized_generate.py --tiny --out /tmp/quantized_generate_tiny.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODEL_085B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                  tie_word_embeddings=False)
MODEL_TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
VARIANTS = {  # name -> policy quantization value
    "bf16": "none",
    "bnb-nf4": "bnb-nf4",
    "bnb-int8": "bnb-int8",
    "torchao-int8": "torchao-int8",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, short runs: a CPU smoke check")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--model-path", default=None, help="a real Llama-family checkpoint instead of random weights")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16; tiny 1,2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; tiny 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per batch size (default 3; tiny 1)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,16")).split(",")]
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def versions() -> dict[str, str | None]:
    """The library versions every bench report carries (this checkout's own version even when it
    is on PYTHONPATH rather than installed, as on the GPU machine)."""
    from transformers_fastpath.bench.runner import distribution_version, environment

    return {**environment()["versions"], "torchao": distribution_version("torchao")}


def make_checkpoint(args: argparse.Namespace, directory: Path) -> Path:
    """Random weights of the benchmark shape, saved in bf16 (so every variant loads the same bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(MODEL_TINY if args.tiny else MODEL_085B), bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    return directory


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_generate(model: Any, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            sync(args.device)
            times.append(time.perf_counter() - start)
    new = out.shape[1] - args.prompt_len
    median = statistics.median(times)
    return {"batch": batch, "new_tokens": int(new), "seconds": times, "median_s": median,
            "tokens_per_s": batch * new / median, "first_tokens": out[0, args.prompt_len:args.prompt_len + 8].tolist()}


def run_variant(name: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import transformers_fastpath as fp
    from transformers_fastpath.loading.quantization import QuantizationUnavailable

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    policy = {"defaults": {"quantization": VARIANTS[name], "quantization_fallback": "error", "dtype": dtype,
                           "attn_implementation": "sdpa", "compile": False, "static_cache": False,
                           "device": "cuda:0" if args.device == "cuda" else "cpu"}}
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    try:
        with fp.enabled(policy):
            model = AutoModelForCausalLM.from_pretrained(path)
    except QuantizationUnavailable as exc:
        return {"variant": name, "skipped": f"{exc.reason} (fix: {exc.fix})"}
    except ImportError as exc:
        return {"variant": name, "skipped": f"{type(exc).__name__}: {exc}"}
    plan = fp.plan_of(model)  # the model is used as from_pretrained returned it: never moved by hand
    result: dict[str, Any] = {
        "variant": name,
        "device": str(model.device),
        "quantization": plan["quantization"] if plan else None,
        "plan_reason": plan.settings["quantization"].reason if plan else None,
        "footprint_bytes": int(model.get_memory_footprint()),
        # get_memory_footprint() counts a torchao tensor subclass at its nominal dtype; the
        # allocator's count is what the weights really take on the device.
        **({"device_bytes": int(torch.cuda.memory_allocated() - before)} if args.device == "cuda" else {}),
        "runs": [time_generate(model, args, b) for b in args.batches],
    }
    if args.device == "cuda":
        result["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    del model
    return result


def summarize(results: list[dict[str, Any]]) -> list[str]:
    base = next((r for r in results if r["variant"] == "bf16" and "runs" in r), None)
    lines = []
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['variant']:<14} skipped: {r['skipped']}")
            continue
        key = "device_bytes" if "device_bytes" in r and base and "device_bytes" in base else "footprint_bytes"
        foot = r[key] / 2**30
        rel = f" ({r[key] / base[key]:.2f}x bf16, {key})" if base else ""
        speeds = []
        for run in r["runs"]:
            ref = next((x for x in (base or {}).get("runs", []) if x["batch"] == run["batch"]), None)
            ratio = f" {run['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
            speeds.append(f"b{run['batch']}: {run['tokens_per_s']:.1f} tok/s{ratio}")
        lines.append(f"{r['variant']:<14} {foot:.2f} GiB{rel}; " + "; ".join(speeds))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("quantized_generate: --device cuda but no CUDA device; use --device cpu (with --tiny)", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "benchmark": "quantized_generate",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k != "model_path"} | {"model_path": args.model_path},
        "model": "tiny" if args.tiny else ("checkpoint" if args.model_path else "llama-0.85B random weights"),
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="fastpath-qbench-") as tmp:
        path = Path(args.model_path) if args.model_path else make_checkpoint(args, Path(tmp))
        for name in args.variants:
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            report["results"].append(run_variant(name, path, args))
    report["summary"] = summarize(report["results"])
    print("\n".join(report["summary"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
