"""Threads and asyncio tasks under different policies, concurrent install()/uninstall(), first import.

What each test proves is listed in docs/reliability.md ("Concurrency").
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import run_python
from transformers import AutoModel, PreTrainedModel

import transformers_fastpath as fp
from transformers_fastpath.interception import patches, state

pytestmark = pytest.mark.usefixtures("sdpa_flags_restored")


@pytest.fixture(autouse=True)
def _leave_transformers_as_found(clean_fastpath: None) -> None:
    """Every test here restores the patches and installed policy it found (conftest's clean_fastpath)."""

TEXTS = ["Hello world.", "A much longer sentence with quite a few more tokens than the first one.", "Short.",
         "Medium length text goes here.", "x", "Another sentence, of another length, to pad against."]

# Three settings that must not leak between concurrent users: fused encoder, dtype, batch size.
# Eager attention keeps the SDPA-chain pass out of these runs: its process-wide torch flags are a
# known cross-thread leak, shown on its own by the xfail test below.
EAGER = {"attn_implementation": "eager"}
POLICIES: dict[str, Any] = {
    "fused-fp32-b3": {"defaults": {"encoder_fastpath": True, "batch_size": 3, **EAGER}},
    "plain-bf16-b7": {"defaults": {"encoder_fastpath": False, "batch_size": 7, "dtype": "bfloat16", **EAGER}},
    "off": False,
}
EXPECTED = {
    "fused-fp32-b3": {"fused_encoder": "applied", "dtype": torch.float32, "batch_size": 3},
    "plain-bf16-b7": {"fused_encoder": "off", "dtype": torch.bfloat16, "batch_size": 7},
    "off": {"fused_encoder": None, "dtype": torch.float32, "batch_size": 1},
}


def _sdpa_flags() -> tuple[Any, ...]:
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled(),
            tuple(torch._C._get_sdp_priority_order()))


def _set_sdpa_flags(flags: tuple[Any, ...]) -> None:
    b = torch.backends.cuda
    b.enable_flash_sdp(flags[0])
    b.enable_mem_efficient_sdp(flags[1])
    b.enable_math_sdp(flags[2])
    b.enable_cudnn_sdp(flags[3])
    torch._C._set_sdp_priority_order(list(flags[4]))


@pytest.fixture
def sdpa_flags_restored() -> Iterator[None]:
    """torch's SDPA backend flags are process-wide; concurrent chains can leave them changed (see the xfail)."""
    before = _sdpa_flags()
    yield
    _set_sdpa_flags(before)


def _describe(pipe: Any) -> dict[str, Any]:
    plan = fp.plan_of(pipe)
    status = plan.pass_status("fused_encoder") if plan is not None else None
    return {"fused_encoder": status.status if status else None, "dtype": pipe.model.dtype,
            "batch_size": pipe._batch_size or 1}


def _scores(outputs: list[dict[str, Any]]) -> list[float]:
    return [o["score"] for o in outputs]


@pytest.fixture(scope="module")
def references(tiny_model_factory) -> dict[str, list[float]]:
    """Each policy's outputs, computed alone (sequentially), before any concurrency."""
    path = str(tiny_model_factory("bert", "seq-cls"))
    patches.patch_all()
    refs = {}
    for name, policy in POLICIES.items():
        pipe = transformers.pipeline("text-classification", model=path, fastpath=policy)
        assert _describe(pipe) == EXPECTED[name]
        refs[name] = _scores(pipe(list(TEXTS)))
    return refs


def _check(name: str, described: dict[str, Any], scores: list[float], refs: dict[str, list[float]]) -> None:
    assert described == EXPECTED[name], name
    assert scores == pytest.approx(refs[name], abs=1e-5), name


def test_threads_with_different_policies_do_not_see_each_other(tiny_model_factory, references) -> None:
    path = str(tiny_model_factory("bert", "seq-cls"))
    names = [*POLICIES] * 2  # six threads, two per policy, all loading and running at once
    barrier = threading.Barrier(len(names))
    results: dict[int, tuple[str, dict[str, Any], list[list[float]]]] = {}
    errors: list[BaseException] = []

    def user(i: int, name: str) -> None:
        try:
            barrier.wait(60)
            if i % 2:  # half through an enabled() scope, half through the call argument
                scope = fp.enabled(policy=POLICIES[name]) if POLICIES[name] is not False else state.scoped_policy(None)
                with scope:
                    pipe = transformers.pipeline("text-classification", model=path)
            else:
                pipe = transformers.pipeline("text-classification", model=path, fastpath=POLICIES[name])
            runs = [_scores(pipe(list(TEXTS))) for _ in range(3)]
            results[i] = (name, _describe(pipe), runs)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    patches.patch_all()
    threads = [threading.Thread(target=user, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == len(names)
    for name, described, runs in results.values():
        for scores in runs:
            _check(name, described, scores, references)


def test_from_pretrained_in_threads_gets_each_threads_plan(tiny_model_factory) -> None:
    path = tiny_model_factory("bert")
    patches.patch_all()
    policies = {i: {"defaults": {"dtype": "bfloat16" if i % 2 else "float32", "batch_size": i + 1}} for i in range(6)}
    barrier = threading.Barrier(len(policies))
    plans: dict[int, Any] = {}

    def load(i: int) -> None:
        barrier.wait(60)
        with fp.enabled(policy=policies[i]):
            time.sleep(0.001 * i)
            model = AutoModel.from_pretrained(path)
        plans[i] = (fp.plan_of(model), model.dtype)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(policies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(plans) == list(policies)
    for i, (plan, dtype) in plans.items():
        assert plan["batch_size"] == i + 1
        assert plan["dtype"] == ("bfloat16" if i % 2 else "float32")
        assert dtype == (torch.bfloat16 if i % 2 else torch.float32)


def test_asyncio_tasks_with_different_policies(tiny_model_factory, references) -> None:
    """Scopes follow each task across awaits and into asyncio.to_thread (which copies the context)."""
    path = str(tiny_model_factory("bert", "seq-cls"))
    patches.patch_all()

    async def user(name: str, delay: float) -> tuple[str, dict[str, Any], list[float]]:
        policy = POLICIES[name]
        with fp.enabled(policy=policy) if policy is not False else state.scoped_policy(None):
            await asyncio.sleep(delay)  # the other tasks enter their own scopes meanwhile
            pipe = await asyncio.to_thread(transformers.pipeline, "text-classification", model=path)
            await asyncio.sleep(delay)
            scores = _scores(await asyncio.to_thread(pipe, list(TEXTS)))
        return name, _describe(pipe), scores

    async def main() -> list[tuple[str, dict[str, Any], list[float]]]:
        return await asyncio.gather(*(user(n, 0.01 * k) for k, n in enumerate([*POLICIES, *reversed(POLICIES)])))

    for name, described, scores in asyncio.run(main()):
        _check(name, described, scores, references)


def test_concurrent_sdpa_chains_do_not_interleave(tiny_model_factory) -> None:
    """torch's SDPA backend flags are process-wide. B asks for its chain while A runs under another:
    B waits until A is done (it never runs under A's chain, nor A under B's), and the flags are
    torch's own again afterwards."""
    import time

    path = tiny_model_factory("bert")
    patches.patch_all()
    off = {"encoder_fastpath": False, "backend": "torch"}  # torch's SDPA runs, with or without the [onnx] extra
    model_a = AutoModel.from_pretrained(path, fastpath={"defaults": {"sdpa_backends": ["math"], **off}})
    model_b = AutoModel.from_pretrained(path, fastpath={"defaults": {"sdpa_backends": ["flash", "math"], **off}})
    ids = torch.randint(1000, 2000, (2, 8))
    with torch.no_grad():  # first calls probe the backends; not part of the race
        expected_a, expected_b = model_a(input_ids=ids)[0], model_b(input_ids=ids)[0]
        seen_a_chain = _sdpa_flags_inside(model_a, ids)
        seen_b_chain = _sdpa_flags_inside(model_b, ids)
    assert seen_a_chain != seen_b_chain
    before = _sdpa_flags()
    a_inside = threading.Event()
    seen: dict[str, Any] = {}

    def a_hook(module: Any, args: Any) -> None:
        a_inside.set()
        time.sleep(0.5)  # B tries to enter meanwhile
        seen["a"], seen["a_slept"] = _sdpa_flags(), time.monotonic()

    def b_hook(module: Any, args: Any) -> None:
        seen["b"], seen["b_at"] = _sdpa_flags(), time.monotonic()

    outputs: dict[str, Any] = {}

    def run_a() -> None:
        with torch.no_grad():
            outputs["a"] = model_a(input_ids=ids)[0]

    def run_b() -> None:
        a_inside.wait(30)
        with torch.no_grad():
            outputs["b"] = model_b(input_ids=ids)[0]

    handles = [model_a.embeddings.register_forward_pre_hook(a_hook),
               model_b.embeddings.register_forward_pre_hook(b_hook)]
    try:
        threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for h in handles:
            h.remove()
    assert seen["a"] == seen_a_chain and seen["b"] == seen_b_chain
    assert seen["b_at"] > seen["a_slept"]  # B did not run while A was inside its chain
    assert torch.equal(outputs["a"], expected_a) and torch.equal(outputs["b"], expected_b)
    assert _sdpa_flags() == before


def _sdpa_flags_inside(model: Any, ids: torch.Tensor) -> tuple[Any, ...]:
    seen: list[tuple[Any, ...]] = []
    handle = model.embeddings.register_forward_pre_hook(lambda *_: seen.append(_sdpa_flags()))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


# -- install() / uninstall() from many threads ------------------------------------------------

def _entry_points() -> dict[str, object]:
    from transformers import pipelines
    from transformers.pipelines import base

    return {
        "from_pretrained": PreTrainedModel.__dict__["from_pretrained"],
        "save_pretrained": PreTrainedModel.__dict__["save_pretrained"],
        "pipelines.pipeline": pipelines.__dict__["pipeline"],
        "pipelines.load_model": pipelines.__dict__["load_model"],
        "base.load_model": base.__dict__["load_model"],
        "transformers.pipeline": transformers.pipeline,
    }


def _assert_consistent(originals: dict[str, object]) -> None:
    """Fully patched with a policy and every original recorded, or fully unpatched with the originals back."""
    current = _entry_points()
    if fp.is_installed():
        assert all(current[k] is not originals[k] for k in originals), "installed, but some entry point unpatched"
        assert all(patches.is_wrapper(v) and not patches.is_wrapper(getattr(v, "__func__", v).__wrapped__)
                   for v in current.values()), "an entry point is wrapped twice"
    else:
        assert all(current[k] is originals[k] for k in originals), "uninstalled, but not every original is back"
        assert not patches.is_patched()


def test_install_uninstall_storm_ends_consistent() -> None:
    fp.uninstall()
    originals = _entry_points()
    for _round in range(3):
        barrier = threading.Barrier(8)

        def toggle(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(60)
            for k in range(6):
                if (i + k) % 2:
                    fp.install({"defaults": {"batch_size": i + 1}})
                else:
                    fp.uninstall()

        threads = [threading.Thread(target=toggle, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        _assert_consistent(originals)
    fp.uninstall()
    assert all(_entry_points()[k] is originals[k] for k in originals)


def test_uninstall_during_install_cannot_leave_a_policy_without_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: install() patched, a concurrent uninstall() unpatched, then install() set its policy:
    fastpath reported installed while transformers was unpatched. Now the two steps are one."""
    fp.uninstall()
    originals = _entry_points()
    real_patch_all = patches.patch_all
    patched = threading.Event()

    def slow_patch_all() -> None:
        real_patch_all()
        patched.set()
        time.sleep(0.3)  # a window between patching and setting the policy

    monkeypatch.setattr(patches, "patch_all", slow_patch_all)
    installer = threading.Thread(target=fp.install)
    installer.start()
    assert patched.wait(60)
    fp.uninstall()  # lands inside the window
    installer.join(60)
    monkeypatch.setattr(patches, "patch_all", real_patch_all)
    _assert_consistent(originals)
    assert not fp.is_installed()


def test_a_stale_wrapper_is_never_wrapped_again() -> None:
    """A lazy ``transformers`` module that cached the wrapper while patched gets the original back, not a
    wrapper of the wrapper, on the next patch/unpatch cycle."""
    from transformers import pipelines

    fp.uninstall()
    original = pipelines.__dict__["pipeline"]
    patches.patch_all()
    stale = pipelines.__dict__["pipeline"]
    fp.uninstall()

    class Holder:  # stands in for a module object that cached the wrapper
        pipeline = stale

    holder = Holder()
    holder.__dict__["pipeline"] = stale
    with patches.lock:
        patches._replace(holder, "pipeline", "new")
        assert patches._originals[(id(holder), "pipeline")][1] is original
        patches.unpatch_all()
    assert holder.pipeline is original


# -- first import from several threads, env var set (fresh interpreter) -------------------------

FIRST_IMPORT = """
import json, sys, threading
sys.setswitchinterval(1e-5)
import transformers  # the lazy top level only (its own first import is not thread-safe, see reliability.md)
assert "transformers.modeling_utils" not in sys.modules and "transformers.pipelines" not in sys.modules
N = 6
barrier = threading.Barrier(N)
errors = []

def work(i):
    try:
        barrier.wait(60)
        if i % 3 == 0:
            import transformers.modeling_utils
        elif i % 3 == 1:
            import transformers.pipelines
        else:
            import transformers_fastpath as fp
            fp.install()
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=work, args=(i,)) for i in range(N)]
for t in threads: t.start()
for t in threads: t.join()

import transformers.pipelines as pl, transformers.pipelines.base as base
from transformers import AutoModel, PreTrainedModel
import transformers_fastpath as fp
from transformers_fastpath.interception import patches, targets

def depth(obj):
    obj, n = getattr(obj, "__func__", obj), 0
    while patches.is_wrapper(obj):
        n, obj = n + 1, obj.__wrapped__
    return n

depths = [depth(PreTrainedModel.__dict__["from_pretrained"]), depth(PreTrainedModel.__dict__["save_pretrained"]),
          depth(pl.__dict__["pipeline"]), depth(pl.__dict__["load_model"]), depth(base.__dict__["load_model"]),
          *[depth(m.pipeline) for m in targets.transformers_module_objects()]]
model = AutoModel.from_pretrained({path!r})
print(json.dumps({{"errors": errors, "depths": depths, "installed": fp.is_installed(),
                  "originals_clean": not any(patches.is_wrapper(v[1]) for v in patches._originals.values()),
                  "plan": fp.plan_of(model) is not None}}))
"""


def test_concurrent_first_import_with_env_var_wraps_once(tiny_model_factory) -> None:
    result = run_python(FIRST_IMPORT.format(path=str(tiny_model_factory("bert"))), env={"TRANSFORMERS_FASTPATH": "1"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert out["depths"] and set(out["depths"]) == {1}, out["depths"]  # every entry point wrapped exactly once
    assert out["installed"] and out["originals_clean"] and out["plan"]


def test_env_install_from_two_import_hooks_sets_one_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The two post-import hooks (modeling, pipelines) may run in two threads: one policy wins, set once."""
    from transformers_fastpath.interception import bootstrap

    fp.uninstall()
    patches.patch_all()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSFORMERS_FASTPATH_POLICY", raising=False)
    monkeypatch.setenv("TRANSFORMERS_FASTPATH", "1")
    seen: list[object] = []
    real_set = state.set_installed_policy
    monkeypatch.setattr(state, "set_installed_policy", lambda p: (seen.append(p), real_set(p)))
    barrier = threading.Barrier(4)

    def hook() -> None:
        barrier.wait(60)
        bootstrap._install_from_env()

    threads = [threading.Thread(target=hook) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen) == 1 and fp.is_installed()


def test_plain_loads_in_threads_leave_weight_tying_intact(tiny_model_factory) -> None:
    """transformers' from_pretrained swaps PreTrainedModel.tie_weights out for the whole load
    (initialization.no_tie_weights) and back at the end. Two loads at once could leave it swapped
    out for the rest of the process, and every later tied model (BERT's masked-LM decoder) loaded
    with its tied weights on the meta device. In a patched process every load runs alone."""
    from transformers import AutoModelForMaskedLM, PreTrainedModel

    path = tiny_model_factory("bert", "mlm")
    patches.patch_all()
    original = PreTrainedModel.__dict__["tie_weights"]
    barrier = threading.Barrier(6)
    models: list[Any] = []

    def load() -> None:
        barrier.wait(60)
        with state.scoped_policy(None):  # fastpath off: a plain load
            models.append(AutoModelForMaskedLM.from_pretrained(path))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert PreTrainedModel.__dict__["tie_weights"] is original
    assert len(models) == 6
    for model in models:
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    later = AutoModelForMaskedLM.from_pretrained(path)
    assert later.cls.predictions.decoder.weight.device.type == "cpu"
