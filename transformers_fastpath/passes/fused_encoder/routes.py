"""The three ways the converted encoder computes a batch (inference only, no autograd).

``dense``
    ``torch._transformer_encoder_layer_fwd`` on the padded batch, with a ``(B, T)`` key padding
    mask (``mask_type=1``) or none. Pad positions are computed like real tokens, so they hold
    what the unconverted model gives. Best for small, launch-bound batches and unpadded ones.
``nested``
    The padded batch becomes a (strided) nested tensor once, every layer runs the fused op on
    it, and it is padded back once at the end: no work on pad tokens in the linear layers.
    Needs right padding (real tokens first). Pad positions come back as 0.
``packed``
    Real tokens are gathered once into a ``(N, E)`` matrix; linear layers, norms and the FFN
    run on it; only attention sees the padded layout (q/k/v scattered into a zeroed
    ``(B, T)`` buffer, ``scaled_dot_product_attention`` with the key mask, gathered back).
    Works for any padding pattern, and for any elementwise activation (it calls the layer's own
    module where the fused op has no such activation). Pad positions come back as 0, except position 0 of a
    left-padded row: heads read that position (BERT's pooler, RoBERTa's and DistilBERT's
    classifiers), so it is computed as the unconverted model computes it, as a query that
    attends to its row's real tokens and is no key itself. Measured fastest on CPU,
    where the nested attention of the fused op pads internally (see docs/fused-encoder.md).
    Attention is padding-free too: on a GPU with flash attention (sm80+, fp16/bf16)
    ``torch.nn.attention.varlen.varlen_attn`` with each sequence's offsets; on a CPU one unmasked
    ``scaled_dot_product_attention`` per run of sequences of equal length (a masked call over
    the padded batch costs what its pad tokens cost: 4.8x slower on a MiniLM batch of 32 x 171 at
    28% fill, 1.6x at 80%); elsewhere (float32 on a GPU) SDPA over a padded view with the key mask.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .layers import BoundLayer, LayerParts

__all__ = ["ROUTES", "Route", "run_dense", "run_nested", "run_packed", "run_route", "use_length_runs",
           "use_onednn_linear", "use_varlen"]

Route = Literal["dense", "nested", "packed"]
ROUTES: tuple[Route, ...] = ("dense", "nested", "packed")

# torch warns once that strided nested tensors are a prototype; the fused op only accepts
# that layout, so the warning tells users nothing they can act on.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage",
                        category=UserWarning)


def run_dense(x: torch.Tensor, keep: torch.Tensor | None, layers: Iterable[BoundLayer]) -> torch.Tensor:
    """Fused op on the padded batch; ``keep`` is ``(B, T)`` True at real tokens, or None."""
    pad = None if keep is None else ~keep
    mask_type = None if pad is None else 1
    for layer in layers:
        x = torch._transformer_encoder_layer_fwd(x, *layer.fused_args(), pad, mask_type)
    return x


def run_nested(x: torch.Tensor, keep: torch.Tensor, layers: Iterable[BoundLayer]) -> torch.Tensor:
    """Fused op on a nested tensor made once from the right-padded batch."""
    h = torch._nested_tensor_from_mask(x, keep)
    for layer in layers:
        h = torch._transformer_encoder_layer_fwd(h, *layer.fused_args(), None, None)
    return h.to_padded_tensor(0.0, output_size=tuple(x.shape))


def _activation(x: torch.Tensor, parts: LayerParts) -> torch.Tensor:
    if parts.use_gelu is None:
        return parts.activation(x)  # the layer's own module (tanh-GELU, quick GELU, SiLU...)
    return F.gelu(x) if parts.use_gelu else F.relu(x)


@functools.cache
def _has_onednn_linear() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def use_onednn_linear(x: torch.Tensor) -> bool:
    """Whether the packed route's linear layers run as oneDNN's linear (``mkldnn._linear_pointwise``,
    what inductor's CPU freezing calls) instead of ``F.linear``: float32 on a CPU. On the 2-core CPU
    (MiniLM's shapes, 128-1532 rows) it is 1.03-1.29x ``F.linear`` on the module's own weight, so
    nothing is cached and nothing can go stale; it also computes the FFN's GELU or ReLU in the
    same pass over the output."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _has_onednn_linear()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _ffn_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: LayerParts,
            onednn: bool) -> torch.Tensor:
    """The FFN's first linear layer and its activation."""
    if onednn and parts.use_gelu is not None:  # exact (erf) GELU or ReLU, fused into the product
        attr, algorithm = ("gelu", "none") if parts.use_gelu else ("relu", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    return _activation((_onednn_linear if onednn else F.linear)(x, weight, bias), parts)


def _to_padded_heads(t: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``(N, E)`` packed rows -> ``(B, H, T, D)`` with zeros at pads (finite: masked keys still enter q.k)."""
    batch, length, heads, head_dim = shape
    buf = t.new_zeros(batch * length, heads * head_dim).index_copy_(0, index, t)
    return buf.view(batch, length, heads, head_dim).transpose(1, 2)


@functools.cache
def _varlen_attn() -> Callable[..., torch.Tensor] | None:
    """torch's variable-length flash attention (torch >= 2.9), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _has_flash(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def use_varlen(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the packed route's attention can run padding-free on ``x`` (flash's limits)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and _varlen_attn() is not None and _has_flash(x.device))


def use_length_runs(keep: torch.Tensor) -> bool:
    """Whether the packed route's attention (where flash varlen does not run) is one unmasked SDPA
    call per run of sequences of equal length rather than one masked call over the padded batch:
    on a CPU, where the masked kernel costs what the pad tokens cost and a call costs little."""
    return keep.device.type == "cpu"


class _EqualLengthRuns:
    """A batch's sequences cut into runs of consecutive sequences of equal (queries, keys) counts,
    for one unmasked SDPA call per run.

    Sequence ``i``'s queries are packed rows ``[q_start_i, q_start_i + q_len_i)`` and its keys are
    rows ``[k_start_i, k_start_i + k_len_i)`` of the key matrix, so a run's queries and keys are
    each one contiguous block: ``view(n, len, H, D)`` lays the run out as a batch of equal-length
    sequences with no padding and no copy. Length-sorted batches (what fastpath's pipelines
    make) have one run per distinct length; an unsorted batch at worst one per sequence (a call
    costs about 0.1 ms on a CPU). Made once per batch on the host and shared by every layer.
    """

    def __init__(self, q_lens: list[int], k_lens: list[int]) -> None:
        q_starts, k_starts = _starts(q_lens), _starts(k_lens)
        self.runs: list[tuple[int, int, int, int, int]] = []  # (sequences, q_len, k_len, q_start, k_start)
        for i, key in enumerate(zip(q_lens, k_lens)):
            if self.runs and self.runs[-1][1:3] == key:
                n, q_len, k_len, q_start, k_start = self.runs[-1]
                self.runs[-1] = (n + 1, q_len, k_len, q_start, k_start)
            else:
                self.runs.append((1, *key, q_starts[i], k_starts[i]))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """``(Nq, E)`` queries and ``(Nk, E)`` keys/values -> ``(Nq, E)`` attention output."""
        embed = q.shape[1]
        head_dim = embed // heads

        def block(t: torch.Tensor, start: int, n: int, length: int) -> torch.Tensor:
            return t[start: start + n * length].view(n, length, heads, head_dim).transpose(1, 2)

        if len(self.runs) == 1:  # no padding in the batch, or every sequence of one length
            n, q_len, k_len, _, _ = self.runs[0]
            att = F.scaled_dot_product_attention(block(q, 0, n, q_len), block(k, 0, n, k_len), block(v, 0, n, k_len))
            return att.transpose(1, 2).reshape(n * q_len, embed)
        out = q.new_empty(q.shape)
        for n, q_len, k_len, q_start, k_start in self.runs:
            att = F.scaled_dot_product_attention(block(q, q_start, n, q_len), block(k, k_start, n, k_len),
                                                 block(v, k_start, n, k_len))  # (n, H, q_len, D): no mask, no pad
            out[q_start: q_start + n * q_len].view(n, q_len, heads, head_dim).copy_(att.transpose(1, 2))
        return out


def _starts(lengths: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts


class _PackedAttention:
    """Attention of one batch's packed ``(N, E)`` rows, each sequence attending to its own real tokens.

    ``rows`` (``(B, T)``) marks the positions computed, ``keep`` the real tokens among them (the
    keys); a computed pad (position 0 of a left-padded row) is a query only, as in the unconverted
    model, whose attention mask hides pad keys but not pad queries. The packed rows are in
    ``(batch, time)`` order, so each sequence's queries, and its keys once the key rows are
    selected, are consecutive rows.
    """

    def __init__(self, rows: torch.Tensor, keep: torch.Tensor, index: torch.Tensor, embed: int, heads: int,
                 varlen: bool) -> None:
        batch, length = keep.shape
        self.index, self.embed, self.heads = index, embed, heads
        self.shape = (batch, length, heads, embed // heads)
        self.varlen = varlen
        self.length_runs: _EqualLengthRuns | None = None
        by_runs = not varlen and use_length_runs(keep)
        self.key_rows: torch.Tensor | None = None  # which packed rows are keys (None: all)
        if (varlen or by_runs) and rows is not keep:
            self.key_rows = keep.reshape(-1).index_select(0, index).nonzero().squeeze(1)
        if by_runs:
            keys = keep.sum(1).tolist()
            self.length_runs = _EqualLengthRuns(keys if rows is keep else rows.sum(1).tolist(), keys)
        elif varlen:
            keys = keep.sum(1, dtype=torch.int32)  # each >= 1: keep_mask rejects rows of padding only
            queries = keys if rows is keep else rows.sum(1, dtype=torch.int32)
            self.offsets_k = F.pad(keys.cumsum(0, dtype=torch.int32), (1, 0))
            self.offsets_q = self.offsets_k if rows is keep else F.pad(queries.cumsum(0, dtype=torch.int32), (1, 0))
            self.max_k, self.max_q = int(keys.max()), int(queries.max())
        else:
            self.rows, self.cols = index // length, index % length  # (batch, time) of each computed row
            self.key_mask = keep[:, None, None, :]  # (B, 1, 1, T): True = attend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(N, E)`` q/k/v of the computed rows -> ``(N, E)`` attention output."""
        if self.key_rows is not None:
            k, v = k.index_select(0, self.key_rows), v.index_select(0, self.key_rows)
        if self.length_runs is not None:
            return self.length_runs(q, k, v, self.heads)
        if self.varlen:
            heads, head_dim = self.heads, self.shape[3]
            out: Any = _varlen_attn()(q.view(q.shape[0], heads, head_dim), k.view(k.shape[0], heads, head_dim),
                                      v.view(v.shape[0], heads, head_dim), self.offsets_q, self.offsets_k,
                                      self.max_q, self.max_k)
            return out.reshape(q.shape[0], self.embed)
        q, k, v = (_to_padded_heads(t, self.index, self.shape) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=self.key_mask)  # (B, H, T, D)
        return att[self.rows, :, self.cols, :].reshape(-1, self.embed)


def computed_rows(keep: torch.Tensor) -> torch.Tensor:
    """The positions the packed route computes: the real tokens, and position 0 of every row
    (a pad there only in left-padded rows). Returns ``keep`` itself when that adds nothing."""
    if bool(keep[:, 0].all()):
        return keep
    rows = keep.clone()
    rows[:, 0] = True
    return rows


def run_packed(x: torch.Tensor, keep: torch.Tensor | None, layers: Iterable[BoundLayer]) -> torch.Tensor:
    """Padding-free linear layers on packed tokens (oneDNN's on a float32 CPU); attention
    padding-free too on a CPU and where flash runs, else on a padded view via SDPA. ``keep``
    None: no padding (every token is real)."""
    batch, length, embed = x.shape
    if keep is None:
        keep = torch.ones(batch, length, dtype=torch.bool, device=x.device)
    rows = computed_rows(keep)
    index = rows.reshape(-1).nonzero().squeeze(1)    # positions of computed tokens in (B*T)
    h = x.reshape(batch * length, embed).index_select(0, index)
    onednn = use_onednn_linear(x)
    linear = _onednn_linear if onednn else F.linear
    attention: _PackedAttention | None = None
    for layer in layers:
        p = layer.parts
        qw, qb, kw, kb, vw, vb, ow, ob, n1w, n1b, n2w, n2b, f1w, f1b, f2w, f2b = layer.w
        if attention is None or attention.heads != p.num_heads:
            attention = _PackedAttention(rows, keep, index, embed, p.num_heads, use_varlen(x, embed // p.num_heads))

        residual = h
        a_in = F.layer_norm(h, (embed,), n1w, n1b, p.eps) if p.norm_first else h
        att = attention(linear(a_in, qw, qb), linear(a_in, kw, kb), linear(a_in, vw, vb))
        att = linear(att, ow, ob)                                             # (N, E): computed rows only
        if p.norm_first:
            h = residual + att
            f_in = F.layer_norm(h, (embed,), n2w, n2b, p.eps)
            h = h + linear(_ffn_in(f_in, f1w, f1b, p, onednn), f2w, f2b)
        else:
            h = F.layer_norm(att + residual, (embed,), n1w, n1b, p.eps)
            f = linear(_ffn_in(h, f1w, f1b, p, onednn), f2w, f2b)
            h = F.layer_norm(f + h, (embed,), n2w, n2b, p.eps)
    out = h.new_zeros(batch * length, embed).index_copy_(0, index, h)
    return out.view(batch, length, embed)


def run_route(route: Route, x: torch.Tensor, keep: torch.Tensor | None, layers: Iterable[BoundLayer]) -> torch.Tensor:
    """Run ``route``; nested needs a mask (``keep`` not None: else dense runs). Every route walks
    ``layers`` once, in order, so an iterator that makes them on the fly will do."""
    if route == "dense" or (keep is None and route == "nested"):
        return run_dense(x, keep, layers)
    if route == "nested":
        return run_nested(x, keep, layers)
    return run_packed(x, keep, layers)
