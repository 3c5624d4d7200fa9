"""Engine contracts (nanochat style): a MockModel with deterministic logits and a small Llama-style byte-fallback
tokenizer stand in for Phi-3, so every test runs on CPU in milliseconds; the real tiny Phi-3 checks chunked
prefill and the LongRoPE re-prefill policy end to end."""

from __future__ import annotations

import functools
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from pocketlm.engine.detok import IncrementalDecoder
from pocketlm.engine.generate import (
    GenerationResult,
    StopStringFilter,
    generate,
    generate_full,
    generate_ids,
    prefill,
    stream,
    stream_events,
)
from pocketlm.engine.sampling import SamplingParams, make_generator, sample
from pocketlm.errors import GenerationError, StaleCacheError

# ----------------------------------------------------------------------------------------------------------------
# mocks


class MockTokenizer:
    """The pocketlm Tokenizer interface over a tiny Llama-2-style vocabulary: "▁" for spaces, byte fallback
    (<0x00>..<0xFF>), one leading space stripped on decode, and four added chat tokens."""

    SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]

    def __init__(self):
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\n中文é":
            vocab.setdefault(c, len(vocab))
        merges = []
        for word in ["▁the", "▁Hello", "▁world", "he", "ll", "▁a", "in", "▁▁", "▁▁▁▁", "中文", "STOP"]:
            cur = word[0]
            for c in word[1:]:
                if cur + c not in vocab:
                    vocab[cur + c] = len(vocab)
                    merges.append((cur, c))
                cur += c
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t in ["<unk>", "<s>", "</s>", *self.SPECIALS]])
        self.tk = tk
        self.bos_id, self.eos_id, self.add_bos_default = 1, 2, True
        self.special_ids = frozenset([0, 1, 2] + [tk.token_to_id(t) for t in self.SPECIALS])
        self.byte_ids = range(3, 259)

    def __len__(self):
        return self.tk.get_vocab_size()

    def token_to_id(self, token):
        return self.tk.token_to_id(token)

    def encode(self, text, *, add_bos=False, parse_special=False):
        ids = self.tk.encode(text, add_special_tokens=False).ids if text else []
        return [self.bos_id] * add_bos + ids

    def decode(self, ids, *, skip_special=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)


TOK = MockTokenizer()
N_PADDING = 24  # embedding rows past the tokenizer, like Phi-3's 32011..32063


class MockCache:
    def __init__(self, capacity):
        self.capacity = capacity
        self.hashes: list[int] = []  # a running hash of (token, position, rope mode) per cached position
        self.rope_mode = None
        self.resets = 0

    @property
    def length(self):
        return len(self.hashes)

    def reset(self):
        self.hashes.clear()
        self.rope_mode = None
        self.resets += 1


class MockModel(torch.nn.Module):
    """Logits at position p are pseudo-random, seeded by a hash of every (token, position, rope mode) up to p, so a
    stale cache changes them. Strongly prefers the padding rows (the engine must mask them) and never wants byte
    or BOS/UNK/EOS tokens. Follows the Phi3ForCausalLM interface, StaleCacheError included."""

    def __init__(self, *, n_ctx=256, scale=3.0, switch_at=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_position_embeddings=n_ctx, vocab_size=len(TOK) + N_PADDING,
                                            bos_token_id=1, eos_token_id=2)
        self.scale, self.switch_at = scale, switch_at
        self.calls: list[tuple[int, int]] = []  # (start, T) of every forward
        self.caches: list[MockCache] = []

    def rope_mode_for(self, seq_len):
        if self.switch_at is None:
            return "default"
        return "long" if seq_len > self.switch_at else "short"

    def make_cache(self, batch_size, capacity):
        if not 0 < capacity <= self.config.max_position_embeddings:
            raise GenerationError(f"capacity {capacity}")
        self.caches.append(MockCache(capacity))
        return self.caches[-1]

    def logits_for(self, h):
        g = torch.Generator().manual_seed(h % (2**62))
        logits = torch.randn(self.config.vocab_size, generator=g) * self.scale
        logits[list(self.byte_and_control_ids)] = -30.0
        logits[len(TOK):] = 30.0
        return logits

    byte_and_control_ids = [0, 1, 2, *TOK.byte_ids]

    def forward(self, input_ids, cache=None, *, last_only=False, rope_mode=None):
        (B, T) = input_ids.shape
        start = cache.length if cache is not None else 0
        L = start + T
        assert L <= self.config.max_position_embeddings
        mode = self.rope_mode_for(L) if rope_mode is None else rope_mode
        if cache is not None:
            assert L <= cache.capacity, "cache overflow"
            if start > 0 and cache.rope_mode != mode:
                raise StaleCacheError(f"{cache.rope_mode} != {mode}")
        self.calls.append((start, T))
        h = cache.hashes[-1] if cache is not None and cache.hashes else 0
        hashes = []
        for i, tok in enumerate(input_ids[0].tolist()):
            h = hash((h, tok, start + i, mode))
            hashes.append(h)
        if cache is not None:
            cache.hashes.extend(hashes)
            cache.rope_mode = mode
        if last_only:
            hashes = hashes[-1:]
        return torch.stack([self.logits_for(h) for h in hashes])[None]  # (1, T or 1, V)


def reference_ids(model, prompt, params, n, vocab_limit=len(TOK)):
    """The slow truth: a full no-cache forward over the sequence so far at every step."""
    seq, out = list(prompt), []
    generator = None if params.greedy else make_generator(params)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1].clone()
        logits[vocab_limit:] = float("-inf")
        token = sample(logits, params, generator, seen_ids=seq if params.repetition_penalty != 1 else ())
        seq.append(token)
        out.append(token)
    return out


PROMPT = "Hello world, the"


def run(model=None, prompt=PROMPT, **kw) -> GenerationResult:
    return generate_full(model or MockModel(), TOK, prompt, **kw)


# ----------------------------------------------------------------------------------------------------------------
# sampling contracts


def test_temperature_zero_ignores_the_seed():
    outs = {tuple(run(temperature=0, seed=s, max_tokens=20).token_ids) for s in (None, 0, 1, 2)}
    assert len(outs) == 1


def test_same_seed_same_output_and_different_seeds_differ():
    flat = MockModel(scale=0.05)  # nearly uniform: high entropy
    a = run(flat, temperature=1.0, seed=123, max_tokens=20)
    b = run(flat, temperature=1.0, seed=123, max_tokens=20)
    c = run(flat, temperature=1.0, seed=124, max_tokens=20)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 40])
def test_completion_tokens_at_most_max_tokens(max_tokens):
    r = run(temperature=0.8, seed=0, max_tokens=max_tokens)
    assert r.completion_tokens == len(r.token_ids) <= max_tokens
    assert r.finish_reason == "length" and r.completion_tokens == max_tokens


def test_padding_ids_are_never_produced():
    # the mock puts +30 on every padding row: unmasked, greedy would pick one at every step
    for kw in (dict(temperature=0), dict(temperature=1.5, seed=1), dict(temperature=1.0, top_k=5, seed=2)):
        r = run(max_tokens=40, **kw)
        assert all(t < len(TOK) for t in r.token_ids)


def test_matches_the_no_cache_reference_loop():
    model = MockModel()
    prompt = TOK.encode(PROMPT, add_bos=True)
    for params in (SamplingParams(temperature=0, max_tokens=25),
                   SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=5, max_tokens=25)):
        ours = list(generate_ids(model, prompt, params, vocab_limit=len(TOK)))
        assert ours == reference_ids(model, prompt, params, 25)


# ----------------------------------------------------------------------------------------------------------------
# stops


@pytest.mark.parametrize("k", [0, 3, 9])
def test_stops_on_a_stop_token_which_is_not_in_the_text(k):
    base = run(temperature=0, max_tokens=30)
    k = base.token_ids.index(base.token_ids[k])  # first occurrence of that id
    stop_id = base.token_ids[k]
    r = run(temperature=0, max_tokens=30, stop_token_ids=[stop_id])
    assert r.finish_reason == "stop"
    assert r.token_ids == base.token_ids[:k + 1]
    assert r.text == TOK.decode(base.token_ids[:k], skip_special=True)


def test_chat_messages_stop_on_the_chat_stop_tokens(monkeypatch):
    """Messages go through chat.render (with chat_format passed on); stops default to the chat stops + EOS."""
    base = run(temperature=0, max_tokens=40)
    stop_id = base.token_ids[4]
    k = base.token_ids.index(stop_id)
    seen = {}

    def render(messages, tokenizer, *, add_generation_prompt=True, format=None):
        seen.update(messages=messages, format=format, add_generation_prompt=add_generation_prompt)
        return TOK.encode(PROMPT, add_bos=True)

    fake_chat = types.SimpleNamespace(render=render, stop_token_ids=lambda tok: [stop_id])
    monkeypatch.setitem(sys.modules, "pocketlm.chat", fake_chat)
    monkeypatch.setattr(sys.modules["pocketlm"], "chat", fake_chat, raising=False)
    messages = [{"role": "user", "content": "hi"}]
    r = generate_full(MockModel(), TOK, messages, temperature=0, max_tokens=40, chat_format="phi3.5")
    assert seen == dict(messages=messages, format="phi3.5", add_generation_prompt=True)
    assert r.finish_reason == "stop" and r.token_ids == base.token_ids[:k + 1]


def boundary_stop_string(ids):
    """A 2-3 character string that starts in one token's text and ends in the next one's, and its position."""
    text = TOK.decode(ids, skip_special=True)
    for i in range(1, len(ids)):
        cut = len(TOK.decode(ids[:i], skip_special=True))
        s = text[cut - 1:cut + 2]
        if 0 < cut < len(text) - 1 and s.strip() and text.find(s) == cut - 1:
            return s
    raise AssertionError("no boundary-straddling substring")


def test_stop_string_split_over_two_tokens_cuts_the_text_before_it():
    base = run(temperature=0, max_tokens=40)
    stop = boundary_stop_string(base.token_ids)
    r = run(temperature=0, max_tokens=40, stop=[stop])
    assert r.finish_reason == "stop"
    assert r.text == base.text[:base.text.find(stop)]
    assert stop not in r.text
    # streaming gives the same text, and no chunk ever showed any part of the stop string
    chunks = list(stream(MockModel(), TOK, PROMPT, temperature=0, max_tokens=40, stop=[stop]))
    assert "".join(chunks) == r.text


def test_earliest_of_several_stop_strings_wins():
    base = run(temperature=0, max_tokens=40)
    text = base.text
    late, early = text[20:23], text[8:10]
    r = run(temperature=0, max_tokens=40, stop=[late, early])
    assert r.text == text[:min(text.find(late), text.find(early))]


def test_stop_string_filter_holds_back_possible_starts():
    f = StopStringFilter(["<END>", "xyz"])
    out = [f.push(p) for p in ["ab<", "E", "N", "x", "D> more"]]
    assert out == ["ab", "", "", "<EN", "xD> more"] and f.flush() == "" and not f.stopped
    f = StopStringFilter(["<END>"])
    assert f.push("hello <EN") == "hello " and f.push("D> tail") == "" and f.stopped and f.flush() == ""


# ----------------------------------------------------------------------------------------------------------------
# streaming, results


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=9, top_k=20)])
def test_streaming_chunks_concatenate_to_the_full_text(kw):
    full = run(max_tokens=40, **kw)
    events = list(stream_events(MockModel(), TOK, PROMPT, max_tokens=40, **kw))
    *chunks, result = events
    assert isinstance(result, GenerationResult) and all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == full.text == result.text
    assert generate(MockModel(), TOK, PROMPT, max_tokens=40, **kw) == full.text
    assert full.text == TOK.decode(full.token_ids, skip_special=True)


def test_result_stats():
    r = run(temperature=0, max_tokens=12)
    assert r.prompt_tokens == len(TOK.encode(PROMPT, add_bos=True))
    assert r.completion_tokens == 12
    assert r.prompt_seconds > 0 and r.decode_seconds > 0
    assert r.prompt_tokens_per_s > 0 and r.decode_tokens_per_s > 0


def test_raw_text_prompt_gets_bos_when_the_tokenizer_wants_it():
    model = MockModel()
    run(model, temperature=0, max_tokens=1)
    assert model.calls[0] == (0, len(TOK.encode(PROMPT, add_bos=True)))


# ----------------------------------------------------------------------------------------------------------------
# context, cache, prefill


def test_cache_capacity_and_prefill_chunks():
    model = MockModel(n_ctx=256)
    prompt = TOK.encode("the world " * 12, add_bos=True)
    params = SamplingParams(temperature=0, max_tokens=10)
    ids = list(generate_ids(model, prompt, params, prefill_chunk_size=8))
    assert model.caches[0].capacity == len(prompt) + 10
    prefill_calls = model.calls[:-(len(ids) - 1)]
    assert [T for _, T in prefill_calls] == [8] * (len(prompt) // 8) + [len(prompt) % 8] * (len(prompt) % 8 > 0)
    assert ids == list(generate_ids(MockModel(n_ctx=256), prompt, params, prefill_chunk_size=512))
    assert all(T == 1 for _, T in model.calls[len(prefill_calls):])


def test_context_full_ends_with_length():
    model = MockModel(n_ctx=24)
    prompt = TOK.encode(PROMPT, add_bos=True)
    r = generate_full(model, TOK, PROMPT, temperature=0, max_tokens=100)
    assert r.finish_reason == "length"
    assert r.completion_tokens == 24 - len(prompt)
    assert model.caches[0].capacity == 24


def test_prompt_that_does_not_fit_raises_with_the_numbers():
    prompt = TOK.encode(PROMPT, add_bos=True)
    with pytest.raises(GenerationError, match=rf"{len(prompt)}.*{len(prompt)}"):
        run(MockModel(n_ctx=len(prompt)), max_tokens=5)
    run(MockModel(n_ctx=len(prompt) + 1), max_tokens=5)  # one slot left: fine, one token


@pytest.mark.parametrize("switch_offset", [1, 5])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=20),
                                    SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.2, max_tokens=20)])
def test_longrope_switch_resets_and_reprefills_once(switch_offset, params):
    prompt = TOK.encode(PROMPT, add_bos=True)
    model = MockModel(switch_at=len(prompt) + switch_offset)
    ours = list(generate_ids(model, prompt, params, vocab_limit=len(TOK), prefill_chunk_size=4))
    cache = model.caches[0]
    assert cache.resets == 1
    assert cache.rope_mode == "long"
    # the re-prefill restarts from position 0, in chunks, at the first length past the switch
    n = len(prompt) + switch_offset + 1
    restart = [i for i, (start, _) in enumerate(model.calls) if start == 0][1]
    assert sum(T for _, T in model.calls[restart:restart + (n + 3) // 4]) == n
    assert ours == reference_ids(model, prompt, params, 20)


def test_long_prompt_past_the_switch_is_prefilled_in_chunks_with_the_long_factors():
    prompt = TOK.encode(PROMPT * 3, add_bos=True)
    model = MockModel(switch_at=10)
    params = SamplingParams(temperature=0, max_tokens=8)
    ours = list(generate_ids(model, prompt, params, vocab_limit=len(TOK), prefill_chunk_size=4))
    assert model.calls[0] == (0, 4) and model.caches[0].resets == 0
    assert ours == reference_ids(model, prompt, params, 8)


def test_ignoring_the_policy_is_caught_by_the_model():
    model = MockModel(switch_at=5)
    cache = model.make_cache(1, 16)
    model(torch.tensor([[1, 5, 6, 7, 8]]), cache)
    with pytest.raises(StaleCacheError):
        model(torch.tensor([[9]]), cache)


# ----------------------------------------------------------------------------------------------------------------
# bad settings


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"), (dict(stop=["s"] * 17), "stop"),
    (dict(seed="x"), "seed"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(temprature=0.5), "temprature"), (dict(prefill_chunk_size=0), "prefill_chunk_size"),
])
def test_bad_settings_raise_generation_error(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        run(**kwargs)


@pytest.mark.parametrize("prompt,match", [("", "empty"), (123, "prompt must be")])
def test_bad_prompts_raise_generation_error(prompt, match):
    tok = MockTokenizer()
    tok.add_bos_default = False
    with pytest.raises(GenerationError, match=match):
        generate_full(MockModel(), tok, prompt)


def test_prompt_ids_outside_the_vocabulary_raise():
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        list(generate_ids(MockModel(), [1, 10_000], SamplingParams()))


# ----------------------------------------------------------------------------------------------------------------
# incremental detokenization

DETOK_CASES = [
    "Hello world", " leading space", "  two leading", "trailing  ", "a\n\nb\t c", "emoji 😀 and 👩‍👩‍👧 family",
    "😀", "中文 mixed with 日本語 and 한국어", "combining a\u0301 e\u0308 and \u0915\u094d\u0937", "   ", "é", "\u200b",
    "the the the", "ünïcödé", "🇫🇷 flags 🇯🇵", "x" * 50,
]


def pushed(tok, ids, **kw):
    dec = IncrementalDecoder(tok, **kw)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def real_tokenizer():
    try:
        from pocketlm.tokenizer import Tokenizer
    except ImportError as e:  # pragma: no cover - written alongside
        pytest.skip(f"pocketlm.tokenizer not importable: {e}")
    return Tokenizer.default()


@pytest.fixture(params=["mock", "phi3"], scope="module")
def any_tok(request):
    return TOK if request.param == "mock" else real_tokenizer()


@pytest.mark.parametrize("text", DETOK_CASES)
def test_incremental_decode_equals_full_decode(text, any_tok):
    ids = any_tok.encode(text)
    pieces, tail = pushed(any_tok, ids)
    assert "".join(pieces) + tail == any_tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces + [tail])


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_incremental_decode_equals_full_decode_for_any_text(text, any_tok):
    ids = any_tok.encode(text)
    pieces, tail = pushed(any_tok, ids)
    assert "".join(pieces) + tail == any_tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces + [tail])


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.sampled_from([i for i in range(len(TOK)) if i not in TOK.byte_ids]), max_size=25))
def test_incremental_decode_of_arbitrary_ids(ids):
    """Random ids (specials, lone spaces, unknowns): still exactly the full decode. (Byte tokens are covered by
    the text tests: a random run of byte tokens is not UTF-8, see the detok module docstring.)"""
    for skip in (False, True):
        pieces, tail = pushed(TOK, ids, skip_special=skip)
        assert "".join(pieces) + tail == TOK.decode(ids, skip_special=skip)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(259, 32010), st.sampled_from([0, 1, 2, 29871, 32000, 32007])),
                    max_size=25))
def test_incremental_decode_of_arbitrary_phi3_ids(ids):
    tok = real_tokenizer()
    for skip in (False, True):
        pieces, tail = pushed(tok, ids, skip_special=skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special=skip)


def test_incremental_decoder_holds_back_partial_utf8():
    ids = TOK.encode("a😀")
    dec = IncrementalDecoder(TOK)
    pieces = [dec.push(i) for i in ids]
    assert pieces[-4:-1] == ["", "", ""] and pieces[-1] == "😀"
    assert pieces[0] == "a"
    dec = IncrementalDecoder(TOK)
    assert [dec.push(i) for i in ids[:-1]] == ["a", "", "", ""]
    assert dec.flush() == "\ufffd" * 3  # an unfinished sequence only shows up when flushed


# ----------------------------------------------------------------------------------------------------------------
# the real tiny Phi-3


@functools.cache
def _tiny_model(overrides: tuple) -> torch.nn.Module:
    try:
        from pocketlm.config import PRESETS, Phi3Config
        from pocketlm.model import Phi3ForCausalLM
    except ImportError as e:  # pragma: no cover - the model is being written alongside
        pytest.skip(f"pocketlm.model not importable: {e}")
    base = "tiny-longrope" if overrides else "tiny"
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**(PRESETS[base] | dict(overrides)))).eval()


def tiny_model(**overrides):
    """A random tiny Phi-3 (the "tiny" preset, or "tiny-longrope" with `overrides`), built once per config."""
    return _tiny_model(tuple(sorted(overrides.items())))


def test_real_tiny_chunked_prefill_equals_one_shot():
    model = tiny_model()
    ids = torch.randint(0, 32000, (1, 45), generator=torch.Generator().manual_seed(0)).tolist()[0]
    full = model(torch.tensor([ids]))[0, -1]
    for chunk in (1, 7, 16, 45, 512):
        cache = model.make_cache(1, 60)
        torch.testing.assert_close(prefill(model, cache, ids, chunk), full, rtol=1e-4, atol=1e-4)
        assert cache.length == 45


def test_real_tiny_greedy_equals_no_cache_reference():
    model = tiny_model()
    prompt = [1, 450, 4996, 17354, 1701, 432, 29889]
    params = SamplingParams(temperature=0, max_tokens=12)
    ours = list(generate_ids(model, prompt, params, vocab_limit=32011, prefill_chunk_size=3))
    assert ours == reference_ids(model, prompt, params, 12, vocab_limit=32011)
    assert all(t < 32011 for t in ours)


def test_real_tiny_longrope_switch_reprefills_and_matches_no_cache():
    model = tiny_model(original_max_position_embeddings=16, max_position_embeddings=256)
    prompt = list(range(100, 112))  # 12 tokens: short factors; crossing 16 happens at the 5th new token
    params = SamplingParams(temperature=0, max_tokens=10)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    try:
        ours = list(generate_ids(model, prompt, params, vocab_limit=32011, prefill_chunk_size=5))
    finally:
        hook.remove()
    # chunked prefill (5, 5, 2), decode steps, then the 17-token re-prefill, chunked too (5, 5, 5, 2)
    assert calls[:3] == [5, 5, 2] and calls[7:11] == [5, 5, 5, 2]
    assert ours == reference_ids(model, prompt, params, 10, vocab_limit=32011)


def test_real_tiny_with_the_phi3_tokenizer_end_to_end():
    model, tok = tiny_model(), real_tokenizer()
    r = generate_full(model, tok, "The capital of France is", temperature=0.8, seed=1, max_tokens=16)
    chunks = list(stream(model, tok, "The capital of France is", temperature=0.8, seed=1, max_tokens=16))
    assert "".join(chunks) == r.text and r.completion_tokens <= 16
    assert all(t < len(tok) for t in r.token_ids)
    assert r.prompt_tokens == len(tok.encode("The capital of France is", add_bos=tok.add_bos_default))


def test_bad_input_raises_before_iteration():
    with pytest.raises(GenerationError, match="top_p"):
        stream(MockModel(), TOK, PROMPT, top_p=2)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        stream_events(MockModel(n_ctx=4), TOK, PROMPT)
    with pytest.raises(GenerationError, match="empty"):
        generate_ids(MockModel(), [], SamplingParams())


def test_closing_a_stream_early_stops_generating():
    model = MockModel()
    chunks = stream(model, TOK, PROMPT, temperature=0, max_tokens=50)
    next(chunks)
    chunks.close()
    n = len(model.calls)
    assert n < 10 and len(model.calls) == n


def test_real_chat_default_stops_are_the_phi3_stop_tokens():
    chat = pytest.importorskip("pocketlm.chat")
    from pocketlm.engine.generate import encode_prompt

    tok = real_tokenizer()
    messages = [{"role": "user", "content": "Hi"}]
    ids, stops = encode_prompt(tok, messages)
    assert ids == chat.render(messages, tok, add_generation_prompt=True)
    assert {32000, 32001, 32007} <= set(stops)
