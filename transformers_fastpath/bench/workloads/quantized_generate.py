"""``quantized-generate``: 4-bit weights (bitsandbytes nf4) for generation, against the unquantized default.

Needs CUDA and bitsandbytes. Same model and request as ``generate`` on a GPU (0.85B Llama shape,
prompt 128, 128 new tokens, batch 1 and 16). The memory columns are the point: weights, and
peak memory while generating, per variant.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..checks import compare_logits, first_token_in_top_k
from ..runner import Bench
from ._common import plan_summary
from ._generate import llama_setup, load_causal, measure_generate
from ._workload import Workload

if TYPE_CHECKING:
    from ...planning.hardware import Hardware


def requires(hardware: Hardware, options: Mapping[str, Any]) -> str | None:
    """CUDA and bitsandbytes (its 4-bit kernels are what is measured)."""
    if hardware.device != "cuda":
        return "needs a CUDA GPU and bitsandbytes (4-bit nf4 kernels); this machine has no CUDA GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes: pip install 'transformers-fastpath[bnb]'"
    return None


def run(bench: Bench) -> None:
    """bf16 default vs nf4 by hand, nf4 + static cache + compile, and fastpath's nf4."""
    import torch
    from transformers import BitsAndBytesConfig

    setup = llama_setup(bench)
    device = bench.device
    nf4: dict[str, Any] = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=torch.bfloat16),
           "dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": device}}
    policy = {"defaults": {"quantization": "bnb-nf4", "quantization_fallback": "error"}}
    bench.define("default", f"AutoModelForCausalLM.from_pretrained(path) with no settings (bf16, not quantized) "
                            f"moved to {device} by hand; dynamic cache")
    bench.define("expert", "from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
                           "bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=bfloat16), dtype=bfloat16, "
                           f"attn_implementation='sdpa', device_map={device!r}); dynamic cache")
    bench.define("compile", "expert + generation_config.cache_implementation = 'static' (transformers compiles the "
                            "decode step when the quantizer allows it)")
    bench.define("fastpath", f"from_pretrained(path, fastpath={policy!r}) and nothing else (not moved): nf4 from "
                             "the policy, the rest of its plan (device, static cache and compile where the quantizer "
                             "allows it)")

    def compiled() -> Any:
        model = load_causal(setup.path, device, fastpath=False, **nf4)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None and not getattr(quantizer, "is_compileable", False):
            bench.omit("compile", f"transformers does not compile generate with this quantizer "
                                  f"({type(quantizer).__name__}.is_compileable is False)")
            return None
        model.generation_config.cache_implementation = "static"
        return model

    models = {
        "default": bench.build("default", lambda: load_causal(setup.path, device, fastpath=False)),
        "expert": bench.build("expert", lambda: load_causal(setup.path, device, fastpath=False, **nf4)),
        "compile": bench.build("compile", compiled),
        "fastpath": bench.build("fastpath", lambda: load_causal(setup.path, device, fastpath=policy)),
    }
    bench.config.update(setup.config(), quantization="bitsandbytes nf4, bf16 compute")
    bench.config["footprint_mib"] = {k: m.get_memory_footprint() / 2**20 for k, m in models.items() if m is not None}
    if models["fastpath"] is not None:
        bench.config["fastpath_plan"] = plan_summary(models["fastpath"])

    def make_check(ids: Any, mask: Any, dtypes: dict[str, str], reference: Any) -> Any:
        cache: dict[str, Any] = {}

        def last_logits(name: str) -> Any:
            if name not in cache:
                with torch.inference_mode():
                    model = models[name]
                    cache[name] = model(input_ids=ids.to(model.device),
                                        attention_mask=mask.to(model.device)).logits[:, -1].float().cpu()
            return cache[name]

        def check(variant: str, default_out: Any, out: Any) -> dict[str, Any]:
            result = compare_logits(last_logits("default"), last_logits(variant))
            sequences, logits = reference()
            tokens = first_token_in_top_k(logits, out, setup.prompt_len, k=5, reference=sequences)
            result["first_tokens_in_reference_top_5"] = tokens["rows_in_top_k"]
            result["matching_fraction"] = tokens.get("matching_fraction")
            return result

        return check

    measure_generate(bench, setup, models, make_check)


WORKLOAD = Workload(
    "quantized-generate",
    "greedy generate with bitsandbytes nf4 weights vs bf16 (0.85B Llama shape, prompt 128 + 128 new tokens, "
    "batch 1 and 16); memory per variant",
    run,
    requires,
)
