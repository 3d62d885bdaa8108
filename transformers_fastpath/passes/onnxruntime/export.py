"""Export an encoder to ONNX with ``torch.onnx`` (the dynamo exporter), once per cache key.

The graph takes the model's text inputs (``input_ids``, ``attention_mask`` and, where the model
has them, ``token_type_ids``) with a dynamic batch and sequence length, and returns the tensors
of the model's output (``last_hidden_state`` and ``pooler_output``, or ``logits``...), in the
order :class:`ExportedGraph` records. It is traced from the class's own ``forward``, so no
instance-level override of fastpath's (or anyone's) is baked in. ``int8`` adds onnxruntime's
dynamic int8 quantization of the weights (smaller and faster; it changes outputs).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import export_key, locked, publish, read_manifest, write_manifest

__all__ = ["OPSET", "TEXT_INPUTS", "ExportedGraph", "exported_graph"]

logger = logging.getLogger(__name__)

OPSET = 18
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class ExportedGraph:
    """An export on disk: the ``.onnx`` file, its inputs and outputs, and whether it was reused."""

    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    key: str
    reused: bool


def exported_graph(model: nn.Module, folder_root: Path, *, quantize: str,
                   progress: bool = True) -> tuple[ExportedGraph, type, dict[str, Any]]:
    """The export of ``model`` under ``folder_root`` (made now, or reused when its key matches),
    the model's output class, and the recipe the key was made with."""
    inputs = _text_inputs(model)
    output_type, outputs = _outputs(model, inputs)
    recipe = {"inputs": inputs, "outputs": outputs, "opset": OPSET, "quantize": quantize, "exporter": "dynamo"}
    key, described = export_key(model, recipe)
    folder = folder_root / "onnx" / key
    manifest = read_manifest(folder)
    reused = manifest is not None
    if manifest is None:
        with locked(folder):
            manifest = read_manifest(folder)  # another process may have built it while we waited
            reused = manifest is not None
            if manifest is None:
                manifest = _build(model, folder, inputs, outputs, quantize, described, progress)
    graph = ExportedGraph(folder / manifest["model_file"], tuple(manifest["inputs"]), tuple(manifest["outputs"]),
                          key, reused)
    return graph, output_type, recipe


def _text_inputs(model: nn.Module) -> tuple[str, ...]:
    from ..instance_methods import method_signature

    signature = method_signature(type(model), "forward")
    names = set(signature.parameters) if signature is not None else set()
    if "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"{type(model).__name__}.forward takes no input_ids/attention_mask")
    return tuple(name for name in TEXT_INPUTS if name in names)


def _dummy(model: nn.Module, inputs: Sequence[str]) -> dict[str, Any]:
    """Two rows of 16 tokens, the second padded, so the traced graph takes the masked path."""
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: values[name] for name in inputs}


def _outputs(model: nn.Module, inputs: Sequence[str]) -> tuple[type, tuple[str, ...]]:
    """The class of the model's output and the names of its tensors, from one small call."""
    with torch.no_grad():
        out = type(model).forward(model, **_dummy(model, inputs), return_dict=True)
    names = tuple(name for name, value in out.items() if isinstance(value, torch.Tensor))
    if not names:
        raise ValueError(f"{type(model).__name__}.forward returns no tensors")
    return type(out), names


class _Positional(torch.nn.Module):
    """The model's class ``forward`` with positional inputs and a tuple of output tensors (what the
    exporter traces)."""

    def __init__(self, model: nn.Module, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = type(self.model).forward(self.model, **dict(zip(self.inputs, tensors)), return_dict=True)
        return tuple(out[name] for name in self.outputs)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from the ``name`` logger tree (torch.onnx warns about every optional package it lacks)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _unconverted_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every pass applied so far undone (the fused encoder's
    routes do not export): the graph computes what the unconverted model computes."""
    import copy

    from ..runner import revert_model

    plain = copy.deepcopy(model)
    revert_model(plain)
    return plain.eval()


def _build(model: nn.Module, folder: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], quantize: str,
           described: dict[str, Any], progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    steps = ["export", "check"] + (["int8"] if quantize == "int8" else [])
    bar = tqdm(total=len(steps), desc=f"fastpath: ONNX export of {type(model).__name__}", unit="step",
               disable=not progress, leave=False)
    dummy = _dummy(model, inputs)
    dims = {0: "batch", 1: "sequence"}
    with publish(folder) as staging:
        fp32 = staging / "model.onnx"
        plain = _unconverted_copy(model)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")  # the exporter narrates each step; the bar says where it is
            program = torch.onnx.export(
                _Positional(plain, inputs, outputs), tuple(dummy[name] for name in inputs),
                input_names=list(inputs), output_names=list(outputs), opset_version=OPSET, dynamo=True,
                dynamic_shapes=(tuple(dims for _ in inputs),), verbose=False)  # one entry: the *tensors parameter
            program.save(str(fp32))
        del plain, program
        bar.update()
        import onnx

        onnx.checker.check_model(str(fp32))
        bar.update()
        model_file = fp32.name
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8 = staging / "model.int8.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
            fp32.unlink()
            model_file = int8.name
            bar.update()
        manifest = {**described, "model_file": model_file, "inputs": list(inputs), "outputs": list(outputs)}
        write_manifest(staging, manifest)
    bar.close()
    logger.info("fastpath: exported %s to ONNX in %s", type(model).__name__, folder)
    return manifest
