"""Every architecture the fused encoder knows beyond BERT/DistilBERT/ViT: the same numbers as the
unconverted model on real tokens, on right- and left-padded batches, through every route; revert
exact; canonical saves; training on the original forward; pipelines equal to plain.

Tiny random models (hidden 64, 4 heads, 2 layers) built with ``from_config``, one case per model
type. The first-generation families (bert, roberta, distilbert, vit...) are in test_fused_encoder.py;
:func:`test_every_supported_model_type_is_tested_here_or_there` keeps the two lists honest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fused_encoder import assert_state_equal, module_types, no_overrides, snapshot
from test_pipeline_parity import assert_same as assert_pipeline_outputs_same
from torch import nn

import transformers_fastpath as fp
from transformers_fastpath.passes.fused_encoder import FusedEncoderPass, runtime_of
from transformers_fastpath.passes.fused_encoder.families import (
    UNSUPPORTED,
    supported_model_types,
)

ATOL = 1e-5
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]
ROUTES = ("dense", "nested", "packed", "auto")
LENGTHS = (9, 1, 5, 1, 7, 3)
VOCAB = 100

_SIZE = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
         "vocab_size": VOCAB, "max_position_embeddings": 64}
_SEQ2SEQ = {"d_model": 64, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_layers": 2,
            "decoder_layers": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "vocab_size": VOCAB,
            "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
            "decoder_start_token_id": 2}
_AUDIO = {**_SIZE, "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
          "num_conv_pos_embedding_groups": 2}
_VISION = {**_SIZE, "image_size": 32, "patch_size": 8}


@dataclass(frozen=True)
class Case:
    """One model type: its config and the kind of input it takes."""

    model_type: str
    kind: str  # text | seq2seq | audio | vision | whisper | vilt
    config: dict[str, Any] = field(default_factory=dict)
    padded: bool = True  # vision inputs have no padding: only the dense route applies

    def build_config(self) -> Any:
        from transformers import AutoConfig

        base = {"text": _SIZE, "seq2seq": _SEQ2SEQ, "audio": _AUDIO, "vision": _VISION, "vilt": _VISION,
                "whisper": _SEQ2SEQ}[self.kind]
        return AutoConfig.for_model(self.model_type, **{**base, **self.config})


CASES = {c.model_type if not c.config.get("do_stable_layer_norm") else f"{c.model_type}-stable": c for c in (
    Case("bert-generation", "text"),
    Case("roc_bert", "text", {"pad_token_id": 0}),
    Case("layoutlm", "text"),
    Case("markuplm", "text", {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}),
    Case("splinter", "text", {"question_token_id": 5}),
    Case("tapas", "text"),
    Case("rembert", "text", {"input_embedding_size": 32, "output_embedding_size": 32}),
    # ALBERT's default tanh-GELU is not what the fused op computes: the packed route runs it.
    Case("albert", "text", {"embedding_size": 32}),
    Case("vit_mae", "vision", {"mask_ratio": 0.5}, padded=False),
    Case("vit_msn", "vision", padded=False),
    Case("yolos", "vision", {"image_size": [32, 32], "num_detection_tokens": 2}, padded=False),
    Case("vilt", "vilt", {"max_position_embeddings": 16}),
    Case("wav2vec2", "audio"),
    Case("wav2vec2", "audio", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}),
    Case("hubert", "audio"),
    Case("hubert", "audio", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}),
    Case("data2vec-audio", "audio"),
    Case("bart", "seq2seq"),
    Case("marian", "seq2seq"),
    Case("mbart", "seq2seq"),
    Case("pegasus", "seq2seq"),
    Case("m2m_100", "seq2seq"),
    Case("blenderbot", "seq2seq"),
    Case("whisper", "whisper", {"num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32},
         padded=False),
)}
# Covered by test_fused_encoder.py.
FIRST_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie", "distilbert",
                  "vit", "deit")
# optimum's BetterTransformerManager.MODEL_MAPPING (huggingface/optimum@00a04df, the last tree with
# the BetterTransformer module), and the encoders issue 15 names on top (pegasus, blenderbot,
# data2vec-audio, blip-2, t5, mpnet).
BETTERTRANSFORMER_TYPES = (
    "albert", "bart", "bert", "bert-generation", "camembert", "clip", "codegen", "data2vec-text", "deit",
    "distilbert", "electra", "ernie", "fsmt", "gpt2", "gptj", "gpt_neo", "gpt_neox", "hubert", "layoutlm",
    "m2m_100", "marian", "markuplm", "mbart", "rembert", "roberta", "roc_bert", "roformer", "splinter", "tapas",
    "vilt", "vit", "vit_mae", "vit_msn", "wav2vec2", "whisper", "xlm-roberta", "yolos",
)
ISSUE_ENCODERS = ("pegasus", "blenderbot", "data2vec-audio", "blip-2", "t5", "mpnet")
DECODERS = ("codegen", "gpt2", "gptj", "gpt_neo", "gpt_neox")  # BetterTransformer only swapped their attention


class StubPlan:
    hardware = None

    def get(self, key: str, default: Any = None) -> Any:
        return {"encoder_fastpath": "auto"}.get(key, default)


def build(case: Case, impl: str) -> nn.Module:
    from transformers import AutoModel

    torch.manual_seed(0)
    try:
        return AutoModel.from_config(case.build_config(), attn_implementation=impl).eval()
    except ValueError as exc:  # LayoutLM has sdpa attention from some 5.x release on
        if "does not support an attention implementation" in str(exc):
            pytest.skip(f"{case.model_type} has no {impl} attention in transformers {transformers_version()}")
        raise


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def converted(model: nn.Module) -> nn.Module:
    fast = copy.deepcopy(model)
    FusedEncoderPass().apply(fast, StubPlan())
    assert runtime_of(fast) is not None
    return fast


def _lengths_mask(lengths: tuple[int, ...], left: bool, length: int | None = None) -> torch.Tensor:
    length = length or max(lengths)
    pos = torch.arange(length)[None, :]
    lens = torch.tensor(lengths)[:, None]
    return (pos >= length - lens) if left else (pos < lens)


def inputs_for(case: Case, model: nn.Module, left: bool) -> tuple[dict[str, torch.Tensor], Callable[[Any], Any]]:
    """The inputs, and a function picking what must match from an output (real tokens only)."""
    g = torch.Generator().manual_seed(1)
    config = model.config
    if case.kind in ("text", "seq2seq"):
        keep = _lengths_mask(LENGTHS, left)
        ids = torch.randint(3, VOCAB, keep.shape, generator=g)
        ids[~keep] = config.pad_token_id if config.pad_token_id is not None else 0
        inputs = {"input_ids": ids, "attention_mask": keep.long()}
        if case.kind == "text":
            # Real tokens, and position 0 (heads read it; a pad in left-padded rows).
            return inputs, lambda out: (out.last_hidden_state[keep], out.last_hidden_state[:, 0],
                                        getattr(out, "pooler_output", None))
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (len(LENGTHS), 4), generator=g)
        # The decoder reads the encoder through cross-attention on real tokens only.
        return inputs, lambda out: (out.last_hidden_state, out.encoder_last_hidden_state[keep])
    if case.kind == "audio":
        lengths = (4000, 1600, 3000)
        keep_samples = _lengths_mask(lengths, left=False)
        values = torch.randn(len(lengths), max(lengths), generator=g).masked_fill(~keep_samples, 0.0)
        inputs = {"input_values": values, "attention_mask": keep_samples.long()}

        def audio_pick(out: Any) -> Any:
            frames = model._get_feature_vector_attention_mask(out.last_hidden_state.shape[1], inputs["attention_mask"])
            return out.last_hidden_state[frames.bool()]

        return inputs, audio_pick
    if case.kind == "vision":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}, lambda out: out.last_hidden_state
    if case.kind == "whisper":
        return ({"input_features": torch.randn(2, 8, 32, generator=g),
                 "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g)},
                lambda out: (out.last_hidden_state, out.encoder_last_hidden_state))
    # ViLT: text tokens (padded) followed by image patches (all real).
    keep_text = _lengths_mask((9, 4, 6), left)
    ids = torch.randint(3, VOCAB, keep_text.shape, generator=g)
    inputs = {"input_ids": ids, "attention_mask": keep_text.long(),
              "pixel_values": torch.randn(3, 3, 32, 32, generator=g),
              "pixel_mask": torch.ones(3, 32, 32, dtype=torch.long)}

    def vilt_pick(out: Any) -> Any:
        patches = out.last_hidden_state.shape[1] - keep_text.shape[1]
        keep = torch.cat([keep_text, torch.ones(3, patches, dtype=torch.bool)], dim=1)
        return out.last_hidden_state[keep], out.pooler_output

    return inputs, vilt_pick


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    torch.manual_seed(7)  # ViTMAE masks patches at random, also in eval mode
    with torch.no_grad():
        return model(**inputs)


def assert_same(fast: Any, plain: Any, where: str) -> None:
    if plain is None:
        assert fast is None, where
    elif isinstance(plain, tuple):
        for i, (a, b) in enumerate(zip(fast, plain, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        torch.testing.assert_close(fast, plain, atol=ATOL, rtol=0, msg=where)


# transformers has only eager attention for these.
EAGER_ONLY = ("markuplm", "splinter", "tapas", "rembert", "vilt")
CASE_IMPLS = [(name, impl) for name, case in CASES.items()
              for impl in (("eager",) if case.model_type in EAGER_ONLY else ("sdpa", "eager"))]


# -- same numbers ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "impl"), CASE_IMPLS)
def test_family_matches_the_unconverted_model(name: str, impl: str) -> None:
    """Each route, forced in turn on one converted copy, gives the unconverted model's outputs on
    real tokens, and takes the fused route (never the original forward) for every call."""
    case = CASES[name]
    model = build(case, impl)
    fast = converted(model)
    runtime = runtime_of(fast)
    fusable = all(p.fusable for p in runtime.parts)
    for left in ((False, True) if case.padded and case.kind != "audio" else (False,)):
        inputs, pick = inputs_for(case, model, left)
        expected = pick(forward(model, inputs))
        for route in ROUTES if case.padded else ("dense", "auto"):
            runtime.route = route
            runtime.stats.clear()
            where = f"{name} {impl} {route} {'left' if left else 'right'}"
            assert_same(pick(forward(fast, inputs)), expected, where)
            taken = set(runtime.stats)
            assert taken and not [k for k in taken if k.startswith("original")], (where, taken)
            if route == "packed" or (case.padded and not fusable):
                assert taken == {"packed"}, (where, taken)


def test_albert_shares_its_converted_layer_across_the_depth() -> None:
    """ALBERT calls one layer per group num_hidden_layers times: the conversion sits on that shared
    layer (one per group), and every call of it runs fused."""
    case = Case("albert", "text", {"embedding_size": 32, "num_hidden_layers": 4, "num_hidden_groups": 2,
                                   "hidden_act": "gelu"})
    model = build(case, "sdpa")
    fast = converted(model)
    runtime = runtime_of(fast)
    assert len(runtime.parts) == 2  # two groups of one layer
    inputs, pick = inputs_for(case, model, left=False)
    runtime.route = "dense"
    assert_same(pick(forward(fast, inputs)), pick(forward(model, inputs)), "albert groups")
    assert runtime.stats == {"dense": 4}


def test_seq2seq_encoder_runs_fused_inside_generate() -> None:
    """BART's generate runs its encoder once under no_grad: converted, and the same tokens."""
    from transformers import AutoModelForSeq2SeqLM

    config = CASES["bart"].build_config()
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    fast = converted(model)
    keep = _lengths_mask((6, 3), left=False)
    ids = torch.randint(3, VOCAB, keep.shape, generator=torch.Generator().manual_seed(3)).masked_fill(~keep, 1)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        plain_tokens = model.generate(input_ids=ids, attention_mask=keep.long(), **kwargs)
        fast_tokens = fast.generate(input_ids=ids, attention_mask=keep.long(), **kwargs)
    assert torch.equal(plain_tokens, fast_tokens)
    assert runtime_of(fast).stats.total() == config.encoder_layers  # once per layer, the decoder untouched
    assert not [k for k in runtime_of(fast).stats if k.startswith("original")]


def test_fp16_clamp_of_seq2seq_layers_is_kept() -> None:
    """mBART's (pre-norm) encoder layer clamps non-finite float16 outputs into range; so does the
    converted layer, giving what the original layer gives."""
    model = build(CASES["mbart"], "sdpa").half()
    fast = converted(model)
    layer = fast.encoder.layers[0]
    hidden = torch.full((1, 4, 64), 3e4, dtype=torch.float16)
    with torch.no_grad():
        layer.fc2.bias.fill_(4e4)  # residual + feed-forward overflows float16
        out = layer(hidden, attention_mask=None)
        ref = type(layer).forward(layer, hidden, attention_mask=None)
    assert runtime_of(fast).stats == {"dense": 1}
    assert bool(torch.isfinite(ref).all()) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


# -- state, saving, training -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_revert_is_exact_and_saves_are_canonical(name: str, tmp_path: Path) -> None:
    from transformers import AutoModel

    case = CASES[name]
    model = build(case, "eager")
    before, types = snapshot(model), module_types(model)
    fast = converted(model)
    inputs, _ = inputs_for(case, model, left=False)
    forward(fast, inputs)
    fast.save_pretrained(tmp_path)
    assert_state_equal(AutoModel.from_pretrained(tmp_path, attn_implementation="eager", fastpath=False), before)

    FusedEncoderPass().revert(fast)
    assert runtime_of(fast) is None
    assert module_types(fast) == types and no_overrides(fast)
    assert_state_equal(fast, before)
    _, pick = inputs_for(case, model, left=False)
    assert_same(pick(forward(fast, inputs)), pick(forward(model, inputs)), f"{name} after revert")


@pytest.mark.parametrize("name", ["albert", "bart", "wav2vec2", "vit_msn", "vilt"])
def test_training_runs_the_original_forward(name: str) -> None:
    case = CASES[name]
    model = build(case, "eager")
    fast = converted(model).train()
    inputs, pick = inputs_for(case, model, left=False)
    out = fast(**inputs)
    first = pick(out)
    loss = (first[0] if isinstance(first, tuple) else first).float().pow(2).mean()
    loss.backward()
    assert all(k.startswith("original: training mode") for k in runtime_of(fast).stats), runtime_of(fast).stats
    assert any(p.grad is not None for p in fast.parameters())


# -- pipelines -------------------------------------------------------------------------------

def _saved(tmp_path: Path, model: nn.Module, *extras: Any) -> str:
    model.save_pretrained(tmp_path)
    for extra in extras:
        extra.save_pretrained(tmp_path)
    return str(tmp_path)


def test_pipelines_equal_plain(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Three of the new families through the user entry point: a text model whose activation only
    the packed route computes (ALBERT), a seq2seq encoder (BART) and speech recognition (wav2vec2
    CTC; its classification heads always ask transformers for hidden states, so they run the
    original forward)."""
    import json

    import numpy as np
    import transformers
    from transformers import (
        AutoTokenizer,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        pipeline,
    )

    # No token_type_ids, as BART's own tokenizer (BART hands unknown inputs down to its layers).
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, model_input_names=["input_ids", "attention_mask"])
    texts = ["short", "a somewhat longer sentence about nothing", "mid length text",
             "the longest sentence of all of them by far with many more words than the rest", "x y"]
    torch.manual_seed(0)
    albert = transformers.AlbertModel(transformers.AlbertConfig(**{**_SIZE, "vocab_size": 30522, "embedding_size": 32}))
    bart_config = transformers.BartConfig(**{**_SEQ2SEQ, "vocab_size": 30522, "pad_token_id": 0, "eos_token_id": 102,
                                             "bos_token_id": 101, "decoder_start_token_id": 102, "num_labels": 3})
    bart = transformers.BartForSequenceClassification(bart_config)
    (tmp_path / "wav").mkdir()
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefgh")}}
    (tmp_path / "wav" / "vocab.json").write_text(json.dumps(vocab))
    ctc_tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "wav" / "vocab.json"))
    wav = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**{**_AUDIO, "vocab_size": len(vocab),
                                                                     "pad_token_id": 0}))
    cases = [
        ("feature-extraction", _saved(tmp_path / "albert", albert.eval(), tokenizer), texts),
        ("text-classification", _saved(tmp_path / "bart", bart.eval(), tokenizer), texts),
        # One clip per call (unpadded): short enough for the CPU's dense route (<= 128 frames).
        ("automatic-speech-recognition",
         _saved(tmp_path / "wav", wav.eval(), ctc_tokenizer, Wav2Vec2FeatureExtractor()),
         [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate((1200, 800, 1000))]),
    ]
    for task, path, inputs in cases:
        plain = pipeline(task, model=path, fastpath=False)
        fast = pipeline(task, model=path, fastpath=True)
        plan = fp.plan_of(fast)
        status = plan.pass_status("fused_encoder") if plan is not None else None
        assert status is not None and status.status == "applied", (task, status)
        assert_pipeline_outputs_same(plain(inputs), fast(inputs), task)
        stats = runtime_of(fast.model).stats
        assert stats and not [k for k in stats if k.startswith("original")], (task, stats)


# -- coverage --------------------------------------------------------------------------------

def test_every_supported_model_type_is_tested_here_or_there() -> None:
    tested = {c.model_type for c in CASES.values()} | set(FIRST_FAMILIES)
    assert set(supported_model_types()) == tested


def test_bettertransformer_coverage() -> None:
    """Of the BetterTransformer encoder architectures (its list plus the issue's), every one is
    converted or skipped with a stated reason; the decoders are the generation passes' business."""
    supported = set(supported_model_types())
    encoders = [t for t in (*BETTERTRANSFORMER_TYPES, *ISSUE_ENCODERS) if t not in DECODERS]
    missing = [t for t in encoders if t not in supported and t not in UNSUPPORTED]
    assert not missing
    assert len([t for t in encoders if t in supported]) >= 30


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_types_say_why(model_type: str) -> None:
    from transformers import AutoConfig

    reason = FusedEncoderPass().supports(type("Info", (), {"config": AutoConfig.for_model(model_type),
                                                            "model_type": model_type})(), None)
    assert reason and UNSUPPORTED[model_type] in reason


def test_group_normalized_speech_models_are_not_batched() -> None:
    """wav2vec2-base and the like group-normalize the waveform over time, so zero padding changes
    every output: their pipelines run one clip at a time (layer-normalized ones are batched)."""
    from transformers import Wav2Vec2Config

    group = fp.resolve(Wav2Vec2Config(feat_extract_norm="group"), task="audio-classification")
    assert group["batch_size"] == "keep"
    assert "feat_extract_norm='group'" in group.settings["batch_size"].reason
    layer = fp.resolve(Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True),
                       task="audio-classification")
    assert isinstance(layer["batch_size"], int) and layer["batch_size"] > 1
