"""Encoder forward passes (``encoder-latency``, ``encoder-padded``): the four variants and one case."""

from __future__ import annotations

from typing import Any

from ..checks import compare_hidden, is_half
from ..models import (
    BERT_BASE,
    BERT_TINY,
    BERT_VOCAB,
    bert_checkpoint,
    draw_lengths,
    minilm_checkpoint,
    quiet_transformers,
    random_batch,
)
from ..runner import Bench, Variant
from ._common import dtype_name, enable_fastpath_kwarg, plan_summary

__all__ = ["run_encoder"]


def _model_path(bench: Bench) -> tuple[str, str]:
    """(checkpoint directory, what it is): BERT-base random weights on GPU, all-MiniLM-L6-v2 on CPU.

    ``--set model=bert-base|minilm|bert-tiny|DIR`` picks another.
    """
    choice = bench.pick("model", gpu="bert-base", cpu="minilm", quick="minilm" if not bench.on_gpu else "bert-tiny")
    if choice == "bert-base":
        return str(bert_checkpoint(BERT_BASE)), "BERT-base shape, random weights (fp32 checkpoint)"
    if choice == "bert-tiny":
        return str(bert_checkpoint(BERT_TINY)), "tiny BERT, random weights (fp32 checkpoint)"
    if choice == "minilm":
        path, what = minilm_checkpoint()
        return str(path), what
    return str(choice), str(choice)


def run_encoder(bench: Bench, *, batch: int, length: int, fill: float, calls: int) -> None:
    """Time ``model(input_ids, attention_mask)`` on one ``batch x length`` batch at mean ``fill``."""
    import torch
    from transformers import AutoModel

    enable_fastpath_kwarg()
    path, what = _model_path(bench)
    half = torch.float16 if bench.on_gpu else torch.float32
    half_name = dtype_name(half)
    device = bench.device

    def load(fastpath: bool | dict[str, Any], **kwargs: Any) -> Any:
        with quiet_transformers():
            return AutoModel.from_pretrained(path, fastpath=fastpath, **kwargs)

    def placed(**kwargs: Any) -> Any:
        """A baseline, moved to the device by hand as its user would (from_pretrained returns it in eval mode)."""
        return load(False, **kwargs).to(device)

    def compiled() -> Any:
        model = placed(dtype=half, attn_implementation="sdpa")
        model.forward = torch.compile(model.forward)
        return model

    bench.define("default", f"AutoModel.from_pretrained(path) with no settings (the checkpoint's float32, "
                            f"transformers' default attention), moved to {device} by hand")
    bench.define("expert", f"from_pretrained(path, dtype={half_name}, attn_implementation='sdpa'), moved to {device}"
                 + ("" if bench.on_gpu else " (float32: half precision is slow on CPUs)"))
    bench.define("compile", f"expert + model.forward = torch.compile(model.forward) (inductor, default mode): "
                            f"torch.compile of the {half_name} sdpa model")
    bench.define("fastpath", "AutoModel.from_pretrained(path, fastpath=True) and nothing else: not moved, not "
                             "applied again; the plan picks device, dtype, attention and fused encoder (the inputs "
                             "go to model.device)")
    if bench.on_gpu:
        # fastpath's own plan picks float16 for these encoders on a GPU; the other half precision,
        # side by side, keeps the choice measured (error against float32 at the same speed class).
        bench.define("fastpath-bf16", "AutoModel.from_pretrained(path, fastpath={'defaults': {'dtype': 'bfloat16'}}): "
                                      "fastpath's plan with bfloat16 instead of its float16")
    if bench.quick and not bench.on_gpu:
        bench.omit("compile", "--quick on a CPU: inductor takes tens of seconds to compile the encoder")
    models = {
        "default": bench.build("default", lambda: placed()),
        "expert": bench.build("expert", lambda: placed(dtype=half, attn_implementation="sdpa")),
        "compile": bench.build("compile", compiled),
        "fastpath": bench.build("fastpath", lambda: load(True)),
    }
    if bench.on_gpu:
        models["fastpath-bf16"] = bench.build("fastpath-bf16", lambda: load({"defaults": {"dtype": "bfloat16"}}))
    models = {k: m for k, m in models.items() if m is not None}
    lengths = draw_lengths(batch, length, fill, seed=0)
    vocab = getattr(next(iter(models.values())).config, "vocab_size", BERT_VOCAB) if models else BERT_VOCAB
    ids, mask = random_batch(vocab, lengths, length, seed=0)
    dtypes = {k: dtype_name(m) for k, m in models.items()}
    devices = {k: str(m.device) for k, m in models.items()}

    def forward(model: Any) -> Any:
        ids_here, mask_here = ids.to(model.device), mask.to(model.device)  # inputs go where the model is

        def run() -> Any:
            with torch.inference_mode():
                for _ in range(calls):
                    out = model(input_ids=ids_here, attention_mask=mask_here).last_hidden_state
            return out

        return run

    def check(variant: str, reference: Any, candidate: Any) -> dict[str, Any]:
        return compare_hidden(reference, candidate, mask, half=is_half(dtypes["default"], dtypes[variant]))

    real_fill = sum(lengths) / (batch * length)
    bench.config.update(model=what, batch=batch, length=length, target_fill=fill, fill=round(real_fill, 4),
                        dtypes=dtypes, devices=devices,
                        fastpath_plan=plan_summary(models["fastpath"]) if "fastpath" in models else None)
    bench.measure(f"{batch}x{length} fill {real_fill:.0%}", {k: Variant(forward(m)) for k, m in models.items()},
                  check=check, params={"batch": batch, "length": length, "fill": round(real_fill, 4)}, calls=calls,
                  work=sum(lengths), work_unit="tokens")
