"""A torchrun worker for tests/test_trainer.py: Trainer steps under DistributedDataParallel on
CPU (gloo) with ``FastpathCallback``.

Run as ``torchrun --nproc-per-node 2 tests/trainer_ddp_worker.py --model DIR --out DIR``. Each
rank trains the same classifier on its share of the data and writes ``rank<R>.json`` (its
losses, what the Trainer wrapped the model in, the fastpath plan) and ``rank<R>.pt`` (its trained
state_dict). ``trainer.save_model(OUT/saved)`` writes the checkpoint from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)

    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    import transformers_fastpath as fp

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 13, (24,), generator=gen)
    data = [{"input_ids": torch.randint(3, 100, (12,), generator=gen),
             "attention_mask": (torch.arange(12) < n).long(), "labels": torch.tensor(i % 2)}
            for i, n in enumerate(lengths.tolist())]
    training = TrainingArguments(output_dir=str(out / "run"), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                                 disable_tqdm=True, use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[fp.FastpathCallback()])
    trainer.train()
    trainer.save_model(str(out / "saved"))

    rank = int(os.environ["RANK"])
    plan = fp.plan_of(trainer.model)
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": int(os.environ["WORLD_SIZE"]),
        "wrapped": type(trainer.model_wrapped).__name__,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "applied": [] if plan is None else [name for name in ("fused_encoder", "sdpa_backends")
                                            if (s := plan.pass_status(name)) and s.status == "applied"],
    }))


if __name__ == "__main__":
    main()
