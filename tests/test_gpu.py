"""GPU checks that CPUs cannot make; each skips cleanly without the GPUs it needs.

Run them on a GPU machine (``source benchmarks/gpu_env.sh; FASTPATH_TEST_TOKENIZER=.tok python3 -m pytest
-q tests/test_gpu.py``, where ``.tok`` holds a BERT tokenizer: the MiniLM package is not there):
replicas in worker processes on two GPUs, quantized weights sharded over two GPUs, a Trainer
step under ``torch.nn.DataParallel`` (what the Trainer does on several GPUs without torchrun), and
the fused encoder's packed route with flash varlen attention on one GPU.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import transformers_fastpath as fp

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
flash_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                               reason="needs a CUDA GPU with flash attention (sm80+)")

TEXTS = [f"text number {i} " + "more words " * (i % 7) for i in range(37)]


@two_gpus
def test_replicas_on_two_gpus_match_one_gpu(tiny_model_factory) -> None:
    import transformers

    from transformers_fastpath.pipelines.replica_workers import WorkerReplica
    from transformers_fastpath.pipelines.replicas import replicas_of

    path = str(tiny_model_factory("bert", "seq-cls"))
    single = transformers.pipeline("text-classification", model=path,
                                   fastpath={"defaults": {"placement": "single", "dtype": "float32"}})
    pipe = transformers.pipeline("text-classification", model=path,
                                 fastpath={"defaults": {"placement": "replicate", "dtype": "float32"}})
    replicas = replicas_of(pipe)
    assert len(replicas) == 2 and isinstance(replicas[1], WorkerReplica), replicas
    assert replicas[1].wait_ready(timeout=300) == "cuda:1"
    seen: list[str] = []
    pipe.model.register_forward_hook(lambda *_: seen.append(threading.current_thread().name))
    got, want = pipe(TEXTS), single(TEXTS)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-4)
    assert seen and set(seen) == {threading.current_thread().name}  # the first shard ran on this thread


@two_gpus
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_sharded_over_two_gpus_matches_one_gpu(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # big enough that a balanced device map has layers for both GPUs
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    base = {"quantization": "bnb-nf4", "dtype": "bfloat16", "compile": False, "static_cache": False}
    ids = torch.randint(3, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for placement in ("single", "balanced"):
        with fp.enabled({"defaults": {**base, "placement": placement}}):
            model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        plan = fp.plan_of(model)
        assert plan["placement"] == placement and plan["quantization"] == "bnb-nf4", str(plan)
        assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        assert plan.pass_status("sdpa_backends").status == "applied", str(plan)
        devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {"": 0}).values()}
        if placement == "balanced":
            assert devices == {"0", "1"}, model.hf_device_map
        with torch.inference_mode():
            outputs[placement] = model(ids.to(model.device)).logits.float().cpu()
        del model
        torch.cuda.empty_cache()
    torch.testing.assert_close(outputs["balanced"], outputs["single"], atol=2e-2, rtol=2e-2)


@two_gpus
def test_trainer_under_data_parallel_with_fastpath(tiny_model_factory, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_factory("bert", "seq-cls"))
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 100, (16,), generator=gen), "attention_mask": torch.ones(16, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[fp.FastpathCallback()])
    assert trainer.args.n_gpu >= 2  # the Trainer wraps the model in DataParallel
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert fp.plan_of(trainer.model) is not None


@flash_gpu
@pytest.mark.parametrize("left", [False, True])
def test_packed_route_runs_varlen_flash_attention(tiny_model_factory, left: bool) -> None:
    """On a flash GPU the packed route's attention is padding-free (varlen_attn, with separate query and
    key offsets on left padding); real tokens and position 0 match the unconverted model, other pads are 0."""
    from transformers import AutoModel

    from transformers_fastpath.passes.fused_encoder import FusedEncoderPass, routes, runtime_of

    model = AutoModel.from_pretrained(tiny_model_factory("bert", "base")).to("cuda", torch.bfloat16).eval()
    reference = AutoModel.from_pretrained(tiny_model_factory("bert", "base")).to("cuda", torch.bfloat16).eval()
    FusedEncoderPass(route="packed").apply(model, SimpleNamespace(hardware=None, get=lambda key, default=None: (
        "auto" if key == "encoder_fastpath" else default)))
    lengths = torch.tensor([5, 1, 16, 9, 12])
    pos = torch.arange(16)[None, :]
    mask = (pos >= 16 - lengths[:, None]) if left else (pos < lengths[:, None])
    ids = torch.randint(3, 100, mask.shape, generator=torch.Generator().manual_seed(0)).masked_fill(~mask, 0)
    inputs = {"input_ids": ids.cuda(), "attention_mask": mask.long().cuda()}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert routes.use_varlen(torch.zeros(1, device="cuda", dtype=torch.bfloat16), head_dim)
    with torch.inference_mode():
        out, ref = model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
    keep = mask.cuda()
    torch.testing.assert_close(out[keep].float(), ref[keep].float(), atol=3e-2, rtol=3e-2)
    # Position 0 of a left-padded row is computed (heads read it), as the unconverted model does;
    # every other pad comes back as 0.
    read = torch.zeros_like(keep)
    read[:, 0] = True
    torch.testing.assert_close(out[~keep & read].float(), ref[~keep & read].float(), atol=3e-2, rtol=3e-2)
    assert bool((~keep & read).any()) == left
    assert torch.count_nonzero(out[~keep & ~read]) == 0
    assert set(runtime_of(model).stats) == {"packed"}

    runtime_of(model).route = "auto"  # the heuristic picks packed for a big padded batch on a flash GPU
    runtime_of(model).stats.clear()
    big = torch.arange(128)[None, :] < torch.randint(8, 64, (32, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(input_ids=torch.full(big.shape, 5, device="cuda"), attention_mask=big.long().cuda())
    assert set(runtime_of(model).stats) == {"packed"}


@flash_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_family_on_the_gpu(dtype: torch.dtype) -> None:
    """Every family of tests/test_fused_encoder_families.py on the GPU, every route forced in turn:
    real tokens equal the unconverted model in the same dtype (bf16: the packed route's attention is
    flash varlen, layer by layer for layer-level conversions)."""
    from test_fused_encoder_families import CASE_IMPLS, CASES, ROUTES, build, converted, forward, inputs_for

    from transformers_fastpath.passes.fused_encoder import runtime_of

    # fp32: the fused CUDA kernels reduce in another order; seq2seq cases compare the decoder output after it.
    atol = 3e-4 if dtype == torch.float32 else 6e-2
    worst: dict[str, float] = {}
    not_here = []
    for name, impl in CASE_IMPLS:
        case = CASES[name]
        try:
            model = build(case, impl).to("cuda", dtype)
        except pytest.skip.Exception:  # an attention implementation this transformers lacks
            not_here.append(f"{name}-{impl}")
            continue
        fast = converted(model)
        runtime = runtime_of(fast)
        for left in ((False, True) if case.padded and case.kind != "audio" else (False,)):
            inputs, pick = inputs_for(case, model, left)  # CPU masks: they index the CUDA outputs as well
            inputs = {k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()}
            expected = pick(forward(model, inputs))
            for route in ROUTES if case.padded else ("dense", "auto"):
                runtime.route = route
                runtime.stats.clear()
                got = pick(forward(fast, inputs))
                pairs = list(zip(got, expected)) if isinstance(expected, tuple) else [(got, expected)]
                for a, b in pairs:
                    if b is not None:
                        err = float((a.float() - b.float()).abs().max())
                        worst[name] = max(worst.get(name, 0.0), err)
                        assert err <= atol, (name, impl, route, left, err)
                assert runtime.stats and not [k for k in runtime.stats if k.startswith("original")], (
                    name, impl, route, dict(runtime.stats))
    print("largest difference per family:", {k: f"{v:.1e}" for k, v in worst.items()}, "not built:", not_here)
    assert len(not_here) < len(CASE_IMPLS) // 4


# -- the documented journeys, on a GPU ----------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_user_journeys_on_the_gpu(tmp_path: Path, tokenizer_dir: Path) -> None:
    """README.md's and the quickstart's blocks, as on CPU (tests/test_user_journeys.py), plus: what
    fastpath loaded or built runs on the GPU. The hub id there resolves to a MiniLM-shaped BERT with
    random weights and the test tokenizer (the MiniLM package is not on the GPU machine)."""
    from test_docs import make_hf_home, offline_env
    from test_user_journeys import EXPECTED, assert_journey_passes, run_journeys
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = tmp_path / "minilm-shaped"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         vocab_size=30522)).save_pretrained(source)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(source)
    report = run_journeys(tmp_path / "journeys", offline_env(make_hf_home(tmp_path / "hf_home", source)))
    for page in EXPECTED:
        for journey in assert_journey_passes(report, page):
            if not _made_by_apply(page, journey):  # fp.apply on the user's own CPU model leaves it where it is
                assert journey["device"].startswith("cuda"), (page, journey)


def _made_by_apply(page: str, journey: dict) -> bool:
    """Whether the page's block that made ``journey`` converts the user's own model with ``fp.apply``
    (``fp.apply(name)`` or ``name = fp.apply(...)``) rather than loading it through fastpath."""
    import re

    path = Path(__file__).resolve().parent.parent / page
    if not path.is_file() or not journey.get("line"):
        return False
    block = []
    for line in path.read_text(encoding="utf-8").splitlines()[journey["line"] - 1:]:
        if line.startswith("```"):
            break
        block.append(line)
    name = re.escape(journey["name"])
    return re.search(rf"fp\.apply\({name}\b|\b{name}\s*=\s*fp\.apply\(", "\n".join(block)) is not None


# -- batched pipeline processing on a GPU --------------------------------------------------------

@gpu
@pytest.mark.parametrize(("task", "head"), [("feature-extraction", "base"), ("text-classification", "seq-cls")])
def test_batched_processing_on_the_gpu(tiny_model_factory, task: str, head: str) -> None:
    """Pinned copies and two batches in flight give what transformers' per-input path of the same
    fastpath pipeline gives (same model, same sorted batches), for a list and for a generator."""
    from transformers import pipeline

    from transformers_fastpath.pipelines.batched import batched_processing_of

    path = str(tiny_model_factory("bert", head))
    texts = TEXTS * 9  # 333 texts: several calls of several batches
    batched = pipeline(task, model=path, fastpath=True)
    per_input = pipeline(task, model=path, fastpath={"defaults": {"batched_processing": False}})
    assert batched.device.type == "cuda" and batched_processing_of(batched) is not None
    assert batched_processing_of(per_input) is None
    kwargs = {"top_k": None} if task == "text-classification" else {}
    got, want = batched(texts, **kwargs), per_input(texts, **kwargs)
    streamed = list(batched((t for t in texts), **kwargs))
    assert batched_processing_of(batched).batches >= 2 * len(texts) // batched._batch_size
    for result, exact in ((got, True), (streamed, False)):
        assert len(result) == len(want)
        for a, b in zip(result, want):
            if task == "feature-extraction":  # the list: the same batches, so the same kernels and bits
                a, b = torch.tensor(a), torch.tensor(b)
                assert a.shape == b.shape
                # a generator's windows (1, 2, 4... inputs) make other batches: bf16 rounding differs
                assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=6e-2, rtol=2e-2)
            else:
                assert [x["label"] for x in a] == [x["label"] for x in b] or not exact
                assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < (1e-6 if exact else 2e-2)


@gpu
def test_batched_chunk_pipelines_on_the_gpu(tiny_model_factory) -> None:
    """Token classification and zero-shot (several rows per input, the pipeline's own postprocess per
    input) on the GPU: what transformers' per-input path of the same fastpath pipeline gives."""
    from transformers import pipeline

    from transformers_fastpath.pipelines.batched import batched_processing_of

    texts = TEXTS * 5
    cases = [("token-classification", tiny_model_factory("bert", "token-cls"), {"aggregation_strategy": "simple"}),
             ("zero-shot-classification", tiny_model_factory("bert", "seq-cls"),
              {"candidate_labels": ["sports", "politics", "cooking"]})]
    for task, path, kwargs in cases:
        batched = pipeline(task, model=str(path), fastpath=True)
        per_input = pipeline(task, model=str(path), fastpath={"defaults": {"batched_processing": False}})
        assert batched.device.type == "cuda" and batched_processing_of(batched) is not None
        got, want = batched(texts, **kwargs), per_input(texts, **kwargs)
        assert batched_processing_of(batched).batches >= 1
        if task == "token-classification":  # the same batches: the same entities, scores within rounding
            assert [[(e["entity_group"], e["start"], e["end"]) for e in r] for r in got] == \
                [[(e["entity_group"], e["start"], e["end"]) for e in r] for r in want]
        else:  # other batches of (text, label) rows: bf16 rounding differs, the ranking can swap near ties
            assert [r["sequence"] for r in got] == texts
            for a, b in zip(got, want):
                scores = dict(zip(b["labels"], b["scores"]))
                assert sorted(a["labels"]) == sorted(b["labels"])
                assert max(abs(s - scores[label]) for label, s in zip(a["labels"], a["scores"])) < 3e-2


# -- CUDA graphs for small fused-encoder batches ---------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_batches_replay_cuda_graphs(tiny_model_factory, dtype: str) -> None:
    """A bucket's second call captures, later ones replay; real tokens equal the eager fused encoder
    (and the unconverted model) on padded and unpadded batches of odd sizes; in-place weight changes
    reach the graph, a replaced weight captures again; a copy starts empty; revert frees the graphs."""
    import copy

    from transformers import AutoModel

    from transformers_fastpath.passes.fused_encoder import runtime_of

    path = tiny_model_factory("bert", "base")
    settings = {"defaults": {"dtype": dtype}}
    model = AutoModel.from_pretrained(path, fastpath=settings)
    eager = AutoModel.from_pretrained(path, fastpath={"defaults": {"dtype": dtype, "cuda_graphs": False}})
    plain = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).to("cuda").eval()
    assert model.device.type == "cuda" and fp.plan_of(model)["cuda_graphs"] is True
    assert runtime_of(eager).graphs is None
    graphs = runtime_of(model).graphs
    atol = 1e-4 if dtype == "float32" else 3e-2  # eager: no mask and flash SDPA; the bucket: masked softmax
    gen = torch.Generator().manual_seed(0)

    def batch(rows: int, length: int, padded: bool) -> dict[str, torch.Tensor]:
        lengths = torch.randint(1, length + 1, (rows,), generator=gen) if padded else torch.full((rows,), length)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        ids = torch.randint(3, 100, (rows, length), generator=gen).masked_fill(~mask, 0)
        return {"input_ids": ids.cuda(), "attention_mask": mask.long().cuda()}

    def run(m: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return m(**inputs).last_hidden_state

    for rows, length, padded in [(8, 128, False), (3, 37, True), (5, 100, False), (1, 9, True)]:
        inputs = batch(rows, length, padded)
        keep = inputs["attention_mask"].bool()
        want, reference = run(eager, inputs), run(plain, inputs)
        replays = graphs.stats["replays"]
        first = run(model, inputs)
        for _ in range(3):  # eager on the bucket, capture + replay, replay
            got = run(model, inputs)
            assert torch.equal(got, first)  # the bucket's shape every time: the same bits, replayed or not
            torch.testing.assert_close(got[keep], want[keep], atol=atol, rtol=atol)
            torch.testing.assert_close(got[keep], reference[keep], atol=atol * 5, rtol=atol * 5)
        assert graphs.stats["replays"] == replays + 3, (rows, length, padded, dict(graphs.stats))
    assert graphs.stats["captures"] == 4 and len(graphs) == 4 and graphs.disabled is None
    assert graphs.stats["replays"] == 12 and set(runtime_of(model).stats) == {"dense"}

    inputs = batch(4, 32, True)
    keep = inputs["attention_mask"].bool()
    run(model, inputs), run(model, inputs)
    layer = model.encoder.layer[0]
    with torch.no_grad():
        layer.output.dense.weight.mul_(0.5)  # in place: the graph reads the same memory
        eager.encoder.layer[0].output.dense.weight.mul_(0.5)
    torch.testing.assert_close(run(model, inputs)[keep], run(eager, inputs)[keep], atol=atol, rtol=atol)
    captures = graphs.stats["captures"]
    with torch.no_grad():  # a new tensor: the key changes, so the next calls capture again
        layer.output.dense.weight = torch.nn.Parameter(layer.output.dense.weight * 2)
        eager.encoder.layer[0].output.dense.weight = torch.nn.Parameter(eager.encoder.layer[0].output.dense.weight * 2)
    for _ in range(2):
        torch.testing.assert_close(run(model, inputs)[keep], run(eager, inputs)[keep], atol=atol, rtol=atol)
    assert graphs.stats["captures"] == captures + 1

    twin = copy.deepcopy(model)
    assert len(runtime_of(twin).graphs) == 0
    torch.testing.assert_close(run(twin, inputs)[keep], run(model, inputs)[keep], atol=atol, rtol=atol)
    fp.revert(model)
    assert len(graphs) == 0 and runtime_of(model) is None


# -- the lean decode loop's token choice, compiled with CUDA graphs ---------------------------------

@gpu
def test_compiled_decode_loop_decodes_every_mode_on_the_gpu(monkeypatch) -> None:
    """The compiled step (reduce-overhead: CUDA graphs) on a tiny float32 Llama: greedy, repetition
    penalty and min_new_tokens give transformers' tokens; top_k = 1 sampling is the argmax; seeded
    sampling repeats itself; every sampled token lies in transformers' own top-k of its context; and
    the token frequencies match transformers' sampling (over 2,048 rows, the total variation to
    transformers' is within 1.5x that between two transformers runs, + 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers_fastpath.passes.generation import STATIC_PASS, decode_loop
    from transformers_fastpath.passes.instance_methods import get_layer

    monkeypatch.setattr(decode_loop, "CHOICE_IN_CUDA_GRAPHS", True)  # what this test is to verify

    config = LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval().cuda()
    model = LlamaForCausalLM(config).eval().cuda()
    model.load_state_dict(plain.state_dict())
    fp.apply(model, {"defaults": {"dtype": "keep"}})  # the GPU plan (static cache, compile, lean loop) in float32
    runtime = get_layer(model, "generate", STATIC_PASS).__self__
    ids = torch.randint(3, 200, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0

    def generate(m, prompt, prompt_mask, seed=0, **kwargs):
        torch.manual_seed(seed)
        with torch.no_grad():
            return m.generate(prompt, attention_mask=prompt_mask, max_new_tokens=12, pad_token_id=0, **kwargs)

    for kwargs in ({}, {"repetition_penalty": 1.3}, {"min_new_tokens": 8, "eos_token_id": [2, 5, 7]}):
        fast, ref = (generate(m, ids, mask, do_sample=False, **kwargs) for m in (model, plain))
        assert runtime.last_loop_reason is None, runtime.last_loop_reason
        assert torch.equal(fast, ref), (kwargs, fast.tolist(), ref.tolist())
    fast = generate(model, ids, mask, do_sample=True, top_k=1, temperature=0.5)
    assert torch.equal(fast, generate(plain, ids, mask, do_sample=False)), fast.tolist()

    # Uncompiled on the GPU, seeded draws are transformers' bit for bit.
    eager = LlamaForCausalLM(config).eval().cuda()
    eager.load_state_dict(plain.state_dict())
    fp.apply(eager, {"defaults": {"dtype": "keep", "compile": False, "static_cache": True, "decode_loop": True}})
    sampled = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2}
    for seed in (0, 1):
        fast, ref = (generate(m, ids, mask, seed=seed, **sampled) for m in (eager, plain))
        assert torch.equal(fast, ref), ("uncompiled draws", seed, fast.tolist(), ref.tolist())

    rows = ids[1:].expand(2048, -1).contiguous()
    sample = {"do_sample": True, "top_k": 10, "temperature": 1.5}
    ours = generate(model, rows, None, seed=3, **sample)
    assert runtime.last_loop_reason is None
    assert torch.equal(generate(model, rows, None, seed=3, **sample), ours)
    theirs = generate(plain, rows, None, seed=4, **sample)
    with torch.no_grad():  # transformers' logits for each row's own context at every new position
        logits = plain(ours[:, :-1]).logits[:, ids.shape[1] - 1:].float()
    # Every sampled token is in transformers' top 10 of its context, up to a near-tie with the 10th
    # (the compiled step's float32 logits differ from eager ones in the last bits).
    tenth = logits.topk(10, dim=-1).values[..., -1]
    new = ours[:, ids.shape[1]:]
    picked = logits.gather(-1, new[:, :, None]).squeeze(-1)
    sampled = (new == 2).int().cumsum(-1) - (new == 2).int() == 0  # up to each row's EOS; pads after it
    assert bool(((picked >= tenth - 1e-4) | ~sampled).all()), ("a sampled token outside the top-k",
                                                              float(((tenth - picked) * sampled).max()))
    again = generate(plain, rows, None, seed=5, **sample)  # the sampling noise of 2,048 rows, transformers alone

    def distance(a, b, position):
        counts = [torch.bincount(o[:, position], minlength=200).float() / o.shape[0] for o in (a, b)]
        return 0.5 * float((counts[0] - counts[1]).abs().sum())

    for position in (ids.shape[1] + 1, ids.shape[1] + 6):  # tokens made by the compiled step
        ours_vs_theirs, noise = distance(ours, theirs, position), distance(again, theirs, position)
        assert ours_vs_theirs < 1.5 * noise + 0.02, (position, ours_vs_theirs, noise)
    # top-p in the compiled step (its cumulative sum is a custom op: inductor's split scan failed on
    # (16, 32000) in torch 2.11): the loop runs, and each token lies in transformers' nucleus.
    nucleus = {"do_sample": True, "top_k": 0, "top_p": 0.9}
    ours = generate(model, rows[:16], None, seed=3, **nucleus)
    assert runtime.last_loop_reason is None and fp.plan_of(model).pass_status("generate_decode_loop").status \
        == "applied", fp.plan_of(model).pass_status("generate_decode_loop")
    with torch.no_grad():
        probs = plain(ours[:, :-1]).logits[:, ids.shape[1] - 1:].float().softmax(-1)
    new = ours[:, ids.shape[1]:]
    picked = probs.gather(-1, new[:, :, None]).squeeze(-1)
    above = (probs * (probs > picked[..., None])).sum(-1)  # mass of the tokens likelier than the pick
    sampled = (new == 2).int().cumsum(-1) - (new == 2).int() == 0
    assert bool(((above < 0.9 + 1e-4) | ~sampled).all()), "a token outside the top-p nucleus"
    assert len(runtime.loop._compiled) >= 4
