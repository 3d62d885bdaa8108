"""Where does batch-1 decode time go? Variants of generate on one model, side by side (diagnostic).

    python benchmarks/probe_decode.py            # 0.85B Llama shape, bf16, prompt 128, 128 new tokens
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from generate import LLAMA_085B  # noqa: E402


def build(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_085B, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    return model.eval()


def timed(fn, repeats: int = 3) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(runs), "out": out}


def main() -> None:
    import transformers_fastpath as fp
    from transformers import CompileConfig

    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers
    results["transformers"] = transformers.__version__
    model = build(torch.bfloat16)
    ids = torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    new = 128

    def gen(**kw):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)

    rows = {}
    rows["default"] = timed(lambda: gen())
    rows["hf_static"] = timed(lambda: gen(cache_implementation="static"))
    rows["hf_static_fullgraph"] = timed(lambda: gen(cache_implementation="static",
                                                    compile_config=CompileConfig(fullgraph=True)))
    fp.apply(model, {}, task="text-generation")
    rows["fastpath"] = timed(lambda: gen())
    prof = cProfile.Profile()
    prof.enable()
    gen()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    results["fastpath_profile"] = s.getvalue()[-6000:]
    fp.revert(model)
    fp.apply(model, {"defaults": {"sdpa_backends": ["flash", "efficient", "math"]}}, task="text-generation")
    rows["fastpath_flash_first"] = timed(lambda: gen())
    fp.revert(model)
    # the decode step alone: one compiled forward per token, no generate loop (the floor we could reach)
    from transformers import StaticCache
    try:
        cache = StaticCache(config=model.config, max_cache_len=256)
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        pos = torch.arange(128, device="cuda")

        def loop():
            cache.reset()
            with torch.inference_mode():
                out = model(ids, past_key_values=cache, cache_position=pos, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                toks = [tok]
                for i in range(new - 1):
                    p = torch.tensor([128 + i], device="cuda")
                    out = step(tok, past_key_values=cache, cache_position=p, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                    toks.append(tok)
                return torch.cat(toks, 1)
        rows["lean_loop"] = timed(loop)
    except Exception as exc:  # diagnostic only
        results["lean_loop_error"] = f"{type(exc).__name__}: {exc}"[:500]
    ref = rows["default"]["out"][:, 128:]
    for name, row in rows.items():
        out = row.pop("out")
        gen_part = out[:, 128:] if out.shape[1] > new else out
        row["ms_per_token"] = row["median_s"] / new * 1e3
        row["speedup_vs_default"] = rows["default"]["median_s"] / row["median_s"]
        row["match_prefix"] = int((gen_part.cpu() == ref.cpu()).int().cumprod(1).sum())
    results["rows"] = rows
    print(json.dumps({k: v for k, v in results.items() if k != "fastpath_profile"}, indent=1))
    print(results["fastpath_profile"])


if __name__ == "__main__":
    main()
