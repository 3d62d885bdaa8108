"""A fastpath model pickles and ``torch.save``s whole, and loads back working: the plan, the fused
encoder and the SDPA chain come along, outputs equal the original's, and saving the copy writes
canonical weights."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

import transformers_fastpath as fp
from transformers_fastpath.passes.fused_encoder import runtime_of
from transformers_fastpath.passes.instance_methods import LAYERS_ATTR, REPLICATE_ATTR, get_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_layers_came_along(model: torch.nn.Module, copy: torch.nn.Module) -> None:
    """Every method layer of ``model`` is on ``copy`` too, its dispatcher bound to the copy (a pickled
    bound method used to come back as the class's own method: outputs right, every layer gone)."""
    stacks = vars(model)[LAYERS_ATTR]
    assert set(vars(copy)[LAYERS_ATTR]) == set(stacks)
    for method, stack in stacks.items():
        bound = vars(copy)[method]
        assert bound.__self__ is copy and bound.__func__ is vars(model)[method].__func__, (method, bound)
        for owner, _ in stack.layers:
            assert get_layer(copy, method, owner) is not None, (method, owner)
    if REPLICATE_ATTR in vars(model):  # the DataParallel fix comes along too, bound to the copy
        fix = vars(copy)[REPLICATE_ATTR]
        assert fix.__self__ is copy and fix.__func__ is vars(model)[REPLICATE_ATTR].__func__


def _round_trip(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_fastpath_encoder_round_trips_whole(tiny_model_factory, tmp_path: Path, how: str) -> None:
    from transformers import AutoModel

    path = tiny_model_factory("bert")
    model = AutoModel.from_pretrained(path, fastpath=True)
    copy = _round_trip(model, how)
    plan = fp.plan_of(copy)
    assert plan is not None and plan.pass_status("fused_encoder").status == "applied"
    _assert_layers_came_along(model, copy)
    lengths = torch.tensor([9, 3, 6, 1])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 2000, mask.shape, generator=torch.Generator().manual_seed(0)).masked_fill(mask == 0, 0)
    with torch.no_grad():
        want, got = model(input_ids=ids, attention_mask=mask), copy(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[keep], want.last_hidden_state[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-6, rtol=0)
    assert not [k for k in runtime_of(copy).stats if k.startswith("original")], runtime_of(copy).stats
    copy.save_pretrained(tmp_path / "copy")
    plain = AutoModel.from_pretrained(tmp_path / "copy", fastpath=False)
    for key, value in AutoModel.from_pretrained(path, fastpath=False).state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_fastpath_decoder_round_trips_whole(tiny_model_factory, how: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", "causal"), fastpath=True)
    copy = _round_trip(model, how)
    assert fp.plan_of(copy).pass_status("sdpa_backends").status == "applied"
    _assert_layers_came_along(model, copy)
    assert set(vars(copy)[LAYERS_ATTR]) >= {"forward", "generate"}
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(copy.generate(ids, **kwargs), model.generate(ids, **kwargs))
