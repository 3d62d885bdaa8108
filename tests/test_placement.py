"""Placement from the policy: plans per hardware, forbidden mixes, replicas on CPU, tensor parallel under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import torchrun_env

import transformers_fastpath as fp
from transformers_fastpath import Hardware, resolve
from transformers_fastpath.errors import PolicyError, StrictModeError
from transformers_fastpath.loading import quantization as q
from transformers_fastpath.loading.placement import PlacementError, tensor_parallel_kwargs
from transformers_fastpath.pipelines.replicas import (
    disable_replicas,
    enable_replicas,
    replicas_of,
    split_contiguous,
)

REPO = Path(__file__).resolve().parent.parent
H100 = Hardware.from_profile("h100")
H100x2 = Hardware.from_profile("2xh100")
GPU16x2 = Hardware.from_profile("cuda:2x16:sm89")
CPU = Hardware.from_profile("cpu")
TORCHRUN2 = Hardware(device="cuda", count=2, memory_gib=80, capability=(9, 0), distributed_world_size=2)


def bert():
    from transformers import BertConfig

    return BertConfig(architectures=["BertForSequenceClassification"])


def llama(size: str = "8B"):
    from transformers import LlamaConfig

    sizes = {"8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
             "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)}
    kw = {"num_attention_heads": 32, "num_key_value_heads": 8, **sizes[size]}
    return LlamaConfig(vocab_size=128256, architectures=["LlamaForCausalLM"], **kw)


def llama70b():
    return llama("70B")


@pytest.fixture
def bnb_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q, "_version", lambda package: (0, 50, 2) if package == "bitsandbytes" else None)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    q._warned.clear()
    yield
    q._warned.clear()


@pytest.fixture(autouse=True)
def _patched() -> None:
    """``pipeline(..., fastpath=...)`` accepted, as the .pth bootstrap does for users (another test
    module may have called ``fp.uninstall()``, which takes the wrappers away)."""
    from transformers_fastpath.interception import patches

    patches.patch_all()


# -- plans ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, task, hardware, placement", [
    (bert, "text-classification", H100x2, "replicate"),  # fits one GPU, batched task, several GPUs
    (bert, "text-classification", H100, "single"),
    (bert, "text-classification", CPU, "single"),
    (bert, None, H100x2, "single"),                      # from_pretrained alone: nothing to replicate
    (llama, "text-generation", H100x2, "single"),        # generation is not a batched task
    (llama, "text-generation", GPU16x2, "balanced"),     # 15 GiB > 12.8 GiB on one, fits two
    (llama, "text-generation", TORCHRUN2, "tensor-parallel"),
    (llama, None, TORCHRUN2, "single"),              # bare from_pretrained under torchrun: DDP-style copy per rank
    (llama70b, None, TORCHRUN2, "tensor-parallel"),  # ... unless it does not fit one GPU
    (bert, "text-classification", TORCHRUN2, "single"),  # no TP plan: data parallel, a copy per rank
], ids=lambda v: v.describe() if isinstance(v, Hardware) else getattr(v, "__name__", str(v)))
def test_auto_placement(config, task, hardware: Hardware, placement: str) -> None:
    plan = resolve(config(), task=task, hardware=hardware)
    assert plan["placement"] == placement, str(plan)
    assert plan.settings["placement"].reason.startswith("auto: ")


def test_balanced_load_kwargs() -> None:
    plan = resolve(llama(), task="text-generation", hardware=GPU16x2)
    assert plan.load_kwargs["device_map"] == "balanced"
    assert plan.load_kwargs["max_memory"] == {0: "12.80GiB", 1: "12.80GiB"}  # 16 GiB less 20 % headroom
    assert "fits the 2 GPUs (budget 25.6 GiB" in plan.settings["placement"].reason
    offload = resolve(llama("70B"), task="text-generation", hardware=H100x2)  # 131 GiB > 2 x 64 GiB
    assert offload["placement"] == "balanced" and "cpu" in offload.load_kwargs["max_memory"]
    assert any("CPU offload" in note for note in offload.notes)


def test_quantization_and_sharding_compose(bnb_installed) -> None:
    """One policy: 8-bit weights, sdpa attention, sharded over two GPUs."""
    plan = resolve(llama("70B"), task="text-generation", hardware=H100x2,
                   policy={"defaults": {"quantization": "auto", "attn_implementation": "sdpa"}})
    assert (plan["placement"], plan["quantization"]) == ("balanced", "bnb-int8")
    kwargs = plan.load_kwargs
    assert kwargs["attn_implementation"] == "sdpa" and kwargs["device_map"] == "balanced"
    assert kwargs["quantization_config"].load_in_8bit and set(kwargs["max_memory"]) == {0, 1}
    one = resolve(llama(), task="text-generation", hardware=H100,
                  policy={"defaults": {"quantization": "bnb-nf4", "attn_implementation": "sdpa"}})
    assert one.load_kwargs["device_map"] == {"": "cuda:0"} and one.load_kwargs["attn_implementation"] == "sdpa"


def test_tensor_parallel_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers_fastpath.builtin import placement as plugin

    plan = resolve(llama(), task="text-generation", hardware=TORCHRUN2)
    kwargs = dict(plan.load_kwargs)
    assert "device_map" not in kwargs
    if "distributed_config" in kwargs:  # transformers >= 5.18
        assert kwargs["distributed_config"].tp_plan == "auto" and kwargs["distributed_config"].tp_size == 2
    else:
        assert kwargs["tp_plan"] == "auto"
    assert plan["quantization"] == "none"
    pipe_kwargs = {"device": "cuda:0", "batch_size": 8}
    plugin.fastpath_pipeline_kwargs(plan=plan, kwargs=pipe_kwargs)
    assert pipe_kwargs == {"batch_size": 8}  # a sharded model has no one device


def test_tensor_parallel_kwargs_before_5_18(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    class OldDistributedConfig:  # 5.17 and before: no tp_plan field
        def __init__(self, enable_expert_parallel: bool = False) -> None:
            pass

    monkeypatch.setattr(transformers, "DistributedConfig", OldDistributedConfig, raising=False)
    assert tensor_parallel_kwargs(2) == {"tp_plan": "auto"}
    monkeypatch.setattr(transformers, "DistributedConfig", None)  # not in this transformers at all
    assert tensor_parallel_kwargs(2) == {"tp_plan": "auto"}


def test_data_parallel_rank_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    plan = resolve(bert(), task="text-classification", hardware=TORCHRUN2)
    assert plan["device"] == "cuda:1" and "LOCAL_RANK" in plan.settings["device"].reason
    assert "data parallel" in plan.settings["placement"].reason
    assert "has no tensor-parallel plan" in plan.settings["placement"].reason


def test_tp_needs_divisible_heads() -> None:
    config = llama()
    config.num_key_value_heads = 3
    config.num_attention_heads = 33
    plan = resolve(config, task="text-generation", hardware=TORCHRUN2)
    assert plan["placement"] == "single" and "not divisible by the 2 ranks" in plan.settings["placement"].reason


# -- explicit placements that cannot run, forbidden mixes, caller arguments ---------------------------

def test_explicit_tensor_parallel_without_torchrun() -> None:
    policy = {"defaults": {"placement": "tensor-parallel"}}
    with pytest.warns(UserWarning, match="needs a torchrun"):
        plan = resolve(llama(), task="text-generation", hardware=H100x2, policy=policy)
    assert plan["placement"] == "single" and "tensor-parallel not possible" in plan.settings["placement"].reason
    with pytest.raises(StrictModeError, match="tensor-parallel"):
        resolve(llama(), hardware=H100x2, policy={"defaults": {"placement": "tensor-parallel", "strict": True}})


@pytest.mark.parametrize("placement, hardware, why", [
    ("replicate", H100, "needs several devices"),
    ("balanced", CPU, "sharding needs GPUs"),
])
def test_explicit_placement_falls_back(placement: str, hardware: Hardware, why: str) -> None:
    with pytest.warns(UserWarning, match=why):
        plan = resolve(bert(), task="text-classification", hardware=hardware,
                       policy={"defaults": {"placement": placement}})
    assert plan["placement"] == "single" and why in plan.settings["placement"].reason


def test_replicas_do_not_copy_quantized_weights(bnb_installed) -> None:
    with pytest.warns(UserWarning, match="replicas copy dense weights"):
        plan = resolve(bert(), task="text-classification", hardware=H100x2,
                       policy={"defaults": {"placement": "replicate", "quantization": "bnb-int8"}})
    assert (plan["placement"], plan["quantization"]) == ("single", "bnb-int8")


def test_device_map_with_tensor_parallel_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match=r"device_map='auto' together with tp_plan.*cannot combine"):
        resolve(llama(), hardware=TORCHRUN2, call_kwargs={"device_map": "auto", "tp_plan": "auto"})
    policy = tmp_path / "fastpath.toml"
    policy.write_text('[defaults]\nplacement = "tensor-parallel"\n')
    with pytest.raises(PolicyError) as info:
        resolve(llama(), hardware=TORCHRUN2, policy=policy, call_kwargs={"device_map": "auto"})
    message = str(info.value)
    assert str(policy) in message and "key 'placement'" in message and "remove device_map" in message


def test_caller_arguments_win() -> None:
    plan = resolve(bert(), task="text-classification", hardware=H100x2, call_kwargs={"device": "cuda:1"})
    assert plan["placement"] == "single" and "caller passed device=cuda:1" in plan.settings["placement"].reason
    with pytest.warns(UserWarning, match="pins the model to one device"):
        plan = resolve(bert(), task="text-classification", hardware=H100x2, call_kwargs={"device": "cuda:1"},
                       policy={"defaults": {"placement": "balanced"}})
    assert plan["placement"] == "single"
    plan = resolve(llama(), task="text-generation", hardware=GPU16x2, call_kwargs={"device_map": "auto"})
    assert plan["placement"] == "keep" and "device_map" not in plan.load_kwargs
    plan = resolve(llama(), task="text-generation", hardware=TORCHRUN2, call_kwargs={"tp_plan": "auto"})
    assert plan["placement"] == "keep" and not {"distributed_config", "tp_plan"} & set(plan.load_kwargs)


# -- where from_pretrained puts the model ----------------------------------------------------------

def test_from_pretrained_loads_straight_onto_the_plans_device() -> None:
    """On a GPU machine the plan's device is where the weights load (a one-device device_map), and
    the dtype is chosen for it (float16 for a fused BERT encoder on a GPU); device = keep leaves a bare
    load on the CPU, in float32."""
    plan = resolve(bert(), hardware=H100)
    assert plan["device"] == "cuda:0" and plan["dtype"] == "float16"
    assert plan.load_kwargs["device_map"] == {"": "cuda:0"}
    assert "straight onto it" in plan.settings["device"].reason

    kept = resolve(bert(), hardware=H100, policy={"defaults": {"device": "keep"}})
    assert kept["dtype"] == "float32" and "device_map" not in kept.load_kwargs
    assert "leaves the model on the CPU" in kept.settings["dtype"].reason
    # A pipeline with device = keep lands on transformers' own default, the first GPU.
    assert resolve(bert(), task="text-classification", hardware=H100,
                   policy={"defaults": {"device": "keep"}})["dtype"] == "float16"

    on_cpu = resolve(bert(), hardware=H100, call_kwargs={"device_map": "cpu"})
    assert on_cpu["dtype"] == "float32" and on_cpu["device"] == "keep" and "device_map" not in on_cpu.load_kwargs
    assert resolve(bert(), hardware=H100, call_kwargs={"device_map": "auto"})["dtype"] == "float16"
    # A pipeline's device=1 / -1 is a device, not "keep".
    assert resolve(bert(), task="text-classification", hardware=H100x2, call_kwargs={"device": 1}
                   ).load_kwargs["device_map"] == {"": "cuda:1"}
    minus_one = resolve(bert(), task="text-classification", hardware=H100, call_kwargs={"device": -1})
    assert minus_one["device"] == "cpu" and minus_one["dtype"] == "float32" and "device_map" not in minus_one.load_kwargs
    assert "device_map" not in resolve(bert(), hardware=CPU).load_kwargs


def test_rank_devices_under_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:LOCAL_RANK when the rank sees every GPU; cuda:0 when it sees only its own (srun /
    CUDA_VISIBLE_DEVICES per task), never a device the rank cannot see; a bare "cuda" is this rank's."""
    from transformers_fastpath.loading.placement import single_device

    one_each = Hardware(device="cuda", count=1, memory_gib=80, capability=(9, 0), distributed_world_size=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve(bert(), hardware=TORCHRUN2)["device"] == "cuda:1"
    plan = resolve(bert(), hardware=one_each)
    assert plan["device"] == "cuda:0" and plan.load_kwargs["device_map"] == {"": "cuda:0"}
    assert single_device(resolve(bert(), hardware=TORCHRUN2, policy={"defaults": {"device": "cuda"}})) == "cuda:1"


@pytest.mark.parametrize(("device", "hardware", "needle"), [
    ("cuda", CPU, "this machine has no cuda device"),
    ("cuda:2", H100x2, "this machine has 2 cuda devices (cuda:0..cuda:1)"),
    ("cuda:1", H100, "this machine has only cuda:0"),
    ("xpu", H100, "this machine has no xpu device"),
])
def test_a_device_the_machine_lacks_is_a_policy_error(device: str, hardware: Hardware, needle: str) -> None:
    with pytest.raises(PolicyError, match="key 'device'") as info:
        resolve(bert(), hardware=hardware, policy={"defaults": {"device": device}})
    assert needle in str(info.value) and "set device = 'auto'" in str(info.value)


def test_settle_loaded_model_drops_accelerates_one_device_mark() -> None:
    """A model fastpath loaded onto one device looks like ``from_pretrained(...).to(device)`` (as
    transformers >= 5.25 leaves it): transformers' pipeline accepts device= for it; the caller's maps
    and maps over several devices keep the mark."""
    from torch import nn

    from transformers_fastpath.loading.placement import settle_loaded_model

    plan = resolve(bert(), hardware=H100)
    for placed_by_fastpath, device_map, kept in [(True, {"": "cuda:0"}, False), (False, {"": "cuda:0"}, True),
                                                 (True, {"a": 0, "b": 1}, True), (True, {"a": 1, "b": 1}, False)]:
        model = nn.Linear(2, 2)
        model.hf_device_map = device_map
        settle_loaded_model(model, plan, placed_by_fastpath=placed_by_fastpath)
        assert hasattr(model, "hf_device_map") == kept, (placed_by_fastpath, device_map)


def test_explain_shows_the_choice(tiny_model_factory, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers_fastpath.cli import main

    path = tiny_model_factory("bert", "seq-cls")
    assert main(["explain", str(path), "--task", "text-classification", "--hardware", "2xh100"]) == 0
    out = capsys.readouterr().out
    assert "placement              replicate" in out and "one replica on each of the 2 GPUs" in out


# -- replicas, simulated on CPU ----------------------------------------------------------------------

TEXTS = [f"text number {i} " + "more words " * (i % 5) for i in range(23)]


def test_split_contiguous() -> None:
    assert split_contiguous(5, 2) == [range(3), range(3, 5)]
    assert split_contiguous(1, 4) == [range(1)]
    assert [len(r) for r in split_contiguous(23, 3)] == [8, 8, 7]


def _labels(results):
    return [(r["label"], round(r["score"], 5)) for r in results]


@pytest.fixture(scope="module")
def classifier_reference(tiny_model_factory) -> tuple[Path, list]:
    import transformers

    path = tiny_model_factory("bert", "seq-cls")
    return path, _labels(transformers.pipeline("text-classification", model=str(path), fastpath=False)(TEXTS))


def test_replicas_keep_order_and_results(classifier_reference) -> None:
    import transformers

    path, reference = classifier_reference
    pipe = transformers.pipeline("text-classification", model=str(path), fastpath=False, batch_size=4)
    cls = type(pipe)
    enable_replicas(pipe, ["cpu", "cpu"])
    replicas = replicas_of(pipe)
    assert len(replicas) == 2 and isinstance(pipe, cls)
    assert replicas[0].model is pipe.model and replicas[1].model is not pipe.model
    assert replicas[1].tokenizer is not pipe.tokenizer
    threads: dict[int, set[str]] = {0: set(), 1: set()}
    for i, replica in enumerate(replicas):
        replica.model.register_forward_hook(
            lambda *_, i=i: threads[i].add(threading.current_thread().name))
    assert _labels(pipe(TEXTS)) == reference
    assert _labels(pipe(TEXTS)) == reference
    # The first shard runs on the caller's thread, the second on one long-lived thread (torch keeps
    # per-thread GPU state: a fresh thread per call would rebuild it every time).
    assert threads[0] == {threading.current_thread().name}
    assert len(threads[1]) == 1 and not threads[0] & threads[1]
    assert _labels([pipe(TEXTS[3])[0]]) == reference[3:4]  # one input: the first replica
    disable_replicas(pipe)
    assert type(pipe) is cls and not replicas_of(pipe)


def test_a_stopped_replica_thread_loses_nothing(classifier_reference, caplog: pytest.LogCaptureFixture) -> None:
    """disable_replicas racing a call stops a replica's thread: its shard runs on the first replica."""
    import logging

    import transformers

    path, reference = classifier_reference
    pipe = transformers.pipeline("text-classification", model=str(path), fastpath=False, batch_size=4)
    enable_replicas(pipe, ["cpu", "cpu"], workers="threads")
    for lane, _ in vars(pipe)["_fastpath_replica_lanes"]:
        lane.shutdown()
    with caplog.at_level(logging.WARNING, logger="transformers_fastpath"):
        assert _labels(pipe(TEXTS)) == reference
    assert any("its thread is stopped" in r.getMessage() for r in caplog.records)
    disable_replicas(pipe)


def test_replicate_through_the_policy(classifier_reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """placement = replicate on a machine with two devices (two 'CPUs' stand in for two GPUs)."""
    import transformers

    path, reference = classifier_reference
    two = Hardware(device="cpu", count=2, memory_gib=32, cpu_count=2)
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: two))
    pipe = transformers.pipeline("text-classification", model=str(path), fastpath={"defaults": {"placement": "replicate"}})
    plan = fp.plan_of(pipe)
    assert plan["placement"] == "replicate" and plan["length_bucketing"] is True
    assert len(replicas_of(pipe)) == 2
    assert _labels(pipe(TEXTS)) == reference


# -- torchrun: two CPU processes over gloo -------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun_commands(layout: str, worker_args: list[str]) -> list[list[str]]:
    """One command per launched torchrun: one node of two processes, or two nodes of one each
    (a multi-node launch on one host: RANK 0 and 1, LOCAL_RANK 0 on both)."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    worker = [str(REPO / "tests" / "tp_worker.py"), *worker_args]
    if layout == "one node":
        return [[*run, "--standalone", "--nproc-per-node", "2", *worker]]
    port = str(_free_port())
    return [[*run, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
             "--master-port", port, *worker] for node in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one node", "two nodes"])
def test_torchrun_tensor_and_data_parallel(tiny_model_factory, tmp_path: Path, layout: str) -> None:
    """transformers' tensor parallel on CPU (gloo) through ``pipeline(..., fastpath=True)``: both ranks
    produce the greedy tokens of a single-process run; the BERT classifier runs data parallel. Launched
    as one node of two processes and as two single-process nodes."""
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from tp_worker import PROMPTS, greedy_token_ids
        from tp_worker import TEXTS as DP_TEXTS
    finally:
        sys.path.pop(0)
    llama_path, bert_path = tiny_model_factory("llama", "causal"), tiny_model_factory("bert", "seq-cls")
    env = torchrun_env()
    commands = _torchrun_commands(layout, ["--model", str(llama_path), "--classifier", str(bert_path),
                                           "--out", str(tmp_path)])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in commands]
    try:  # the single-process references while the ranks start up
        single = transformers.pipeline("text-generation", model=str(llama_path), fastpath=False)
        expected = greedy_token_ids(single)
        classifier = transformers.pipeline("text-classification", model=str(bert_path), fastpath=False)
        expected_dp = [[r["label"], round(float(r["score"]), 5)] for r in classifier(DP_TEXTS)]
        outputs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [rank["local_rank"] for rank in ranks] == ([0, 1] if layout == "one node" else [0, 0])
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["distributed"]
        assert rank["placement"] == "tensor-parallel", rank["placement_reason"]
        assert rank["weight_type"] == "DTensor" and rank["local_q_rows"] == 32  # 64 rows split in two
        assert rank["tp_tokens"] == expected
        assert len(rank["tp_tokens"]) == len(PROMPTS)
        assert rank["dp_placement"] == "single" and rank["dp_shard_size"] == len(DP_TEXTS) // 2
        assert rank["dp_results"] == expected_dp


def test_replicas_in_worker_processes(classifier_reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker-process replicas (what GPUs get): the worker rebuilds the pipeline from its checkpoint
    with the parent's plan pinned, results come back in order, and a dead worker loses nothing."""
    import transformers

    from transformers_fastpath.pipelines.replica_workers import WorkerReplica, recipe_for

    path, reference = classifier_reference
    two = Hardware(device="cpu", count=2, memory_gib=32, cpu_count=2)
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: two))
    pipe = transformers.pipeline("text-classification", model=str(path), batch_size=4, use_fast=True,
                                 model_kwargs={"output_hidden_states": False, "device_map": None},
                                 fastpath={"defaults": {"placement": "single"}})
    plan = fp.plan_of(pipe)
    recipe = recipe_for(pipe, plan)
    assert not isinstance(recipe, str), recipe
    assert recipe.call["model"] == str(path) and recipe.call["batch_size"] == 4
    # The caller's load arguments travel; placement ones do not (the worker's device is its own).
    assert recipe.call["use_fast"] is True and recipe.call["model_kwargs"] == {"output_hidden_states": False}
    assert recipe.policy["defaults"]["placement"] == "single"
    assert recipe.policy["defaults"]["length_bucketing"] == plan["length_bucketing"]

    enable_replicas(pipe, ["cpu", "cpu"], plan=plan, workers="processes")
    worker = replicas_of(pipe)[1]
    assert isinstance(worker, WorkerReplica) and worker.wait_ready(timeout=120) == "cpu"
    assert _labels(pipe(TEXTS)) == reference
    worker.close()  # the worker is gone: its shard runs on the first replica instead
    assert _labels(pipe(TEXTS)) == reference
    disable_replicas(pipe)


def test_worker_replicas_need_a_loadable_checkpoint(classifier_reference) -> None:
    import transformers

    from transformers_fastpath.pipelines.replica_workers import recipe_for

    path, _ = classifier_reference
    pipe = transformers.pipeline("text-classification", model=str(path), fastpath=True)
    pipe.model.name_or_path = "/nonexistent/checkpoint"
    assert "neither a directory nor a Hub id" in recipe_for(pipe, fp.plan_of(pipe))
    assert "no fastpath plan" in recipe_for(pipe, None)
    with pytest.raises(ValueError, match="cannot rebuild this pipeline"):
        enable_replicas(pipe, ["cpu", "cpu"], plan=fp.plan_of(pipe), workers="processes")


def test_worker_recipe_pins_the_hub_commit_the_parent_loaded(classifier_reference) -> None:
    import transformers

    from transformers_fastpath.pipelines.replica_workers import recipe_for

    path, _ = classifier_reference
    pipe = transformers.pipeline("text-classification", model=str(path), revision="main", fastpath=True)
    pipe.model.name_or_path = pipe.tokenizer.name_or_path = "org/classifier"  # as if loaded from the Hub
    pipe.model.config._commit_hash = "0123abcd"
    recipe = recipe_for(pipe, fp.plan_of(pipe))
    assert recipe.call["model"] == "org/classifier" and recipe.call["revision"] == "0123abcd"
    pipe.tokenizer.name_or_path = "org/tokenizer"  # another repository: one revision cannot serve both
    assert recipe_for(pipe, fp.plan_of(pipe)).call["revision"] == "main"  # the caller's, as given


def test_a_worker_that_cannot_build_its_pipeline_says_why() -> None:
    from transformers_fastpath.pipelines.replica_workers import PipelineRecipe, WorkerReplica, WorkerUnavailable

    worker = WorkerReplica(PipelineRecipe({"task": "text-classification", "model": "/nonexistent/checkpoint"},
                                          {"defaults": {}}), "cpu", threads=1)
    try:
        with pytest.raises(WorkerUnavailable, match="could not build its pipeline.*nonexistent"):
            worker.wait_ready(timeout=120)
        with pytest.raises(WorkerUnavailable):  # known now: no second attempt
            worker(["a text"])
    finally:
        worker.close()
