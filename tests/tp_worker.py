"""A torchrun worker for tests/test_placement.py: tensor parallel and data parallel on CPU (gloo).

Run as ``torchrun --nproc-per-node 2 tests/tp_worker.py --model DIR --classifier DIR --out DIR``
(or ``python -m torch.distributed.run ...``). Each rank writes ``rank<R>.json`` into ``--out``:

- tensor parallel: ``transformers.pipeline("text-generation", model=DIR, fastpath=True)``; the
  policy's ``placement = auto`` picks tensor-parallel (WORLD_SIZE > 1 and Llama has a TP plan),
  transformers shards the weights as DTensors over the ranks; greedy token ids are recorded.
- data parallel: a BERT classifier (no TP plan, so each rank runs its own copy) fed this rank's
  contiguous share of the inputs via accelerate's ``PartialState.split_between_processes``,
  results gathered with ``accelerate.utils.gather_object``.

Without ``--model`` the worker builds the tiny Llama itself (same seed on every rank).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PROMPTS = ["the quick brown fox", "hello world", "a b c d e f"]
TEXTS = [f"sample number {i} " + "word " * (i % 7) for i in range(10)]
NEW_TOKENS = 8


def build_tiny_llama(out: Path, tokenizer_dir: str | None) -> Path:
    """A tiny Llama whose sizes divide by 2 (hidden 64, 4 heads, 2 KV heads)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def greedy_token_ids(pipe: object) -> list[list[int]]:
    outputs = pipe(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)  # type: ignore[operator]
    return [list(map(int, out[0]["generated_token_ids"])) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="tiny causal Llama directory (built when omitted)")
    parser.add_argument("--tokenizer", help="tokenizer directory for a built model")
    parser.add_argument("--classifier", help="sequence-classification model directory (data-parallel part)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import transformers

    import transformers_fastpath as fp

    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or str(build_tiny_llama(out / f"llama-rank{rank}", args.tokenizer))

    result: dict[str, object] = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                                 "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    pipe = transformers.pipeline("text-generation", model=model_dir, fastpath=True)
    plan = fp.plan_of(pipe)
    weight = pipe.model.model.layers[0].self_attn.q_proj.weight
    result.update(
        placement=plan["placement"] if plan else None,
        placement_reason=plan.settings["placement"].reason if plan else None,
        load_kwargs=sorted(plan.load_kwargs) if plan else None,
        weight_type=type(weight).__name__,
        local_q_rows=int(weight.to_local().shape[0]) if hasattr(weight, "to_local") else int(weight.shape[0]),
        tp_tokens=greedy_token_ids(pipe),
        distributed=torch.distributed.is_available() and torch.distributed.is_initialized(),
    )

    if args.classifier:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo over CPU processes
        classifier = transformers.pipeline("text-classification", model=args.classifier, fastpath=True)
        cplan = fp.plan_of(classifier)
        with state.split_between_processes(TEXTS) as shard:
            local = classifier(list(shard))
        result.update(
            dp_placement=cplan["placement"] if cplan else None,
            dp_reason=cplan.settings["placement"].reason if cplan else None,
            dp_shard_size=len(local),
            dp_results=gather_object([[r["label"], round(float(r["score"]), 5)] for r in local]),
        )

    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
