"""``multi-gpu-pipeline``: a BERT-base text-classification pipeline over 8,000 texts, one GPU vs all of them.

Needs at least two CUDA GPUs. ``default`` and ``expert`` use one GPU (what users reach for:
splitting a model that fits one GPU with ``device_map`` is slower, see DESIGN.md); ``fastpath``
is the default call plus ``fastpath=True``, whose plan puts one replica on each GPU and splits
the list between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..models import BERT_BASE, BERT_TINY, bert_checkpoint, tokenizer_path, varied_sentences
from ..runner import Bench
from ._common import needs_tokenizer
from ._pipelines import run_pipeline
from ._workload import Workload

if TYPE_CHECKING:
    from ...planning.hardware import Hardware


def requires(hardware: Hardware, options: Mapping[str, Any]) -> str | None:
    """Two or more CUDA GPUs, and a tokenizer."""
    if hardware.device != "cuda" or hardware.count < 2:
        found = f"{hardware.count} CUDA GPU" if hardware.device == "cuda" else "no CUDA GPU"
        return f"needs >= 2 CUDA GPUs (found {found})"
    return needs_tokenizer(hardware, options)


def run(bench: Bench) -> None:
    """Throughput over one long list: replicas split it, one GPU runs it alone."""
    path = bert_checkpoint(BERT_TINY if bench.quick else BERT_BASE, "seq-cls", tokenizer=tokenizer_path(bench.options))
    texts = varied_sentences(int(bench.pick("texts", gpu=8000, cpu=8000, quick=64)), seed=2)
    run_pipeline(bench, task="text-classification", path=str(path),
                 what=("tiny" if bench.quick else "BERT-base shape") + " classifier, random weights",
                 texts=texts, expert_batch=int(bench.pick("batch_size", gpu=64, cpu=64, quick=8)),
                 call_kwargs={"top_k": None})
    bench.config["gpus"] = bench.hardware.count


WORKLOAD = Workload(
    "multi-gpu-pipeline",
    "BERT-base text-classification pipeline over 8,000 texts: one GPU vs fastpath's replicas on every GPU",
    run,
    requires,
)
