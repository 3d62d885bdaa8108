"""Where does batch-1 decode time go? Variants of generate on one checkpoint, side by side (diagnostic).

    python benchmarks/probe_decode.py            # 0.85B Llama shape, bf16, prompt 128, 128 new tokens

The random weights are saved once as a bf16 checkpoint. The transformers rows (default,
``cache_implementation="static"``, the lean loop) run on ``from_pretrained(path)`` moved to the
GPU by hand; the fastpath rows each load ``from_pretrained(path, fastpath=...)`` and make no
further call on the model (it runs where its plan put it; the prompt goes to ``model.device``).
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from generate import LLAMA_085B  # noqa: E402


def save_checkpoint(directory: Path) -> Path:
    """Random weights of the 0.85B Llama shape in bf16, no end-of-sequence token (every call makes 128 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_085B, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


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
    import transformers
    from transformers import AutoModelForCausalLM, CompileConfig

    import transformers_fastpath as fp

    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "transformers": transformers.__version__}
    tmp = tempfile.TemporaryDirectory(prefix="fastpath-probe-decode-")
    path = save_checkpoint(Path(tmp.name))
    ids_cpu = torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(0))
    new = 128

    def gen_on(model, **kw):
        ids = ids_cpu.to(model.device)
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0, **kw)

    rows = {}
    model = AutoModelForCausalLM.from_pretrained(path, fastpath=False).to("cuda")  # the baseline, moved by hand
    rows["default"] = timed(lambda: gen_on(model))
    rows["hf_static"] = timed(lambda: gen_on(model, cache_implementation="static"))
    rows["hf_static_fullgraph"] = timed(lambda: gen_on(model, cache_implementation="static",
                                                       compile_config=CompileConfig(fullgraph=True)))
    # the decode step alone: one compiled forward per token, no generate loop (the floor we could reach)
    from transformers import StaticCache
    step = None
    try:
        ids = ids_cpu.to("cuda")
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
    del model, step
    torch.cuda.empty_cache()

    fast = AutoModelForCausalLM.from_pretrained(path, fastpath=True)  # and nothing else
    if fp.plan_of(fast) is None:
        sys.exit("probe_decode: from_pretrained(..., fastpath=True) was not intercepted: the .pth bootstrap is not "
                 "installed in this interpreter's site-packages (see benchmarks/gpu_env.sh)")
    results["fastpath_device"] = str(fast.device)
    rows["fastpath"] = timed(lambda: gen_on(fast))
    prof = cProfile.Profile()
    prof.enable()
    gen_on(fast)
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    results["fastpath_profile"] = s.getvalue()[-6000:]
    del fast
    torch.cuda.empty_cache()
    fast = AutoModelForCausalLM.from_pretrained(
        path, fastpath={"defaults": {"sdpa_backends": ["flash", "efficient", "math"]}})
    results["fastpath_flash_first_device"] = str(fast.device)
    rows["fastpath_flash_first"] = timed(lambda: gen_on(fast))
    del fast
    tmp.cleanup()
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
