"""The decode loop: prompt ids in, token ids and text out, one sequence at a time.

    prompt -> prefill (in chunks) -> [sample -> stop? -> decode_one_token] * n -> text (detok + stop strings)

Notable choices:
- The KV cache is allocated once, with capacity `min(len(prompt) + max_tokens, max_position_embeddings)`.
  A prompt that does not fit (len(prompt) >= max_position_embeddings) raises GenerationError. A request whose
  prompt + max_tokens runs past the context is not refused: it generates until the context is full and ends
  with finish_reason "length" (the same reason as hitting max_tokens).
- The prompt is prefilled in chunks of `prefill_chunk_size` tokens so a long prompt never builds a T x T
  attention matrix at once; every chunk uses the LongRoPE factor set of the whole prompt (`rope_mode=`).
- LongRoPE re-prefill policy (phi3-spec.md §4): keys in the cache were rotated with the factor set that was
  active when they were computed. Before every forward the loop asks `model.rope_mode_for(len(sequence))`; if
  it differs from `cache.rope_mode` (the sequence just grew past `original_max_position_embeddings`), it calls
  `cache.reset()` and prefills the whole sequence so far (prompt + generated) again. That happens at most once
  per request, and every step's logits then equal a no-cache forward over the sequence so far -- the
  behaviour of transformers after PR #33129 and of onnxruntime-genai PR #1161.
- Logits for ids >= len(tokenizer) (Phi-3's embedding padding rows 32011-32063) are set to -inf: they are
  never sampled.
- Stops: a stop token id ends generation; it is kept in `token_ids` (and counted in `completion_tokens`, like
  HF's generate) but never in the text. A stop string cuts the text before it; while streaming, text that could
  be the start of a stop string is held back until it is clear. Output text skips special tokens.
- Timing, as `ollama --verbose` prints it: prompt time runs until the first token is sampled (the first token
  comes out of the prefill); decode time covers the tokens after it.

References: gpt-fast `generate.py` (prefill / decode_one_token), vLLM `detokenize_incrementally`, transformers
`Phi3ForCausalLM.prepare_inputs_for_generation` (the re-prefill rule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from pocketlm.engine import cpu
from pocketlm.engine.detok import IncrementalDecoder
from pocketlm.engine.sampling import (SamplingParams, make_generator, model_repetition_penalty, penalized_ids,
                                      sample)
from pocketlm.errors import GenerationError

DEFAULT_PREFILL_CHUNK_SIZE = 512


@dataclass
class GenerationResult:
    """What one request produced, with the numbers `ollama --verbose` prints."""

    text: str
    token_ids: list[int]  # every sampled id, a final stop token included
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_tokens or full context)
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    decode_seconds: float
    prompt_tokens_per_s: float = field(init=False)
    decode_tokens_per_s: float = field(init=False)

    def __post_init__(self):
        self.prompt_tokens_per_s = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0
        decoded = max(self.completion_tokens - 1, 0)  # the first token came out of the prefill
        self.decode_tokens_per_s = decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# model steps


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def prefill(model, cache, ids: Sequence[int], chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE) -> torch.Tensor:
    """Run `ids` into an empty `cache`, `chunk_size` tokens per forward; return the last position's logits (V,).

    Every chunk uses the LongRoPE factor set of the whole sequence (`rope_mode=`), so a prompt longer than
    original_max_position_embeddings is still prefilled in chunks; only the last position's logits are computed.
    """
    assert cache.length == 0, "prefill expects an empty cache"
    mode = model.rope_mode_for(len(ids))
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=_device(model))  # (1, T)
    for start in range(0, len(ids), chunk_size):
        logits = model(tokens[:, start:start + chunk_size], cache, last_only=True, rope_mode=mode)  # (1, 1, V)
    return logits[0, -1]


@torch.inference_mode()
def decode_one_token(model, cache, token_id: int) -> torch.Tensor:
    """Append one token to the cache; return its logits (V,)."""
    tokens = torch.tensor([[token_id]], dtype=torch.long, device=_device(model))  # (1, 1)
    return model(tokens, cache, last_only=True)[0, -1]


def next_logits(model, cache, sequence: Sequence[int], chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE) -> torch.Tensor:
    """Logits after `sequence`, whose ids but the last are in `cache`; applies the LongRoPE re-prefill policy."""
    if cache.length > 0 and cache.rope_mode != model.rope_mode_for(len(sequence)):
        cache.reset()  # cached keys used the other factor set: recompute everything with the new one
        return prefill(model, cache, sequence, chunk_size)
    return decode_one_token(model, cache, sequence[-1])


@torch.inference_mode()
def _pick(logits: torch.Tensor, params: SamplingParams, generator, sequence: list[int], vocab_limit: int,
          constraint=None, stops: frozenset[int] = frozenset()) -> int:
    if vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[vocab_limit:] = -math.inf  # padding rows of the embedding: not real tokens
    if constraint is not None:  # structured output (serve/grammar.py): only the ids the grammar allows
        allowed = torch.tensor(constraint.allowed_ids(), dtype=torch.long, device=logits.device)
        masked = torch.full_like(logits, -math.inf, dtype=torch.float32)
        masked[allowed] = logits.float()[allowed]
        logits = masked
    seen = penalized_ids(sequence, stops) if params.repetition_penalty != 1.0 else ()
    return sample(logits, params, generator, seen_ids=seen)


def check_prompt(model, prompt_ids: Sequence[int]) -> None:
    """Raise GenerationError unless the prompt is non-empty, in the vocabulary and fits the context."""
    n_ctx = model.config.max_position_embeddings
    if len(prompt_ids) == 0:
        raise GenerationError("the prompt is empty: at least one token is needed to generate from")
    if len(prompt_ids) >= n_ctx:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens but the context holds "
                              f"{n_ctx} (max_position_embeddings): at most {n_ctx - 1} prompt tokens leave room "
                              "for one generated token")
    bad = [i for i in prompt_ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise GenerationError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {model.config.vocab_size})")


def generate_ids(model, prompt_ids: Sequence[int], params: SamplingParams, *, stop_token_ids: Iterable[int] = (),
                 vocab_limit: int | None = None,
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE, constraint=None) -> Iterator[int]:
    """Return an iterator over the sampled token ids; the core loop. Bad input raises here, not on iteration.

    The iterator ends after yielding a stop id (`stop_token_ids` plus `params.stop_token_ids`), after
    `params.max_tokens` ids, or when the sequence fills the context. Stop strings are the caller's business (they
    need text). Closing the iterator early stops it.

    Args:
        model: `model(ids (B, T), cache) -> logits (B, T, V)` with `make_cache`, `rope_mode_for`, `config`.
        prompt_ids: the prompt, already tokenized (with BOS if the model wants one).
        params: sampling settings.
        stop_token_ids: ids that end generation.
        vocab_limit: ids >= this are never sampled (default: all `model.config.vocab_size` rows).
        prefill_chunk_size: most prompt tokens per forward during prefill.
        constraint: a `pocketlm.serve.grammar.JsonConstraint` (allowed_ids/advance): each id is sampled among
            the ids it allows (structured output).
    """
    if isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
        raise GenerationError(f"prefill_chunk_size={prefill_chunk_size!r} is invalid: must be an integer >= 1")
    check_prompt(model, prompt_ids)
    vocab_limit = model.config.vocab_size if vocab_limit is None else min(vocab_limit, model.config.vocab_size)
    stops = frozenset(stop_token_ids) | frozenset(params.stop_token_ids)
    return _decode_loop(model, list(prompt_ids), params, stops, vocab_limit, prefill_chunk_size, constraint)


def _decode_loop(model, sequence: list[int], params: SamplingParams, stops: frozenset[int], vocab_limit: int,
                 chunk_size: int, constraint=None) -> Iterator[int]:
    n_ctx = model.config.max_position_embeddings
    budget = min(params.max_tokens, n_ctx - len(sequence))  # the last sampled id is never fed back
    model = cpu.accelerate(model)  # one C call per token when the linears run on the compiled kernels
    cache = model.make_cache(1, min(len(sequence) + params.max_tokens, n_ctx))
    generator = None if params.greedy else make_generator(params, _device(model))
    # a FastDecoder runs a whole token in C (engine/cpu.py): greedy ids come back from C (argmax over the first
    # vocab_limit ids) unless a repetition penalty or a grammar needs the logits; other sampling reads its logits
    # with torch on one thread (on a busy 2-core machine a 2-thread torch op over 49K logits waits for its
    # second thread behind the kernels' workers: measured 420 ms against 24 ms per sampled token at load 17)
    fast = isinstance(model, cpu.FastDecoder) and isinstance(cache, cpu.FastKVCache)
    greedy_in_c = fast and params.greedy and params.repetition_penalty == 1.0 and constraint is None
    logits = prefill(model, cache, sequence, chunk_size)
    token = -1
    for step in range(budget):
        if logits is not None:
            if fast:  # one torch thread: the same ids (the ops are per row), no wait on a second thread
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    token = _pick(logits, params, generator, sequence, vocab_limit, constraint, stops)
                finally:
                    torch.set_num_threads(threads)
            else:
                token = _pick(logits, params, generator, sequence, vocab_limit, constraint, stops)
        if constraint is not None:
            constraint.advance(token)
        sequence.append(token)
        yield token
        if token in stops or step == budget - 1:
            return
        mode = model.rope_mode_for(len(sequence)) if fast else None
        if fast and cache.rope_mode == mode:  # no LongRoPE re-prefill due: one token in C
            if greedy_in_c:
                token, logits = model.decode_argmax(token, cache, vocab_limit, rope_mode=mode), None
            else:
                logits = model.decode_logits(token, cache, rope_mode=mode)  # the decoder's buffer, read by _pick
        else:
            logits = next_logits(model, cache, sequence, chunk_size)


# ----------------------------------------------------------------------------------------------------------------
# text


class StopStringFilter:
    """Cuts streamed text before the first stop string, holding back any tail that may start one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.pending = ""  # text not released yet: a possible start of a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return the part that is safe to show. Sets `stopped` once a stop string appears."""
        if self.stopped or not text:
            return ""
        if not self.stop:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = self._held_tail_length()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def _held_tail_length(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self.stop) - 1
        for k in range(min(longest, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def encode_prompt(tokenizer, prompt_or_messages, *, chat_format: str | None = None) -> tuple[list[int], list[int]]:
    """Return (prompt ids, default stop ids).

    A `str` is raw text, encoded with BOS when the tokenizer wants one and without parsing special tokens; it
    stops on EOS. A list of OpenAI-style messages is rendered by `pocketlm.chat.render` (with the generation
    prompt) and stops on the chat stop tokens plus EOS.
    """
    if isinstance(prompt_or_messages, str):
        ids = tokenizer.encode(prompt_or_messages, add_bos=tokenizer.add_bos_default)
        return ids, [tokenizer.eos_id]
    if isinstance(prompt_or_messages, (list, tuple)):
        from pocketlm import chat  # chat templates are only needed for message lists

        ids = chat.render(list(prompt_or_messages), tokenizer, add_generation_prompt=True, format=chat_format)
        stops = list(chat.stop_token_ids(tokenizer))
        if tokenizer.eos_id not in stops:
            stops.append(tokenizer.eos_id)
        return list(ids), stops
    raise GenerationError(f"prompt must be a str or a list of chat messages, got {type(prompt_or_messages).__name__}")


_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def make_params(params: SamplingParams | None = None, **sampling) -> SamplingParams:
    """SamplingParams from keyword arguments (or `params` with some fields replaced); unknown names raise. A
    repetition_penalty of None counts as not given (the CLI's "the model's own")."""
    if "repetition_penalty" in sampling and sampling["repetition_penalty"] is None:
        sampling = {k: v for k, v in sampling.items() if k != "repetition_penalty"}
    unknown = sorted(set(sampling) - _PARAM_NAMES)
    if unknown:
        raise GenerationError(f"unknown sampling settings {unknown}; valid: {sorted(_PARAM_NAMES)}")
    if params is None:
        return SamplingParams(**sampling)
    base = {f.name: getattr(params, f.name) for f in fields(SamplingParams)}
    return SamplingParams(**(base | sampling))


def stream_events(model, tokenizer, prompt_or_messages, *, params: SamplingParams | None = None,
                  chat_format: str | None = None, prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE,
                  response_format: dict | None = None, **sampling) -> Iterator[str | GenerationResult]:
    """Return an iterator of text chunks as they are produced, ending with one `GenerationResult`.

    Settings and the prompt are checked here (GenerationError), before anything is generated.

    Args:
        model: a `Phi3ForCausalLM` (or anything with the same interface).
        tokenizer: a `pocketlm.tokenizer.Tokenizer`.
        prompt_or_messages: raw text, or a list of `{"role": ..., "content": ...}` messages.
        params: a `SamplingParams`; keyword `sampling` settings override its fields.
        chat_format: passed to `pocketlm.chat.render` for message lists (default: the model's own,
            `model.config.chat_format`, e.g. "chatml" for SmolLM2 and models `pocketlm distill` makes).
        prefill_chunk_size: most prompt tokens per forward.
        response_format: structured output, as in the OpenAI API: {"type": "json_object"}, {"type": "json_schema",
            "json_schema": {"schema": {...}}} (or {"type": "json_schema", "schema": {...}}), and the pocketlm
            extensions {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar": "<Lark or GBNF>"}.
            Needs the `serve` extra (llguidance); a bad schema raises SchemaError.
        **sampling: any `SamplingParams` field (temperature, top_k, top_p, min_p, repetition_penalty, seed,
            max_tokens, stop, stop_token_ids). Without `params`, a repetition_penalty left out (or None) is the
            one the model's file declares (`sampling.model_repetition_penalty`; 1.0 when it declares none).
    """
    if params is None and sampling.get("repetition_penalty") is None:
        sampling["repetition_penalty"] = model_repetition_penalty(model)
    params = make_params(params, **sampling)
    if chat_format is None:
        chat_format = getattr(getattr(model, "config", None), "chat_format", None)
    prompt_ids, default_stops = encode_prompt(tokenizer, prompt_or_messages, chat_format=chat_format)
    stops = frozenset(default_stops) | frozenset(params.stop_token_ids)
    constraint = _constraint(response_format, tokenizer, stops, params.max_tokens) if response_format else None
    t0 = time.perf_counter()
    ids = generate_ids(model, prompt_ids, params, stop_token_ids=stops, vocab_limit=len(tokenizer),
                       prefill_chunk_size=prefill_chunk_size, constraint=constraint)
    return _text_events(ids, tokenizer, params, stops, len(prompt_ids), t0)


def _constraint(response_format: dict, tokenizer, stops, budget: int):
    """The per-sequence grammar constraint for an OpenAI-style `response_format` (see `stream_events`)."""
    from pocketlm.serve import grammar  # needs llguidance (the serve extra)
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise grammar.SchemaError(f"response_format must be a dict with a 'type', got {response_format!r:.80}")
    rf = dict(response_format)
    if rf["type"] == "json_schema" and "schema" not in rf:
        rf["schema"] = (rf.get("json_schema") or {}).get("schema", {})
    return grammar.JsonConstraint(grammar.grammar_for(rf), grammar.token_table(tokenizer), stops, budget=budget)


def _text_events(ids: Iterator[int], tokenizer, params: SamplingParams, stops: frozenset[int], prompt_tokens: int,
                 t0: float) -> Iterator[str | GenerationResult]:
    detok = IncrementalDecoder(tokenizer, skip_special=True)
    text_filter = StopStringFilter(params.stop)
    pieces: list[str] = []
    token_ids: list[int] = []
    finish_reason = "length"
    t_first = None
    try:
        for token in ids:
            if t_first is None:
                t_first = time.perf_counter()
            token_ids.append(token)
            if token in stops:
                finish_reason = "stop"
                break
            piece = text_filter.push(detok.push(token))
            if piece:
                pieces.append(piece)
                yield piece
            if text_filter.stopped:
                finish_reason = "stop"
                break
    finally:
        ids.close()
    tail = text_filter.push(detok.flush())
    finish_reason = "stop" if text_filter.stopped else finish_reason
    tail += text_filter.flush()
    if tail:
        pieces.append(tail)
        yield tail
    t_end = time.perf_counter()
    t_first = t_end if t_first is None else t_first
    yield GenerationResult(text="".join(pieces), token_ids=token_ids, finish_reason=finish_reason,
                           prompt_tokens=prompt_tokens, completion_tokens=len(token_ids),
                           prompt_seconds=t_first - t0, decode_seconds=t_end - t_first)


def stream(model, tokenizer, prompt_or_messages, **kwargs) -> Iterator[str]:
    """Return an iterator over the generated text in chunks as it is produced (same arguments as
    `stream_events`; bad settings raise here)."""
    events = stream_events(model, tokenizer, prompt_or_messages, **kwargs)
    return (event for event in events if isinstance(event, str))


def generate_full(model, tokenizer, prompt_or_messages, **kwargs) -> GenerationResult:
    """Generate to the end; return text, ids, finish reason and timings (same arguments as `stream_events`)."""
    for event in stream_events(model, tokenizer, prompt_or_messages, **kwargs):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("stream_events always ends with a GenerationResult")


def generate(model, tokenizer, prompt_or_messages, **kwargs) -> str:
    """Generate to the end; return the text (same arguments as `stream_events`)."""
    return generate_full(model, tokenizer, prompt_or_messages, **kwargs).text
