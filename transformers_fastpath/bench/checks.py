"""Correctness checks: a variant's output compared with the default variant's.

Each check returns a JSON-safe dict with ``"passed"`` (bool), the ``"criterion"`` applied and the
numbers behind it. Tolerances depend on precision: two float32 runs must agree closely, a
half-precision run (fp16/bf16) only as closely as half precision allows.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["HALF", "compare_embeddings", "compare_greedy", "compare_hidden", "compare_logits", "compare_losses",
           "compare_probabilities", "first_token_in_top_k", "is_half"]

HALF = frozenset({"float16", "bfloat16"})

HIDDEN_FP32_MAX_ABS = 1e-4
HIDDEN_HALF_MIN_COSINE = 0.999
PROB_FP32_MAX_ABS = 1e-4
PROB_HALF_MAX_ABS = 2e-2
GREEDY_TIE_FP32 = 0.01  # of the reference logits' standard deviation at that position
GREEDY_TIE_HALF = 0.25
QUANTIZED_MIN_COSINE = 0.5
LOSS_FP32_MAX_ABS = 1e-3
LOSS_HALF_MAX_ABS = 5e-2


def is_half(*dtypes: Any) -> bool:
    """Whether any of ``dtypes`` (torch dtypes or names) is a half-precision type."""
    return any(str(d).replace("torch.", "") in HALF for d in dtypes)


def _finite(x: Any) -> bool:
    import torch

    return bool(torch.isfinite(x).all())


def compare_hidden(reference: Any, candidate: Any, mask: Any, *, half: bool) -> dict[str, Any]:
    """Hidden states ``(batch, length, hidden)`` compared on real tokens (``mask`` True = real).

    float32: max abs diff <= 1e-4. Half precision: the smallest per-token cosine similarity >= 0.999.
    """
    import torch

    keep = mask.bool().cpu()
    a = reference.detach().float().cpu()[keep]
    b = candidate.detach().float().cpu()[keep]
    if a.shape != b.shape:
        return {"passed": False, "criterion": "same shape", "shapes": [list(a.shape), list(b.shape)]}
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) if a.numel() else 1.0
    finite = _finite(b)
    if half:
        passed = finite and cosine >= HIDDEN_HALF_MIN_COSINE
        criterion = f"min cosine similarity per real token >= {HIDDEN_HALF_MIN_COSINE} (half precision)"
    else:
        passed = finite and diff <= HIDDEN_FP32_MAX_ABS
        criterion = f"max abs diff on real tokens <= {HIDDEN_FP32_MAX_ABS:g} (float32)"
    return {"passed": bool(passed), "criterion": criterion, "max_abs_diff": diff, "min_cosine": cosine,
            "real_tokens": int(keep.sum())}


def compare_embeddings(reference: list[Any], candidate: list[Any], lengths: list[int], *,
                       half: bool) -> dict[str, Any]:
    """feature-extraction pipeline outputs (one ``[1][tokens][hidden]`` list per text), on real tokens."""
    import torch

    if len(reference) != len(candidate) or len(reference) != len(lengths):
        return {"passed": False, "criterion": "one output per input",
                "outputs": [len(reference), len(candidate), len(lengths)]}
    rows_a, rows_b = [], []
    for a, b, n in zip(reference, candidate, lengths):
        rows_a.append(torch.as_tensor(a[0][:n], dtype=torch.float32))
        rows_b.append(torch.as_tensor(b[0][:n], dtype=torch.float32))
    a, b = torch.cat(rows_a)[None], torch.cat(rows_b)[None]
    if a.shape != b.shape:
        return {"passed": False, "criterion": "same number of real tokens", "shapes": [list(a.shape), list(b.shape)]}
    result = compare_hidden(a, b, torch.ones(a.shape[:2], dtype=torch.bool), half=half)
    result["inputs"] = len(lengths)
    return result


def _scores(item: Any) -> dict[str, float]:
    entries = item if isinstance(item, list) else [item]
    return {e["label"]: float(e["score"]) for e in entries}


def compare_probabilities(reference: list[Any], candidate: list[Any], *, half: bool) -> dict[str, Any]:
    """text-classification outputs (``top_k=None``: every label's score per text).

    Passes when every label's probability agrees within 1e-4 (float32) or 2e-2 (half precision);
    the fraction of texts whose top label agrees is reported too.
    """
    if len(reference) != len(candidate):
        return {"passed": False, "criterion": "one output per input", "outputs": [len(reference), len(candidate)]}
    worst, agree, finite = 0.0, 0, True
    for ref_item, cand_item in zip(reference, candidate):
        a, b = _scores(ref_item), _scores(cand_item)
        if set(a) != set(b):
            return {"passed": False, "criterion": "the same labels", "labels": [sorted(a), sorted(b)]}
        finite = finite and all(math.isfinite(x) for x in b.values())
        worst = max([worst, *(abs(a[k] - b[k]) for k in a)])
        agree += max(a, key=a.__getitem__) == max(b, key=b.__getitem__)
    tol = PROB_HALF_MAX_ABS if half else PROB_FP32_MAX_ABS
    return {"passed": bool(finite and worst <= tol),
            "criterion": f"max abs diff of label probabilities <= {tol:g} ({'half precision' if half else 'float32'})",
            "max_abs_diff": worst, "label_agreement": agree / len(reference) if reference else 1.0,
            "inputs": len(reference)}


def compare_greedy(reference: Any, reference_logits: Any, candidate: Any, prompt_len: int, *,
                   half: bool) -> dict[str, Any]:
    """Greedy token ids compared position by position, allowing a split only at a near-tie.

    Random weights give nearly flat logits, so two correct kernels can pick different tokens
    where the reference's two best logits are within rounding. A row passes when it is
    identical, or when at its first mismatch the reference's logit of its own token exceeds
    that of the candidate's token by at most the tie tolerance: 0.01 (float32) or 0.25 (half
    precision involved) times the standard deviation of the reference's logits there (about
    0.2 for the 0.85B Llama shape in bf16). Past that point the rows legitimately differ. A
    wrong token at a clear margin fails.

    Args:
        reference: the default variant's sequences ``(batch, prompt + new)``.
        reference_logits: its logits per generated position ``(batch, new, vocab)``.
        candidate: the variant's sequences.
        prompt_len: prompt tokens at the start of each sequence.
    """
    ref = reference[:, prompt_len:].cpu()
    cand = candidate[:, prompt_len:].cpu()
    if ref.shape != cand.shape:
        return {"passed": False, "criterion": "same number of generated tokens",
                "shapes": [list(ref.shape), list(cand.shape)]}
    scale = GREEDY_TIE_HALF if half else GREEDY_TIE_FP32
    logits = reference_logits.float().cpu()
    first_mismatch: list[int | None] = []
    margins: list[float] = []  # in units of the logits' standard deviation
    passed = True
    for row in range(ref.shape[0]):
        diff = (ref[row] != cand[row]).nonzero()
        if not len(diff):
            first_mismatch.append(None)
            continue
        j = int(diff[0])
        first_mismatch.append(j)
        step = logits[row, j]
        margin = float(step[ref[row, j]] - step[cand[row, j]]) / max(float(step.std()), 1e-12)
        margins.append(margin)
        passed = passed and margin <= scale
    equal = (ref == cand).float()
    return {"passed": bool(passed),
            "criterion": f"rows identical, or the first split at a near-tie (reference logit margin <= {scale:g} "
                         "standard deviations of its logits)",
            "identical_rows": sum(m is None for m in first_mismatch), "rows": int(ref.shape[0]),
            "matching_fraction": float(equal.mean()), "first_mismatch_per_row": first_mismatch,
            "max_margin_at_split_std": max(margins) if margins else None}


def first_token_in_top_k(reference_logits: Any, candidate: Any, prompt_len: int, *, k: int = 5,
                         reference: Any = None) -> dict[str, Any]:
    """For quantized weights: each row's first generated token is among the reference's top ``k``.

    Quantization moves logits far more than rounding does, so token identity is not expected;
    a broken model picks tokens outside the reference's top few at once.
    """
    import torch

    first = candidate[:, prompt_len].cpu()
    top = torch.topk(reference_logits[:, 0].float().cpu(), k, dim=-1).indices
    inside = (top == first[:, None]).any(dim=-1)
    result: dict[str, Any] = {"passed": bool(inside.all()),
                              "criterion": f"first generated token of every row within the reference's top {k}",
                              "rows_in_top_k": int(inside.sum()), "rows": int(first.shape[0])}
    if reference is not None:
        ref = reference[:, prompt_len:].cpu()
        cand = candidate[:, prompt_len:].cpu()
        if ref.shape == cand.shape:
            result["matching_fraction"] = float((ref == cand).float().mean())
    return result


def compare_logits(reference: Any, candidate: Any, *, min_cosine: float = QUANTIZED_MIN_COSINE) -> dict[str, Any]:
    """Next-token logits ``(batch, vocab)`` of quantized weights against the unquantized reference.

    Passes when every row's cosine similarity is at least ``min_cosine`` (0.5). Random weights
    have no structure to protect, so 4-bit error is large next to the logits' spread: nf4 on
    the 0.85B Llama shape gives a cosine of about 0.8 (error std about 0.6 of the logits' std,
    simulated with bitsandbytes' own quantize/dequantize); a broken model is near 0. The rank
    of the candidate's top token under the reference is reported too.
    """
    import torch

    a = reference.detach().float().cpu()
    b = candidate.detach().float().cpu()
    if a.shape != b.shape:
        return {"passed": False, "criterion": "same logits shape", "shapes": [list(a.shape), list(b.shape)]}
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top = b.argmax(dim=-1, keepdim=True)
    ranks = (a > a.gather(1, top)).sum(dim=-1)
    return {"passed": bool(_finite(b) and float(cosine.min()) >= min_cosine),
            "criterion": f"cosine similarity of next-token logits with the reference >= {min_cosine:g} in every row",
            "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
            "top_token_rank_in_reference": [int(r) for r in ranks], "rows": int(a.shape[0])}


def compare_losses(reference: dict[str, float], candidate: dict[str, float], *, half: bool) -> dict[str, Any]:
    """Training losses of a round (same initial weights, data and steps) agree.

    Within 1e-3 in float32, 5e-2 when mixed precision is involved; every loss must be finite.
    """
    tol = LOSS_HALF_MAX_ABS if half else LOSS_FP32_MAX_ABS
    keys = sorted(set(reference) & set(candidate))
    if not keys:
        return {"passed": False, "criterion": "losses to compare", "keys": [sorted(reference), sorted(candidate)]}
    diffs = {k: abs(float(reference[k]) - float(candidate[k])) for k in keys}
    finite = all(math.isfinite(float(candidate[k])) for k in keys)
    return {"passed": bool(finite and max(diffs.values()) <= tol),
            "criterion": f"training loss within {tol:g} of the default's ({'mixed precision' if half else 'float32'})",
            "abs_diff": diffs, "losses": {k: float(candidate[k]) for k in keys}}
