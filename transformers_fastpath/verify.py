"""The ``verify`` step: a probe batch through the converted model, compared with the original.

With ``verify = true`` in the policy the runner (:func:`~transformers_fastpath.passes.runner.apply_plan`)
runs a small probe batch built from the model's config through the model *before* any pass is
applied (the reference), then again after each pass is applied; a pass whose output differs
from the reference beyond a dtype-aware tolerance is rolled back (its transaction restored)
with the difference as the reason. The probe is:

* text models (``main_input_name == "input_ids"``): two sequences of different lengths
  (16 and 8 tokens, fewer when the model has fewer positions), right-padded, with an
  ``attention_mask`` -- so padding-free routes are exercised; encoder-decoder models also get
  ``decoder_input_ids``;
* vision models (``pixel_values``): two random images of the config's ``image_size``.

Only the model's ``forward`` is probed: passes that change ``generate`` only (static cache,
compile) are not exercised. Positions that are padding in the probe are left out of the
comparison (padding-free routes leave zeros there, the original forward does not).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Probe", "ProbeUnavailable", "build_probe", "compare", "run_probe", "tolerance"]

logger = logging.getLogger(__name__)

TEXT_LENGTHS = (16, 8)
# (atol, rtol) per output dtype; atol is scaled by max(1, max |reference|) so large activations
# (logits, unnormalized hidden states) are judged relative to their size.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-4, 1e-3),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 2e-2),
}


class ProbeUnavailable(Exception):
    """No probe batch can be built or run for this model; ``str()`` says why."""


@dataclass(frozen=True)
class Probe:
    """Inputs for one probe call, and the ``(batch, length)`` mask of real positions (or None)."""

    inputs: dict[str, torch.Tensor]
    keep: torch.Tensor | None
    description: str


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for outputs of ``dtype`` (float32's for unknown floating dtypes)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def build_probe(model: nn.Module) -> Probe:
    """A small padded batch for ``model``, built from its config alone (fixed seed)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ProbeUnavailable(f"{type(model).__name__} has no config to build a probe batch from")
    main = getattr(model, "main_input_name", "input_ids")
    device = _input_device(model)
    generator = torch.Generator().manual_seed(0)
    if main == "input_ids":
        vocab = _config_int(config, "vocab_size")
        if not vocab or vocab < 2:
            raise ProbeUnavailable("the config has no vocab_size")
        positions = _config_int(config, "max_position_embeddings", "n_positions", "max_seq_len")
        longest = TEXT_LENGTHS[0] if not positions else max(2, min(TEXT_LENGTHS[0], positions - 2))
        lengths = (longest, max(1, longest // 2))
        pad = getattr(config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
        low = min(5, vocab - 1)  # stay clear of the usual special-token ids
        ids = torch.randint(low, vocab, (len(lengths), longest), generator=generator)
        real = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        ids[~real] = pad
        keep: torch.Tensor | None = real
        inputs = {"input_ids": ids.to(device), "attention_mask": real.long().to(device)}
        if getattr(config, "is_encoder_decoder", False):
            start = getattr(config, "decoder_start_token_id", None)
            start = start if isinstance(start, int) and 0 <= start < vocab else pad
            inputs["decoder_input_ids"] = torch.full((len(lengths), 4), start, dtype=torch.long, device=device)
            keep = None  # decoder outputs are not padded like the encoder input
        return Probe(inputs, keep, f"{len(lengths)} sequences of {lengths[0]} and {lengths[1]} tokens, right-padded")
    if main == "pixel_values":
        size = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", 3)
        if isinstance(size, int):
            height = width = size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            height, width = size
        else:
            raise ProbeUnavailable(f"the config's image_size is {size!r}")
        dtype = _float_dtype(model)
        pixels = torch.randn(2, channels, height, width, generator=generator).to(device=device, dtype=dtype)
        return Probe({"pixel_values": pixels}, None, f"2 random {height}x{width} images")
    raise ProbeUnavailable(f"no probe batch for models whose main input is {main!r} (text and images only)")


def run_probe(model: nn.Module, probe: Probe) -> Any:
    """The model's forward on the probe, in eval mode without autograd (modes restored after)."""
    kwargs: dict[str, Any] = dict(probe.inputs)
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(**kwargs)
    finally:
        for module, training in modes:
            vars(module)["training"] = training


def compare(reference: Any, output: Any, keep: torch.Tensor | None) -> tuple[bool, str]:
    """``(matches, detail)``: every tensor of ``output`` against ``reference`` (padding left out)."""
    ref_items = list(_tensors(reference))
    out_items = list(_tensors(output))
    if [name for name, _ in ref_items] != [name for name, _ in out_items]:
        return False, (f"the outputs differ in structure: {[n for n, _ in out_items]} instead of "
                       f"{[n for n, _ in ref_items]}")
    worst = (0.0, 0.0, "")  # (diff / allowed, diff, name)
    for (name, ref), (_, out) in zip(ref_items, out_items):
        if ref.shape != out.shape or ref.dtype != out.dtype:
            return False, f"{name}: shape/dtype {tuple(out.shape)}/{out.dtype} instead of {tuple(ref.shape)}/{ref.dtype}"
        if keep is not None and ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(keep.shape):
            mask = keep.to(ref.device)
            ref, out = ref[mask], out[mask]
        if not ref.is_floating_point():
            if not torch.equal(ref, out):
                return False, f"{name}: the values differ"
            continue
        atol, rtol = tolerance(ref.dtype)
        ref32, out32 = ref.float(), out.float()
        if ref32.numel() == 0:
            continue
        if not (torch.isfinite(out32) == torch.isfinite(ref32)).all():
            return False, f"{name}: non-finite values where the original has finite ones (or the reverse)"
        finite = torch.isfinite(ref32)
        diff = (out32 - ref32).abs()[finite]
        allowed = atol * max(1.0, float(ref32[finite].abs().max()) if finite.any() else 1.0) + rtol * ref32.abs()[finite]
        if diff.numel() == 0:
            continue
        ratio = float((diff / allowed).max())
        if ratio > worst[0]:
            worst = (ratio, float(diff.max()), name)
        if ratio > 1.0:
            return False, (f"{name}: max abs difference {float(diff.max()):.3g} exceeds the {ref.dtype} tolerance "
                           f"(atol {atol:g} x max(1, |reference|), rtol {rtol:g})")
    if worst[2]:
        return True, f"max abs difference {worst[1]:.3g} ({worst[2]}), {worst[0]:.0%} of the tolerance"
    return True, "identical"


# -- helpers ---------------------------------------------------------------------------

def _tensors(value: Any, name: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):  # ModelOutput is an OrderedDict holding the non-None fields
        for key, item in value.items():
            yield from _tensors(item, key if name == "output" else f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]")


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = getattr(config, "get_text_config", None)
    if callable(text):
        try:
            sub = text()
        except (AttributeError, TypeError, ValueError):  # multimodal configs without a text part
            return None
        if sub is not config:
            return _config_int(sub, *names)
    return None


def _input_device(model: nn.Module) -> torch.device:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = None
    if callable(get_embeddings):
        try:
            weight = getattr(get_embeddings(), "weight", None)
        except (AttributeError, NotImplementedError):  # models without (standard) input embeddings
            weight = None
    if isinstance(weight, torch.Tensor):
        return weight.device
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters
