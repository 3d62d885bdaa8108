"""One encoder layer seen as the arguments of ``torch._transformer_encoder_layer_fwd``.

:func:`resolve_layer` checks, once at ``apply``, that a layer is exactly what the fused op
computes (plain ``nn.Linear``/``nn.LayerNorm``, exact GELU or ReLU, one eps, no extra
parameters) and records where its parts are. The weights themselves are read from the modules
at every call, never copied at apply time, so the state_dict stays the model's own.

q/k/v must be one packed ``(3E, E)`` weight for the op. By default it is concatenated per call
(``torch.cat``: one copy of ``3E^2`` elements per layer and call). With ``cache_qkv=True`` the
packed copy is kept (a plain attribute, never a parameter or buffer) and rebuilt when a q/k/v
tensor is replaced or changed in place; writes through ``param.data`` are invisible to that
check (they do not bump the version counter), which is why the cache is opt-in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .families import LayerLayout, get_path

__all__ = ["BoundLayer", "FusedArgs", "LayerParts", "LayerRejected", "resolve_layer"]

# Arguments 2..18 of torch._transformer_encoder_layer_fwd: embed_dim, num_heads, qkv weight/bias,
# proj weight/bias, use_gelu, norm_first, eps, norm1 weight/bias, norm2 weight/bias, ffn1 weight/bias,
# ffn2 weight/bias.
_T = torch.Tensor
FusedArgs = tuple[int, int, _T, _T, _T, _T, bool, bool, float, _T, _T, _T, _T, _T, _T, _T, _T]


class LayerWeights(NamedTuple):
    """One layer's tensors, in the fused op's order (linear biases may be None)."""

    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    out_w: torch.Tensor
    out_b: torch.Tensor | None
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    ffn_in_w: torch.Tensor
    ffn_in_b: torch.Tensor | None
    ffn_out_w: torch.Tensor
    ffn_out_b: torch.Tensor | None


class LayerRejected(Exception):
    """A layer does not map onto the fused op; the message says why."""


def _activation_is_gelu(act: Any) -> bool | None:
    """True for exact GELU, False for ReLU, None for anything else."""
    if type(act) is nn.ReLU:
        return False
    if type(act) is nn.GELU:
        return True if act.approximate == "none" else None
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if type(act) is GELUActivation:
        # ``act.act`` is F.gelu, or the exact erf formula written in Python: both are exact GELU.
        fn = getattr(act, "act", None)
        if fn is F.gelu or getattr(fn, "__name__", "") == "_gelu_python":
            return True
    return None


# Activation modules that are not elementwise (or not activations of a feed-forward at all).
_NOT_ELEMENTWISE = frozenset({"GLU", "Softmax", "Softmax2d", "LogSoftmax", "Softmin", "MultiheadAttention",
                              "GLUActivation"})


def _elementwise_activation(act: Any) -> bool:
    """An activation the packed route can call as it is: a parameter-free elementwise module of
    torch or transformers (tanh-GELU, quick GELU, SiLU...)."""
    cls = type(act)
    if cls.__module__ not in ("transformers.activations", "torch.nn.modules.activation"):
        return False
    if cls.__name__ in _NOT_ELEMENTWISE or not isinstance(act, nn.Module):
        return False
    return not any(True for _ in act.parameters()) and not any(True for _ in act.buffers())


def _tensor(module: nn.Module, name: str) -> Any:
    """``module.<name>``, from the parameter dict where it is there (nn.Module.__getattr__ is slow)."""
    params = module._parameters
    if name in params and name not in vars(module):
        return params[name]
    return getattr(module, name)


def _plain_tensor(t: Any) -> bool:
    # Tensor subclasses (bitsandbytes Params4bit, torchao quantized tensors, DTensor...) do not
    # carry plain weights the fused op can read.
    return type(t) in (nn.Parameter, torch.Tensor)


@dataclass(eq=False)
class LayerParts:
    """Where the parts of one layer live, plus what was checked about them.

    ``bindings`` (parent, attribute, child) let :meth:`intact` notice a submodule that was
    replaced after ``apply`` (an adapter injected, a layer quantized), so the converted forward
    falls back instead of computing with stale parts.
    """

    name: str
    layer: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    activation: nn.Module
    use_gelu: bool | None  # None: not exact GELU or ReLU, so only the packed route (which calls it) runs
    norm_first: bool
    eps: float
    num_heads: int
    embed_dim: int
    bindings: tuple[tuple[nn.Module, str, nn.Module], ...]
    modules: tuple[nn.Module, ...]
    cache_qkv: bool = False
    _qkv_cache: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def fusable(self) -> bool:
        """Whether ``torch._transformer_encoder_layer_fwd`` computes this layer's activation."""
        return self.use_gelu is not None

    # -- checks at call time -------------------------------------------------------------
    def intact(self) -> bool:
        """True while every part is still the module that was checked at ``apply``."""
        for parent, attr, child in self.bindings:
            # The submodule dict first: nn.Module.__getattr__ is slow, and this runs per layer and call.
            if parent._modules.get(attr) is not child and getattr(parent, attr, None) is not child:
                return False
        return True

    def parameters(self) -> LayerWeights:
        """The tensors the fused op reads, read fresh from the modules (a Parameter may be replaced)."""
        return LayerWeights(*(t for m in (self.q, self.k, self.v, self.out, self.norm1, self.norm2, self.ffn_in,
                                          self.ffn_out) for t in (_tensor(m, "weight"), _tensor(m, "bias"))))

    def read(self, dtype: torch.dtype, device: torch.device) -> BoundLayer | None:
        """This call's weights, or None unless all are plain tensors of ``dtype`` on ``device``."""
        tensors = self.parameters()
        for t in tensors:
            if t is not None and (t.dtype != dtype or t.device != device or not _plain_tensor(t)):
                return None
        return BoundLayer(self, tensors)

    def _packed_qkv(self, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        key: tuple[Any, ...] = ()
        if self.cache_qkv:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                        for t in (w.q_w, w.k_w, w.v_w, w.q_b, w.k_b, w.v_b))
            cached = self._qkv_cache
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]
        weight = torch.cat((w.q_w, w.k_w, w.v_w))
        bias = torch.cat((_or_zeros(w.q_b, w.q_w), _or_zeros(w.k_b, w.k_w), _or_zeros(w.v_b, w.v_w)))
        if self.cache_qkv:
            self._qkv_cache = (key, weight, bias)
        return weight, bias

    def drop_cache(self) -> None:
        self._qkv_cache = None

    def cache_bytes(self) -> int:
        """Memory held by the packed q/k/v copy (0 when not cached)."""
        if self._qkv_cache is None:
            return 0
        _, w, b = self._qkv_cache
        return w.numel() * w.element_size() + b.numel() * b.element_size()


class BoundLayer:
    """One layer's weights for one call (read once), and the fused op's arguments from them."""

    __slots__ = ("parts", "w")

    def __init__(self, parts: LayerParts, w: LayerWeights) -> None:
        self.parts = parts
        self.w = w

    def fused_args(self) -> FusedArgs:
        """Positional arguments 2..18 of ``torch._transformer_encoder_layer_fwd`` (after ``src``)."""
        p, w = self.parts, self.w
        if p.use_gelu is None:
            raise RuntimeError(f"{p.name}: the fused op cannot compute {type(p.activation).__name__}")
        qkv_w, qkv_b = p._packed_qkv(w)
        return (
            p.embed_dim, p.num_heads, qkv_w, qkv_b,
            w.out_w, _or_zeros(w.out_b, w.out_w),
            p.use_gelu, p.norm_first, p.eps,
            w.norm1_w, w.norm1_b, w.norm2_w, w.norm2_b,
            w.ffn_in_w, _or_zeros(w.ffn_in_b, w.ffn_in_w), w.ffn_out_w, _or_zeros(w.ffn_out_b, w.ffn_out_w),
        )


def _or_zeros(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    # ViT with qkv_bias=False and the like: the op wants a tensor; zeros add nothing.
    return bias if bias is not None else weight.new_zeros(weight.shape[0])


def _resolve(layer: nn.Module, path: str) -> tuple[Any, list[tuple[nn.Module, str, Any]]]:
    """The object at ``path`` and every (parent, attribute, child) step on the way to it."""
    steps = []
    obj = layer
    for attr in path.split("."):
        child = get_path(obj, attr)
        steps.append((obj, attr, child))
        obj = child
    return obj, steps


def resolve_layer(layer: nn.Module, layout: LayerLayout, name: str, *, cache_qkv: bool = False,
                  norm_first: bool | None = None) -> LayerParts:
    """Check that ``layer`` is exactly what the fused routes compute, and describe it.

    ``norm_first`` overrides ``layout.norm_first`` (a config switch such as wav2vec2's
    ``do_stable_layer_norm``). Raises :class:`LayerRejected` with the reason when it is not.
    """
    try:
        found = {key: _resolve(layer, getattr(layout, key))
                 for key in ("q", "k", "v", "out", "norm1", "norm2", "ffn_in", "ffn_out", "activation")}
        attention = get_path(layer, layout.attention)
    except AttributeError as exc:
        raise LayerRejected(f"{name}: unexpected layer structure ({exc})") from None
    mods = {key: value[0] for key, value in found.items()}
    bindings: dict[tuple[int, str], tuple[nn.Module, str, Any]] = {}
    for _, steps in found.values():
        for step in steps:
            bindings[(id(step[0]), step[1])] = step

    for key in ("q", "k", "v", "out", "ffn_in", "ffn_out"):
        mod = mods[key]
        if type(mod) is not nn.Linear:
            raise LayerRejected(f"{name}.{getattr(layout, key)} is a {type(mod).__name__}, not a plain nn.Linear "
                                "(quantized, adapter-wrapped or custom layers are not fused)")
    for key in ("norm1", "norm2"):
        mod = mods[key]
        if type(mod) is not nn.LayerNorm or not mod.elementwise_affine or mod.bias is None:
            raise LayerRejected(f"{name}.{getattr(layout, key)} is not an affine nn.LayerNorm with bias")
    use_gelu = _activation_is_gelu(mods["activation"])
    if use_gelu is None and not _elementwise_activation(mods["activation"]):
        raise LayerRejected(f"{name}.{layout.activation} is {mods['activation']!r}; only exact GELU or ReLU, or a "
                            "parameter-free elementwise activation of torch or transformers, can be fused")

    n1, n2 = mods["norm1"], mods["norm2"]
    if n1.eps != n2.eps:
        raise LayerRejected(f"{name}: the two layer norms use different eps ({n1.eps} and {n2.eps}); "
                            "the fused op takes one")
    q = mods["q"]
    embed = q.in_features
    heads = getattr(attention, layout.heads_attr, None)
    if not isinstance(heads, int) or heads <= 0 or embed % heads:
        raise LayerRejected(f"{name}: {layout.attention}.{layout.heads_attr}={heads!r} does not divide "
                            f"the hidden size {embed}")
    for key in ("q", "k", "v", "out"):
        mod = mods[key]
        if (mod.in_features, mod.out_features) != (embed, embed):
            raise LayerRejected(f"{name}.{getattr(layout, key)} is {mod.in_features}->{mod.out_features}; "
                                f"the fused op needs {embed}->{embed}")
    ffn_in, ffn_out = mods["ffn_in"], mods["ffn_out"]
    if ffn_in.in_features != embed or ffn_out.out_features != embed or ffn_in.out_features != ffn_out.in_features:
        raise LayerRejected(f"{name}: feed-forward shapes do not chain {embed}->hidden->{embed}")
    for norm_key in ("norm1", "norm2"):
        if tuple(mods[norm_key].normalized_shape) != (embed,):
            raise LayerRejected(f"{name}.{getattr(layout, norm_key)} normalizes {tuple(mods[norm_key].normalized_shape)}, "
                                f"not ({embed},)")
    scaling = getattr(attention, "scaling", getattr(attention, "scale", None))
    if scaling is not None and not math.isclose(float(scaling), (embed // heads) ** -0.5, rel_tol=1e-6):
        raise LayerRejected(f"{name}: attention scaling {scaling} is not 1/sqrt(head_dim)")
    if getattr(attention, "is_causal", False):
        raise LayerRejected(f"{name}: causal self-attention")

    # Everything with weights in the layer must be one of the parts above, or the fused op
    # would silently ignore it (cross-attention, adapters, layer scale...).
    ours = {id(p) for key in ("q", "k", "v", "out", "norm1", "norm2", "ffn_in", "ffn_out")
            for p in mods[key].parameters(recurse=False)}
    extra = [pname for pname, p in layer.named_parameters() if id(p) not in ours]
    if extra:
        raise LayerRejected(f"{name} has parameters the fused op would ignore: {', '.join(extra[:5])}")
    buffers = [bname for bname, _ in layer.named_buffers()]
    if buffers:
        raise LayerRejected(f"{name} has buffers the fused op would ignore: {', '.join(buffers[:5])}")

    params = [p for p in layer.parameters()]
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if any(p.is_meta for p in params):
        raise LayerRejected(f"{name} has weights on the meta device (offloaded or not loaded)")
    if len(devices) != 1 or len(dtypes) != 1:
        raise LayerRejected(f"{name} spreads its weights over {sorted(map(str, devices))} / {sorted(map(str, dtypes))}")
    if not all(_plain_tensor(p) for p in params):
        kinds = sorted({type(p).__name__ for p in params if not _plain_tensor(p)})
        raise LayerRejected(f"{name} has weights of type {', '.join(kinds)} (quantized or distributed), not plain tensors")
    if not next(iter(dtypes)).is_floating_point:
        raise LayerRejected(f"{name} has non-floating-point weights")

    modules = tuple(layer.modules())
    for mod in modules:
        if "forward" in vars(mod):
            raise LayerRejected(f"{name}: a {type(mod).__name__} already has its forward replaced "
                                "(an accelerate hook or another patch); it would be bypassed")

    return LayerParts(
        name=name, layer=layer, **mods, use_gelu=use_gelu,
        norm_first=layout.norm_first if norm_first is None else norm_first, eps=float(n1.eps),
        num_heads=heads, embed_dim=embed,
        bindings=tuple(bindings.values()), modules=modules, cache_qkv=cache_qkv,
    )
