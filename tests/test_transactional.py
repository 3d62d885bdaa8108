"""Applying a plan is transactional: a failing pass leaves the model exactly as it was.

Faults are injected into tiny BERT/ViT models built from configs: a pass's ``apply`` that raises
after changing the model in many ways (with a working, a no-op and a raising ``revert``), a pass
that writes into weights in place, the fused kernel raising on the first batch, and a fused
layer whose outputs are perturbed (caught by ``verify``). Every test checks the state_dict bit
for bit, module types, hooks and attributes.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import transformers_fastpath as fp
from transformers_fastpath.errors import PassSkipped, RollbackError, StrictModeError
from transformers_fastpath.passes.fused_encoder import FusedEncoderPass, runtime_of
from transformers_fastpath.passes.fused_encoder import runtime as fused_runtime
from transformers_fastpath.planning.hardware import Hardware

pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest: tiny models on one thread
]

CPU = Hardware(device="cpu", memory_gib=24, cpu_count=2)
# Only the fused encoder (and test passes) run: sdpa_backends is skipped with eager attention.
# backend torch: no ONNX Runtime pass either, where the [onnx] extra is installed
ONLY_FUSED = {"attn_implementation": "eager", "backend": "torch"}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
RUNNER_ATTRS = {"_fastpath_plan", "_fastpath_applied"}


def bert(head: str = "AutoModelForSequenceClassification", seed: int = 0) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model("bert", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                  intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(seed)
    return getattr(transformers, head).from_config(config, attn_implementation="sdpa").eval()


def vit() -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.for_model("vit", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                  intermediate_size=128, image_size=32, patch_size=8, num_channels=3)
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(config, attn_implementation="sdpa").eval()


def text_inputs(lengths: tuple[int, ...] = (9, 4, 7, 2)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    length = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), length), generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    ids[~mask] = 0
    return {"input_ids": ids, "attention_mask": mask.long()}


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a pass could leave behind, in comparable form."""
    modules = list(model.named_modules())
    return {
        "state": {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in modules],
        "attrs": [(n, sorted(set(vars(m)) - (RUNNER_ATTRS if m is model else set()))) for n, m in modules],
        "hooks": [(n, {h: list(getattr(m, h, {})) for h in HOOK_DICTS}) for n, m in modules],
        "params": [(n, id(p), p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()],
        "config": {k: v for k, v in vars(model.config).items()},
        "global_hooks": len(torch.nn.modules.module._global_forward_hooks),
    }


def assert_same_model(model: nn.Module, before: dict[str, Any]) -> None:
    after = fingerprint(model)
    assert list(after["state"]) == list(before["state"])  # keys, in order
    for key, (dtype, value) in before["state"].items():
        now_dtype, now = after["state"][key]
        assert now_dtype == dtype and torch.equal(now, value), key  # bit for bit
    for field in ("types", "attrs", "hooks", "params", "config", "global_hooks"):
        assert after[field] == before[field], field


def no_overrides(model: nn.Module) -> bool:
    return all("forward" not in vars(m) and "_fastpath_fused_encoder" not in vars(m) for m in model.modules())


def warnings_about(caplog: pytest.LogCaptureFixture, *needles: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("transformers_fastpath")
            and all(n in r.getMessage() for n in needles)]


class _SubLinear(nn.Linear):
    pass


def vandalize(model: nn.Module) -> None:
    """Every kind of change a pass could make before failing."""
    base = model.bert
    base.pooler.activation = nn.ReLU()                                # a submodule replaced
    model.classifier.__class__ = _SubLinear                           # a module's class swapped
    base.embeddings.register_forward_hook(lambda *a: None)            # a hook
    base.encoder.layer[0].stray_attribute = 1                         # an attribute
    base.encoder.layer[1].attention.self.forward = lambda *a, **k: None  # an instance forward
    model.classifier.weight = nn.Parameter(torch.zeros_like(model.classifier.weight))  # a parameter replaced
    model.classifier.bias.data = torch.ones(3)                        # a parameter's data swapped
    base.register_buffer("extra_buffer", torch.ones(1))               # a new state_dict key
    base.encoder.layer[0].output.dense.weight.requires_grad_(False)   # requires_grad flipped
    model.config.fastpath_test_attribute = True                       # the config touched
    torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # a process-wide hook


# -- a pass that fails while applying ----------------------------------------------------------

@pytest.mark.parametrize("revert", ["real", "noop", "raises"])
def test_failing_apply_leaves_the_model_exactly_as_before(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture, revert: str) -> None:
    """The fused pass converts the model, vandalizes it, then raises: whatever its revert does,
    the model is bit-identical afterwards, the plan says why, one warning names the pass."""
    model = bert()
    inputs = text_inputs()
    ref = run(model, inputs)
    before = fingerprint(model)
    real_apply = FusedEncoderPass.apply

    def failing_apply(self: FusedEncoderPass, model: nn.Module, plan: Any = None) -> None:
        real_apply(self, model, plan)
        vandalize(model)
        raise RuntimeError("boom after partial changes")

    monkeypatch.setattr(FusedEncoderPass, "apply", failing_apply)
    if revert == "noop":
        monkeypatch.setattr(FusedEncoderPass, "revert", lambda self, model: None)
    elif revert == "raises":
        def broken_revert(self: FusedEncoderPass, model: nn.Module) -> None:
            raise ValueError("revert is broken too")
        monkeypatch.setattr(FusedEncoderPass, "revert", broken_revert)

    with caplog.at_level(logging.INFO, logger="transformers_fastpath"):
        fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    assert_same_model(model, before)
    assert no_overrides(model)
    assert torch.equal(run(model, inputs), ref)
    status = fp.plan_of(model).pass_status("fused_encoder")
    assert status.status == "failed" and "RuntimeError: boom after partial changes" in status.reason
    assert "failed" in str(fp.plan_of(model)) and "boom after partial changes" in str(fp.plan_of(model))
    logged = warnings_about(caplog, "fused_encoder", "boom after partial changes")
    assert len(logged) == 1 and "rolled back" in logged[0].getMessage()
    if revert == "raises":
        assert "revert is broken too" in logged[0].getMessage()


def test_skip_after_partial_changes_is_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = bert()
    before = fingerprint(model)

    def skipping_apply(self: FusedEncoderPass, model: nn.Module, plan: Any = None) -> None:
        vandalize(model)
        raise PassSkipped("decided late that it cannot run")

    monkeypatch.setattr(FusedEncoderPass, "apply", skipping_apply)
    fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    assert_same_model(model, before)
    status = fp.plan_of(model).pass_status("fused_encoder")
    assert (status.status, status.reason) == ("skipped", "decided late that it cannot run")


def test_keyboard_interrupt_inside_apply_rolls_back_and_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    model = bert()
    before = fingerprint(model)

    def interrupted(self: FusedEncoderPass, model: nn.Module, plan: Any = None) -> None:
        vandalize(model)
        raise KeyboardInterrupt

    monkeypatch.setattr(FusedEncoderPass, "apply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    assert_same_model(model, before)


# -- rollback scope: the failing pass only; strict mode: the whole plan -------------------------

class _FlakyPass:
    """Applies after the fused encoder; changes the model, then fails."""

    name, setting, changes_state_dict = "test_flaky", "test_flaky", False

    def supports(self, info: Any, plan: Any) -> str | None:
        return None

    def apply(self, model: nn.Module, plan: Any) -> None:
        model.test_flaky_marker = True
        model.classifier.weight = nn.Parameter(model.classifier.weight.detach() * 2)
        raise RuntimeError("flaky pass gave up")

    def revert(self, model: nn.Module) -> None:
        vars(model).pop("test_flaky_marker", None)


class _InPlacePass(_FlakyPass):
    """Writes into a weight in place, then fails."""

    name, setting = "test_in_place", "test_in_place"

    def apply(self, model: nn.Module, plan: Any) -> None:
        with torch.no_grad():
            model.classifier.weight.mul_(3.0)
            model.bert.embeddings.word_embeddings.weight[0].fill_(7.0)
        raise RuntimeError("in-place pass gave up")


class _DeclaredInPlacePass(_InPlacePass):
    name, setting, mutates_weights = "test_declared_in_place", "test_declared_in_place", True


@pytest.mark.parametrize("extra_pass", [_FlakyPass], indirect=True)
def test_only_the_failing_pass_is_rolled_back(extra_pass: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = bert()
    inputs = text_inputs()
    ref = run(model, inputs)
    before = fingerprint(model)
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    plan = fp.plan_of(model)
    assert plan.pass_status("fused_encoder").status == "applied"  # kept: it succeeded on its own
    assert plan.pass_status("test_flaky").status == "failed"
    assert "flaky pass gave up" in plan.pass_status("test_flaky").reason
    assert runtime_of(model) is not None and "test_flaky_marker" not in vars(model)
    after = fingerprint(model)
    assert after["types"] == before["types"] and after["params"] == before["params"]
    assert all(torch.equal(after["state"][k][1], v) for k, (_, v) in before["state"].items())
    torch.testing.assert_close(run(model, inputs), ref, atol=1e-5, rtol=0)
    assert len(warnings_about(caplog, "test_flaky")) == 1
    fp.revert(model)
    assert_same_model(model, before)


@pytest.mark.parametrize("extra_pass", [_FlakyPass], indirect=True)
def test_strict_mode_raises_and_rolls_back_the_whole_plan(extra_pass: Any) -> None:
    model = bert()
    before = fingerprint(model)
    with pytest.raises(StrictModeError) as info:
        fp.apply(model, {"defaults": {**ONLY_FUSED, "strict": True}}, hardware=CPU)
    message = str(info.value)
    assert "'test_flaky'" in message and "BertForSequenceClassification" in message
    assert "flaky pass gave up" in message and "test_flaky = false" in message and "strict = false" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_same_model(model, before)           # the fused encoder applied before it is undone too
    assert no_overrides(model) and fp.plan_of(model) is None


@pytest.mark.parametrize("extra_pass", [_InPlacePass], indirect=True)
def test_undeclared_in_place_write_cannot_be_undone_and_says_so(extra_pass: Any) -> None:
    model = bert()
    with pytest.raises(RollbackError) as info:
        fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    assert info.value.pass_name == "test_in_place"
    assert set(info.value.weights) == {"classifier.weight", "bert.embeddings.word_embeddings.weight"}
    assert "mutates_weights = True" in str(info.value) and "load it again" in str(info.value)
    assert fp.plan_of(model).pass_status("test_in_place").status == "failed"


@pytest.mark.parametrize("extra_pass", [_DeclaredInPlacePass], indirect=True)
def test_declared_in_place_write_is_restored_bit_for_bit(extra_pass: Any) -> None:
    model = bert()
    before = fingerprint(model)
    fp.apply(model, {"defaults": {**ONLY_FUSED, "encoder_fastpath": False}}, hardware=CPU)
    assert_same_model(model, before)
    assert fp.plan_of(model).pass_status("test_declared_in_place").status == "failed"


@pytest.mark.parametrize("extra_pass", [_DeclaredInPlacePass], indirect=True)
def test_strict_rollback_after_a_declared_in_place_write(extra_pass: Any) -> None:
    """The failing pass's value copy restores the weights (bumping their version counters); the
    earlier passes' rollback must not take that for a lost in-place write (RollbackError)."""
    model = bert()
    before = fingerprint(model)
    with pytest.raises(StrictModeError, match="in-place pass gave up"):
        fp.apply(model, {"defaults": {**ONLY_FUSED, "strict": True}}, hardware=CPU)
    assert_same_model(model, before)
    assert no_overrides(model) and fp.plan_of(model) is None


# -- the fused kernel fails on the first batch ---------------------------------------------------

def _broken_route(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[int]:
    calls: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise error

    monkeypatch.setattr(fused_runtime, "run_route", broken)
    return calls


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"),
                                   NotImplementedError("no nested kernel for this dtype")],
                         ids=["runtime", "not-implemented"])
def test_fused_kernel_failing_on_the_first_batch_reverts_the_pass(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: BaseException) -> None:
    model = bert()
    inputs = text_inputs()
    ref = run(model, inputs)
    before = fingerprint(model)
    fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    assert fp.plan_of(model).pass_status("fused_encoder").status == "applied"
    calls = _broken_route(monkeypatch, error)
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        out = run(model, inputs)
        again = run(model, inputs)
    assert torch.equal(out, ref) and torch.equal(again, ref)  # the unconverted model's result, bit for bit
    assert calls == [1]                                        # tried once; reverted after
    assert no_overrides(model) and runtime_of(model) is None
    assert_same_model(model, before)
    status = fp.plan_of(model).pass_status("fused_encoder")
    assert status.status == "failed" and type(error).__name__ in status.reason and "run time" in status.reason
    logged = warnings_about(caplog, "fused_encoder", type(error).__name__)
    assert len(logged) == 1 and "reverted" in logged[0].getMessage()


def test_data_parallel_replicas_run_the_original_forward(cpu_data_parallel: Any) -> None:
    """DataParallel (the Trainer on several GPUs, no torchrun) copies __dict__ into each replica: the
    converted forward there would read the original's weights on the first GPU. Replicas drop it."""
    model = bert()
    inputs = text_inputs()
    ref = run(model, inputs)
    fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    with torch.no_grad():
        replica = cpu_data_parallel(model)
        for param in model.parameters():
            param.zero_()  # a replica still running the original's fused forward would see zeros
    torch.testing.assert_close(run(replica, inputs), ref, atol=1e-5, rtol=0)
    assert no_overrides(replica) and runtime_of(replica) is None
    assert runtime_of(model) is not None  # the model itself keeps its conversion
    fp.revert(model)
    assert not any("_replicate_for_data_parallel" in vars(m) or "_fastpath_replica_fixes" in vars(m)
                   for m in model.modules())


def test_fused_kernel_out_of_memory_keeps_the_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OOM may be one big batch's: the original forward answers that call, the conversion stays,
    and the fused route serves again once memory allows."""
    model = bert()
    inputs = text_inputs()
    ref = run(model, inputs)
    fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    fused = run(model, inputs)
    with monkeypatch.context() as patch:
        calls = _broken_route(patch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        assert torch.equal(run(model, inputs), ref) and torch.equal(run(model, inputs), ref)
        assert calls == [1, 1]  # tried every call: not reverted
    runtime = runtime_of(model)
    assert runtime is not None and runtime.stats["original: fused route out of memory"] == 2
    assert fp.plan_of(model).pass_status("fused_encoder").status == "applied"
    assert torch.equal(run(model, inputs), fused)  # the fused route again


def test_fused_kernel_failure_in_strict_mode_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = bert()
    before = fingerprint(model)
    fp.apply(model, {"defaults": {**ONLY_FUSED, "strict": True}}, hardware=CPU)
    _broken_route(monkeypatch, RuntimeError("native op failed"))
    with pytest.raises(StrictModeError, match="native op failed") as info:
        run(model, text_inputs())
    assert "encoder_fastpath = false" in str(info.value) and "BertForSequenceClassification" in str(info.value)
    assert no_overrides(model)
    assert_same_model(model, before)


def test_an_error_the_original_forward_raises_too_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused route fails and so does the original forward (a bad input): the original's error
    propagates unchanged and the conversion stays."""
    model = bert()
    fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    _broken_route(monkeypatch, RuntimeError("fused op failed"))
    bad = ValueError("the original forward rejects this input")

    def original_raises(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise bad

    monkeypatch.setattr(fused_runtime.FusedForward, "original", original_raises)
    with pytest.raises(ValueError) as info:
        run(model, text_inputs())
    assert info.value is bad
    assert runtime_of(model) is not None
    assert fp.plan_of(model).pass_status("fused_encoder").status == "applied"


def test_user_input_errors_surface_unchanged() -> None:
    """A malformed input raises the same error with and without the conversion; nothing is reverted."""
    plain = bert()
    model = bert()
    fp.apply(model, {"defaults": ONLY_FUSED}, hardware=CPU)
    hidden = torch.randn(2, 5, 48)  # wrong hidden size for the encoder
    errors = []
    for m in (plain, model):
        with pytest.raises(Exception) as info:
            m.bert.encoder(hidden, attention_mask=torch.ones(2, 5))
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    assert runtime_of(model) is not None


# -- verify --------------------------------------------------------------------------------------

def test_verify_passes_and_is_recorded() -> None:
    model = bert()
    fp.apply(model, {"defaults": {"verify": True}}, hardware=CPU)
    plan = fp.plan_of(model)
    assert plan.pass_status("fused_encoder").status == "applied"
    assert plan.verification.status == "passed"
    assert "fused_encoder" in plan.verification.detail and "2 sequences of 16 and 8 tokens" in plan.verification.detail
    assert plan.to_dict()["verification"]["status"] == "passed" and "verify: passed" in str(plan)
    assert runtime_of(model).stats  # the probe really ran the fused route


def test_verify_passes_on_a_vision_model() -> None:
    model = vit()
    fp.apply(model, {"defaults": {"verify": True}}, hardware=CPU)
    plan = fp.plan_of(model)
    assert plan.verification.status == "passed" and "images" in plan.verification.detail
    assert set(runtime_of(model).stats) & {"dense", "packed"}  # the probe really ran a fused route


def _perturb_fused_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    real_output = fused_runtime.FusedForward._output

    def perturbed(self: Any, hidden: torch.Tensor) -> Any:
        return real_output(self, hidden + 0.1)

    monkeypatch.setattr(fused_runtime.FusedForward, "_output", perturbed)


def test_verify_mismatch_rolls_the_pass_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = bert()
    inputs = text_inputs()
    ref = run(model, inputs)
    before = fingerprint(model)
    _perturb_fused_outputs(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        fp.apply(model, {"defaults": {**ONLY_FUSED, "verify": True}}, hardware=CPU)
    plan = fp.plan_of(model)
    status = plan.pass_status("fused_encoder")
    assert status.status == "failed" and status.reason.startswith("verify:") and "exceeds" in status.reason
    assert plan.verification.status == "rolled back"
    assert no_overrides(model)
    assert_same_model(model, before)
    assert torch.equal(run(model, inputs), ref)
    assert len(warnings_about(caplog, "fused_encoder", "verify:")) == 1


def test_verify_mismatch_in_strict_mode_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = bert()
    before = fingerprint(model)
    _perturb_fused_outputs(monkeypatch)
    with pytest.raises(StrictModeError, match="verify:"):
        fp.apply(model, {"defaults": {**ONLY_FUSED, "verify": True, "strict": True}}, hardware=CPU)
    assert_same_model(model, before)
    assert fp.plan_of(model) is None


def test_verify_probe_catches_a_kernel_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernel raises on the probe: the pass reverts itself before the user's first call."""
    model = bert()
    before = fingerprint(model)
    _broken_route(monkeypatch, RuntimeError("kernel missing"))
    fp.apply(model, {"defaults": {**ONLY_FUSED, "verify": True}}, hardware=CPU)
    plan = fp.plan_of(model)
    assert plan.pass_status("fused_encoder").status == "failed" and "kernel missing" in plan.pass_status(
        "fused_encoder").reason
    assert plan.verification.status == "rolled back"
    assert_same_model(model, before)


def test_verify_without_a_probe_is_recorded_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers_fastpath import verify

    def unavailable(model: nn.Module) -> Any:
        raise verify.ProbeUnavailable("no probe batch for models whose main input is 'input_values'")

    monkeypatch.setattr(verify, "build_probe", unavailable)
    model = bert()
    fp.apply(model, {"defaults": {"verify": True}}, hardware=CPU)
    plan = fp.plan_of(model)
    assert plan.verification.status == "not run" and "input_values" in plan.verification.detail
    assert plan.pass_status("fused_encoder").status == "applied"
    with pytest.raises(StrictModeError, match="verify = false"):
        fp.apply(bert(), {"defaults": {"verify": True, "strict": True}}, hardware=CPU)


def test_verify_compare_tolerances() -> None:
    from transformers_fastpath.verify import compare

    ref = torch.randn(2, 4, 8)
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    noisy = ref + 1e-6
    noisy[1, 3] = 100.0  # padding: ignored
    assert compare({"last_hidden_state": ref}, {"last_hidden_state": noisy}, keep)[0]
    assert not compare({"x": ref}, {"x": ref + 1e-2}, keep)[0]
    half = ref.to(torch.bfloat16)
    assert compare({"x": half}, {"x": (ref + 1e-2).to(torch.bfloat16)}, None)[0]
    assert not compare({"x": ref}, {"y": ref}, None)[0]


# -- re-applying passes after a save ------------------------------------------------------------------

class _BufferPass:
    """Changes the state_dict (adds a buffer); fails when applied again if ``fail_on_reapply``."""

    name = setting = "test_buffer_a"
    changes_state_dict, fail_on_reapply = True, True

    def __init__(self) -> None:
        self.applied = 0

    def supports(self, info: Any, plan: Any) -> str | None:
        return None

    def apply(self, model: nn.Module, plan: Any) -> None:
        self.applied += 1
        if self.fail_on_reapply and self.applied > 1:
            raise RuntimeError(f"{self.name} cannot be applied twice")
        model.register_buffer(self.name, torch.zeros(1))

    def revert(self, model: nn.Module) -> None:
        model._buffers.pop(self.name, None)


class _SteadyBufferPass(_BufferPass):
    name = setting = "test_buffer_b"
    fail_on_reapply = False


@pytest.fixture
def two_buffer_passes() -> Any:
    from transformers_fastpath import hookimpl, plugins

    passes = [_BufferPass(), _SteadyBufferPass()]

    class Plugin:
        @hookimpl
        def fastpath_register_passes(self) -> list[object]:
            return passes

    name = plugins.register(Plugin(), name="test-two-buffer-passes")
    yield passes
    plugins.unregister(name)


def test_strict_reapply_failure_after_a_save_reapplies_the_others(two_buffer_passes: Any, tmp_path: Any) -> None:
    """The first pass cannot be re-applied after the save: strict mode raises, but only after the
    other pass is back; no pass is left reverted while listed as applied."""
    from transformers_fastpath.passes.runner import APPLIED_ATTR, canonical_for_save

    model = bert()
    fp.apply(model, {"defaults": {**ONLY_FUSED, "encoder_fastpath": False, "strict": True}}, hardware=CPU)
    assert {"test_buffer_a", "test_buffer_b"} <= set(getattr(model, APPLIED_ATTR))
    with pytest.raises(StrictModeError, match="test_buffer_a.*cannot be applied twice"), \
            canonical_for_save(model, str(tmp_path)):
        assert not {"test_buffer_a", "test_buffer_b"} & set(dict(model.named_buffers()))  # canonical
    buffers = dict(model.named_buffers())
    applied = set(getattr(model, APPLIED_ATTR))
    assert "test_buffer_b" in buffers and "test_buffer_b" in applied
    assert "test_buffer_a" not in buffers and "test_buffer_a" not in applied
    plan = fp.plan_of(model)
    assert plan.pass_status("test_buffer_a").status == "failed"
    assert plan.pass_status("test_buffer_b").status == "applied"
