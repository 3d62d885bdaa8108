"""A lean decode loop for static-cache ``generate`` calls: the token choice on the device, few host syncs.

On an H100, transformers' ``generate`` loop costs about 1.3 ms of host time per token around
a compiled decode step that takes about 1 ms on the GPU: input preparation, a 4D mask built
in Python, logits processors, stopping criteria and a device sync every token. fastpath runs
the pattern transformers documents for a static cache (the ``decode_one_tokens`` loop of the
"LLM inference optimization" guide) itself: one compiled step per token that embeds, attends,
chooses the next token and tracks EOS on the device, and a host check for "all finished"
every :data:`SYNC_EVERY` tokens instead of every token.

The token choice covers greedy and sampling with transformers' own processors for temperature,
top-k, top-p, min-p, the repetition penalty, ``min_new_tokens`` and ``min_length``
(:mod:`.selection`), several EOS ids, ``num_return_sequences``, stop strings (checked on the
host every :data:`STREAM_EVERY` tokens) and streamers (fed every :data:`STREAM_EVERY` tokens,
one ``put`` per token as transformers does). The inputs are
transformers' own: the same position ids, mask, first-token logits (``logits_to_keep=1``),
float32 scores and the pad token after a row's EOS; the output is trimmed to where
transformers would have stopped. Anything else -- beams, other processors, stopping criteria,
extra model inputs, ``return_dict_in_generate`` -- goes to transformers' loop
(:func:`ineligible` says why).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..instance_methods import method_signature
from ..sdpa_backends import compiled_step_scope
from .selection import Rule, Selection, choose, eos_unblock_step, rule_for, unsupported_setting

__all__ = ["CHOICE_IN_CUDA_GRAPHS", "STREAM_EVERY", "SYNC_EVERY", "DecodeLoop", "StreamerRaised", "StreamedFailure",
           "call_rule", "ineligible"]

SYNC_EVERY = 16  # tokens between host checks for "every row has finished"
STREAM_EVERY = 4  # ... and between deliveries to a streamer or stop-string checks
# One compiled step per token-choice rule and batch size, all of one Python function: dynamo's default
# limit of 8 compiled variants per function would run the ninth uncompiled.
_STEP_VARIANTS = 64
_EOS_WIDTH = 8  # EOS id lists up to this long share one compiled step
# Whether token-choice rules other than the plain argmax (sampling, penalties, minimum lengths) run in
# the compiled step on CUDA, where it is replayed as a CUDA graph. On since tests/test_gpu.py's
# test_compiled_decode_loop_decodes_every_mode_on_the_gpu passed on a GPU (2026-12-07, H100 80GB HBM3,
# torch 2.11, transformers 5.17); turning it off sends such calls to transformers' loop on CUDA (CPU
# and uncompiled runs never consult it).
CHOICE_IN_CUDA_GRAPHS = True

# generate() arguments other than generation settings; any of them set sends the call to transformers.
_CALL_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                   "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask",
                   "custom_generate", "inputs_embeds", "past_key_values", "cache")
_MODEL_INPUTS = frozenset({"inputs", "input_ids", "attention_mask", "generation_config", "use_model_defaults",
                           "streamer", "tokenizer"})
# Generation settings the loop does not apply, with the values that leave the decoding alone. (Sampling,
# the repetition penalty, min_length/min_new_tokens and num_return_sequences are the loop's own: selection.py.)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (1, None), "num_beam_groups": (1, None), "use_cache": (True, None), "penalty_alpha": (None,),
    "dola_layers": (None,), "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None), "encoder_no_repeat_ngram_size": (0, None), "bad_words_ids": (None,),
    "force_words_ids": (None,), "constraints": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "renormalize_logits": (False, None), "remove_invalid_values": (False, None),
    "exponential_decay_length_penalty": (None,), "max_time": (None,),
    "token_healing": (False, None), "output_scores": (False, None), "output_logits": (False, None),
    "output_attentions": (False, None), "output_hidden_states": (False, None),
    "return_dict_in_generate": (False, None), "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,), "cache_implementation": (None,),
}
_DEFAULT_MAX_LENGTH = 20


def _effective_config(model: Any, call: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The generation config ``generate`` would use for this call, and the call's leftover model kwargs.

    transformers' own merge (``_prepare_generation_config``: the call > its generation_config > the
    model's > transformers' global defaults such as ``top_k = 50``), so sampling sees the same values.
    """
    settings = {k: v for k, v in call.items() if k not in _MODEL_INPUTS and k not in _CALL_ARGUMENTS}
    prepare = getattr(model, "_prepare_generation_config", None)
    if callable(prepare):
        return prepare(call.get("generation_config"), **settings)
    config = copy.deepcopy(call.get("generation_config") or model.generation_config)
    return config, config.update(**settings)


class StreamedFailure(RuntimeError):
    """The loop failed after the call's streamer had received tokens: re-running the call would stream them twice."""


class StreamerRaised(Exception):
    """The caller's streamer raised ``original``: the caller's error, not the loop's."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def call_rule(model: Any, call: dict[str, Any]) -> Rule:
    """The token-choice rule (which processors run) the lean loop would compile for ``call``."""
    config, _ = _effective_config(model, call)
    return _rule_of(config, call.get("input_ids", call.get("inputs")))


def _rule_of(config: Any, ids: Any) -> Rule:
    return rule_for(config, prompt_len=ids.shape[1], eos=_eos_ids(config))


def ineligible(model: Any, call: dict[str, Any], *, compiled: bool = False,
               failed_rules: Mapping[Rule, str] | None = None) -> str | None:
    """Why this ``generate`` call needs transformers' loop, or None when the lean loop decodes it as transformers would.

    ``compiled``: the step will be compiled; on CUDA that also holds the token choice to the plain
    argmax while :data:`CHOICE_IN_CUDA_GRAPHS` is off. ``failed_rules``: token choices whose
    compiled step failed on this model, and why (their calls go to transformers).
    """
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    passed = next((name for name in _CALL_ARGUMENTS if call.get(name) is not None), None)
    if passed is not None:
        return f"the call passes {passed}"
    ids = call.get("input_ids", call.get("inputs"))
    if ids is None or getattr(ids, "ndim", 0) != 2 or ids.dtype.is_floating_point:
        return "the prompt is not a 2D tensor of token ids"
    try:
        config, leftover = _effective_config(model, call)
    except (ValueError, TypeError) as exc:  # transformers' loop raises it to the caller
        return f"transformers rejects the generation settings: {exc}"
    if leftover:
        return f"model keyword arguments {sorted(leftover)}"
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, None)
        if value not in neutral:
            return f"generation setting {name} = {value!r}"
    if _return_sequences(config) > 1 and not config.do_sample:
        return f"num_return_sequences = {config.num_return_sequences} without sampling (transformers rejects it)"
    problem = unsupported_setting(config)
    if problem is not None:
        return f"generation setting {problem}"
    if config.stop_strings is not None and call.get("tokenizer") is None:
        return "stop_strings without a tokenizer (transformers rejects it)"
    streamer = call.get("streamer")
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        return "the streamer has no put() and end()"
    parameters = _forward_parameters(model)
    if "cache" not in parameters and "past_key_values" not in parameters:
        return f"{type(model).__name__}.forward takes no cache argument"
    if _new_tokens(model, call, config, ids.shape[1]) < 1:
        return "no new tokens requested"
    on_cuda = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    held_to_argmax = compiled and on_cuda and not CHOICE_IN_CUDA_GRAPHS
    if held_to_argmax or failed_rules:
        rule = _rule_of(config, ids)
        if held_to_argmax and not rule.greedy_only:
            return "sampling, penalties and minimum lengths are held out of the compiled CUDA-graph step " \
                   "(CHOICE_IN_CUDA_GRAPHS is off)"
        failed = (failed_rules or {}).get(rule)
        if failed is not None:
            return f"this token choice failed to compile on this model ({failed})"
    return None


def _forward_parameters(model: Any) -> frozenset[str]:
    signature = method_signature(type(model), "forward")  # cached per class
    return frozenset(signature.parameters) if signature is not None else frozenset()


def _new_tokens(model: Any, call: dict[str, Any], config: Any, prompt_len: int) -> int:
    """New tokens to make, by transformers' rule (``_prepare_generated_length``): ``max_new_tokens``, else
    ``max_length`` less the prompt, except that a ``max_length`` nobody set means 20 *new* tokens
    (capped at ``max_position_embeddings``)."""
    if isinstance(config.max_new_tokens, int):
        return config.max_new_tokens
    max_length = config.max_length if isinstance(config.max_length, int) else _DEFAULT_MAX_LENGTH
    passed = call.get("generation_config")
    unset = (call.get("max_length") is None and getattr(passed, "max_length", None) is None
             and getattr(getattr(model, "generation_config", None), "max_length", None) is None)
    if unset:
        max_length += prompt_len
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int):
            max_length = min(max_length, positions)
    return max_length - prompt_len


def _return_sequences(config: Any) -> int:
    value = config.num_return_sequences
    return value if isinstance(value, int) and value > 0 else 1


def _eos_ids(config: Any) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class DecodeLoop:
    """The lean loop for one model: its static cache and its (optionally compiled) decode steps.

    The cache is kept between calls of the same batch size, cache length and dtype and reset in
    place, so a compiled step's CUDA graph keeps its addresses (as transformers does with
    ``model._cache``). One compiled step per token-choice :class:`~.selection.Rule`. Calls on one
    model from several threads take turns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one call at a time: the cache is shared between calls
        self._cache: Any = None
        self._cache_key: tuple | None = None
        self._compiled: dict[tuple[Rule, bool], Callable[..., Any]] = {}

    def __reduce__(self) -> tuple[type, tuple]:
        # A copied or pickled model gets a fresh loop: cache, compiled step and lock are per object.
        return (DecodeLoop, ())

    def generate(self, model: Any, call: dict[str, Any], *, cache_len: int, compile: bool) -> Any:
        """The tokens of ``call`` (same as ``model.generate``): prompt + new tokens, a LongTensor.

        Raises:
            StreamedFailure: the loop failed after the call's streamer had received tokens.
        """
        import torch

        config, _ = _effective_config(model, call)
        ids = call.get("input_ids", call.get("inputs"))
        mask = call.get("attention_mask")
        eos = _eos_ids(config)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        new_tokens = _new_tokens(model, call, config, ids.shape[1])
        if mask is None:  # transformers' inference: pad tokens are padding unless pad is an EOS token
            mask = (ids != pad).long() if pad is not None and pad not in eos and bool((ids == pad).any()) \
                else torch.ones_like(ids)
        copies = _return_sequences(config)
        if copies > 1:  # transformers' _expand_inputs_for_generation
            ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
        stream = _Stream(call["streamer"], ids) if call.get("streamer") is not None else None
        stops = (_Stops(call["tokenizer"], config.stop_strings, ids, pads=bool(eos))
                 if config.stop_strings is not None else None)
        try:
            with self._lock, torch.inference_mode():
                tokens = self._run(model, config, ids, mask, new_tokens=new_tokens, cache_len=cache_len, eos=eos,
                                   pad=pad, compile=compile, stream=stream, stops=stops)
            if stream is not None:
                stream.send(tokens[:, ids.shape[1]:], tokens.shape[1] - ids.shape[1])
                stream.end()
        except StreamerRaised:
            raise
        except Exception as exc:
            if stream is not None and stream.started:
                raise StreamedFailure(f"after streaming tokens: {type(exc).__name__}: {exc}") from exc
            raise
        return tokens.clone()  # a normal tensor, not an inference tensor, as generate returns under no_grad

    def _run(self, model: Any, config: Any, ids: Any, mask: Any, *, new_tokens: int, cache_len: int,
             eos: list[int], pad: int | None, compile: bool, stream: _Stream | None, stops: _Stops | None) -> Any:
        import torch

        batch, prompt_len = ids.shape
        device = ids.device
        total = prompt_len + new_tokens
        cache_len = max(cache_len, total)
        cache = self._static_cache(model, batch, cache_len)
        parameters = _forward_parameters(model)
        cache_arg = "cache" if "cache" in parameters else "past_key_values"
        takes_positions = "position_ids" in parameters

        full_mask = torch.zeros(batch, cache_len, dtype=mask.dtype, device=device)
        full_mask[:, :prompt_len] = mask
        positions = mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 0)
        cache_positions = torch.arange(cache_len, device=device)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        if takes_positions:
            extra["position_ids"] = positions
        out = model(input_ids=ids, attention_mask=full_mask, cache_position=cache_positions[:prompt_len],
                    use_cache=True, **{cache_arg: cache}, **extra)
        logits = out.logits[:, -1, :]
        del out
        rule = rule_for(config, prompt_len=prompt_len, eos=eos)
        selection = Selection(rule, config, ids=ids, mask=mask, vocab=logits.shape[-1], eos=eos,
                              unblock_at=eos_unblock_step(config, prompt_len, eos))
        token, valid = choose(rule, logits, *selection.tensors())
        eos_t = _eos_tensor(eos, device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        if eos_t is not None:
            unfinished = unfinished & ~torch.isin(token, eos_t)
        generated = torch.full((batch, new_tokens), pad if pad is not None else 0, dtype=ids.dtype, device=device)
        generated[:, 0] = token
        position = positions[:, -1:] + 1
        token = token[:, None]
        selection.after_token(0, token, valid)
        step = self._step(model, rule, cache_arg, takes_positions, compile)
        step_scope = compiled_step_scope(model) if compile else contextlib.nullcontext
        pad_t = torch.tensor(pad if pad is not None else 0, device=device)
        state = selection.tensors()
        check_every = STREAM_EVERY if stream is not None or stops is not None else SYNC_EVERY
        can_finish = eos_t is not None or stops is not None

        graphs = compile and device.type == "cuda"
        with _room_for_step_variants() if compile else contextlib.nullcontext():
            for i in range(1, new_tokens):
                slot = prompt_len + i - 1  # the cache slot of the token fed in this step
                full_mask[:, slot] = 1
                if graphs:  # a new CUDA-graph iteration: the previous step's outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                with step_scope():  # the model's SDPA chain, which the compiler traces under
                    outputs = step(model, cache, token, position, cache_positions[slot:slot + 1], full_mask,
                                   unfinished, eos_t, pad_t, *state)
                # Copy into our own buffers before the next replay reuses the graph's output memory.
                for buffer, value in zip((token, position, unfinished), outputs):
                    buffer.copy_(value)
                generated[:, i] = token[:, 0]
                selection.after_token(i, token, outputs[3] if rule.sample else None)
                if i % check_every == 0:
                    selection.check()
                    if stops is not None:
                        stops.scan(generated, i + 1, unfinished, pad_t)
                    done = can_finish and not bool(unfinished.any())
                    if stream is not None:
                        stream.send(generated, _finished_length(generated, eos_t, stops) if done else i + 1)
                    if done:
                        break
        selection.check()
        if stops is not None:
            stops.scan(generated, generated.shape[1], unfinished, pad_t)
        if can_finish:
            generated = generated[:, : _finished_length(generated, eos_t, stops)]
        return torch.cat([ids, generated.to(ids.dtype)], dim=1)

    def _static_cache(self, model: Any, batch: int, cache_len: int) -> Any:
        from transformers import StaticCache

        key = (batch, cache_len, model.dtype, str(model.device))
        if self._cache_key != key:
            self._cache = None  # free the old one first
            self._cache = StaticCache(config=model.config, max_cache_len=cache_len)
            self._cache_key = key
        else:
            self._cache.reset()
        return self._cache

    def _step(self, model: Any, rule: Rule, cache_arg: str, takes_positions: bool,
              compile: bool) -> Callable[..., Any]:
        def decode_one_token(model: Any, cache: Any, token: Any, position: Any, cache_position: Any, mask: Any,
                             unfinished: Any, eos: Any, pad: Any, *state: Any) -> tuple[Any, ...]:
            import torch

            kwargs = {"position_ids": position} if takes_positions else {}
            out = model(input_ids=token, attention_mask=mask, cache_position=cache_position, use_cache=True,
                        **{cache_arg: cache}, **kwargs)
            nxt, valid = choose(rule, out.logits[:, -1, :], *state)
            if eos is not None:
                nxt = torch.where(unfinished, nxt, pad)
                unfinished = unfinished & ~torch.isin(nxt, eos)
            if valid is None:
                return nxt[:, None], position + 1, unfinished
            return nxt[:, None], position + 1, unfinished, valid

        if not compile:
            return decode_one_token
        key = (rule, takes_positions)
        if key not in self._compiled:
            import torch

            mode = "reduce-overhead" if model.device.type == "cuda" else "default"
            self._compiled[key] = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
        return self._compiled[key]


class _Stream:
    """Feeds a streamer what transformers feeds it -- the prompt, then one ``put`` per new token -- in bursts."""

    def __init__(self, streamer: Any, prompt: Any) -> None:
        self.streamer = streamer
        self.prompt = prompt
        self.started = False
        self.sent = 0

    def send(self, generated: Any, upto: int) -> None:
        """Put the new-token columns ``[sent, upto)`` of ``generated`` (batch, new tokens)."""
        if upto <= self.sent:
            return
        if not self.started:
            self.started = True
            self._call(self.streamer.put, self.prompt.cpu())
        chunk = generated[:, self.sent:upto].cpu()  # one device-to-host copy per burst
        for column in range(chunk.shape[1]):
            self._call(self.streamer.put, chunk[:, column].clone())  # its own tensor, as transformers gives
        self.sent = upto

    def end(self) -> None:
        self._call(self.streamer.end)

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:
            raise StreamerRaised(exc) from exc


def _eos_tensor(eos: list[int], device: Any) -> Any:
    """The EOS ids on the device, padded (by repeating one) to a fixed width so the count does not
    make another compiled step; None without EOS."""
    import torch

    if not eos:
        return None
    width = max(len(eos), _EOS_WIDTH)
    return torch.tensor(eos + [eos[0]] * (width - len(eos)), device=device)


def _room_for_step_variants() -> Any:
    """A context raising dynamo's per-function recompile limit to :data:`_STEP_VARIANTS` while the loop runs."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(int(getattr(config, name)), _STEP_VARIANTS)})


class _Stops:
    """Rows that a stop string ends, found on the host every few tokens with transformers' ``StopStringCriteria``.

    Each new column is checked against the sequence up to it, as transformers checks after every
    token; a row that matches at column ``c`` is finished there. With an EOS token its later
    columns become the pad token, on the device too, and the device stops extending it; without
    one, transformers pads nothing (only an EOS criterion turns finished rows into padding), so the
    row keeps its tokens until every row has finished.
    """

    def __init__(self, tokenizer: Any, stop_strings: Any, prompt: Any, *, pads: bool) -> None:
        from transformers.generation.stopping_criteria import StopStringCriteria

        self.criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
        self.pads = pads
        self.prompt = prompt.cpu()
        self.checked = 0
        self.at: dict[int, int] = {}  # row -> the column whose token completed a stop string

    def scan(self, generated: Any, upto: int, unfinished: Any, pad: Any) -> None:
        """Check columns ``[checked, upto)`` of ``generated`` (batch, new tokens) and finish the rows that match."""
        import torch

        if upto <= self.checked:
            return
        host = torch.cat([self.prompt, generated[:, :upto].cpu()], dim=1)
        prompt_len = self.prompt.shape[1]
        for column in range(self.checked, upto):
            hits = self.criteria(host[:, : prompt_len + column + 1], None)
            for row in hits.nonzero()[:, 0].tolist():
                self.at.setdefault(row, column)  # the first match ends the row (an earlier EOS wins later)
        self.checked = upto
        if not self.at:
            return
        unfinished[list(self.at)] = False  # all rows stopped: the loop ends (without EOS the step ignores it)
        if self.pads:
            for row, column in self.at.items():
                generated[row, column + 1:] = pad


def _finished_length(generated: Any, eos: Any, stops: _Stops | None = None) -> int:
    """How many new-token columns transformers keeps: through the step where the last row finished
    (its first EOS, or the token that completed a stop string)."""
    import torch

    rows = generated.shape[0]
    ends = torch.full((rows,), -1, dtype=torch.long)
    if eos is not None:
        hit = torch.isin(generated, eos).cpu()
        ends = torch.where(hit.any(dim=1), hit.int().argmax(dim=1).long(), ends)
    for row, column in (stops.at.items() if stops is not None else ()):
        ends[row] = column if ends[row] < 0 else min(int(ends[row]), column)
    if bool((ends < 0).any()):
        return generated.shape[1]
    return int(ends.max()) + 1
