"""``pipeline-text-classification``: a text-classification pipeline over many texts of varied length.

GPU: BERT-base shape (random weights, 2 labels), 1000 texts. CPU: the real all-MiniLM-L6-v2
encoder with a seeded random head, 128 texts. ``--quick``: a tiny BERT, 8 texts. Texts from
:func:`~transformers_fastpath.bench.models.varied_sentences`, tokenized by the MiniLM tokenizer;
every label's score is returned (``top_k=None``) so the check compares probabilities.
"""

from __future__ import annotations

from ..models import (
    BERT_BASE,
    BERT_TINY,
    bert_checkpoint,
    minilm_classifier_checkpoint,
    tokenizer_path,
    varied_sentences,
)
from ..runner import Bench
from ._common import needs_tokenizer
from ._pipelines import run_pipeline
from ._workload import Workload


def run(bench: Bench) -> None:
    """Labels and scores for every text."""
    tokenizer = tokenizer_path(bench.options)
    if bench.quick:
        path, what = bert_checkpoint(BERT_TINY, "seq-cls", tokenizer=tokenizer), "tiny BERT classifier, random weights"
    elif bench.on_gpu:
        path = bert_checkpoint(BERT_BASE, "seq-cls", tokenizer=tokenizer)
        what = "BERT-base shape classifier, random weights (fp32)"
    else:
        path, what = minilm_classifier_checkpoint(tokenizer)
    texts = varied_sentences(int(bench.pick("texts", gpu=1000, cpu=128, quick=8)), seed=1)
    run_pipeline(bench, task="text-classification", path=str(path), what=what, texts=texts,
                 expert_batch=int(bench.pick("batch_size", gpu=64, cpu=32, quick=4)), call_kwargs={"top_k": None})


WORKLOAD = Workload(
    "pipeline-text-classification",
    "text-classification pipeline over many varied texts (GPU: BERT-base shape, 1000 texts; "
    "CPU: MiniLM classifier, 128 texts)",
    run,
    needs_tokenizer,
)
