"""``feature-extraction``: the README's main job, the bundled all-MiniLM-L6-v2 over sentences of varied length.

320 sentences on a GPU, 96 on a CPU, 8 with ``--quick`` (``--set texts=N``); most are short,
a few long (:func:`~transformers_fastpath.bench.models.varied_sentences`). ``--model DIR``
benchmarks another sentence-embedding checkpoint, ``--batch-size N`` sets the expert's batch size,
``--set return_tensors=1`` asks every variant for tensors instead of nested lists.
Without the bundled model installed (``--tokenizer DIR`` given), the MiniLM shape with random
weights stands in.
"""

from __future__ import annotations

from ..models import minilm_checkpoint, tokenizer_path, varied_sentences
from ..runner import Bench
from ._common import needs_tokenizer
from ._pipelines import run_pipeline
from ._workload import Workload


def run(bench: Bench) -> None:
    """Embeddings of every token of every sentence, as the pipeline returns them (nested lists)."""
    model = bench.option("model")
    if model:
        path, what = str(model), str(model)
    else:
        checkpoint, what = minilm_checkpoint(tokenizer_path(bench.options))
        path = str(checkpoint)
    texts = varied_sentences(int(bench.pick("texts", gpu=320, cpu=96, quick=8)))
    tensors = bool(bench.option("return_tensors"))  # --set return_tensors=1: tensors, no nested lists
    run_pipeline(bench, task="feature-extraction", path=path, what=what, texts=texts,
                 expert_batch=int(bench.pick("batch_size", gpu=64, cpu=32, quick=4)),
                 call_kwargs={"return_tensors": True} if tensors else None)


WORKLOAD = Workload(
    "feature-extraction",
    "feature-extraction pipeline, the bundled all-MiniLM-L6-v2 over sentences of varied length "
    "(320 on GPU, 96 on CPU)",
    run,
    needs_tokenizer,
)
