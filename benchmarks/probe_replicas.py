"""Where a replicated text pipeline's time goes: one process alone vs two side by side.

Times a fastpath ``placement = "single"`` text-classification pipeline on one device over N
texts: the whole call, tokenization alone (the pipeline's own tokenizer, one text at a time as
the pipeline does) and the model alone on pre-tokenized batches. Run it once alone and then as
two concurrent processes on two GPUs: if each of the two takes as long as one alone, the host
scales and a slow replicated pipeline is the replica code's fault; if each slows down, the host
(CPU, memory bandwidth) is the limit. Writes one JSON line to stdout.

The pipelines are built with ``pipeline(..., fastpath=policy)`` and no further call on them.
Only on a machine without CUDA (a smoke run of ``--replicated`` / ``--diagnose``) is the second
replica enabled by hand on a CPU copy, since no policy puts replicas on a CPU; the output says so
(``built_by``). ``--replicated`` and ``--diagnose`` then take a replicated call apart by hand:
that is their purpose (where the time goes), not a measurement of the entry point.

    python benchmarks/probe_replicas.py --model DIR --texts 4000 --device cuda:0 --start-at EPOCH
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from multi_gpu import texts


def timed_in_worker(inputs: list[str]) -> dict:
    """Run in a replica worker process: its pipeline on ``inputs``, with wall-clock start and end."""
    from transformers_fastpath.pipelines import replica_workers

    start = time.time()
    replica_workers._PIPELINE(inputs)
    return {"start": start, "end": time.time(), "affinity": len(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _single_and_replicated(args: argparse.Namespace) -> tuple:
    """The same classifier twice: ``placement = "single"`` and ``"replicate"`` (on CPU, a smoke run:
    two CPU replicas, the second a worker process)."""
    import transformers

    import transformers_fastpath as fp
    from transformers_fastpath.pipelines.replicas import enable_replicas

    base = {"batch_size": args.batch_size, "encoder_fastpath": False}
    single = transformers.pipeline("text-classification", model=args.model,
                                   fastpath={"defaults": {**base, "placement": "single"}})
    multi = transformers.pipeline("text-classification", model=args.model,
                                  fastpath={"defaults": {**base, "placement": "replicate"}})
    if not torch.cuda.is_available():
        enable_replicas(multi, ["cpu", "cpu"], plan=fp.plan_of(multi), workers="processes")
    return single, multi


def _built_by() -> str:
    return ("pipeline(..., fastpath=policy) for both" if torch.cuda.is_available() else
            "pipeline(..., fastpath=policy); the replicated one's CPU replicas enabled by hand (CPU smoke run)")


def replicated(args: argparse.Namespace, inputs: list[str]) -> dict:
    """Interleave one-GPU and replicated calls; then one replicated call taken apart by hand, the
    first shard on a fresh thread (how replicas.py ran it before it was fixed; compare the two)."""
    import statistics
    import threading

    from transformers_fastpath.pipelines.replicas import replicas_of, split_contiguous

    single, multi = _single_and_replicated(args)
    replicas = replicas_of(multi)
    out: dict = {"replicas": [repr(r)[:50] for r in replicas], "parent_affinity": len(os.sched_getaffinity(0)),
                 "built_by": _built_by(), "single": [], "replicated": []}
    single(inputs), multi(inputs)
    for _ in range(args.repeats):
        for name, pipe in (("single", single), ("replicated", multi)):
            _sync()
            start = time.perf_counter()
            pipe(inputs)
            _sync()
            out[name].append(round(time.perf_counter() - start, 3))
    out["ratio"] = statistics.median(out["single"]) / statistics.median(out["replicated"])
    shards = split_contiguous(len(inputs), len(replicas))
    marks: dict = {}

    def primary() -> None:
        marks["primary_start"] = time.time()
        replicas[0]([inputs[i] for i in shards[0]])
        marks["primary_end"] = time.time()

    t0 = time.time()
    thread = threading.Thread(target=primary)
    thread.start()
    import probe_replicas  # by module name: the worker cannot unpickle a function of __main__

    worker = replicas[1]._pool.submit(probe_replicas.timed_in_worker, [inputs[i] for i in shards[1]]).result()
    thread.join()
    out["by_hand"] = {"primary": [marks["primary_start"] - t0, marks["primary_end"] - t0],
                      "worker": [worker["start"] - t0, worker["end"] - t0],
                      "worker_affinity": worker["affinity"], "worker_threads": worker["threads"],
                      "total": time.time() - t0}
    return out


def diagnose(args: argparse.Namespace, inputs: list[str]) -> dict:
    """Time the same shard under each condition a replicated call changes: thread, worker busy."""
    import cProfile
    import io
    import pstats
    import threading

    from transformers_fastpath.pipelines.replicas import replicas_of

    single, multi = _single_and_replicated(args)
    primary, worker = replicas_of(multi)[:2]
    half = inputs[: len(inputs) // 2]
    single(inputs), multi(inputs)
    import probe_replicas

    def timed(fn, in_thread: bool, worker_busy: bool, profile: bool = False) -> float:
        busy = worker._pool.submit(probe_replicas.timed_in_worker, half) if worker_busy else None
        if busy is not None:
            time.sleep(0.2)
        prof = cProfile.Profile() if profile else None
        box: dict = {}

        def body() -> None:
            if prof:
                prof.enable()
            start = time.perf_counter()
            fn(half)
            _sync()
            box["s"] = round(time.perf_counter() - start, 3)
            if prof:
                prof.disable()

        if in_thread:
            t = threading.Thread(target=body)
            t.start()
            t.join()
        else:
            body()
        if busy is not None:
            busy.result()
        if prof:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
            box["profile"] = text.getvalue()[-2500:]
        return box

    out: dict = {"built_by": _built_by()}
    for repeat in range(2):
        for name, fn in (("single", single), ("primary", primary)):
            for in_thread in (False, True):
                for busy in (False, True):
                    key = f"{name}{'_thread' if in_thread else '_main'}{'_workerbusy' if busy else ''}"
                    out.setdefault(key, []).append(timed(fn, in_thread, busy)["s"])
    out["profile_primary_thread_workerbusy"] = timed(primary, True, True, profile=True)
    out["profile_single_main"] = timed(single, False, False, profile=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--texts", type=int, default=4000)
    p.add_argument("--offset", type=int, default=0, help="take texts[offset:offset+texts] of the benchmark's list")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start timing (sync two runs)")
    p.add_argument("--replicated", action="store_true", help="one-GPU vs replicated pipeline, interleaved")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--diagnose", action="store_true", help="the replicated call's conditions, one at a time")
    args = p.parse_args()
    if args.diagnose:
        import transformers_fastpath

        print(json.dumps(diagnose(args, texts(args.texts))), flush=True)
        return
    if args.replicated:
        import transformers_fastpath  # noqa: F401

        print(json.dumps(replicated(args, texts(args.texts))), flush=True)
        return
    import transformers

    import transformers_fastpath as fp

    inputs = texts(args.offset + args.texts)[args.offset:]
    pipe = transformers.pipeline("text-classification", model=args.model, device=args.device,
                                 fastpath={"defaults": {"placement": "single", "batch_size": args.batch_size,
                                                        "encoder_fastpath": False}})
    assert fp.plan_of(pipe) is not None, "fastpath did not intercept pipeline()"
    pipe(inputs[:512])
    while time.time() < args.start_at:
        time.sleep(0.01)
    out: dict = {"device": args.device, "texts": len(inputs), "threads": torch.get_num_threads(),
                 "cpus": os.cpu_count()}
    for name, run in (("pipeline", lambda: pipe(inputs)),
                      ("tokenize_one_by_one", lambda: [pipe.tokenizer(t) for t in inputs]),
                      ("tokenize_batched", lambda: [pipe.tokenizer(inputs[i:i + args.batch_size], padding=True)
                                                    for i in range(0, len(inputs), args.batch_size)])):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        out[name] = round(time.perf_counter() - start, 3)
    batches = [pipe.tokenizer(inputs[i:i + args.batch_size], padding=True, return_tensors="pt")
               for i in range(0, len(inputs), args.batch_size)]
    with torch.inference_mode():
        _sync()
        start = time.perf_counter()
        for b in batches:
            pipe.model(**{k: v.to(pipe.device) for k, v in b.items()}).logits.cpu()
        _sync()
        out["model_only"] = round(time.perf_counter() - start, 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
