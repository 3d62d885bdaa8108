"""CPU rows for the fused encoder beyond BERT: one speech, one vision and one seq2seq encoder.

Each workload saves a random-weight checkpoint of a real model's shape once, then loads it twice,
side by side in one process:

* ``plain``    -- ``AutoModel.from_pretrained(path, fastpath=False)``: transformers' own forward
  (SDPA attention, float32), the default a user has;
* ``fastpath`` -- ``AutoModel.from_pretrained(path, fastpath=True)`` and nothing else.

Repeats are interleaved (plain, fastpath, plain, ...) and the medians compared; the report gives
the ratio plain / fastpath, the routes fastpath took, and the largest difference on real tokens.

    python benchmarks/fused_encoder_families_cpu.py --out benchmarks/results/fused_encoder_families_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any


def _workloads() -> dict[str, tuple[Any, str, Callable[[Any], tuple[dict[str, Any], Any]]]]:
    """name -> (config, model class name, inputs(model) -> (kwargs, real-token mask or None))."""
    import torch
    import transformers

    g = torch.Generator().manual_seed(0)

    def speech(model: Any) -> tuple[dict[str, Any], Any]:
        # Four clips of 2-8 s at 16 kHz, zero-padded, with their attention mask.
        lengths = (128000, 80000, 48000, 32000)
        keep = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        values = torch.randn(len(lengths), max(lengths), generator=g).masked_fill(~keep, 0.0)
        frames = model._get_feature_vector_attention_mask(model._get_feat_extract_output_lengths(max(lengths)), keep.long())
        return {"input_values": values, "attention_mask": keep.long()}, frames.bool()

    def vision(model: Any) -> tuple[dict[str, Any], Any]:
        return {"pixel_values": torch.randn(1, 3, 224, 224, generator=g)}, None

    def seq2seq(model: Any) -> tuple[dict[str, Any], Any]:
        lengths = [int(x) for x in torch.randint(8, 129, (16,), generator=g)]
        lengths[0] = 128
        keep = torch.arange(128)[None, :] < torch.tensor(lengths)[:, None]
        ids = torch.randint(3, 50000, keep.shape, generator=g).masked_fill(~keep, 1)
        return {"input_ids": ids, "attention_mask": keep.long()}, keep

    return {
        # wav2vec2-large-lv60's layer order and mask handling at base size (12 x 768).
        "wav2vec2-base-stable 4 clips 2-8 s": (
            transformers.Wav2Vec2Config(do_stable_layer_norm=True, feat_extract_norm="layer"), "Wav2Vec2Model", speech),
        "vit-base 1x224": (transformers.ViTConfig(), "ViTModel", vision),
        "bart-base encoder 16x128": (transformers.BartConfig(), "BartModel", seq2seq),
    }


def _forward(model: Any, kwargs: dict[str, Any]) -> Any:
    import torch

    with torch.inference_mode():
        if hasattr(model, "get_encoder") and "input_ids" in kwargs:
            return model.get_encoder()(**kwargs).last_hidden_state
        return model(**kwargs).last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import torch
    import transformers
    from tqdm.auto import tqdm

    import transformers_fastpath  # noqa: F401  (the .pth hook may not run from a source checkout)
    from transformers_fastpath.interception.patches import patch_all
    from transformers_fastpath.passes.fused_encoder import runtime_of

    patch_all()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, (config, cls_name, make_inputs) in tqdm(_workloads().items(), desc="workloads"):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            getattr(transformers, cls_name)(config).save_pretrained(tmp)
            cls = getattr(transformers, cls_name)
            plain = cls.from_pretrained(tmp, fastpath=False).eval()
            fast = cls.from_pretrained(tmp, fastpath=True)  # and nothing else
            kwargs, keep = make_inputs(plain)
            ref, out = _forward(plain, kwargs), _forward(fast, kwargs)
            diff = (ref - out).abs() if keep is None else (ref[keep] - out[keep]).abs()
            runtime = runtime_of(fast)
            if runtime is not None:
                runtime.stats.clear()
            times: dict[str, list[float]] = {"plain": [], "fastpath": []}
            for _ in range(args.repeats):
                for variant, model in (("plain", plain), ("fastpath", fast)):
                    start = time.perf_counter()
                    _forward(model, kwargs)
                    times[variant].append(time.perf_counter() - start)
            medians = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "workload": name, "model_class": cls_name,
                "plain_ms": round(medians["plain"] * 1e3, 2), "fastpath_ms": round(medians["fastpath"] * 1e3, 2),
                "speedup": round(medians["plain"] / medians["fastpath"], 3),
                "max_abs_diff_real_tokens": float(diff.max()),
                "fastpath_calls": dict(runtime.stats) if runtime is not None else {},
            })
            print(json.dumps(rows[-1]))
    report = {
        "benchmark": "fused_encoder_families_cpu",
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "date": _dt.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "repeats": args.repeats, "weights": "random, real model shapes", "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
