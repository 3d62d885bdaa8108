"""Where does a small GPU encoder call spend its time? (diagnostic; BERT-base shape, 8x128 bf16)

    python benchmarks/probe_encoder_overhead.py --out results.json

Times, per call, with the GPU synchronized around each block of calls: the whole
``from_pretrained(..., fastpath=True)`` model, its embeddings alone, its converted encoder alone
(CUDA graph replays), and the fp16 sdpa expert; then the host functions that take the most time
in the whole call (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from transformers_fastpath.bench.models import BERT_BASE, bert_checkpoint


def per_call(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModel

    import transformers_fastpath  # noqa: F401  (the from_pretrained fastpath keyword)
    from transformers_fastpath.passes.fused_encoder import runtime_of

    path = bert_checkpoint(BERT_BASE)
    fast = AutoModel.from_pretrained(path, fastpath=True)
    expert = AutoModel.from_pretrained(path, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    ids = torch.randint(3, 30000, (args.batch, args.length), device="cuda")
    mask = torch.ones_like(ids)
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": [args.batch, args.length]}
    with torch.inference_mode():
        hidden = fast.embeddings(input_ids=ids)
        result["ms"] = {
            "expert fp16 sdpa, whole call": per_call(lambda: expert(input_ids=ids, attention_mask=mask)),
            "fastpath, whole call": per_call(lambda: fast(input_ids=ids, attention_mask=mask)),
            "fastpath, whole call, no attention_mask": per_call(lambda: fast(input_ids=ids)),
            "fastpath embeddings": per_call(lambda: fast.embeddings(input_ids=ids)),
            "fastpath encoder (graph)": per_call(lambda: fast.encoder(hidden)),
        }
        graphs = runtime_of(fast).graphs
        entry = next(iter(graphs._graphs.values()))
        result["ms"]["graph.replay() alone"] = per_call(entry.graph.replay)
        result["graph_stats"] = dict(graphs.stats)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            fast(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    result["profile_top"] = text.getvalue().splitlines()[:60]
    print(json.dumps(result["ms"], indent=1), result["graph_stats"])
    print("\n".join(result["profile_top"][:45]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
