"""``generate-many``: greedy generation for many prompts of varied lengths, the text-generation pipeline's way.

GPU: the 0.85B Llama shape (random bf16 weights), 256 prompts of 16-512 tokens, 128 new tokens.
CPU: a small Llama, 32 prompts of 8-64 tokens, 16 new tokens. ``--quick``: a tiny Llama, 6
prompts. Prompts are texts of words the BERT tokenizer saved with the checkpoint reads as one
token each. Variants:

* ``default``: ``pipeline("text-generation", model=path, batch_size=16)`` fed the list, on the
  bench's device (what transformers' docs recommend for many prompts);
* ``expert``: the same pipeline with the expert's dtype and SDPA;
* ``compile``: the expert's pipeline on a model whose ``generation_config.cache_implementation``
  is ``"static"`` (transformers' compiled decode step; GPU only);
* ``continuous``: transformers' continuous batching (``model.generate_batch``, paged attention)
  on the expert's model, the tokenized list in one call (GPU only);
* ``fastpath``: ``pipeline("text-generation", model=path, fastpath=True)`` fed the list;
* ``generate_many``: ``fp.generate_many`` on the tokenized list, model from
  ``from_pretrained(path, fastpath=True)``.

Per variant: generated tokens/s over the whole list. ``--set omit=expert,continuous`` leaves peers out.
"""

from __future__ import annotations

import random
from typing import Any

from ..models import LLAMA_085B, LLAMA_SMALL, LLAMA_TINY, TOKENIZER_MISSING, llama_checkpoint, quiet_transformers, \
    tokenizer_path
from ..runner import Bench, Variant
from ._common import dtype_name, enable_fastpath_kwarg, plan_summary
from ._generate import load_causal, load_expert
from ._workload import Workload

BATCH = 16
_WORDS = ("the model reads every token of the sentence and returns one vector per token while the benchmark "
          "measures how long a batch takes on this machine").split()


def _texts(count: int, low: int, high: int) -> list[str]:
    """``count`` prompts of ``low``-``high`` words (one token each for a BERT tokenizer), seeded."""
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)]


def run(bench: Bench) -> None:
    """The plain pipeline, its expert and compiled forms, continuous batching (GPU) and fastpath, one list."""
    import torch
    import transformers

    import transformers_fastpath as fp

    tokenizer = tokenizer_path(bench.options)
    if tokenizer is None:
        bench.skip(TOKENIZER_MISSING)
        return
    shape = {**LLAMA_TINY, "vocab_size": 30522} if bench.quick else LLAMA_085B if bench.on_gpu else LLAMA_SMALL
    shape_name = "tiny Llama" if bench.quick else "0.85B Llama shape" if bench.on_gpu else "small Llama"
    path = str(llama_checkpoint(shape, on_gpu=bench.on_gpu, tokenizer=tokenizer))
    device = bench.device
    count = int(bench.pick("prompts", gpu=256, cpu=32, quick=6))
    low, high = bench.pick("lengths", gpu=[16, 512], cpu=[8, 64], quick=[2, 8])
    new_tokens = int(bench.pick("new_tokens", gpu=128, cpu=16, quick=3))
    batch = int(bench.pick("batch", gpu=BATCH, cpu=BATCH, quick=2))
    half = torch.bfloat16 if bench.on_gpu else torch.float32
    expert_kwargs = {"dtype": half, "model_kwargs": {"attn_implementation": "sdpa"}}  # the pipeline's own arguments
    on_device = {"device": device} if bench.on_gpu else {}
    settings = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0, "return_tensors": True}
    bench.define("default", f"pipeline('text-generation', model=path, batch_size={batch}) on {device}, fed the list")
    bench.define("expert", f"pipeline('text-generation', model=path, batch_size={batch}, "
                           f"dtype={str(half).replace('torch.', '')}, attn_implementation='sdpa'), fed the list")
    bench.define("compile", f"the expert's pipeline (batch_size={batch}) on a model loaded with dtype and SDPA whose "
                            "generation_config.cache_implementation = 'static' (transformers' compiled decode step)")
    bench.define("continuous", "the expert's model; model.generate_batch(the tokenized list, GenerationConfig("
                               "max_new_tokens=N, do_sample=False)): transformers' continuous batching")
    bench.define("fastpath", "pipeline('text-generation', model=path, fastpath=True), fed the list")
    bench.define("generate_many", f"from_pretrained(path, fastpath=True); fp.generate_many(model, the tokenized "
                                  f"list, batch_size={batch}, max_new_tokens=N, do_sample=False)")
    if not bench.on_gpu:
        bench.omit("compile", "transformers compiles generate only on accelerators")
        # Measured with --quick: 18 s for 6 tiny prompts, and a paged cache of 13.6 GiB sized to free memory.
        bench.omit("continuous", "transformers' continuous batching is a GPU path: on a CPU it sizes its paged "
                                 "cache to the free memory and runs slower than one prompt at a time")

    def pipe(**kwargs: Any) -> Any:
        enable_fastpath_kwarg()
        with quiet_transformers():
            return transformers.pipeline("text-generation", model=path, **kwargs)

    def expert_model() -> Any:
        return load_expert(bench, path)

    def compiled() -> Any:
        model = expert_model()
        model.generation_config.cache_implementation = "static"
        with quiet_transformers():
            return transformers.pipeline("text-generation", model=model, tokenizer=path, batch_size=batch)

    pipes = {
        "default": bench.build("default", lambda: pipe(batch_size=batch, **on_device)),
        "expert": bench.build("expert", lambda: pipe(batch_size=batch, **on_device, **expert_kwargs)),
        "compile": bench.build("compile", compiled),
        "fastpath": bench.build("fastpath", lambda: pipe(fastpath=True)),
    }
    pipes = {k: p for k, p in pipes.items() if p is not None}
    models: dict[str, Any] = {
        "continuous": bench.build("continuous", expert_model),
        "generate_many": bench.build("generate_many", lambda: load_causal(path, device, fastpath=True)),
    }
    models = {k: m for k, m in models.items() if m is not None}
    texts = _texts(count, int(low), int(high))
    token_ids = [ids for ids in transformers.AutoTokenizer.from_pretrained(path)(texts)["input_ids"]]

    def pipeline_call(p: Any) -> list[Any]:
        out = p(texts, **settings)
        return [torch.tensor(r[0]["generated_token_ids"][-new_tokens:]) for r in out]  # no EOS: N new each

    def continuous_call() -> list[Any]:
        config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                               eos_token_id=None)
        # No inference_mode here: generate_batch runs the model on a thread of its own, outside it.
        out = models["continuous"].generate_batch(inputs=token_ids, generation_config=config, progress_bar=False)
        if len(out) != len(texts):
            raise RuntimeError(f"generate_batch returned {len(out)} results for {len(texts)} prompts")
        return [torch.tensor(r.generated_tokens, dtype=torch.long) for r in out.values()]

    def generate_many_call() -> list[Any]:
        out = fp.generate_many(models["generate_many"], token_ids, batch_size=batch, max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
        return [o[len(ids):] for o, ids in zip(out, token_ids)]

    calls = {k: (lambda p=p: pipeline_call(p)) for k, p in pipes.items()}
    if "continuous" in models:
        calls["continuous"] = continuous_call
    if "generate_many" in models:
        calls["generate_many"] = generate_many_call
    dtypes = {**{k: dtype_name(p.model) for k, p in pipes.items()}, **{k: dtype_name(m) for k, m in models.items()}}

    def check(variant: str, default_out: Any, out: Any) -> dict[str, Any]:
        same = sum(bool(torch.equal(a, b)) for a, b in zip(default_out, out))
        first = sum(bool(a[:1].equal(b[:1])) for a, b in zip(default_out, out))
        exact = dtypes[variant] == dtypes["default"] == "float32"
        passed = len(out) == len(default_out) and (same == len(out) if exact else first >= 0.9 * len(out))
        return {"passed": passed, "criterion": "identical tokens (float32)" if exact
                else "first new token identical for 90% of prompts (half precision: later tokens split at ties)",
                "identical_prompts": same, "same_first_token": first, "prompts": len(out)}

    lengths = [len(ids) for ids in token_ids]
    bench.config.update({"model": f"{shape_name}, random weights (bf16 checkpoint)", "prompts": count,
                         "prompt_tokens": [min(lengths), max(lengths)], "new_tokens": new_tokens, "batch": batch,
                         "dtypes": dtypes})
    if "fastpath" in pipes:
        bench.config["fastpath_plan"] = plan_summary(pipes["fastpath"])
    bench.measure(f"{count} prompts", {k: Variant(fn) for k, fn in calls.items()}, check=check,
                  params={"prompts": count, "prompt_tokens": [min(lengths), max(lengths)], "new_tokens": new_tokens,
                          "batch": batch},
                  work=count * new_tokens, work_unit="tokens")


WORKLOAD = Workload(
    "generate-many",
    "greedy text-generation pipeline over many prompts of varied lengths (GPU: 256 prompts of 16-512 tokens, 128 "
    "new, 0.85B Llama shape; CPU: 32 of 8-64, 16 new): the plain pipeline at batch_size=16 against fastpath=True",
    run,
)
