"""Greedy ``generate`` (``generate``, ``quantized-generate``): prompts, timed calls, reference logits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..models import LLAMA_085B, LLAMA_SMALL, LLAMA_TINY, llama_checkpoint, quiet_transformers
from ..runner import Bench, Sample, Variant, sync
from ._common import dtype_name, enable_fastpath_kwarg

__all__ = ["Setup", "generate_call", "llama_setup", "load_causal", "measure_generate"]


class Setup:
    """The checkpoint and request sizes of a generate workload on this machine."""

    def __init__(self, bench: Bench) -> None:
        shape = LLAMA_TINY if bench.quick else LLAMA_085B if bench.on_gpu else LLAMA_SMALL
        self.shape_name = "tiny Llama" if bench.quick else "0.85B Llama shape" if bench.on_gpu else "small Llama"
        self.shape = shape
        self.path = str(llama_checkpoint(shape, on_gpu=bench.on_gpu))
        self.prompt_len = int(bench.pick("prompt", gpu=128, cpu=32, quick=8))
        self.new_tokens = max(2, int(bench.pick("new_tokens", gpu=128, cpu=32, quick=4)))
        batches = bench.pick("batches", gpu=[1, 16], cpu=[1, 4], quick=[1, 2])
        self.batches = [int(b) for b in (batches if isinstance(batches, (list, tuple)) else [batches])]

    def config(self) -> dict[str, Any]:
        return {"model": f"{self.shape_name}, random weights (bf16 checkpoint)", "shape": self.shape,
                "prompt_tokens": self.prompt_len, "new_tokens": self.new_tokens, "batches": self.batches,
                "greedy": True}


def llama_setup(bench: Bench) -> Setup:
    """Sizes for this machine (``--set prompt=... new_tokens=... batches=1,16``) and the checkpoint."""
    return Setup(bench)


def load_causal(path: str, device: str, *, fastpath: Any, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, fastpath=..., **kwargs)``, as its user would get it.

    With ``fastpath`` (True or a policy) the model is returned exactly as ``from_pretrained`` gives it:
    not moved, not applied again (the plan decides where it runs). Without it (a baseline) a model
    that did not land on ``device`` is moved there by hand, as a user with a GPU does.
    """
    from transformers import AutoModelForCausalLM

    enable_fastpath_kwarg()
    with quiet_transformers():
        model: Any = AutoModelForCausalLM.from_pretrained(path, fastpath=fastpath, **kwargs)
    if fastpath:
        return model
    if next(model.parameters()).device.type != device.split(":")[0]:
        model.to(device)
    return model


def generate_call(model: Any, ids: Any, mask: Any, new_tokens: int, **extra: Any) -> Any:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (the checkpoints have no end-of-sequence token)."""
    import torch

    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, **extra)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _variant(model: Any, ids: Any, mask: Any, new_tokens: int) -> Variant:
    """A full call (timed) and a one-token call (time to first token) per sample."""

    def run() -> Sample:
        full_s, out = _timed(lambda: generate_call(model, ids, mask, new_tokens))
        first_s, _ = _timed(lambda: generate_call(model, ids, mask, 1))
        return Sample(out, seconds=full_s, metrics={
            "ttft_ms": first_s * 1e3,
            "decode_ms_per_token": max(full_s - first_s, 0.0) / (new_tokens - 1) * 1e3,
        })

    def warmup() -> Sample:
        full_s, out = _timed(lambda: generate_call(model, ids, mask, new_tokens))
        generate_call(model, ids, mask, 1)  # the first-token path too
        return Sample(out, seconds=full_s)

    return Variant(run, warmup)


def measure_generate(bench: Bench, setup: Setup, models: dict[str, Any],
                     make_check: Callable[[Any, Any, dict[str, str], Callable[[], tuple[Any, Any]]], Any]) -> None:
    """One case per batch size; ``make_check(ids, mask, dtypes, reference)`` builds the case's check.

    Prompts are made on the CPU and each variant gets them on its own model's device (the fastpath
    model is wherever its plan put it); ``ids`` and ``mask`` given to ``make_check`` are on the CPU.

    ``reference()`` runs the default model once more, untimed, keeping its logits: ``(sequences, logits)``.
    """
    import torch

    models = {k: m for k, m in models.items() if m is not None}
    dtypes = {k: dtype_name(m) for k, m in models.items()}
    vocab = setup.shape["vocab_size"]
    for batch in setup.batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, setup.prompt_len), generator=gen)
        mask = torch.ones_like(ids)
        cache: dict[str, tuple[Any, Any]] = {}

        def reference(ids: Any = ids, mask: Any = mask, cache: dict[str, tuple[Any, Any]] = cache) -> tuple[Any, Any]:
            if "ref" not in cache and "default" in models:
                model = models["default"]
                out = generate_call(model, ids.to(model.device), mask.to(model.device), setup.new_tokens,
                                    output_logits=True, return_dict_in_generate=True)
                cache["ref"] = (out.sequences.cpu(), torch.stack(out.logits, dim=1).float().cpu())
                del out
            return cache["ref"]

        live = {k: m for k, m in models.items() if bench.wanted(k)}
        bench.measure(f"batch {batch}", {k: _variant(m, ids.to(m.device), mask.to(m.device), setup.new_tokens)
                                         for k, m in live.items()},
                      check=make_check(ids, mask, dtypes, reference),
                      params={"batch": batch, "prompt_tokens": setup.prompt_len, "new_tokens": setup.new_tokens},
                      work=batch * setup.new_tokens, work_unit="tokens")
        cache.clear()
    bench.config["dtypes"] = dtypes
    bench.config["devices"] = {k: str(m.device) for k, m in models.items()}
