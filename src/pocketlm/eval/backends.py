"""What a benchmark talks to: a pocketlm model in this process, or any OpenAI-compatible HTTP endpoint.

Both offer the two requests lm-evaluation-harness defines:
- `loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]`;
- `generate([prompt, ...], stop=, max_tokens=) -> [text, ...]`, greedy (temperature 0).
A prompt/context is a string, or (chat format for instruct models) a list of OpenAI-style messages.

PocketLMBackend tokenizes exactly as lm-eval's `TemplateLM._encode_pair` (trailing spaces of the context move to
the continuation; the continuation's tokens are those of `encode(context + continuation)` after the context's
token count; BOS as the tokenizer asks), left-truncates to the context window as lm-eval's HFLM, and computes
requests that share a context together: the context runs through the model once, its keys/values are kept, and
all continuations run as one padded batch against them (`forward_batched` with a prefix cache). Log-softmax is
taken in float32 (lm-eval takes it in the model's dtype; identical for float32 models).

OpenAIBackend: loglikelihood through /v1/completions with `echo: true, logprobs: 1, max_tokens: 1` (the
continuation's tokens are those whose `text_offset` falls after the context, since the server's tokenizer is not
known here; as in `encode_pair`, trailing whitespace of the context counts as the continuation's, since a
SentencePiece tokenizer folds "is " + "blue" into "is" + "▁blue"); generation through
/v1/chat/completions for messages and /v1/completions for text.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Sequence

import torch

from pocketlm.errors import PocketLMError


class EvalBackendError(PocketLMError, RuntimeError):
    """The model or endpoint being evaluated failed or answered something unusable."""


class _PrefixCache:
    """KV 'cache' for forward_batched: records a shared prefix once, then prepends it to every row."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.recording:
            self.k[layer], self.v[layer] = k, v  # (1, n_kv, P, hd)
            return k, v
        if layer not in self.k:
            return k, v
        B = k.shape[0]
        pk, pv = self.k[layer].expand(B, -1, -1, -1), self.v[layer].expand(B, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, n_kv, P + T, hd)


class PocketLMBackend:
    def __init__(self, model, tokenizer, *, chat_format: str | None = None, max_length: int | None = None,
                 batch_size: int = 16):
        self.model, self.tok = model.eval(), tokenizer
        self.chat_format = chat_format or getattr(model.config, "chat_format", None)
        self.max_length = max_length or model.config.max_position_embeddings
        self.batch_size = batch_size
        self.name = f"pocketlm:{model.config.name}" if getattr(model.config, "name", None) else "pocketlm"
        # generation (greedy or sampled) applies the repetition penalty the model file declares, as HF's generate
        # applies generation_config.json's; recorded in the results' config
        from pocketlm.engine.sampling import model_repetition_penalty
        self.repetition_penalty = model_repetition_penalty(model)

    # ---- tokenization (lm-eval `_encode_pair`) ----------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=self.tok.add_bos_default)

    def encode_pair(self, context, continuation: str) -> tuple[list[int], list[int]]:
        if isinstance(context, list):  # chat: the rendered conversation, then the answer text
            from pocketlm import chat
            ctx = list(chat.render(context, self.tok, add_generation_prompt=True, format=self.chat_format))
            return ctx, self.tok.encode(continuation.lstrip(), add_bos=False)
        if context == "":
            bos = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
            return [bos], self.tok.encode(continuation, add_bos=False)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    # ---- log-likelihood -------------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple]) -> list[tuple[float, bool]]:
        encoded = [self.encode_pair(c, x) for c, x in requests]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in enumerate(encoded):
            if not cont:
                raise EvalBackendError(f"continuation {requests[i][1]!r} encodes to no tokens")
            groups.setdefault(tuple(ctx), []).append(i)
        for ctx, idx in groups.items():
            if len(ctx) + max(len(encoded[i][1]) for i in idx) > self.max_length + 1:
                for i in idx:  # too long to share: each one left-truncated as lm-eval does
                    out[i] = self._single(list(ctx), encoded[i][1])
                continue
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                for i, r in zip(chunk, self._shared(list(ctx), [encoded[i][1] for i in chunk])):
                    out[i] = r
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _shared(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        m, dev = self.model, self.model.lm_head.weight.device
        prefix = ctx[:-1]
        P = len(prefix)
        rows = [ctx[-1:] + c[:-1] for c in conts]  # row t predicts c[t]
        B, T = len(rows), max(len(r) for r in rows)
        mode = m.rope_mode_for(P + T)
        cache = _PrefixCache()
        if P:
            pos = torch.arange(P, device=dev)[None]
            m.forward_batched(torch.tensor([prefix], device=dev), pos, m.attention_mask(pos, pos), cache,
                              rope_mode=mode, last_only=True)
        cache.recording = False
        ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        valid = torch.zeros(B, T, dtype=torch.bool, device=dev)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, device=dev)
            valid[b, :len(r)] = True
        q_pos = (P + torch.arange(T, device=dev))[None].expand(B, T)
        k_pos = torch.arange(P + T, device=dev)[None].expand(B, P + T)
        k_valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=dev), valid], dim=1)
        logits = m.forward_batched(ids, q_pos, m.attention_mask(q_pos, k_pos, k_valid=k_valid), cache if P else None,
                                   rope_mode=mode)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        res = []
        for b, c in enumerate(conts):
            tgt = torch.tensor(c, device=dev)
            lp = logp[b, :len(c)]
            res.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
        return res

    @torch.inference_mode()
    def _single(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        inp = (ctx + cont)[-(self.max_length + 1):][:-1]
        dev = self.model.lm_head.weight.device
        logits = self.model(torch.tensor([inp], device=dev))
        lp = torch.log_softmax(logits[0, -len(cont):].float(), dim=-1)
        tgt = torch.tensor(cont, device=dev)
        return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())

    # ---- generation -----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence, *, stop: Sequence[str] = (), max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        """Greedy unless `temperature` > 0 (then sampled with `seed`: same seed, same text)."""
        from pocketlm.engine.generate import generate_full
        out = []
        for p in prompts:
            ids_len = len(self._encode(p)) if isinstance(p, str) else 0
            budget = max(1, min(max_tokens, self.max_length - ids_len - 1)) if ids_len else max_tokens
            if ids_len >= self.max_length:
                raise EvalBackendError(f"prompt of {ids_len} tokens does not fit the {self.max_length}-token "
                                       "context; use fewer --shots")
            sampling = {"temperature": temperature, "repetition_penalty": self.repetition_penalty} | \
                ({"seed": seed} if temperature > 0 else {})
            r = generate_full(self.model, self.tok, p, max_tokens=budget, stop=list(stop),
                              chat_format=self.chat_format, **sampling) if isinstance(p, list) else \
                generate_full(self.model, self.tok, p, max_tokens=budget, stop=list(stop), **sampling)
            out.append(r.text)
        return out


class OpenAIBackend:
    """Any server with the OpenAI HTTP API (the pocketlm server, vLLM, llama.cpp, ...)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0):
        self.base = base_url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.name = f"openai:{model}@{self.base}"

    def _post(self, path: str, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise EvalBackendError(f"{self.base + path}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise EvalBackendError(f"{self.base + path}: {e}") from None

    def loglikelihood(self, requests: Sequence[tuple]) -> list[tuple[float, bool]]:
        out = []
        for context, continuation in requests:
            if isinstance(context, list):
                raise EvalBackendError("log-likelihood scoring of chat messages is not possible through the "
                                       "OpenAI API; use --format letter (generation) for chat endpoints")
            r = self._post("/v1/completions", {"model": self.model, "prompt": context + continuation,
                                               "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
            try:
                lp = r["choices"][0]["logprobs"]
                toks, offs, top = lp["tokens"], lp["text_offset"], lp.get("top_logprobs")
                vals = lp["token_logprobs"]
            except (KeyError, IndexError, TypeError):
                raise EvalBackendError(f"{self.base}/v1/completions did not return echo logprobs; this endpoint "
                                       "cannot score log-likelihood") from None
            start, end = len(context.rstrip()), len(context) + len(continuation)  # see encode_pair
            sel = [i for i, o in enumerate(offs) if start <= o < end]
            if not sel or any(vals[i] is None for i in sel):
                raise EvalBackendError(f"no scored continuation tokens for {continuation!r}")
            greedy = all(top is not None and top[i] and max(top[i], key=top[i].get) == toks[i] for i in sel)
            out.append((float(sum(vals[i] for i in sel)), greedy))
        return out

    def generate(self, prompts: Sequence, *, stop: Sequence[str] = (), max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        from pocketlm.eval.scoring import cut_at_stops
        out = []
        for p in prompts:
            body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature} | \
                ({"seed": seed} if seed is not None and temperature > 0 else {})
            if stop:
                body["stop"] = list(stop)[:4]  # the API takes at most 4; the rest are applied here
            if isinstance(p, list):
                r = self._post("/v1/chat/completions", body | {"messages": p})
                text = _get(r, lambda r: r["choices"][0]["message"]["content"], self.base)
            else:
                r = self._post("/v1/completions", body | {"prompt": p})
                text = _get(r, lambda r: r["choices"][0]["text"], self.base)
            out.append(cut_at_stops(text or "", stop))
        return out


def _get(r, fn, base):
    try:
        return fn(r)
    except (KeyError, IndexError, TypeError):
        raise EvalBackendError(f"{base}: unexpected response {str(r)[:200]}") from None
