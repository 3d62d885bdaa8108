"""Policy quantization methods -> transformers quantization configs.

What this module knows, per method (``bnb-int8``, ``bnb-nf4``, ``bnb-fp4``, ``torchao-int8``,
``torchao-int4``, ``torchao-float8``):

- how many bytes a quantized weight takes (scales included), to decide what fits;
- whether it can run here (package installed, device, GPU generation) and the fix when not;
- which ``nn.Linear`` layers it must leave dense: heads (LM head, classifier) always, plus
  layers whose shape the kernel cannot take (bitsandbytes 4-bit on a CPU with AVX512-BF16
  repacks weights in blocks of 32 output rows and one absmax per 64 inputs, so it needs
  ``out_features % 32 == 0`` and ``in_features % 64 == 0``);
- the ``BitsAndBytesConfig`` / ``TorchAoConfig`` that ``from_pretrained`` receives.

Layer facts come from the architecture built on the meta device (no memory, no weights) and
are cached per config.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..errors import FastpathError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..planning.hardware import Hardware

__all__ = [
    "AUTO_ORDER",
    "METHODS",
    "LayerInventory",
    "LinearLayer",
    "Obstacle",
    "QuantMethod",
    "QuantizationUnavailable",
    "build_quantization_config",
    "dense_modules",
    "inventory_of",
    "obstacle",
    "warn_once",
    "weights_bytes",
]

logger = logging.getLogger(__name__)

BNB_MIN_VERSION = (0, 45)
BNB_MIN_CPU_VERSION = (0, 48)  # the CPU backend in the regular wheels; tested with 0.50.2
TORCHAO_MIN_VERSION = (0, 15)  # transformers 5 refuses older torchao (utils.import_utils.TORCHAO_MIN_VERSION)
TORCHAO_INT4_GROUP = 128
BNB_4BIT_BLOCK = 64  # bitsandbytes' 4-bit blocksize (BitsAndBytesConfig has no option for it)


@dataclass(frozen=True)
class QuantMethod:
    """One quantization method of the policy.

    Attributes:
        name: the policy value (``"bnb-nf4"``).
        package: the import name it needs (``"bitsandbytes"``, ``"torchao"``).
        extra: the ``transformers-fastpath`` pip extra that installs it.
        weight_bytes: bytes per quantized weight, scales and statistics included.
        loss_rank: 0 = least lossy; ``auto`` tries methods in this order.
        summary: one line for plans and docs.
    """

    name: str
    package: str
    extra: str
    weight_bytes: float
    loss_rank: int
    summary: str


METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("bnb-int8", "bitsandbytes", "bnb", 1.0, 0,
                "bitsandbytes LLM.int8(): int8 weights, outlier features in fp16"),
    QuantMethod("torchao-int8", "torchao", "torchao", 1.0, 0, "torchao int8 weight-only, per-row scales"),
    QuantMethod("torchao-float8", "torchao", "torchao", 1.0, 0,
                "torchao float8 weights and dynamic float8 activations (sm89+)"),
    # nf4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32 per 256 absmax.
    QuantMethod("bnb-nf4", "bitsandbytes", "bnb", 0.5 + 1 / 64 + 4 / (64 * 256), 1,
                "bitsandbytes 4-bit NormalFloat, double quantization"),
    QuantMethod("torchao-int4", "torchao", "torchao", 0.5 + 4 / TORCHAO_INT4_GROUP, 1,
                f"torchao int4 weight-only, groups of {TORCHAO_INT4_GROUP} (CUDA)"),
    QuantMethod("bnb-fp4", "bitsandbytes", "bnb", 0.5 + 1 / 64 + 4 / (64 * 256), 2,
                "bitsandbytes 4-bit float, double quantization"),
)}

# What ``quantization = "auto"`` tries, least lossy first (int8 before 4-bit).
AUTO_ORDER: tuple[str, ...] = ("bnb-int8", "torchao-int8", "bnb-nf4", "torchao-int4")

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class QuantizationUnavailable(FastpathError, RuntimeError):
    """The policy asks for a quantization method that cannot run here and ``quantization_fallback = "error"``.

    Attributes:
        method: the policy value (``"bnb-nf4"``).
        reason: why it cannot run here.
        fix: what to do about it.
    """

    def __init__(self, method: str, reason: str, fix: str, *, source: str = "") -> None:
        self.method = method
        self.reason = reason
        self.fix = fix
        where = f" (set by {source})" if source else ""
        super().__init__(
            f"quantization = {method!r}{where} cannot run here: {reason}. Fix: {fix}; or set "
            "quantization_fallback = 'warn' to load the model unquantized with a warning."
        )


@dataclass(frozen=True)
class Obstacle:
    """Why a method cannot run here, and the fix."""

    reason: str
    fix: str


# -- can it run here? ------------------------------------------------------------------

def _version(package: str) -> tuple[int, ...] | None:
    if importlib.util.find_spec(package) is None:
        return None
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _show_version(version: Sequence[int]) -> str:
    return ".".join(str(v) for v in version)


def obstacle(method: str, hardware: Hardware) -> Obstacle | None:
    """None when ``method`` can run on ``hardware`` with the packages installed here, else why not.

    The device and GPU generation come from ``hardware`` (so ``explain --hardware t4`` reports
    that float8 needs sm89+) and are checked first: installing a package does not fix them.
    Packages are checked in this environment.
    """
    spec = METHODS[method]
    if spec.package == "bitsandbytes" and hardware.device == "mps":
        return Obstacle("bitsandbytes has no Apple MPS backend", "use quantization = 'none' on MPS")
    if method == "torchao-int4" and hardware.device != "cuda":
        return Obstacle(f"torchao int4 weight-only kernels need a CUDA GPU (this is {hardware.device})",
                        "use quantization = 'torchao-int8' or 'bnb-nf4'")
    if method == "torchao-float8" and not hardware.supports_fp8:
        where = (f"sm{hardware.capability[0]}{hardware.capability[1]}" if hardware.capability
                 else hardware.device)
        return Obstacle(f"float8 matmuls need an sm89+ GPU (Ada, Hopper); this is {where}",
                        "use quantization = 'torchao-int8' or 'bnb-int8'")
    version = _version(spec.package)
    pip = f"pip install 'transformers-fastpath[{spec.extra}]'"
    if version is None:
        return Obstacle(f"{spec.package} is not installed", pip)
    if spec.package == "bitsandbytes":
        needed = BNB_MIN_CPU_VERSION if hardware.device in ("cpu", "xpu") else BNB_MIN_VERSION
        if version < needed:
            return Obstacle(f"bitsandbytes {_show_version(version)} is older than {_show_version(needed)}, the "
                            f"first release fastpath supports on {hardware.device}", pip.replace("install", "install -U"))
    elif version < TORCHAO_MIN_VERSION:
        return Obstacle(f"torchao {_show_version(version)} is older than {_show_version(TORCHAO_MIN_VERSION)}, "
                        "the first release transformers 5 accepts", pip.replace("install", "install -U"))
    return None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """``warnings.warn`` a user-facing fallback once per process (and log it at INFO every time)."""
    logger.info("fastpath: %s", message)
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())


_INTERNAL = ("transformers_fastpath", "pluggy", "transformers")


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside fastpath, pluggy and transformers (the user's call)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    return level


# -- layers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the architecture (names as in ``named_modules``)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class LayerInventory:
    """What quantization needs to know about an architecture, read on the meta device.

    Attributes:
        total_params: every parameter (tied ones once).
        linears: every ``nn.Linear`` whose weight is not shared with another module.
        heads: modules always kept dense: the output embedding (LM head) and the Linear layers
            outside the base model (classifier, score, qa_outputs...).
    """

    total_params: int
    linears: tuple[LinearLayer, ...]
    heads: tuple[str, ...]


def kernel_shape_problem(method: str, layer: LinearLayer, hardware: Hardware) -> str | None:
    """Why ``method``'s kernel cannot take this layer's shape on ``hardware``, or None."""
    if method in ("bnb-nf4", "bnb-fp4") and hardware.device == "cpu":
        # On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit weight at its first forward
        # (functional._convert_weight_packed_for_cpu): it asserts N % 32 == 0 and reshapes the absmax
        # to (N, K // 64), which fails unless K % 64 == 0. Planned for every CPU, so a plan does not
        # depend on this machine's CPU flags.
        if layer.out_features % 32:
            return "out_features % 32 != 0 (bnb 4-bit CPU kernel packs 32 rows)"
        if layer.in_features % BNB_4BIT_BLOCK:
            return f"in_features % {BNB_4BIT_BLOCK} != 0 (bnb 4-bit CPU kernel: one absmax per {BNB_4BIT_BLOCK}-weight block)"
    if method == "torchao-int4":
        if layer.in_features % TORCHAO_INT4_GROUP:
            return f"in_features % {TORCHAO_INT4_GROUP} != 0 (int4 groups)"
        if layer.out_features % 8:
            return "out_features % 8 != 0 (int4 tile)"
    if method == "torchao-float8" and (layer.in_features % 16 or layer.out_features % 16):
        return "a dimension % 16 != 0 (float8 matmul)"
    return None


def dense_modules(inventory: LayerInventory, method: str, hardware: Hardware) -> dict[str, str]:
    """Modules ``method`` must leave dense, each with the reason (heads first, then kernel shapes)."""
    dense = {name: "head" for name in inventory.heads}
    for layer in inventory.linears:
        if layer.name in dense or any(layer.name.startswith(h + ".") for h in inventory.heads):
            continue
        problem = kernel_shape_problem(method, layer, hardware)
        if problem is not None:
            dense[layer.name] = problem
    return dense


def nothing_to_quantize(inventory: LayerInventory, method: str, hardware: Hardware) -> str | None:
    """The reason when ``method`` would leave every layer of the model dense, else None."""
    dense = dense_modules(inventory, method, hardware)
    body = [layer for layer in inventory.linears if layer.name not in inventory.heads]
    if not body or any(layer.name not in dense for layer in body):
        return None
    example = body[0]
    return (f"none of the {len(body)} Linear layers has a shape its kernel takes here "
            f"(e.g. {example.name}: {dense[example.name]})")


def weights_bytes(inventory: LayerInventory | None, num_params: int | None, dtype: str,
                  method: str | None, hardware: Hardware) -> float | None:
    """Bytes of the weights at ``dtype``, with ``method``'s layers quantized (None = unknown size).

    Without an inventory every parameter is counted at the quantized rate (an estimate).
    """
    dense_bytes = _DTYPE_BYTES.get(dtype, 2)
    if method is None:
        total = inventory.total_params if inventory is not None else num_params
        return None if total is None else float(total * dense_bytes)
    rate = METHODS[method].weight_bytes
    if inventory is None:
        return None if num_params is None else float(num_params * rate)
    skipped = dense_modules(inventory, method, hardware)
    quantized = sum(layer.weight_numel for layer in inventory.linears if layer.name not in skipped
                    and not any(layer.name.startswith(s + ".") for s in skipped))
    return (inventory.total_params - quantized) * dense_bytes + quantized * rate


def inventory_of(config: PretrainedConfig | None) -> LayerInventory | None:
    """The :class:`LayerInventory` of an architecture, or None when it cannot be built on meta.

    Cached per config content (a plan is resolved more than once per load).
    """
    if config is None:
        return None
    try:
        key = config.to_json_string(use_diff=False)
    except Exception:  # an exotic config that does not serialize: build, do not cache
        return _build_inventory(config)
    with _cache_lock:
        if key in _inventories:
            return _inventories[key]
    inventory = _build_inventory(config)
    with _cache_lock:
        if len(_inventories) >= 32:
            _inventories.pop(next(iter(_inventories)))
        _inventories[key] = inventory
    return inventory


_inventories: dict[str, LayerInventory | None] = {}
_cache_lock = threading.Lock()


def _build_inventory(config: PretrainedConfig) -> LayerInventory | None:
    from torch import nn

    from ..planning.model_info import meta_model

    try:
        model = meta_model(config)
    except Exception as exc:  # never break a plan over this
        logger.debug("fastpath: cannot build %s on the meta device: %s", getattr(config, "model_type", "?"), exc)
        return None

    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields tied tensors once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    heads: list[str] = []
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    base_ids = {id(m) for m in base.modules()} if isinstance(base, nn.Module) and base is not model else None
    linears: list[LinearLayer] = []
    weight_owner: dict[int, str] = {}
    for name, module in model.named_modules():
        if output is not None and module is output:
            heads.append(name)
        if not isinstance(module, nn.Linear):
            continue
        if base_ids is not None and id(module) not in base_ids and name not in heads:
            heads.append(name)
        if id(module.weight) in weight_owner:
            continue
        weight_owner[id(module.weight)] = name
        linears.append(LinearLayer(name, module.in_features, module.out_features, module.bias is not None))
    return LayerInventory(total_params=total, linears=tuple(linears), heads=tuple(heads))


# -- transformers configs -----------------------------------------------------------------

def build_quantization_config(method: str, *, compute_dtype: Any = None,
                              skip_modules: Sequence[str] | None = None) -> Any:
    """The ``quantization_config`` for ``from_pretrained``.

    Args:
        method: a key of :data:`METHODS`.
        compute_dtype: the torch dtype 4-bit layers compute in (the plan's dtype).
        skip_modules: modules to leave dense; None keeps transformers' default (the LM head).
            A list replaces that default, so it must name the heads too (:func:`dense_modules` does).
    """
    skip = list(skip_modules) if skip_modules else None
    if method == "bnb-int8":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if method in ("bnb-nf4", "bnb-fp4"):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method.removeprefix("bnb-"),
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    if method.startswith("torchao-"):
        from transformers import TorchAoConfig

        # transformers >= 5 takes torchao config objects only (the quant_type strings are gone).
        return TorchAoConfig(_torchao_config(method), modules_to_not_convert=skip)
    raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")


def _torchao_config(method: str) -> Any:
    from torchao import quantization as q

    if method == "torchao-int8":
        return q.Int8WeightOnlyConfig()
    if method == "torchao-int4":
        return q.Int4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP)
    if method == "torchao-float8":
        return q.Float8DynamicActivationFloat8WeightConfig()
    raise ValueError(f"unknown torchao method {method!r}")


def gib(n_bytes: float) -> str:
    """``17_179_869_184`` -> ``"16.0 GiB"``."""
    return f"{n_bytes / 2**30:.1f} GiB"
