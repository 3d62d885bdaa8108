"""Where the CPU time of one encoder forward goes: fastpath's torch route against ONNX Runtime, op by op.

The bundled all-MiniLM-L6-v2 and the [onnx] extra. The torch side is the model of
``pipeline("feature-extraction", ..., fastpath={"defaults": {"backend": "torch"}})`` (today's
CPU route, made through the user entry point), profiled with ``torch.profiler``; the ONNX Runtime
side is a ``torch.onnx`` export of the plain model in an ``InferenceSession`` with all graph
optimizations and ORT's own profiler. Both run the same batches; time is grouped into the same
kinds of work (matrix products, attention, normalization, activation, element-wise, other) so the
two columns can be read side by side, plus the wall time of a call and the part of it no op
accounts for (Python and dispatch; ORT's node times overlap across its threads, so its rest can
be negative). A last section times one layer's matrix products at each batch's row count with
``F.linear`` against oneDNN with the weight packed ahead of time
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``), which is what ORT's MLAS
does with constant weights.

    PYTHONPATH=/tmp/ortsite python benchmarks/profile_cpu_encoder.py --out benchmarks/results/profile_cpu_encoder.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any

# (kind, substrings of torch op names or ORT node op types), first match wins
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("attention", "sdpa", "Attention", "softmax", "Softmax", "_transformer_encoder_layer")),
    ("matmul", ("addmm", "mm", "linear", "matmul", "bmm", "MatMul", "Gemm", "FusedMatMul", "baddbmm")),
    ("normalization", ("layer_norm", "LayerNorm", "SkipLayerNorm", "native_layer_norm")),
    ("activation", ("gelu", "Gelu", "BiasGelu", "FastGelu", "tanh", "erf", "Erf")),
    ("elementwise", ("add", "mul", "div", "sub", "where", "masked_fill", "Add", "Mul", "Div", "Sub", "Where")),
    ("gather/embedding", ("embedding", "index_select", "Gather", "gather", "EmbedLayerNormalization")),
    ("copy/reshape", ("copy", "contiguous", "to", "cat", "transpose", "view", "reshape", "Reshape", "Transpose",
                      "Cast", "Concat", "Slice", "Unsqueeze", "Shape", "Expand", "clone", "empty", "zeros",
                      "select", "slice", "permute", "Squeeze", "ConstantOfShape")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KINDS:
        if any(key.lower() in lowered for key in keys):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="profiled calls per batch")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import onnxruntime
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    import transformers_fastpath  # noqa: F401
    from onnxruntime_cpu import user_export  # this folder's script: the same export as its ORT peer
    from transformers_fastpath.bench.models import required_bundled_minilm
    from transformers_fastpath.interception.patches import patch_all

    patch_all()
    path = required_bundled_minilm()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    fast = transformers.pipeline("feature-extraction", model=path,
                                 fastpath={"defaults": {"backend": "torch"}}).model
    plain = transformers.AutoModel.from_pretrained(path).eval()
    onnx_file = user_export(plain, tokenizer, ["input_ids", "attention_mask", "token_type_ids"])

    def session(profiling: bool) -> Any:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        if profiling:
            options.enable_profiling = True
            options.profile_file_prefix = tempfile.mkdtemp() + "/ort"
        return onnxruntime.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])

    timing_session = session(False)
    report: dict[str, Any] = {
        "benchmark": "profile_cpu_encoder", "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "model": "all-MiniLM-L6-v2 (bundled)", "fastpath_plan_applied": fast._fastpath_plan.applied_passes()
        if hasattr(fast._fastpath_plan, "applied_passes") else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__}, "batches": {},
    }
    for rows, length in ((1, 16), (2, 32), (8, 64), (32, 128)):
        ids = torch.randint(1000, 20000, (rows, length))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        feeds = {n: v.numpy() for n, v in inputs.items()}
        with torch.inference_mode():
            torch_out = fast(**inputs).last_hidden_state
        ort_out = torch.from_numpy(timing_session.run(None, feeds)[0])
        walls: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(3):  # interleaved wall-time rounds (no profiler attached)
            with torch.inference_mode():
                start = time.perf_counter()
                for _ in range(args.repeat):
                    fast(**inputs)
                walls["torch"].append((time.perf_counter() - start) / args.repeat)
            start = time.perf_counter()
            for _ in range(args.repeat):
                timing_session.run(None, feeds)
            walls["onnxruntime"].append((time.perf_counter() - start) / args.repeat)

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeat):
                fast(**inputs)
        torch_kinds: dict[str, float] = collections.Counter()
        torch_ops: dict[str, float] = collections.Counter()
        for event in prof.key_averages():
            if event.key.startswith("aten::") or event.key.startswith("fastpath"):
                torch_kinds[kind_of(event.key)] += event.self_cpu_time_total / args.repeat / 1e3
                torch_ops[event.key] += event.self_cpu_time_total / args.repeat / 1e3

        profiled = session(True)
        profiled.run(None, feeds)  # the first run of a session plans memory; leave it out
        for _ in range(args.repeat):
            profiled.run(None, feeds)
        trace_file = profiled.end_profiling()
        with open(trace_file) as fh:
            events = json.load(fh)
        os.remove(trace_file)
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
        skip = len(nodes) // (args.repeat + 1) if runs and len(runs) == args.repeat + 1 else 0
        ort_kinds: dict[str, float] = collections.Counter()
        ort_ops: dict[str, float] = collections.Counter()
        for event in nodes[skip:]:
            op = event.get("args", {}).get("op_name", "?")
            ort_kinds[kind_of(op)] += event["dur"] / args.repeat / 1e3
            ort_ops[op] += event["dur"] / args.repeat / 1e3

        wall = {k: statistics.median(v) * 1e3 for k, v in walls.items()}
        label = f"{rows}x{length}"
        report["batches"][label] = {
            "wall_ms": wall, "torch_vs_ort": wall["torch"] / wall["onnxruntime"],
            "max_abs_diff_torch_vs_ort": float((torch_out - ort_out).abs().max()),
            "kinds_ms": {"torch": dict(torch_kinds), "onnxruntime": dict(ort_kinds)},
            "unaccounted_ms": {"torch": wall["torch"] - sum(torch_kinds.values()),
                               "onnxruntime": wall["onnxruntime"] - sum(ort_kinds.values())},
            "top_ops_ms": {"torch": dict(torch_ops.most_common(12)), "onnxruntime": dict(ort_ops.most_common(12))},
        }
        print(f"\n[{label}] wall: torch {wall['torch']:.2f} ms, onnxruntime {wall['onnxruntime']:.2f} ms "
              f"({wall['torch'] / wall['onnxruntime']:.2f}x)")
        for kind in sorted(set(torch_kinds) | set(ort_kinds), key=lambda k: -torch_kinds.get(k, 0)):
            print(f"  {kind:18s} torch {torch_kinds.get(kind, 0):7.2f} ms   onnxruntime {ort_kinds.get(kind, 0):7.2f} ms")
        print(f"  {'(not in any op)':18s} torch {report['batches'][label]['unaccounted_ms']['torch']:7.2f} ms   "
              f"onnxruntime {report['batches'][label]['unaccounted_ms']['onnxruntime']:7.2f} ms")
        print("  torch ops:", ", ".join(f"{k} {v:.2f}" for k, v in torch_ops.most_common(8)))
        print("  ort ops:  ", ", ".join(f"{k} {v:.2f}" for k, v in ort_ops.most_common(8)))
    report["gemm_us"] = gemm_section(fast, args.repeat)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


def gemm_section(model: Any, repeat: int) -> dict[str, Any]:
    """One encoder layer's linear layers at each row count: F.linear against prepacked oneDNN weights."""
    import torch
    import torch.nn.functional as F

    layer = model.encoder.layer[0]
    linears = {"query": layer.attention.self.query, "key": layer.attention.self.key,
               "value": layer.attention.self.value, "attention output": layer.attention.output.dense,
               "ffn in": layer.intermediate.dense, "ffn out": layer.output.dense}
    out: dict[str, Any] = {}
    print("\n[one layer's linears: F.linear vs prepacked oneDNN, us per layer]")
    for rows in (16, 64, 512, 4096):
        timings = {"F.linear": 0.0, "prepacked": 0.0}
        worst = 0.0
        with torch.inference_mode():
            for lin in linears.values():
                x = torch.randn(rows, lin.in_features)
                packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight, rows)
                calls = {"F.linear": lambda: F.linear(x, lin.weight, lin.bias),
                         "prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, lin.bias, "none", [], "")}
                worst = max(worst, float((calls["F.linear"]() - calls["prepacked"]()).abs().max()))
                for name, call in calls.items():
                    for _ in range(5):
                        call()
                    start = time.perf_counter()
                    for _ in range(repeat * 5):
                        call()
                    timings[name] += (time.perf_counter() - start) / (repeat * 5) * 1e6
        out[str(rows)] = {**timings, "speedup": timings["F.linear"] / timings["prepacked"], "max_abs_diff": worst}
        print(f"  {rows:5d} rows: F.linear {timings['F.linear']:8.1f}  prepacked {timings['prepacked']:8.1f}  "
              f"({timings['F.linear'] / timings['prepacked']:.2f}x, max diff {worst:.1e})")
    return out


if __name__ == "__main__":
    main()
