"""How the lean decode loop picks each next token: transformers' logits processors on fixed shapes.

transformers' processors read the sequence so far (``input_ids``), which grows by one column a
token; a CUDA graph needs every shape and address fixed. The settings the loop takes are
re-expressed over state that keeps its shape for the whole call, in transformers' order
(``GenerationMixin._get_logits_processor``) and with its arithmetic:

=========================  =========================================================  ==================
setting                    transformers' processor                                    state here
=========================  =========================================================  ==================
``repetition_penalty``     ``RepetitionPenaltyLogitsProcessor``                       ``seen``: (batch, vocab + 1) bool
``min_length``             ``MinLengthLogitsProcessor``                               ``eos_blocked``: one bool
``min_new_tokens``         ``MinNewTokensLengthLogitsProcessor``                      (the same bool)
``temperature``            ``TemperatureLogitsWarper``                                a float32 scalar
``top_k``                  ``TopKLogitsWarper``                                       (an int in the rule)
``top_p``                  ``TopPLogitsWarper``                                       a float32 scalar
``min_p``                  ``MinPLogitsWarper``                                       a float32 scalar
=========================  =========================================================  ==================

Values that change from call to call (temperature, top-p, min-p, penalty) are tensors, so one
compiled step serves them all; ``top_k`` and which processors are on are the step's structure
(:class:`Rule`), one compiled variant each.

Sampling draws ``argmax(probs / q)`` with ``q ~ Exp(1)`` (``torch.empty_like(probs).exponential_(1)``):
that is what ``torch.multinomial(probs, 1)`` computes (its one-sample path, ATen's
``multinomial``), without the host sync ``multinomial`` spends on checking its input. Uncompiled,
the draws are bit-identical to transformers' under the same ``torch.manual_seed``; compiled,
inductor makes its own random numbers (same distribution, other draws).

Presence and frequency penalties are not offered: transformers defines neither.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "Selection", "choose", "eos_unblock_step", "processed_scores", "rule_for", "unsupported_setting"]

# Sampling settings transformers applies that the loop does not re-express; set to anything but
# these neutral values, the call goes to transformers' loop.
_UNSUPPORTED_SAMPLING: dict[str, tuple[Any, ...]] = {
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,),
}


@dataclass(frozen=True)
class Rule:
    """The structure of the token choice for one call (which processors run); values live in :class:`Selection`.

    Attributes:
        sample: draw from the filtered distribution (``do_sample``); else the argmax.
        penalty: a repetition penalty applies.
        eos_floor: end-of-sequence tokens are masked for the first tokens (``min_new_tokens``/``min_length``).
        temperature: scores are divided by a temperature.
        top_k: keep the ``top_k`` highest scores (0: off).
        top_p: nucleus filtering.
        min_p: min-p filtering.
    """

    sample: bool = False
    penalty: bool = False
    eos_floor: bool = False
    temperature: bool = False
    top_k: int = 0
    top_p: bool = False
    min_p: bool = False

    @property
    def greedy_only(self) -> bool:
        """The plain argmax (no processor at all): the loop's original step."""
        return self == Rule()

    def describe(self) -> str:
        """The processors that run, as a user reads them: ``"sampling, temperature, top_k=50, top_p"``."""
        parts = ["sampling" if self.sample else "greedy"]
        parts += [name for name, on in (("repetition penalty", self.penalty), ("minimum length", self.eos_floor),
                                        ("temperature", self.temperature)) if on]
        parts += [f"top_k={self.top_k}"] if self.top_k else []
        parts += [name for name, on in (("top_p", self.top_p), ("min_p", self.min_p)) if on]
        return ", ".join(parts)


def unsupported_setting(config: Any) -> str | None:
    """The first sampling setting of ``config`` the loop cannot apply, as ``name = value``; None when all fit.

    Settings transformers itself rejects (a top-p of 1.5, a negative temperature...) also count:
    transformers' loop then raises its own error for them.
    """
    if config.do_sample:
        for name, neutral in _UNSUPPORTED_SAMPLING.items():
            value = getattr(config, name, None)
            if value not in neutral:
                return f"{name} = {value!r}"
    return _invalid(config)


def eos_unblock_step(config: Any, prompt_len: int, eos: list[int]) -> int:
    """The index of the first new token that may be EOS (0: any): ``min_new_tokens`` and ``min_length``."""
    if not eos:
        return 0  # transformers adds neither processor without an EOS token
    if isinstance(config.min_new_tokens, int):  # it replaces min_length (_prepare_generated_length)
        return max(config.min_new_tokens, 0)
    if isinstance(config.min_length, int):
        return max(config.min_length - prompt_len, 0)
    return 0


def rule_for(config: Any, *, prompt_len: int, eos: list[int]) -> Rule:
    """The :class:`Rule` of a call whose settings :func:`unsupported_setting` accepted."""
    sample = bool(config.do_sample)
    penalty = config.repetition_penalty is not None and config.repetition_penalty != 1.0
    eos_floor = eos_unblock_step(config, prompt_len, eos) > 0
    if not sample:
        return Rule(penalty=penalty, eos_floor=eos_floor)
    return Rule(
        sample=True, penalty=penalty, eos_floor=eos_floor,
        temperature=config.temperature is not None and config.temperature != 1.0,
        top_k=int(config.top_k) if config.top_k else 0,
        top_p=config.top_p is not None and config.top_p < 1.0,
        min_p=config.min_p is not None,
    )


class Selection:
    """The fixed-shape state of one call's token choice, on the model's device.

    Args:
        rule: which processors run.
        config: the call's generation config (values of the processors).
        ids: the prompt (batch, prompt_len), already expanded for ``num_return_sequences``.
        mask: its attention mask.
        vocab: the width of the logits.
        eos: the end-of-sequence ids.
        unblock_at: the first new-token index that may be EOS (:func:`eos_unblock_step`).
    """

    def __init__(self, rule: Rule, config: Any, *, ids: Any, mask: Any, vocab: int, eos: list[int],
                 unblock_at: int) -> None:
        import torch

        register_ops()
        device = ids.device
        self.rule = rule
        self.unblock_at = unblock_at
        scalar = functools.partial(torch.tensor, dtype=torch.float32, device=device)
        self.penalty = scalar(float(config.repetition_penalty or 1.0))
        self.temperature = scalar(float(config.temperature or 1.0))
        # 1 - top_p in double, then float32: the threshold transformers' TopPLogitsWarper compares with.
        self.top_p_floor = scalar(1.0 - float(config.top_p if config.top_p is not None else 1.0))
        self.min_p = scalar(float(config.min_p if config.min_p is not None else 0.0))
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if eos:
            self.eos_mask[torch.tensor([e for e in eos if 0 <= e < vocab], dtype=torch.long, device=device)] = True
        self.eos_blocked = torch.tensor(unblock_at > 0, device=device)
        self.valid = torch.tensor(True, device=device)  # every sampled distribution so far was valid
        self.seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=device)
        if rule.penalty:
            counted = ids.clamp(max=vocab)  # ids outside the logits land in the extra column, as in transformers
            if _penalty_skips_left_padding():
                leading = (mask != 0).int().argmax(dim=1)
                positions = torch.arange(ids.shape[1], device=device)
                counted = counted.masked_fill(positions[None, :] < leading[:, None], vocab)
            self.seen.scatter_(1, counted, True)

    def tensors(self) -> tuple[Any, ...]:
        """The state as step arguments (graph inputs), in :func:`choose`'s order."""
        return (self.seen, self.eos_mask, self.eos_blocked, self.penalty, self.temperature, self.top_p_floor,
                self.min_p)

    def after_token(self, index: int, token: Any, valid: Any = None) -> None:
        """Record the token chosen at new-token ``index`` (batch, 1), after pad substitution, and the
        validity flag :func:`choose` gave with it."""
        if valid is not None:
            self.valid &= valid
        if self.rule.penalty:
            self.seen.scatter_(1, token, True)
        if self.rule.eos_floor and index + 1 == self.unblock_at:
            self.eos_blocked.fill_(False)

    def check(self) -> None:
        """Raise as ``torch.multinomial`` does if a sampled distribution was not valid (a host sync)."""
        if self.rule.sample and not bool(self.valid):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0 "
                               "(the lean decode loop's sampling; the logits were not finite)")


def choose(rule: Rule, logits: Any, *state: Any) -> tuple[Any, Any]:
    """The next token per row (batch,) from the last position's ``logits`` (batch, vocab), and, when
    sampling, a 0-dim bool: whether the probabilities were valid (None for greedy).

    Pure tensor code of fixed shapes, so it compiles into the decode step's graph. The validity
    flag is ``torch.multinomial``'s own input check (no inf or NaN, nothing negative), left on the
    device for the host to read at its next sync (:meth:`Selection.check`).
    """
    import torch

    scores = processed_scores(rule, logits, *state)
    if not rule.sample:
        return scores.argmax(-1), None
    probs = torch.softmax(scores, dim=-1)
    valid = (probs.max() < math.inf) & (probs.min() >= 0)
    # argmax(p / Exp(1)) is torch.multinomial(p, 1). ATen's CUDA exponential never returns 0; a
    # compiled step draws with inductor's own generator, which documents no such guarantee, and a
    # 0 there would make 0 / 0 = NaN at a filtered token, which argmax takes. Filtered tokens score 0.
    draws = probs / torch.empty_like(probs).exponential_(1)
    return draws.masked_fill(probs == 0, 0.0).argmax(-1), valid


def processed_scores(rule: Rule, logits: Any, seen: Any, eos_mask: Any, eos_blocked: Any, penalty: Any,
                     temperature: Any, top_p_floor: Any, min_p: Any) -> Any:
    """The float32 scores after transformers' processors for ``rule``, in transformers' order.

    The arguments after ``logits`` are :meth:`Selection.tensors`.
    """
    import torch

    scores = logits.float()
    if rule.penalty:  # RepetitionPenaltyLogitsProcessor
        penalized = torch.where(scores < 0, scores * penalty, _divide(scores, penalty))
        scores = torch.where(seen[:, : scores.shape[-1]], penalized, scores)
    if rule.eos_floor:  # MinLengthLogitsProcessor / MinNewTokensLengthLogitsProcessor
        scores = torch.where(eos_mask & eos_blocked, -math.inf, scores)
    if not rule.sample:
        return scores
    if rule.temperature:  # TemperatureLogitsWarper
        scores = _divide(scores, temperature)
    if rule.top_k:  # TopKLogitsWarper
        k = min(rule.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)
    if rule.top_p:  # TopPLogitsWarper
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = _cumsum_last(sorted_logits.softmax(dim=-1))
        remove_sorted = cumulative <= top_p_floor
        remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        scores = scores.masked_fill(remove_sorted.scatter(1, sorted_indices, remove_sorted), -math.inf)
    if rule.min_p:  # MinPLogitsWarper
        probs = torch.softmax(scores, dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove = remove.scatter(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


# -- helpers ------------------------------------------------------------------------

def _cumsum_last(x: Any) -> Any:
    """``x.cumsum(dim=-1)``, opaque to inductor when compiled: torch 2.11's inductor failed to
    generate code for its split scan over a (16, 32000) float32 batch on an H100 ("Error in codegen
    for ComputedBuffer ... SplitScan", TypeError: list indices must be integers or slices, not
    NoneType), so the compiled step calls ATen's cumsum kernel instead (no host sync, so the step
    still replays as one CUDA graph). Uncompiled it is the same call."""
    import torch

    if not torch.compiler.is_compiling():  # a traced step finds it registered by its eager Selection
        register_ops()
    return torch.ops.transformers_fastpath.cumsum_last(x)


_ops_lock = threading.Lock()
_ops_registered = False


def register_ops() -> None:
    """Register the custom ops the token choice calls, once per process. Called eagerly by
    :class:`Selection` (dynamo cannot trace a registration inside the compiled step)."""
    global _ops_registered
    if _ops_registered:  # the usual case, once per call (and per token uncompiled): no lock
        return
    with _ops_lock:
        if _ops_registered:
            return
        import torch

        # The schema is spelled out: this module's annotations are strings (postponed evaluation).
        @torch.library.custom_op("transformers_fastpath::cumsum_last", mutates_args=(), schema="(Tensor x) -> Tensor")
        def cumsum_last(x: Any) -> Any:
            return x.cumsum(dim=-1)

        @cumsum_last.register_fake
        def _(x: Any) -> Any:
            return torch.empty_like(x)

        _ops_registered = True


def _divide(scores: Any, divisor: Any) -> Any:
    """``scores / divisor`` as transformers gets it dividing by a Python float: on CUDA, ATen divides by a
    host scalar as a multiplication by its float32 reciprocal; on the CPU it divides."""
    return scores * divisor.reciprocal() if scores.is_cuda else scores / divisor


def _invalid(config: Any) -> str | None:
    """A sampling value transformers' own warpers reject (their loop raises the error), or None."""
    from transformers.generation import logits_process as lp

    sampling = (
        ("temperature", lambda v: lp.TemperatureLogitsWarper(v), lambda v: v is not None and v != 1.0),
        ("top_k", lambda v: lp.TopKLogitsWarper(top_k=v), lambda v: v is not None and v != 0),
        ("top_p", lambda v: lp.TopPLogitsWarper(top_p=v), lambda v: v is not None and v < 1.0),
        ("min_p", lambda v: lp.MinPLogitsWarper(min_p=v), lambda v: v is not None),
    )
    penalty = (("repetition_penalty", lambda v: lp.RepetitionPenaltyLogitsProcessor(v),
                lambda v: v is not None and v != 1.0),)
    for name, build, applies in (*penalty, *(sampling if config.do_sample else ())):
        value = getattr(config, name, None)
        if not applies(value):
            continue
        try:
            build(value)
        except (ValueError, TypeError):
            return f"{name} = {value!r}"
    return None


@functools.cache
def _penalty_skips_left_padding() -> bool:
    """Whether this transformers' repetition penalty skips a row's leading padding (5.2x does; 5.17 counts it).

    transformers that skip it pass each row's padding length to ``RepetitionPenaltyLogitsProcessor``
    as a tensor; older ones accept only an int there.
    """
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    try:
        RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([1]))
    except (ValueError, TypeError):
        return False
    return True
