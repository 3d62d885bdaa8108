"""Benchmark fastpath generate (static bucketed KV cache + transformers' compile) against default generate.

Same weights, same prompts, one process. The random weights are saved once as a checkpoint
(in ``--dtype``) and each variant loads it the way its user would:

* ``default``  -- ``AutoModelForCausalLM.from_pretrained(path, dtype=--dtype)``, moved to
  ``--device`` by hand; transformers' ``generate`` with its default dynamic cache;
* ``fastpath`` -- ``from_pretrained(path, fastpath=policy)`` and nothing else: not moved, not
  applied again. The policy pins ``dtype`` to ``--dtype`` (so both variants run the same
  weights), ``device`` when ``--device`` is given, and ``compile`` / ``static_cache`` when asked;
  everything else is the plan for this machine. Prompts go to ``model.device``.

Per batch size and variant it reports:

* steady-state tokens/s: median over ``--repeats`` full calls after warm-up;
* time to first token: median of ``generate(max_new_tokens=1)`` (prefill + first token);
* decode ms/token: (full call - first token) / (new tokens - 1);
* one-time cost: first call minus the steady median (torch.compile, CUDA graph capture);
* greedy outputs vs the default: token ids compared position by position (bf16 random weights
  give near-uniform logits, so a kernel change can flip a near-tie: the match is reported, not
  asserted);
* batch-1 decode against the weight-streaming limit: parameter bytes / HBM bandwidth per token
  (3.35e12 B/s for an H100 SXM).

GPU (0.85B Llama shape, random bf16 weights, prompt 128, 128 new tokens, batch 1 and 16; about
4-6 minutes, most of it compiling)::

    python benchmarks/generate.py --out benchmarks/results/generate_h100.json

CPU smoke check (tiny config, fp32, static cache forced on, a few tokens; seconds)::

    python benchmarks/generate.py --tiny --out /tmp/generate_tiny.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmarks.generate")

# The 0.85B Llama shape used in DESIGN.md's measurements.
LLAMA_085B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=200, max_position_embeddings=256)
H100_HBM_BYTES_PER_S = 3.35e12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke check: tiny config, fp32, static cache forced on, few tokens")
    p.add_argument("--device", default=None,
                   help="default: cuda when available, else cpu (given: also pinned in the fastpath policy)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16; tiny 1,4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per call (default 128; tiny 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5; tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the policy's compile setting (auto: fastpath's choice for this machine)")
    p.add_argument("--hbm-bandwidth", type=float, default=H100_HBM_BYTES_PER_S,
                   help="bytes/s for the weight-streaming limit (H100 SXM: 3.35e12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    args.device_given = args.device is not None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") and not args.tiny else "float32")
    args.batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,16")).split(",")]
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.repeats = args.repeats or (2 if args.tiny else 5)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode ms/token needs one decode step)")
    if min(args.batches) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("batch sizes and --repeats must be >= 1, --warmup >= 0")
    return args


def save_checkpoint(args: argparse.Namespace, directory: Path) -> Path:
    """A Llama-shape checkpoint with random weights in ``--dtype``, saved to ``directory`` (no end-of-sequence
    token, so every call generates exactly ``--new-tokens``). Built on the device, then freed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY if args.tiny else LLAMA_085B
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


def load_default(path: Path, args: argparse.Namespace) -> torch.nn.Module:
    """The baseline: plain transformers in ``--dtype``, moved to ``--device`` by hand (as its user does)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), fastpath=False).to(args.device)


def load_fastpath(path: Path, args: argparse.Namespace) -> torch.nn.Module:
    """The fastpath variant: ``from_pretrained(path, fastpath=policy)`` and no further call on the model."""
    from transformers import AutoModelForCausalLM

    import transformers_fastpath as fp

    model = AutoModelForCausalLM.from_pretrained(path, fastpath=fastpath_policy(args))
    if fp.plan_of(model) is None:
        sys.exit("generate: from_pretrained(..., fastpath=...) was not intercepted: the .pth bootstrap is not "
                 "installed in this interpreter's site-packages (see benchmarks/gpu_env.sh)")
    return model


def fastpath_policy(args: argparse.Namespace) -> dict[str, Any]:
    defaults: dict[str, Any] = {"dtype": args.dtype}  # the same weights as the default variant
    if args.device_given:
        defaults["device"] = args.device
    if args.tiny:
        defaults["static_cache"] = True  # the GPU path, forced on the CPU
    if args.compile != "auto":
        defaults["compile"] = args.compile == "on"
    return {"defaults": defaults}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def measure(model: torch.nn.Module, prompts: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """First call, warm-up, steady full calls and time-to-first-token calls for one variant and batch.

    ``prompts`` go to the model's device (the fastpath model is wherever its plan put it)."""
    device = str(model.device)
    prompts = prompts.to(model.device)
    mask = torch.ones_like(prompts)

    def run(new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)

    first_s, output = _timed(lambda: run(args.new_tokens), device)
    for _ in range(args.warmup):
        run(args.new_tokens)
    run(1)  # warm the first-token path too
    full = [_timed(lambda: run(args.new_tokens), device)[0] for _ in range(args.repeats)]
    first_token = [_timed(lambda: run(1), device)[0] for _ in range(args.repeats)]
    steady_s = statistics.median(full)
    ttft_s = statistics.median(first_token)
    batch = prompts.shape[0]
    return {
        "batch": batch,
        "device": device,
        "dtype": str(model.dtype).replace("torch.", ""),
        "tokens_per_s": batch * args.new_tokens / steady_s,
        "steady_s": steady_s,
        "ttft_ms": ttft_s * 1e3,
        "decode_ms_per_token": max(steady_s - ttft_s, 0.0) / (args.new_tokens - 1) * 1e3,
        "first_call_s": first_s,
        "one_time_cost_s": max(first_s - steady_s, 0.0),
        "runs_s": full,
        "_output": output.cpu(),
    }


def compare(reference: torch.Tensor, candidate: torch.Tensor, prompt_len: int) -> dict[str, Any]:
    """Token-id agreement of the generated parts."""
    ref, cand = reference[:, prompt_len:], candidate[:, prompt_len:]
    if ref.shape != cand.shape:
        return {"identical": False, "matching_fraction": 0.0,
                "note": f"shapes {tuple(ref.shape)} vs {tuple(cand.shape)}"}
    equal = ref == cand
    mismatched_rows = (~equal).any(dim=1)
    first = [int((~row).nonzero()[0]) if bool((~row).any()) else None for row in equal]
    return {
        "identical": bool(equal.all()),
        "matching_fraction": float(equal.float().mean()),
        "rows_identical": int((~mismatched_rows).sum()),
        "rows": int(equal.shape[0]),
        "first_mismatch_per_row": first,
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        key = param.data_ptr()
        if key not in seen:
            seen.add(key)
            total += param.numel() * param.element_size()
    return total


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import transformers_fastpath as fp

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    return {
        "device": device_name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "transformers-fastpath": fp.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers_fastpath as fp

    if args.tiny:
        torch.set_num_threads(1)  # a tiny model runs fastest, and steadiest, on one thread
    generator = torch.Generator().manual_seed(args.seed)
    vocab = (TINY if args.tiny else LLAMA_085B)["vocab_size"]
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=generator) for b in args.batches}

    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="fastpath-generate-") as tmp:
        path = save_checkpoint(args, Path(tmp))
        model = load_default(path, args)
        for batch in args.batches:
            logger.info("default generate, batch %d ...", batch)
            row = measure(model, prompts[batch], args)
            outputs[("default", batch)] = row.pop("_output")
            rows.append({"variant": "default", **row})
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

        model = load_fastpath(path, args)
    logger.info("fastpath model on %s, %s", model.device, model.dtype)
    for batch in args.batches:
        logger.info("fastpath generate, batch %d ...", batch)
        row = measure(model, prompts[batch], args)
        outputs[("fastpath", batch)] = row.pop("_output")
        row["match_vs_default"] = compare(outputs[("default", batch)], outputs[("fastpath", batch)], args.prompt_len)
        rows.append({"variant": "fastpath", **row})
    plan = fp.plan_of(model)  # outcomes recorded during the calls (a compile failure, say)

    by = {(r["variant"], r["batch"]): r for r in rows}
    for batch in args.batches:
        by[("fastpath", batch)]["speedup_tokens_per_s"] = (by[("fastpath", batch)]["tokens_per_s"]
                                                           / by[("default", batch)]["tokens_per_s"])
    nbytes = weight_bytes(model)
    limit_ms = nbytes / args.hbm_bandwidth * 1e3
    streaming: dict[str, Any] = {"weight_bytes": nbytes, "bandwidth_bytes_per_s": args.hbm_bandwidth,
                                 "limit_ms_per_token": limit_ms}
    if 1 in args.batches:
        for variant in ("default", "fastpath"):
            decode = by[(variant, 1)]["decode_ms_per_token"]
            streaming[f"{variant}_batch1_decode_ms_per_token"] = decode
            streaming[f"{variant}_batch1_fraction_of_limit"] = limit_ms / decode if decode > 0 else None

    report = {
        **environment(args),
        "model": {"shape": "tiny" if args.tiny else "llama-0.85B", "config": TINY if args.tiny else LLAMA_085B,
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": args.dtype},
        "request": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "warmup": args.warmup, "greedy": True},
        "policy": fastpath_policy(args),
        "plan": {"settings": {k: plan.to_dict()["settings"].get(k)
                              for k in ("device", "dtype", "attn_implementation", "sdpa_backends", "static_cache",
                                        "compile", "decode_loop")},
                 "passes": [p.to_dict() for p in plan.passes], "notes": list(plan.notes)},
        "weight_streaming": streaming,
        "rows": rows,
    }
    print(render(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['device']} | torch {report['versions']['torch']} | transformers "
             f"{report['versions']['transformers']} | {report['model']['shape']} {report['model']['dtype']} | "
             f"prompt {report['request']['prompt_len']}, {report['request']['new_tokens']} new tokens"]
    header = f"{'variant':<9} {'device':<7} {'batch':>5} {'tok/s':>9} {'ttft ms':>8} {'decode ms/tok':>13} " \
             f"{'one-time s':>10} {'speedup':>7}  match"
    lines += [header, "-" * len(header)]
    for row in report["rows"]:
        match = row.get("match_vs_default")
        shown = "" if match is None else ("identical" if match["identical"]
                                          else f"{match['matching_fraction']:.1%} tokens")
        speedup = f"{row['speedup_tokens_per_s']:.2f}x" if "speedup_tokens_per_s" in row else ""
        lines.append(f"{row['variant']:<9} {row.get('device', '?'):<7} {row['batch']:>5} {row['tokens_per_s']:>9.1f} "
                     f"{row['ttft_ms']:>8.1f} "
                     f"{row['decode_ms_per_token']:>13.2f} {row['one_time_cost_s']:>10.1f} {speedup:>7}  {shown}")
    ws = report["weight_streaming"]
    size = f"{ws['weight_bytes'] / 1e9:.2f} GB" if ws["weight_bytes"] >= 1e8 else f"{ws['weight_bytes'] / 1e6:.2f} MB"
    lines.append(f"weight-streaming limit: {size} / {ws['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s = "
                 f"{ws['limit_ms_per_token']:.4f} ms/token")
    for variant in ("default", "fastpath"):
        fraction = ws.get(f"{variant}_batch1_fraction_of_limit")
        if fraction is not None:
            lines.append(f"  {variant} batch-1 decode: {ws[f'{variant}_batch1_decode_ms_per_token']:.3f} ms/token "
                         f"= {fraction:.1%} of the limit")
    for status in report["plan"]["passes"]:
        reason = f" ({status['reason']})" if status["reason"] else ""
        lines.append(f"pass {status['name']}: {status['status']}{reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
