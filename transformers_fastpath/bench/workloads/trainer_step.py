"""``trainer-step``: fine-tuning steps of a BERT classifier under ``transformers.Trainer``.

GPU: BERT-base shape (random weights), batch 32, sequence 128, bf16 mixed precision for the
expert. CPU: a small BERT, batch 8, sequence 64. ``--quick``: a tiny BERT. Inputs are random
token ids, right-padded, lengths uniform in [50%, 100%] of the sequence (as
``benchmarks/trainer_step.py``); labels are random.

Each sample is one ``trainer.train()`` of ``steps`` optimizer steps (12 on a GPU); a step is timed
from ``on_step_begin`` to ``on_step_end`` (forward, backward, optimizer; data loading excluded)
with the device synchronised, and the sample's time is the median step after the first two (the
optimizer state is created in the first). The one-time cost is the first step of the warm-up
round (compilation, optimizer state) less the median step. Every round starts again from the
initial weights with a new optimizer and the same seed, so each is the same short fine-tune and
the variants' training losses are comparable (the check: within 1e-3 in float32, 5e-2 with mixed
precision).

On a machine with several GPUs, a Trainer started without torchrun uses ``DataParallel`` over
all of them (transformers' default, so ``per_device_train_batch_size`` per GPU): set
``CUDA_VISIBLE_DEVICES=0`` for the one-GPU figure.

accelerate keeps one process-wide mixed-precision state, so before each variant's round the
runner rebuilds that Trainer's accelerator (``AcceleratorState._reset_state`` +
``Trainer.create_accelerator_and_postprocess``): fp32 and bf16 Trainers then interleave in one
process, each with its own precision.
"""

from __future__ import annotations

import functools
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..checks import compare_losses
from ..models import BERT_BASE, BERT_SMALL, BERT_TINY, BERT_VOCAB, bert_checkpoint, quiet_transformers
from ..runner import Bench, Sample, Variant, sync
from ._common import enable_fastpath_kwarg, plan_summary
from ._workload import Workload

SKIP_STEPS = 2


def _dataset(n: int, seq_len: int, seed: int) -> Any:
    import torch

    class TokenDataset(torch.utils.data.Dataset):
        """Right-padded random sequences with random binary labels."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(seed)
            lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (n,), generator=g)
            self.mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
            self.ids = torch.randint(5, BERT_VOCAB, (n, seq_len), generator=g).masked_fill(self.mask == 0, 0)
            self.labels = torch.randint(0, 2, (n,), generator=g)

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    return TokenDataset()


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, device-synchronised at both ends."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def _activate(trainer: Any) -> None:
    """Give ``trainer`` a fresh accelerator with its own mixed precision (accelerate's state is process-wide)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    trainer.create_accelerator_and_postprocess()


def run(bench: Bench) -> None:
    """default, expert, compile, fastpath (default + callback) and expert+fastpath Trainers, interleaved."""
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    import transformers_fastpath as fp

    enable_fastpath_kwarg()
    shape = BERT_TINY if bench.quick else BERT_BASE if bench.on_gpu else BERT_SMALL
    path = bert_checkpoint(shape, "seq-cls")
    batch = int(bench.pick("batch_size", gpu=32, cpu=8, quick=4))
    seq_len = int(bench.pick("seq_len", gpu=128, cpu=64, quick=32))
    steps = max(SKIP_STEPS + 1, int(bench.pick("steps", gpu=12, cpu=6, quick=3)))
    mixed: dict[str, Any] = ({"bf16": True} if bench.hardware.supports_bf16 else {"fp16": True}) if bench.on_gpu else {}
    precision = next(iter(mixed), "fp32")
    train_set = _dataset(batch * steps, seq_len, seed=0)
    workdir = Path(tempfile.mkdtemp(prefix="fastpath-bench-trainer-"))

    bench.define("default", "Trainer(model=from_pretrained(path), args=TrainingArguments(batch size, max_steps)) "
                            "with no other settings: float32")
    bench.define("expert", f"TrainingArguments(..., {precision}=True) and from_pretrained(path, "
                           "attn_implementation='sdpa')" if mixed else
                           "from_pretrained(path, attn_implementation='sdpa'); float32 "
                           "(mixed precision is slow on CPUs)")
    bench.define("compile", "expert + TrainingArguments(torch_compile=True)")
    bench.define("fastpath", "default + callbacks=[transformers_fastpath.FastpathCallback()] (the callback leaves "
                             "precision to TrainingArguments, so this is float32 like default)")
    bench.define("expert+fastpath", "expert + callbacks=[transformers_fastpath.FastpathCallback()]")
    if not bench.on_gpu:
        bench.omit("compile", "compiling forward and backward with inductor takes minutes on a CPU")

    settings: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {
        "default": ({}, {}, False),
        "expert": (mixed, {"attn_implementation": "sdpa"}, False),
        "compile": ({**mixed, "torch_compile": True}, {"attn_implementation": "sdpa"}, False),
        "fastpath": ({}, {}, True),
        "expert+fastpath": (mixed, {"attn_implementation": "sdpa"}, True),
    }
    timers: dict[str, Any] = {}

    def make(name: str) -> Any:
        args_extra, load_extra, callback = settings[name]
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, fastpath=False, **load_extra)
        args = TrainingArguments(
            output_dir=str(workdir / name), per_device_train_batch_size=batch, max_steps=steps,
            save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=not bench.on_gpu, seed=0, dataloader_num_workers=0, **args_extra)
        timers[name] = _step_timer()
        callbacks = [timers[name]] + ([fp.FastpathCallback()] if callback else [])
        _activate_state_for_build()
        trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    trainers = {name: bench.build(name, functools.partial(make, name)) for name in settings}
    trainers = {k: t for k, t in trainers.items() if t is not None}

    def variant(name: str, trainer: Any) -> Variant:
        initial = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}

        def train_round() -> tuple[float, list[float]]:
            # Every round is the same fresh fine-tune: initial weights, new optimizer and schedule,
            # the same seed (Trainer seeds only in __init__), so dropout masks and batch order match
            # across variants and rounds, and the training losses are comparable (the check).
            trainer.model.load_state_dict(initial)
            trainer.optimizer, trainer.lr_scheduler = None, None
            _activate(trainer)
            set_seed(0)
            first = len(timers[name].times)
            out = trainer.train()
            return float(out.training_loss), timers[name].times[first:]

        def run_round() -> Sample:
            loss, steps_s = train_round()
            median = statistics.median(steps_s[SKIP_STEPS:] or steps_s)
            return Sample({"train_loss": loss}, seconds=median)

        def warmup() -> Sample:
            # The first step of the first round pays torch.compile and the optimizer state: the one-time cost.
            loss, steps_s = train_round()
            return Sample({"train_loss": loss}, seconds=steps_s[0])

        return Variant(run_round, warmup)

    def check(name: str, reference: Any, candidate: Any) -> dict[str, Any]:
        half = bool(settings[name][0].get("bf16") or settings[name][0].get("fp16"))
        return compare_losses(reference, candidate, half=half)

    bench.config.update(model=f"BERT classifier {shape}, random weights", batch=batch, seq_len=seq_len,
                        steps_per_sample=steps, timed_steps_per_sample=steps - SKIP_STEPS, precision=precision,
                        torch_threads=torch.get_num_threads())
    if "fastpath" in trainers:
        bench.config["fastpath_plan"] = plan_summary(trainers["fastpath"].model)
    try:
        bench.measure(f"batch {batch} x {seq_len}", {k: variant(k, t) for k, t in trainers.items()}, check=check,
                      params={"batch": batch, "seq_len": seq_len, "steps": steps}, work=batch, work_unit="samples")
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _activate_state_for_build() -> None:
    """A Trainer builds its accelerator in ``__init__``: clear the previous variant's precision first."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


WORKLOAD = Workload(
    "trainer-step",
    "Trainer fine-tuning step time, BERT classifier (GPU: BERT-base shape, batch 32 x 128, bf16 for the expert; "
    "CPU: a small BERT, batch 8 x 64), with and without FastpathCallback",
    run,
)
