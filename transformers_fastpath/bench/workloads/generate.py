"""``generate``: each decoding mode with default, expert, transformers' static-cache compile and fastpath.

GPU: the 0.85B Llama shape (random bf16 weights), prompt 128, 128 new tokens, batch 1 and 16,
modes greedy, ``min_new_tokens``, ``repetition_penalty`` and sampling (temperature 0.7, top-p
0.9). CPU: a small Llama, prompt 32, 32 new tokens, batch 1 and 4, greedy and sampling.
``--quick``: a tiny Llama. ``--set modes=greedy,sampling`` picks modes. Per variant: tokens/s,
time to first token (a one-token call), decode ms/token, and the one-time cost of the first call
(compilation, CUDA graph capture).
"""

from __future__ import annotations

from typing import Any

from ..checks import compare_greedy, is_half
from ..runner import Bench
from ._common import plan_summary
from ._generate import MODES, build_causal_variants, llama_setup, measure_generate
from ._workload import Workload


def run(bench: Bench) -> None:
    """Four variants of the same checkpoint, one case per batch size."""
    import torch

    setup = llama_setup(bench)
    setup.choose_modes(bench, default=list(MODES) if bench.on_gpu and not bench.quick else ["greedy", "sampling"])
    device = bench.device
    half = torch.bfloat16 if bench.on_gpu else torch.float32
    placed: dict[str, Any] = {"device_map": {"": device}} if bench.on_gpu else {}
    bench.define("default", "AutoModelForCausalLM.from_pretrained(path) with no settings (the checkpoint's bf16, "
                            f"transformers' default attention) moved to {device} by hand; generate(max_new_tokens=N, "
                            "the mode's settings) with its default dynamic cache")
    bench.define("expert", f"from_pretrained(path, dtype={str(half).replace('torch.', '')}, "
                           f"attn_implementation='sdpa'{', device_map=' + repr(device) if placed else ''}); "
                           "dynamic cache")
    bench.define("compile", "expert + generation_config.cache_implementation = 'static': transformers' documented "
                            "static-cache recipe, which compiles the decode step (mode reduce-overhead, CUDA graphs)")
    bench.define("fastpath", "from_pretrained(path, fastpath=True) and nothing else (not moved, not applied again): "
                             "its plan's device, dtype, attention, static cache and compile; prompts go to "
                             "model.device")
    if not bench.on_gpu:
        bench.omit("compile", "transformers compiles generate only on accelerators (its auto-compile criteria); "
                              "on a CPU the static cache stays uncompiled")

    models = build_causal_variants(bench, setup)
    bench.config.update(setup.config())
    if models["fastpath"] is not None:
        bench.config["fastpath_plan"] = plan_summary(models["fastpath"])

    def make_check(ids: Any, mask: Any, dtypes: dict[str, str], reference: Any) -> Any:
        def check(variant: str, default_out: Any, out: Any) -> dict[str, Any]:
            sequences, logits = reference()
            result = compare_greedy(sequences, logits, out, setup.prompt_len,
                                    half=is_half(dtypes["default"], dtypes[variant]))
            result["reference_reproducible"] = bool((sequences == default_out.cpu()).all())
            return result

        return check

    measure_generate(bench, setup, models, make_check)


WORKLOAD = Workload(
    "generate",
    "generate in each decoding mode (greedy, min_new_tokens, repetition_penalty, sampling), prompt 128 + 128 "
    "new tokens, batch 1 and 16 (GPU: 0.85B Llama shape bf16; CPU: a small Llama, 32 + 32 tokens, batch 1 and 4, "
    "greedy and sampling)",
    run,
)
