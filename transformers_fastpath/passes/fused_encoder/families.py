"""Which architectures the fused encoder knows, and where their parts live.

One small table instead of one function per architecture: a :class:`Family` says where the
layers are (relative to ``model.base_model``), which module loops over them (the padding-free
override goes there), and a :class:`LayerLayout` names each submodule the fused op reads.
Adding an architecture whose layer maps cleanly onto ``torch._transformer_encoder_layer_fwd``
(or onto the packed route, which computes the feed-forward itself and so takes any elementwise
activation) is adding one entry here (and one case in the tests).

Where the module looping over the layers does more than loop (the embeddings and final norm of
ViT, the convolutional position embedding of wav2vec2, the embedding scaling of BART's encoder),
each layer is converted on its own (``encoder=None``); padded batches are then packed and
unpacked around every layer instead of once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["FAMILIES", "UNSUPPORTED", "Family", "LayerLayout", "family_for", "get_path", "layer_lists",
           "supported_model_types"]


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
        heads_attr, scaling: see :func:`.layers.resolve_layer` (``scaling`` or ``scale`` is read).
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
        layers: path from the base model to the ``nn.ModuleList`` of layers; a ``*`` step
            stands for every child (ALBERT's layer groups), and each list found is converted.
        encoder: path from the base model to the module whose ``forward`` loops over the layers
            and nothing else (``""`` is the base model itself; ``None``: there is no such module,
            so each layer is converted on its own, and a padded batch is packed around each layer).
        encoder_args: positional parameter names of that ``forward`` (or of the layer's
            ``forward`` when ``encoder`` is None), used to read positional arguments.
        output_class: name, in ``transformers.modeling_outputs``, of what the encoder returns.
        activation_key: config attribute naming the activation function.
        layout: where each part of a layer lives.
        norm_first_key: config attribute that, when true, makes the layers pre-norm whatever
            ``layout.norm_first`` says (wav2vec2's ``do_stable_layer_norm``).
        seq2seq_encoder: the layers are the encoder of an encoder-decoder model (BART, Whisper):
            only they are converted; the decoder is left as it is.
        clamp_fp16: the layer clamps non-finite float16 outputs to the float16 range (BART's
            encoder layers do); the converted layer does the same.
        padded_inputs: whether inputs can be padded at all (images are not): without padding
            only the fused op gains, so an activation it cannot compute means nothing to gain.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    encoder: str | None
    encoder_args: tuple[str, ...]
    output_class: str | None
    activation_key: str
    layout: LayerLayout
    norm_first_key: str | None = None
    seq2seq_encoder: bool = False
    clamp_fp16: bool = False
    padded_inputs: bool = True

    def norm_first(self, config: Any) -> bool:
        """Whether this model's layers are pre-norm."""
        if self.norm_first_key is not None and getattr(config, self.norm_first_key, False):
            return True
        return self.layout.norm_first


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

# ViLT, YOLOS: ViT's pre-norm layer with BERT's module names.
_VILT_LAYOUT = LayerLayout(
    attention="attention.attention",
    heads_attr="num_attention_heads",
    q="attention.attention.query",
    k="attention.attention.key",
    v="attention.attention.value",
    out="attention.output.dense",
    norm1="layernorm_before",
    norm2="layernorm_after",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    activation="intermediate.intermediate_act_fn",
    norm_first=True,
)

_ALBERT_LAYOUT = LayerLayout(
    attention="attention",
    heads_attr="num_attention_heads",
    q="attention.query",
    k="attention.key",
    v="attention.value",
    out="attention.dense",
    norm1="attention.LayerNorm",
    norm2="full_layer_layer_norm",
    ffn_in="ffn",
    ffn_out="ffn_output",
    activation="activation",
    norm_first=False,
)

_WAV2VEC2_LAYOUT = LayerLayout(
    attention="attention",
    heads_attr="num_heads",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    out="attention.out_proj",
    norm1="layer_norm",
    norm2="final_layer_norm",
    ffn_in="feed_forward.intermediate_dense",
    ffn_out="feed_forward.output_dense",
    activation="feed_forward.intermediate_act_fn",
    norm_first=False,
)

# The encoder layers of BART and its descendants (post-norm), and of mBART, Whisper... (pre-norm).
_BART_LAYOUT = LayerLayout(
    attention="self_attn",
    heads_attr="num_heads",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    out="self_attn.out_proj",
    norm1="self_attn_layer_norm",
    norm2="final_layer_norm",
    ffn_in="fc1",
    ffn_out="fc2",
    activation="activation_fn",
    norm_first=False,
)
_PRE_NORM_BART_LAYOUT = replace(_BART_LAYOUT, norm_first=True)

_BERT_ENCODER_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                      "cache", "use_cache")
_AUDIO_CONV_LAYERS = ("wav2vec2", "hubert", "data2vec-audio")
_SEQ2SEQ_LAYER_ARGS = ("hidden_states", "attention_mask")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie",
                     "bert-generation", "roc_bert"),
        layers="encoder.layer",
        encoder="encoder",
        encoder_args=_BERT_ENCODER_ARGS,
        output_class="BaseModelOutputWithPastAndCrossAttentions",
        activation_key="hidden_act",
        layout=_BERT_LAYOUT,
    ),
    Family(
        # BERT's layers under an encoder that returns a BaseModelOutput.
        name="layoutlm",
        model_types=("layoutlm", "markuplm", "splinter"),
        layers="encoder.layer",
        encoder="encoder",
        encoder_args=("hidden_states", "attention_mask"),
        output_class="BaseModelOutput",
        activation_key="hidden_act",
        layout=_BERT_LAYOUT,
    ),
    Family(
        name="tapas",
        model_types=("tapas",),
        layers="encoder.layer",
        encoder="encoder",
        encoder_args=(*_BERT_ENCODER_ARGS, "output_attentions", "output_hidden_states", "return_dict"),
        output_class="BaseModelOutput",
        activation_key="hidden_act",
        layout=_BERT_LAYOUT,
    ),
    Family(
        # RemBERT's encoder projects the embeddings first, so its layers are converted one by one.
        name="rembert",
        model_types=("rembert",),
        layers="encoder.layer",
        encoder=None,
        encoder_args=("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                      "cache", "output_attentions"),
        output_class=None,
        activation_key="hidden_act",
        layout=_BERT_LAYOUT,
    ),
    Family(
        # ALBERT shares one layer (per group) across the depth; AlbertTransformer projects the
        # embeddings and walks the groups, so the shared layers are converted themselves.
        name="albert",
        model_types=("albert",),
        layers="encoder.albert_layer_groups.*.albert_layers",
        encoder=None,
        encoder_args=("hidden_states", "attention_mask"),
        output_class=None,
        activation_key="hidden_act",
        layout=_ALBERT_LAYOUT,
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
        model_types=("vit", "deit", "vit_mae", "vit_msn"),
        layers="layers",
        encoder=None,
        encoder_args=("hidden_states", "attention_mask"),
        output_class=None,
        activation_key="hidden_act",
        layout=_VIT_LAYOUT,
        padded_inputs=False,
    ),
    Family(
        name="vilt",
        model_types=("vilt",),
        layers="encoder.layer",
        encoder="encoder",
        encoder_args=("hidden_states", "attention_mask", "output_attentions", "output_hidden_states", "return_dict"),
        output_class="BaseModelOutput",
        activation_key="hidden_act",
        layout=_VILT_LAYOUT,
    ),
    Family(
        # YOLOS adds interpolated position embeddings between layers.
        name="yolos",
        model_types=("yolos",),
        layers="encoder.layer",
        encoder=None,
        encoder_args=("hidden_states",),
        output_class=None,
        activation_key="hidden_act",
        layout=_VILT_LAYOUT,
        padded_inputs=False,
    ),
    Family(
        name="wav2vec2",
        model_types=_AUDIO_CONV_LAYERS,
        layers="encoder.layers",
        encoder=None,
        encoder_args=("hidden_states", "attention_mask"),
        output_class=None,
        activation_key="hidden_act",
        layout=_WAV2VEC2_LAYOUT,
        norm_first_key="do_stable_layer_norm",
    ),
    Family(
        name="bart",
        model_types=("bart", "marian"),
        layers="encoder.layers",
        encoder=None,
        encoder_args=_SEQ2SEQ_LAYER_ARGS,
        output_class=None,
        activation_key="activation_function",
        layout=_BART_LAYOUT,
        seq2seq_encoder=True,
        clamp_fp16=True,
    ),
    Family(
        name="mbart",
        model_types=("mbart", "pegasus", "m2m_100", "blenderbot", "whisper"),
        layers="encoder.layers",
        encoder=None,
        encoder_args=_SEQ2SEQ_LAYER_ARGS,
        output_class=None,
        activation_key="activation_function",
        layout=_PRE_NORM_BART_LAYOUT,
        seq2seq_encoder=True,
        clamp_fp16=True,
    ),
)

# Architectures people arrive with (from BetterTransformer's list, or as popular encoders)
# whose layers cannot be computed by either fused route, and why: shown by ``explain``.
UNSUPPORTED: dict[str, str] = {
    "roformer": "RoFormer rotates queries and keys by position inside attention (rotary), which the fused "
                "attention does not do",
    "t5": "T5 adds a learned relative position bias to every attention score and normalizes with RMSNorm",
    "mpnet": "MPNet adds a relative position bias to every attention score",
    "deberta-v2": "DeBERTa-v2 computes disentangled (content-to-position) attention",
    "fsmt": "FSMT's encoder layers run time-first (length, batch, hidden) with a byte padding mask",
    "clip": "CLIP's text tower attends causally and both towers use quick_gelu; not converted yet",
    "blip-2": "BLIP-2's vision layers pack q/k/v in one projection with separate q and v biases; not converted yet",
}

_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` the pass knows, sorted."""
    return tuple(sorted(_BY_MODEL_TYPE))


def layer_lists(base: Any, family: Family) -> list[tuple[str, Any]]:
    """``(path, module list)`` for every list of layers ``family.layers`` names under ``base``.

    Raises AttributeError naming the missing step.
    """
    found: list[tuple[str, Any]] = [("", base)]
    for step in family.layers.split("."):
        nxt: list[tuple[str, Any]] = []
        for path, obj in found:
            if step == "*":
                nxt.extend((f"{path}.{name}".lstrip("."), child) for name, child in obj.named_children())
            else:
                nxt.append((f"{path}.{step}".lstrip("."), get_path(obj, step)))
        found = nxt
    return found


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
