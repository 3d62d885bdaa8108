"""``generate`` workloads (``generate``, ``quantized-generate``): decoding modes, prompts, timed calls, checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..models import LLAMA_085B, LLAMA_SMALL, LLAMA_TINY, llama_checkpoint, quiet_transformers
from ..runner import Bench, Sample, Variant, sync
from ._common import dtype_name, enable_fastpath_kwarg

__all__ = ["MODES", "Setup", "build_causal_variants", "generate_call", "llama_setup", "load_causal", "load_expert",
           "measure_generate"]

# Decoding modes: generate() settings on top of max_new_tokens and pad_token_id. The checkpoints have
# no EOS token, so min_new_tokens names one (id 2) and blocks it for every new token: all modes make
# exactly new_tokens tokens, and min_new_tokens measures the cost of its processor.
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
MODES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False},
    "min_new_tokens": {"do_sample": False, "eos_token_id": 2, "min_new_tokens": -1},  # -1: all new tokens
    "repetition_penalty": {"do_sample": False, "repetition_penalty": 1.1},
    "sampling": SAMPLING,
}


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
        self.modes = ["greedy"]

    def config(self) -> dict[str, Any]:
        return {"model": f"{self.shape_name}, random weights (bf16 checkpoint)", "shape": self.shape,
                "prompt_tokens": self.prompt_len, "new_tokens": self.new_tokens, "batches": self.batches,
                "modes": {mode: self.settings(mode) for mode in self.modes}}

    def choose_modes(self, bench: Bench, *, default: list[str]) -> None:
        """The decoding modes to measure: ``--set modes=greedy,sampling``, else ``default``."""
        modes = bench.option("modes", default)
        modes = [str(m) for m in (modes if isinstance(modes, (list, tuple)) else [modes])]
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"--set modes: unknown decoding mode(s) {unknown}; choose from {sorted(MODES)}")
        self.modes = modes

    def settings(self, mode: str) -> dict[str, Any]:
        """The generate() settings of ``mode`` for this setup's sizes."""
        return {k: (self.new_tokens if v == -1 else v) for k, v in MODES[mode].items()}


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


def build_causal_variants(bench: Bench, setup: Setup) -> dict[str, Any]:
    """The four models of a generate workload, each as its user makes it (None where omitted or failed):
    ``default`` (no settings, moved by hand), ``expert`` (half precision on a GPU, SDPA), ``compile``
    (expert + transformers' static-cache recipe) and ``fastpath`` (``from_pretrained(..., fastpath=True)``)."""
    device = bench.device

    def expert() -> Any:
        return load_expert(bench, setup.path)

    def compiled() -> Any:
        model = expert()
        model.generation_config.cache_implementation = "static"
        return model

    return {
        "default": bench.build("default", lambda: load_causal(setup.path, device, fastpath=False)),
        "expert": bench.build("expert", expert),
        "compile": bench.build("compile", compiled),
        "fastpath": bench.build("fastpath", lambda: load_causal(setup.path, device, fastpath=True)),
    }


def load_expert(bench: Bench, path: str) -> Any:
    """The expert's model of ``path``: half precision (bfloat16) and SDPA on a GPU, placed on it; float32 on a CPU."""
    import torch

    half = torch.bfloat16 if bench.on_gpu else torch.float32
    placed: dict[str, Any] = {"device_map": {"": bench.device}} if bench.on_gpu else {}
    return load_causal(path, bench.device, fastpath=False, dtype=half, attn_implementation="sdpa", **placed)


def generate_call(model: Any, ids: Any, mask: Any, new_tokens: int, **extra: Any) -> Any:
    """``generate`` of exactly ``new_tokens`` tokens, greedy unless ``extra`` says otherwise."""
    import torch

    settings = {"do_sample": False, **extra}
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, **settings)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _variant(model: Any, ids: Any, mask: Any, new_tokens: int, settings: dict[str, Any]) -> Variant:
    """A full call (timed) and a one-token call (time to first token) per sample."""
    first_settings = {k: (1 if k == "min_new_tokens" else v) for k, v in settings.items()}

    def run() -> Sample:
        full_s, out = _timed(lambda: generate_call(model, ids, mask, new_tokens, **settings))
        first_s, _ = _timed(lambda: generate_call(model, ids, mask, 1, **first_settings))
        return Sample(out, seconds=full_s, metrics={
            "ttft_ms": first_s * 1e3,
            "decode_ms_per_token": max(full_s - first_s, 0.0) / (new_tokens - 1) * 1e3,
        })

    def warmup() -> Sample:
        full_s, out = _timed(lambda: generate_call(model, ids, mask, new_tokens, **settings))
        generate_call(model, ids, mask, 1, **first_settings)  # the first-token path too
        return Sample(out, seconds=full_s)

    return Variant(run, warmup)


def measure_generate(bench: Bench, setup: Setup, models: dict[str, Any],
                     make_check: Callable[[Any, Any, dict[str, str], Callable[[], tuple[Any, Any]]], Any]) -> None:
    """One case per decoding mode and batch size; ``make_check(ids, mask, dtypes, reference)`` builds
    the check of a greedy mode's case (sampled modes get :func:`_sampled_check`).

    Prompts are made on the CPU and each variant gets them on its own model's device (the fastpath
    model is wherever its plan put it); ``ids`` and ``mask`` given to ``make_check`` are on the CPU.

    ``reference()`` runs the default model once more with the mode's settings, untimed, keeping its
    logits: ``(sequences, logits)``.
    """
    import torch

    models = {k: m for k, m in models.items() if m is not None}
    dtypes = {k: dtype_name(m) for k, m in models.items()}
    vocab = setup.shape["vocab_size"]
    for mode in setup.modes:
        settings = setup.settings(mode)
        for batch in setup.batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, vocab, (batch, setup.prompt_len), generator=gen)
            mask = torch.ones_like(ids)
            cache: dict[str, tuple[Any, Any]] = {}

            def reference(ids: Any = ids, mask: Any = mask, cache: dict[str, tuple[Any, Any]] = cache,
                          settings: dict[str, Any] = settings) -> tuple[Any, Any]:
                if "ref" not in cache and "default" in models:
                    model = models["default"]
                    out = generate_call(model, ids.to(model.device), mask.to(model.device), setup.new_tokens,
                                        output_logits=True, return_dict_in_generate=True, **settings)
                    cache["ref"] = (out.sequences.cpu(), torch.stack(out.logits, dim=1).float().cpu())
                    del out
                return cache["ref"]

            sampled = bool(settings.get("do_sample"))
            check = (_sampled_check(setup, settings, reference) if sampled
                     else make_check(ids, mask, dtypes, reference))
            live = {k: m for k, m in models.items() if bench.wanted(k)}
            bench.measure(f"batch {batch}" if mode == "greedy" else f"{mode}, batch {batch}",
                          {k: _variant(m, ids.to(m.device), mask.to(m.device), setup.new_tokens, settings)
                           for k, m in live.items()},
                          check=check,
                          params={"mode": mode, "batch": batch, "prompt_tokens": setup.prompt_len,
                                  "new_tokens": setup.new_tokens},
                          work=batch * setup.new_tokens, work_unit="tokens")
            cache.clear()
    bench.config["dtypes"] = dtypes
    bench.config["devices"] = {k: str(m.device) for k, m in models.items()}


def _sampled_check(setup: Setup, settings: dict[str, Any],
                   reference: Callable[[], tuple[Any, Any]]) -> Callable[[str, Any, Any], dict[str, Any]]:
    """Sampled tokens differ between variants by design; what must hold: every variant makes exactly
    ``new_tokens`` tokens per row, and each row's first new token (same prompt, same logits up to
    rounding) lies inside the reference's filtered distribution, here its top-p 0.95 nucleus at the
    mode's temperature (a slack of 0.05 over the mode's 0.9 for half-precision rounding)."""

    def check(variant: str, default_out: Any, out: Any) -> dict[str, Any]:
        _, logits = reference()
        new = out[:, setup.prompt_len:].cpu()
        if new.shape != (logits.shape[0], setup.new_tokens):
            return {"passed": False, "criterion": "new_tokens tokens per row", "shape": list(new.shape)}
        probs = (logits[:, 0] / float(settings.get("temperature", 1.0))).softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        inside = (sorted_probs.cumsum(-1) - sorted_probs) < 0.95  # the nucleus, its last token included
        ranks = (order == new[:, :1]).int().argmax(-1)
        in_nucleus = inside.gather(1, ranks[:, None])[:, 0]
        return {"passed": bool(in_nucleus.all()), "criterion": "first sampled token in the reference's nucleus",
                "first_token_in_nucleus": in_nucleus.tolist()}

    return check
