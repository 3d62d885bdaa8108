"""Which architectures the fused encoder knows, and where their parts live.

One small table instead of one function per architecture: a :class:`Family` says where the
layers are (relative to ``model.base_model``), which module loops over them (the padding-free
override goes there), and a :class:`LayerLayout` names each submodule the fused op reads.
Adding an architecture whose layer maps cleanly onto ``torch._transformer_encoder_layer_fwd``
is adding one entry here (and one case in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "Family", "LayerLayout", "family_for", "get_path", "supported_model_types"]


@dataclass(frozen=True)
class LayerLayout:
    """Attribute paths, relative to one layer, of everything the fused op needs.

    Attributes:
        attention: the self-attention module (read for head count, scaling and ``is_causal``).
        heads_attr: attribute of ``attention`` holding the number of heads.
        q, k, v: the query/key/value ``nn.Linear`` modules.
        out: the attention output projection.
        norm1, norm2: the two ``nn.LayerNorm``. Post-norm (BERT): norm1 follows attention,
            norm2 follows the FFN. Pre-norm (ViT): norm1 precedes attention, norm2 the FFN.
        ffn_in, ffn_out: the feed-forward ``nn.Linear`` modules.
        activation: the activation module between them.
        norm_first: True for pre-norm layers.
    """

    attention: str
    heads_attr: str
    q: str
    k: str
    v: str
    out: str
    norm1: str
    norm2: str
    ffn_in: str
    ffn_out: str
    activation: str
    norm_first: bool

    def linear_paths(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.out, self.ffn_in, self.ffn_out)

    def norm_paths(self) -> tuple[str, ...]:
        return (self.norm1, self.norm2)


@dataclass(frozen=True)
class Family:
    """One group of architectures that share a layer layout.

    Attributes:
        name: short name used in messages.
        model_types: ``config.model_type`` values it covers.
        layers: path from the base model to the ``nn.ModuleList`` of layers.
        encoder: path from the base model to the module whose ``forward`` loops over the layers
            and nothing else (``""`` is the base model itself; ``None``: there is no such module,
            so each layer is converted on its own and only the dense route is available).
        encoder_args: positional parameter names of that ``forward`` (or of the layer's
            ``forward`` when ``encoder`` is None), used to read positional arguments.
        output_class: name, in ``transformers.modeling_outputs``, of what the encoder returns.
        activation_key: config attribute naming the activation function.
        layout: where each part of a layer lives.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    encoder: str | None
    encoder_args: tuple[str, ...]
    output_class: str | None
    activation_key: str
    layout: LayerLayout


_BERT_LAYOUT = LayerLayout(
    attention="attention.self",
    heads_attr="num_attention_heads",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    out="attention.output.dense",
    norm1="attention.output.LayerNorm",
    norm2="output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    activation="intermediate.intermediate_act_fn",
    norm_first=False,
)

_DISTILBERT_LAYOUT = LayerLayout(
    attention="attention",
    heads_attr="n_heads",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    out="attention.out_lin",
    norm1="sa_layer_norm",
    norm2="output_layer_norm",
    ffn_in="ffn.lin1",
    ffn_out="ffn.lin2",
    activation="ffn.activation",
    norm_first=False,
)

_VIT_LAYOUT = LayerLayout(
    attention="attention",
    heads_attr="num_attention_heads",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    out="attention.o_proj",
    norm1="layernorm_before",
    norm2="layernorm_after",
    ffn_in="mlp.fc1",
    ffn_out="mlp.fc2",
    activation="mlp.activation_fn",
    norm_first=True,
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie"),
        layers="encoder.layer",
        encoder="encoder",
        encoder_args=("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                      "cache", "use_cache"),
        output_class="BaseModelOutputWithPastAndCrossAttentions",
        activation_key="hidden_act",
        layout=_BERT_LAYOUT,
    ),
    Family(
        name="distilbert",
        model_types=("distilbert",),
        layers="transformer.layer",
        encoder="transformer",
        encoder_args=("hidden_states", "attention_mask"),
        output_class="BaseModelOutput",
        activation_key="activation",
        layout=_DISTILBERT_LAYOUT,
    ),
    Family(
        # ViT/DeiT in transformers 5 loop over ``layers`` inside the model's own forward (with
        # the embeddings and final norm), so there is no encoder module to override: each layer
        # is converted on its own. Images have no padding, so the dense route is all they need.
        name="vit",
        model_types=("vit", "deit"),
        layers="layers",
        encoder=None,
        encoder_args=("hidden_states", "attention_mask"),
        output_class=None,
        activation_key="hidden_act",
        layout=_VIT_LAYOUT,
    ),
)

_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` the pass knows, sorted."""
    return tuple(sorted(_BY_MODEL_TYPE))


def family_for(model_type: str | None) -> Family | None:
    """The family covering ``model_type``, or None."""
    return _BY_MODEL_TYPE.get(model_type or "")


def get_path(root: Any, path: str) -> Any:
    """``get_path(layer, "attention.self.query")``; ``""`` is ``root`` itself.

    Raises AttributeError naming the missing step.
    """
    obj = root
    if not path:
        return obj
    for step in path.split("."):
        try:
            obj = getattr(obj, step)
        except AttributeError:
            raise AttributeError(f"{type(obj).__name__} has no attribute {step!r} (looking up {path!r})") from None
    return obj
