"""The ``fused_encoder`` pass: the :class:`~transformers_fastpath.passes.base.Pass` object itself."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...errors import PassSkipped
from .families import family_for, get_path, layer_lists
from .support import ATTENTION_IMPLEMENTATIONS, config_reason

if TYPE_CHECKING:
    from torch import nn

    from ...planning.model_info import ModelInfo
    from ...planning.plan import Plan, PlanBuilder
    from .layers import LayerParts
    from .runtime import RouteChoice

__all__ = ["FusedEncoderPass"]

logger = logging.getLogger(__name__)

_ROUTE_CHOICES = ("auto", "dense", "nested", "packed")
_DEVICES = ("cpu", "cuda")


class FusedEncoderPass:
    """Padding-free fused encoder layers for inference (the successor of BetterTransformer).

    Converted layers run ``torch._transformer_encoder_layer_fwd`` (or, for padded batches on
    CPU, a packed-token route) in eval mode without autograd, and the original forward in every
    other case. Nothing in the module tree or state_dict changes (see ``runtime``). Should the
    fused route raise at run time where the original forward does not (a native-op error, out of
    memory), the conversion undoes itself on the model and the plan shows the pass as failed
    (strict mode: :class:`~transformers_fastpath.errors.StrictModeError`).

    Args:
        route: ``"auto"`` (choose per call, see ``heuristic``) or force ``"dense"``,
            ``"nested"`` or ``"packed"`` for every padded batch (benchmarks, tests).
        cache_qkv: keep the packed q/k/v weight between calls instead of concatenating it per
            call; costs ``3*E*E + 3*E`` elements per layer (docs/fused-encoder.md).
    """

    name = "fused_encoder"
    setting = "encoder_fastpath"
    changes_state_dict = False

    def __init__(self, route: RouteChoice = "auto", *, cache_qkv: bool = False) -> None:
        if route not in _ROUTE_CHOICES:
            raise ValueError(f"FusedEncoderPass(route={route!r}): route must be one of {', '.join(_ROUTE_CHOICES)}")
        self.route = route
        self.cache_qkv = bool(cache_qkv)

    def __repr__(self) -> str:
        return f"FusedEncoderPass(route={self.route!r}, cache_qkv={self.cache_qkv})"

    # -- Pass protocol ------------------------------------------------------------------
    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan | None) -> str | None:
        """From the config (and plan) alone: None when the pass can run, else why not. Never raises."""
        try:
            return self._supports(info, plan)
        except Exception as exc:  # a reason, never a crash, whatever the config holds
            logger.debug("fused_encoder.supports failed", exc_info=True)
            return f"could not check the model config ({type(exc).__name__}: {exc})"

    def _supports(self, info: ModelInfo, plan: PlanBuilder | Plan | None) -> str | None:
        config = getattr(info, "config", None)
        if config is None:
            family = family_for(getattr(info, "model_type", None))
            if family is None:
                return f"model type {getattr(info, 'model_type', None)!r} has no fused-encoder layout"
        else:
            reason = config_reason(config)
            if reason:
                return reason
        hardware = getattr(plan, "hardware", None)
        device = getattr(hardware, "device", None)
        if device is not None and device not in _DEVICES:
            return f"device {device!r}: the fused encoder op runs on CPU and CUDA only"
        get = getattr(plan, "get", None)
        if callable(get):
            attn = get("attn_implementation")
            if isinstance(attn, str) and attn not in ("auto", "keep", *ATTENTION_IMPLEMENTATIONS):
                return (f"attn_implementation={attn!r}: the fused encoder reads the masks of "
                        f"{' or '.join(ATTENTION_IMPLEMENTATIONS)} only")
            quant = get("quantization")
            if isinstance(quant, str) and quant not in ("none", "auto"):
                return f"quantization={quant!r}: quantized weights are not plain tensors the fused op can read"
        import torch

        if not hasattr(torch, "_transformer_encoder_layer_fwd"):
            return f"torch {torch.__version__} has no torch._transformer_encoder_layer_fwd"
        return None

    def apply(self, model: nn.Module, plan: Plan | Any = None) -> None:
        """Convert ``model`` in place, or raise :class:`PassSkipped` leaving it untouched.

        Only ``model.base_model`` (the ``BertModel`` inside ``BertForSequenceClassification``...)
        is converted; heads are left as they are. From ``plan`` only ``strict`` and ``cuda_graphs``
        are read: every other choice is made per call from the input. Applying twice is a no-op.
        """
        from .layers import LayerRejected, resolve_layer
        from .runtime import FusedRuntime, remove_all, runtime_of

        if runtime_of(model) is not None:
            logger.debug("fused_encoder: %s is already converted", type(model).__name__)
            return
        base = getattr(model, "base_model", model)
        config = getattr(base, "config", None) or getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        family = family_for(model_type)
        reason = config_reason(config, family)
        if reason or family is None:
            raise PassSkipped(reason or f"model type {model_type!r} has no fused-encoder layout")

        try:
            lists = layer_lists(base, family)
            encoder = get_path(base, family.encoder) if family.encoder is not None else None
        except AttributeError as exc:
            raise PassSkipped(f"{type(base).__name__} does not have the {family.name} layout ({exc})") from None
        from torch import nn

        if not lists or not all(isinstance(layers, nn.ModuleList) and len(layers) for _, layers in lists):
            raise PassSkipped(f"{type(base).__name__}.{family.layers} is not a non-empty ModuleList")
        if encoder is not None and "forward" in vars(encoder):
            raise PassSkipped(f"{type(encoder).__name__} already has its forward replaced "
                              "(an accelerate hook or another patch)")
        if encoder is not None:
            extra = [n for n, _ in encoder.named_parameters() if not n.startswith(family.layers.rsplit(".", 1)[-1] + ".")]
            if extra:
                raise PassSkipped(f"{type(encoder).__name__} has parameters outside its layers: {', '.join(extra[:5])}")

        norm_first = family.norm_first(config)
        try:
            converted = [(layers, [resolve_layer(layer, family.layout, f"{path}.{i}", cache_qkv=self.cache_qkv,
                                                 norm_first=norm_first)
                                   for i, layer in enumerate(layers)])
                         for path, layers in lists]
        except LayerRejected as exc:
            raise PassSkipped(str(exc)) from None

        returns_tuple = False
        if encoder is None:
            try:
                returns_tuple = _layer_returns_tuple(converted[0][1][0], family.encoder_args)
            except LayerRejected as exc:
                raise PassSkipped(str(exc)) from None

        get = getattr(plan, "get", None)
        strict = bool(get("strict", False)) if callable(get) else False
        # cuda_graphs: True/False once the plugin resolved it; without a plan, on (used on CUDA only).
        graphs = get("cuda_graphs", "auto") if callable(get) else "auto"
        runtime = FusedRuntime(family, config, base, converted, route=self.route, root=model,
                               strict=strict, pass_name=self.name, layer_returns_tuple=returns_tuple,
                               cuda_graphs=graphs is True or graphs == "auto")
        try:
            runtime.install(encoder)
        except Exception:
            remove_all(model)
            raise
        logger.debug("fused_encoder: converted %d %s layers of %s", len(runtime.parts), family.name, type(model).__name__)

    def revert(self, model: nn.Module) -> None:
        """Remove every converted forward and cache; idempotent, safe after a partial apply."""
        from .runtime import remove_all

        removed = remove_all(model)
        if removed:
            logger.debug("fused_encoder: reverted %d forwards of %s", removed, type(model).__name__)


def _layer_returns_tuple(parts: LayerParts, arg_names: tuple[str, ...]) -> bool:
    """Whether a layer's own forward returns ``(hidden_states, ...)`` rather than the tensor.

    transformers changed this between releases (wav2vec2's layers returned a tuple in 5.13, the
    tensor in 5.25) and the loop reads ``layer(...)[0]`` in the first case, which on a tensor would
    silently take the first sequence. So it is asked, not assumed: one call of the layer's class
    forward on a single zero token, without grad, in eval mode (no dropout, no random numbers drawn).
    Raises :class:`LayerRejected` when the answer is neither.
    """
    import torch

    from .layers import LayerRejected

    layer = parts.layer
    weight = parts.q.weight
    token = torch.zeros(1, 1, parts.embed_dim, dtype=weight.dtype, device=weight.device)
    kwargs = {"attention_mask": None} if "attention_mask" in arg_names else {}
    modes = [(m, m.training) for m in layer.modules()]
    try:
        for module, _ in modes:
            module.training = False
        with torch.no_grad():
            out = type(layer).forward(layer, token, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a layer we cannot call this way is not converted
        raise LayerRejected(f"{parts.name}: calling the layer on one token to read what it returns failed "
                            f"({type(exc).__name__}: {exc})") from None
    finally:
        for module, training in modes:
            module.training = training
    if isinstance(out, torch.Tensor) and out.shape == token.shape:
        return False
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].shape == token.shape:
        return True
    raise LayerRejected(f"{parts.name} returns {type(out).__name__}, neither the hidden states nor a tuple "
                        "starting with them")
