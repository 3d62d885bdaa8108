"""Fine-tuning with and without ``FastpathCallback``: training step time, peak memory, evaluation throughput.

Two ``Trainer`` s in one process, over copies of the same randomly initialised model, on the
same data, run in alternating short rounds (``--rounds``) so clock and thermal drift hit both
variants alike:

* ``plain``    -- a Trainer without the callback;
* ``fastpath`` -- the same Trainer with ``FastpathCallback()`` (default policy).

Per round each variant trains ``--steps`` steps (the first ``--warmup`` of each round are not
counted) and evaluates ``--eval-samples`` examples. A step is timed from ``on_step_begin`` to
``on_step_end`` (forward, backward, optimizer step; data loading excluded), with the device
synchronised at both ends. Peak memory is ``torch.cuda.max_memory_allocated()`` during a round,
reported absolute and above what was resident when the round started (both models and their
optimizer states stay resident, so the difference is what the steps themselves allocate).

Inputs are random token ids, right-padded, lengths uniform in ``[--min-fill * seq, seq]``.

GPU (BERT-base shape, bf16 mixed precision, batch 32, seq 128)::

    python benchmarks/trainer_step.py --out benchmarks/results/trainer_step_h100.json

CPU smoke check (tiny model, seconds)::

    python benchmarks/trainer_step.py --tiny --device cpu --out /tmp/trainer_step_tiny.json

Note: with ``bf16``/``fp16`` mixed precision accelerate runs the model's forward under autocast,
also in evaluation; passes that fall back under autocast (the fused encoder does) then run the
original computation, which this benchmark shows rather than hides.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    "bert-base": {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128},
}
VOCAB = 30522
VARIANTS = ("plain", "fastpath")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true",
                   help="tiny model and sizes (smoke check on CPU): batch 4, seq 32, 2 rounds of 4 steps")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="mixed precision of TrainingArguments (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (4 with --tiny)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (32 with --tiny)")
    p.add_argument("--min-fill", type=float, default=0.5, help="shortest row as a fraction of --seq-len")
    p.add_argument("--steps", type=int, default=None, help="training steps per round (default 30; 4 tiny)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps not counted at the start of each round (default 5; 1 tiny)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per variant (default 3; 2 tiny)")
    p.add_argument("--eval-samples", type=int, default=None, help="examples per evaluation (default 1024; 16 tiny)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 64 (8 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (also printed)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"batch_size": (32, 4), "seq_len": (128, 32), "steps": (30, 4), "warmup": (5, 1), "rounds": (3, 2),
                "eval_samples": (1024, 16), "eval_batch_size": (64, 8)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    if not 0.0 < args.min_fill <= 1.0:
        p.error("--min-fill must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


class TokenDataset(torch.utils.data.Dataset):
    """Right-padded random sequences with binary labels."""

    def __init__(self, n: int, seq_len: int, min_fill: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        shortest = max(1, int(round(seq_len * min_fill)))
        lengths = torch.randint(shortest, seq_len + 1, (n,), generator=g)
        self.ids = torch.randint(1000, VOCAB, (n, seq_len), generator=g)
        self.mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        self.ids = self.ids.masked_fill(self.mask == 0, 0)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step_timer(device: str) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, device-synchronised at both ends."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def build_trainers(args: argparse.Namespace, workdir: Path) -> dict[str, tuple[Any, Any]]:
    """variant -> (trainer, step timer), over copies of one model."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    import transformers_fastpath as fp

    torch.manual_seed(args.seed)
    shape = SHAPES["tiny" if args.tiny else "bert-base"]
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=max(512, args.seq_len), num_labels=2, **shape)
    base = BertForSequenceClassification(config)
    train_set = TokenDataset(args.batch_size * args.steps * 4, args.seq_len, args.min_fill, args.seed)
    eval_set = TokenDataset(args.eval_samples, args.seq_len, args.min_fill, args.seed + 1)
    trainers = {}
    for variant in VARIANTS:
        timer = make_step_timer(args.device)
        callbacks = [timer] + ([fp.FastpathCallback()] if variant == "fastpath" else [])
        training_args = TrainingArguments(
            output_dir=str(workdir / variant), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size, learning_rate=2e-5, save_strategy="no",
            logging_strategy="no", report_to=[], use_cpu=args.device == "cpu", bf16=args.precision == "bf16",
            fp16=args.precision == "fp16", seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=copy.deepcopy(base), args=training_args, train_dataset=train_set,
                          eval_dataset=eval_set, callbacks=callbacks)
        trainers[variant] = (trainer, timer)
    return trainers


def run_round(trainer: Any, timer: Any, warmup: int, device: str) -> dict[str, Any]:
    """One training round then one evaluation; returns step times, memory and evaluation numbers."""
    first = len(timer.times)
    _sync(device)
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    metrics = trainer.evaluate()
    _sync(device)
    return {"step_times": timer.times[first + warmup:], "peak_bytes": peak, "peak_above_resident_bytes": peak - resident,
            "eval_seconds": time.perf_counter() - start, "eval_loss": metrics["eval_loss"]}


def summarize(rounds: list[dict[str, Any]], eval_samples: int) -> dict[str, Any]:
    times = [t for r in rounds for t in r["step_times"]]
    eval_seconds = statistics.median(r["eval_seconds"] for r in rounds)
    return {
        "timed_steps": len(times),
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "step_ms_max": 1000 * max(times),
        "peak_memory_bytes": max(r["peak_bytes"] for r in rounds),
        "peak_memory_above_resident_bytes": max(r["peak_above_resident_bytes"] for r in rounds),
        "eval_seconds_median": eval_seconds,
        "eval_samples_per_second": eval_samples / eval_seconds,
        "final_eval_loss": rounds[-1]["eval_loss"],
    }


def environment(device: str) -> dict[str, Any]:
    import accelerate
    import transformers

    import transformers_fastpath as fp

    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "device_name": name, "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "transformers_fastpath": fp.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers_fastpath as fp

    with tempfile.TemporaryDirectory() as tmp:
        trainers = build_trainers(args, Path(tmp))
        rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for index in range(args.rounds):
            order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]  # alternate who goes first
            for variant in order:
                trainer, timer = trainers[variant]
                rounds[variant].append(run_round(trainer, timer, args.warmup, args.device))
        results = {variant: summarize(rounds[variant], args.eval_samples) for variant in VARIANTS}
        plan = fp.plan_of(trainers["fastpath"][0].model)
        fused_calls = fused_encoder_calls(trainers["fastpath"][0].model)
    plain, fast = results["plain"], results["fastpath"]
    report = {
        "benchmark": "trainer_step",
        "environment": environment(args.device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "ratios": {
            "train_step_speedup": plain["step_ms_median"] / fast["step_ms_median"],
            "peak_memory_fastpath_over_plain": _ratio(fast["peak_memory_bytes"], plain["peak_memory_bytes"]),
            "step_memory_fastpath_over_plain": _ratio(fast["peak_memory_above_resident_bytes"],
                                                      plain["peak_memory_above_resident_bytes"]),
            "eval_throughput_speedup": fast["eval_samples_per_second"] / plain["eval_samples_per_second"],
            "final_eval_loss_abs_diff": abs(fast["final_eval_loss"] - plain["final_eval_loss"]),
        },
        "fastpath_plan": plan.to_dict() if plan is not None else None,
        "fused_encoder_calls": fused_calls,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


def fused_encoder_calls(model: Any) -> dict[str, int] | None:
    """Calls per route and per fallback reason of the fused encoder pass, when it converted the model."""
    try:
        from transformers_fastpath.passes.fused_encoder import runtime_of
    except ImportError:
        return None
    runtime = runtime_of(model)
    return dict(runtime.stats) if runtime is not None else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


if __name__ == "__main__":
    main()
