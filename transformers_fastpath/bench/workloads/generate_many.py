"""``generate-many``: greedy generation for many prompts of varied lengths.

GPU: the 0.85B Llama shape (random bf16 weights), 256 prompts of 16-512 tokens, 128 new tokens.
CPU: a small Llama, 32 prompts of 8-64 tokens, 16 new tokens. ``--quick``: a tiny Llama, 6
prompts. The peers (default, the expert's dtype and SDPA, transformers' static-cache
compile) run batches of 16 in the caller's order, each left-padded to its longest
prompt (what ``pipeline("text-generation", batch_size=16)`` runs per batch); fastpath runs
``fp.generate_many`` (length-sorted batches of 16) on a model from ``from_pretrained(...,
fastpath=True)``. Per variant: generated tokens/s over the whole list.
"""

from __future__ import annotations

from typing import Any

from ..runner import Bench, Variant
from ._common import dtype_name, plan_summary
from ._generate import build_causal_variants, llama_setup
from ._workload import Workload

BATCH = 16


def _in_order(model: Any, prompts: list[Any], new_tokens: int, batch: int) -> list[Any]:
    """``model.generate`` over batches of ``batch`` prompts in the given order, left-padded; per-prompt new tokens."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    results: list[Any] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        # pad_sequence pads on the right: pad the reversed rows, then reverse back (left padding).
        ids = pad_sequence([p.flip(0) for p in chunk], batch_first=True, padding_value=0).flip(1)
        mask = pad_sequence([torch.ones_like(p).flip(0) for p in chunk], batch_first=True).flip(1)
        with torch.inference_mode():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        results.extend(out[:, ids.shape[1]:].cpu())
    return results


def run(bench: Bench) -> None:
    """Default, transformers' static-cache compile (GPU) and fastpath over one list of prompts."""
    import torch

    import transformers_fastpath as fp

    setup = llama_setup(bench)
    device = bench.device
    count = int(bench.pick("prompts", gpu=256, cpu=32, quick=6))
    low, high = bench.pick("lengths", gpu=[16, 512], cpu=[8, 64], quick=[2, 8])
    new_tokens = int(bench.pick("new_tokens", gpu=128, cpu=16, quick=3))
    batch = int(bench.pick("batch", gpu=BATCH, cpu=BATCH, quick=2))
    half = torch.bfloat16 if bench.on_gpu else torch.float32
    bench.define("default", f"AutoModelForCausalLM.from_pretrained(path) moved to {device}; model.generate over "
                            f"batches of {batch} prompts in the list's order, each left-padded to its longest "
                            "(what pipeline('text-generation', batch_size=...) runs per batch)")
    bench.define("expert", f"from_pretrained(path, dtype={str(half).replace('torch.', '')}, "
                           "attn_implementation='sdpa'); the same batches in order, dynamic cache")
    bench.define("compile", "from_pretrained(path, dtype=..., attn_implementation='sdpa') with "
                            "generation_config.cache_implementation = 'static' (transformers' compiled decode step); "
                            "the same batches in order")
    bench.define("fastpath", f"from_pretrained(path, fastpath=True) and fp.generate_many(model, prompts, "
                             f"batch_size={batch}, max_new_tokens=N, do_sample=False): length-sorted batches")
    if not bench.on_gpu:
        bench.omit("compile", "transformers compiles generate only on accelerators")

    models = build_causal_variants(bench, setup)
    models = {k: m for k, m in models.items() if m is not None}
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(low), int(high) + 1, (count,), generator=gen)
    prompts = [torch.randint(3, setup.shape["vocab_size"], (int(n),), generator=gen) for n in lengths]

    def fastpath_call() -> list[Any]:
        out = fp.generate_many(models["fastpath"], prompts, batch_size=batch, max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
        return [o[len(p):] for o, p in zip(out, prompts)]

    calls = {k: (lambda m=m: _in_order(m, prompts, new_tokens, batch)) for k, m in models.items() if k != "fastpath"}
    if "fastpath" in models:
        calls["fastpath"] = fastpath_call
    dtypes = {k: dtype_name(m) for k, m in models.items()}

    def check(variant: str, default_out: Any, out: Any) -> dict[str, Any]:
        same = sum(bool(torch.equal(a, b)) for a, b in zip(default_out, out))
        first = sum(bool(a[:1].equal(b[:1])) for a, b in zip(default_out, out))
        exact = dtypes[variant] == dtypes["default"] == "float32"
        passed = len(out) == len(default_out) and (same == len(out) if exact else first >= 0.9 * len(out))
        return {"passed": passed, "criterion": "identical tokens (float32)" if exact
                else "first new token identical for 90% of prompts (half precision: later tokens split at ties)",
                "identical_prompts": same, "same_first_token": first, "prompts": len(out)}

    bench.config.update({"model": setup.shape_name, "prompts": count, "prompt_lengths": [int(low), int(high)],
                         "new_tokens": new_tokens, "batch": batch, "dtypes": dtypes})
    if "fastpath" in models:
        bench.config["fastpath_plan"] = plan_summary(models["fastpath"])
    bench.measure(f"{count} prompts", {k: Variant(fn) for k, fn in calls.items()}, check=check,
                  params={"prompts": count, "lengths": [int(low), int(high)], "new_tokens": new_tokens,
                          "batch": batch},
                  work=count * new_tokens, work_unit="tokens")


WORKLOAD = Workload(
    "generate-many",
    "greedy generate for many prompts of varied lengths (GPU: 256 prompts of 16-512 tokens, 128 new, 0.85B Llama "
    "shape; CPU: 32 of 8-64, 16 new), batches of 16 in order against fp.generate_many",
    run,
)
