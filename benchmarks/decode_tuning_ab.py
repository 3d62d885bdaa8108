"""A/B on the GPU: batch-1 greedy decode of ``from_pretrained(..., fastpath=True)`` with the decode
step compiled as today, and with inductor's ``coordinate_descent_tuning`` on while it compiles.

Both models are made through the user entry point and compiled once each; then their timed calls
alternate in one process (ratios only). Per variant: median decode ms/token over
``(time of 128 new tokens - time of 1) / 127``, and the share of the weight-streaming limit at the
bandwidth passed with ``--bandwidth`` (bytes/s; H100 SXM 3.35e12).

    python benchmarks/decode_tuning_ab.py --out benchmarks/results/decode_tuning_ab_h100.json
    python benchmarks/decode_tuning_ab.py --tiny --out /tmp/ab.json     # CPU smoke run (nothing compiles there)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=3.35e12)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script runs")
    args = parser.parse_args()

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
    for name, tuning in (("today", False), ("coordinate_descent_tuning", True)):
        inductor_config.coordinate_descent_tuning = tuning
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, fastpath=True)
        call(model, 128)
        call(model, 1)
        report["variants"][name] = {"compile_and_first_calls_s": time.perf_counter() - start, "decode_ms": []}
        models[name] = model
        inductor_config.coordinate_descent_tuning = False
    weights = weights_bytes(models["today"])
    report["weights_bytes"] = weights
    for _ in range(args.rounds):
        for name, model in models.items():
            decode = (call(model, 128) - call(model, 1)) / 127
            report["variants"][name]["decode_ms"].append(decode * 1e3)
        with open(args.out, "w") as f:  # after every round: a cut-off run keeps what it measured
            json.dump(report, f, indent=1)
    limit_ms = weights / args.bandwidth * 1e3
    for name, row in report["variants"].items():
        row["median_decode_ms"] = statistics.median(row["decode_ms"])
        row["share_of_weight_streaming"] = limit_ms / row["median_decode_ms"]
        print(f"{name}: {row['median_decode_ms']:.3f} ms/token, {row['share_of_weight_streaming']:.0%} of "
              f"{limit_ms:.3f} ms; compile + first calls {row['compile_and_first_calls_s']:.1f} s")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
