"""A/B on the GPU: batch-1 greedy decode of ``from_pretrained(..., fastpath=True)`` with the decode
step compiled under different inductor settings, and where a decode step's GPU time goes.

Each variant's model is made through the user entry point and its decode step compiled once, with
the variant's inductor settings patched in while it compiles; then the timed calls of all variants
alternate in one process (ratios only). Per variant: median decode ms/token over
``(time of 128 new tokens - time of 1) / 127``, the share of the weight-streaming limit at
``--bandwidth`` (bytes/s; by default the card's published figure: H100 SXM 3.35e12, H200
4.8e12), the GPU memory the variant's model and compiled step added, and, from a
``torch.profiler`` trace of one 128-token and one 1-token call, the kernels per decode step and
their summed GPU time (the top kernels by time too).

Two limits are reported: all parameter bytes, and the bytes one decode step must read (the input
embedding table is read one row per token, so it is left out of the second).

    python benchmarks/decode_step_ab.py --out benchmarks/results/decode_step_ab_h100.json
    python benchmarks/decode_step_ab.py --tiny --out /tmp/ab.json     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

# Inductor settings per variant, patched in while the variant's decode step compiles.
VARIANTS: dict[str, dict[str, Any]] = {
    "today": {},
    "coordinate_descent_tuning": {"coordinate_descent_tuning": True},
    "freezing": {"freezing": True},
    "freezing+coordinate_descent_tuning": {"freezing": True, "coordinate_descent_tuning": True},
    # Triton GEMM templates autotuned against cuBLAS for the M=1 products (minutes of compile: opt-in)
    "max_autotune_gemm": {"max_autotune_gemm": True},
}
DEFAULT_VARIANTS = ("today", "coordinate_descent_tuning", "freezing", "freezing+coordinate_descent_tuning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="bytes/s; default: the card's published figure (H100 SXM 3.35e12, H200 4.8e12)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script runs")
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    import torch
    import torch._inductor.config as inductor_config
    from transformers import AutoModelForCausalLM

    from transformers_fastpath.bench.models import LLAMA_085B, LLAMA_TINY, llama_checkpoint, weights_bytes
    from transformers_fastpath.interception.patches import patch_all

    patch_all()  # from_pretrained(..., fastpath=...) without the .pth start-up hook
    shape = LLAMA_TINY if args.tiny else LLAMA_085B
    path = str(llama_checkpoint(shape, on_gpu=not args.tiny))
    ids = torch.randint(3, shape["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(0))
    on_gpu = torch.cuda.is_available() and not args.tiny
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if args.bandwidth is None:
        name = torch.cuda.get_device_name(0) if on_gpu else ""
        args.bandwidth = 4.8e12 if "H200" in name else 3.35e12
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__,
                              "prompt_tokens": 128, "new_tokens": 128, "bandwidth_bytes_per_s": args.bandwidth,
                              "variants": {}}

    def call(model: Any, new: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                           max_new_tokens=new, do_sample=False, pad_token_id=0)  # no EOS: all new tokens
        sync()
        return time.perf_counter() - start

    models: dict[str, Any] = {}
    outputs: dict[str, list[int]] = {}
    for name in args.variants.split(","):
        settings = VARIANTS[name]
        held_before = torch.cuda.memory_allocated() if on_gpu else 0
        start = time.perf_counter()
        try:
            with inductor_config.patch(settings):
                model = AutoModelForCausalLM.from_pretrained(path, fastpath=True)
                call(model, 128)
                call(model, 1)
        except Exception as exc:  # one variant failing to compile is a result, not the end of the run
            report["variants"][name] = {"settings": settings, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        row = {"settings": settings, "compile_and_first_calls_s": time.perf_counter() - start, "decode_ms": []}
        if on_gpu:
            # this variant's weights, cache and graph pools (freezing keeps folded copies of weights)
            row["gpu_memory_added_bytes"] = torch.cuda.memory_allocated() - held_before
        report["variants"][name] = row
        models[name] = model
        with torch.inference_mode():
            out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                 max_new_tokens=32, do_sample=False, pad_token_id=0)
        outputs[name] = out[0, 128:].tolist()
    if not models:  # every variant failed to compile: the errors are the result
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        raise SystemExit("; ".join(f"{name}: {row['error'][:200]}" for name, row in report["variants"].items()))
    first = next(iter(outputs.values()))
    for name, tokens in outputs.items():
        report["variants"][name]["tokens_equal_first_variant"] = tokens == first
    weights = weights_bytes(next(iter(models.values())))
    embedding = next(iter(models.values())).get_input_embeddings().weight
    streamed = weights - embedding.numel() * embedding.element_size()
    report["weights_bytes"] = weights
    report["bytes_read_per_decode_step"] = streamed
    for _ in range(args.rounds):
        for name, model in models.items():
            decode = (call(model, 128) - call(model, 1)) / 127
            report["variants"][name]["decode_ms"].append(decode * 1e3)
        with open(args.out, "w") as f:  # after every round: a cut-off run keeps what it measured
            json.dump(report, f, indent=1)
    if on_gpu:
        for name, model in models.items():
            try:
                report["variants"][name]["profile"] = _kernels_per_step(model, call)
            except Exception as exc:  # the timings stand without it
                report["variants"][name]["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    for name, row in report["variants"].items():
        if "error" in row:
            print(f"{name}: failed: {row['error'][:300]}")
            continue
        row["median_decode_ms"] = statistics.median(row["decode_ms"])
        row["share_of_weight_streaming"] = weights / args.bandwidth * 1e3 / row["median_decode_ms"]
        row["share_of_bytes_read"] = streamed / args.bandwidth * 1e3 / row["median_decode_ms"]
        profile = row.get("profile", {})
        print(f"{name}: {row['median_decode_ms']:.3f} ms/token, {row['share_of_weight_streaming']:.0%} of all weights' "
              f"streaming, {row['share_of_bytes_read']:.0%} of the bytes read per step; compile + first calls "
              f"{row['compile_and_first_calls_s']:.1f} s; kernels/step {profile.get('kernels_per_step', '-')}, "
              f"GPU ms/step {profile.get('gpu_ms_per_step', '-')}; same tokens {row['tokens_equal_first_variant']}")
        for kernel in profile.get("top", [])[:8]:
            print(f"    {kernel['us_per_step']:8.1f} us/step  x{kernel['count_per_step']:5.1f}  {kernel['name'][:110]}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _kernels_per_step(model: Any, call: Any) -> dict[str, Any]:
    """GPU kernels of one decode step: a 128-token call's trace less a 1-token call's, over 127 steps."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(new: int) -> dict[str, tuple[int, float]]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call(model, new)
        table: dict[str, tuple[int, float]] = {}
        for event in prof.events():
            if not str(event.device_type).endswith("CUDA"):  # kernels and copies on the GPU only
                continue
            count, total = table.get(event.name, (0, 0.0))
            table[event.name] = (count + 1, total + event.time_range.elapsed_us())
        return table

    kernels(2)  # the profiler's own first-use cost stays out of the trace
    long, short = kernels(128), kernels(1)
    per_step = []
    for name, (count, total) in long.items():
        base_count, base_total = short.get(name, (0, 0.0))
        if count > base_count:
            per_step.append({"name": name, "count_per_step": (count - base_count) / 127,
                             "us_per_step": (total - base_total) / 127})
    per_step.sort(key=lambda row: -row["us_per_step"])
    return {"kernels_per_step": round(sum(row["count_per_step"] for row in per_step), 1),
            "gpu_ms_per_step": round(sum(row["us_per_step"] for row in per_step) / 1e3, 4), "top": per_step[:20]}


if __name__ == "__main__":
    main()
