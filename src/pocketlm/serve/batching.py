"""Continuous batching: one scheduler thread owns the model; requests join the running batch between steps.

    submit() -> waiting queue -> free slot? -> prefix cache lookup -> prefill the rest, in 512-token chunks
    (several prompts batched, interleaved with decode steps) -> its keys/values copied into its slot -> every
    decoding row advances in ONE forward_batched call -> per-row sampling, stop tokens/strings, detokenization
    -> events to the request's asyncio queue (delivered once per step: `_Outbox`)

Design (vLLM's and llama.cpp server's scheduler, reduced to one process and one model):
- Models whose linears run on the CPU kernels decode in ONE C call per step instead (`pl_decode_batch`, see
  engine/cpu_batch.py: every layer for every row, each row at its own position, window and LongRoPE factor
  set), and their slot, prefill and prefix caches default to f16, the cache `generate`'s C decoder uses, so a
  greedy reply equals `generate`'s bit for bit; `--kv-cache` still picks another type.
- Slots: `SlotKVCache` holds (layers, slots, n_kv, capacity, head_dim) keys/values; each row is written at its
  own position (`update(layer, k, v)`) and the batch attends over its rows' first L positions with the mask of
  `model.attention_mask` (causal by position, sliding window), so stale keys a previous occupant left beyond a
  row's length are never seen. Capacity grows in 256-position steps up to the context, so idle capacity costs
  no memory.
- Batched, chunked prefill: each step runs at most `prefill_chunk_size` prompt tokens (several short prompts in
  one left-padded `forward_batched` call, or one chunk of a long one alone) and then one decode step for every
  decoding row, so a long prompt delays the other streams' next token by one chunk, not by its whole prefill
  (vLLM's chunked prefill).
- Prefix caching (kvpool.py): a prompt's full 32-token blocks are kept as soon as they are prefilled, and a
  finished sequence's prompt + reply blocks when it ends (LRU, reference-counted chains); a later prompt that
  starts with the same blocks copies their keys/values and prefills only the rest (at least its last token).
  Prompts that arrive together and start with the same uncached block: one computes it, the others wait a step
  and take it from the cache. `n > 1` prefills each prompt once: the choices that wait for it take the same
  keys/values and logits (each then samples with its own generator). Hit/miss tokens go to /metrics.
- KV pool: with `kv_pool_tokens`, admission reserves prompt + max_tokens positions per sequence; a request that
  does not fit what is left gets 429 with Retry-After at once (never a truncated reply later).
- Exactness: a prompt prefilled alone uses the core `model(...)` forward and KVCache exactly as
  `pocketlm.engine.generate.prefill` does (same 512-token chunk boundaries), so its first token equals the
  single-request path bit for bit. A kernels model prefills in C, never through the batched forward: the
  chunks planned in one step share one call (engine/cpu.py `FastDecoder.prefill_chunks`, kernels.c
  `pl_prefill_segs`: every matrix product over all their rows, attention per prompt), and a chunk alone is the
  call `generate` makes; a row's arithmetic does not depend on the chunking or on the other prompts, so each
  prompt's keys, values and logits are those of its prefill alone (tests/test_prefill_c.py); so there a prompt
  resumed from a prefix-cache hit is not cut at the chunk grid, and the hit stops where the last prompt token is
  still computed as `generate` computes it (`_chunk_end`, `_hit_limit`). On the PyTorch path a hit resumes at a
  block boundary on the same chunk grid (see kvpool.py), and prompts prefilled together go through one batched
  forward: both change GEMM shapes, like the batched decode that every row then uses (`forward_batched`). On CPU fp32 the batched decode
  gave identical greedy ids to `generate` in every test we ran (tests/test_serve_load.py checks 32 streams);
  floating-point reduction order is not formally batch-invariant, so on other devices/dtypes a near-tie could
  resolve differently (the comparison to make there is the same batch shape).
- LongRoPE: one factor set serves a whole batch, so the server fixes `model.config.longrope_policy` from its
  context length (long iff context > original_max_position_embeddings, vLLM's rule); see `fix_longrope_policy`.
- Cancellation: `cancel()` marks a request; the scheduler frees its slots before the next step (one decode
  step of latency) and counts exactly one abort per request.
- Admission: at most `max_slots` sequences decode together and `max_queue` more wait; beyond that `submit`
  raises QueueFullError (HTTP 429 with Retry-After). Each request's `n` sequences take one slot each.
- Failure isolation: an exception while serving a step fails the requests in that step (HTTP 500 / an SSE
  error event) and the loop goes on; it never takes the server down.

Sampling per row uses `pocketlm.engine.sampling.sample` with a per-sequence generator (seed + choice index),
after optional logit_bias, OpenAI presence/frequency penalties and the JSON constraint mask (grammar.py). On a
decode step the whole batch's logit_bias goes in with one indexed add (each request's ids and values made
once), the plain greedy rows (no penalty or constraint) take one argmax over the batch (`_accept_rows`; in C
on the kernels) and the greedy rows whose only processing is a repetition penalty (the default model declares
one) get it in one indexed pass and the same argmax: the same picks as per row
(tests/test_serve_step_batched.py); detokenization memoizes the short id windows it decodes (engine/detok.py).
Logprobs are those of the model's distribution after logit_bias and penalties (before temperature, top_p and
the JSON mask), restricted to the tokenizer's real ids.

Echo (completions `echo: true` with `logprobs`): the prompt's log-probabilities come from the prefill itself,
run on this thread (the only one that touches the model): the same chunked forward, with logits kept for every
position (`last_only=False`) instead of the last one, log-softmax over the tokenizer's real ids (padding rows
masked), no logit_bias or penalties. They reach the request as one `{"type": "prompt"}` event before its first
token. With `echo_only` (max_tokens 0) the sequence ends right after its prefill: no token is sampled, its slot
cache is never written. Deviation: with echo+logprobs the first generated token is sampled from the last row of
the full-logits forward; that is the same computation as `last_only`, but the GEMM shape differs, so on some
backends the last bit of a logit could differ from the non-echo path.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from pocketlm.engine import cpu
from pocketlm.engine.cpu_batch import BatchDecoder, argmax_rows
from pocketlm.engine.detok import IncrementalDecoder
from pocketlm.engine.generate import DEFAULT_PREFILL_CHUNK_SIZE, StopStringFilter
from pocketlm.engine.sampling import SamplingParams, make_generator, penalized_ids, penalized_scores, sample
from pocketlm.errors import ConfigError, GenerationError
from pocketlm.kvcache import dense, kv_store
from pocketlm.model import KVCache
from pocketlm.quant.kernels import release_free_memory
from pocketlm.serve.errors import QueueFullError
from pocketlm.serve.kvpool import DEFAULT_BLOCK_SIZE, PrefixCache
from pocketlm.serve.grammar import JsonConstraint, constraint_for, token_table
from pocketlm.serve.schemas import GenRequest

log = logging.getLogger("pocketlm.serve")
CAPACITY_STEP = 256
TRIM_INTERVAL_S = 1.0
"""When the engine goes idle after serving (at most once per this many seconds), glibc's `malloc_trim(0)` gives
the C heap's free pages back to the OS: request bodies, token tensors and logits are allocated by several
threads (the event loop, the scheduler, torch's pool), each with its own malloc arena, and pages freed in an
arena otherwise stay resident, so RSS crept up over thousands of requests with no live object behind it.
bench/soak_serve.py --requests 3000 (tiny): idle RSS less the prefix cache grew 10.4% after warm-up without
this, 2.0% with it (bench/results/soak_serve_3000_{before,after}_trim.json). Live memory is never touched."""
DEFAULT_PREFIX_CACHE_TOKENS = 8192  # prompt positions the prefix cache keeps (LRU beyond that) by default...
DEFAULT_PREFIX_CACHE_BYTES = 512 * 2**20  # ...or fewer, when their keys/values would take more memory than this


def fix_longrope_policy(model, context_length: int) -> str | None:
    """Pin a LongRoPE model's factor set for serving: "long" iff context_length > original_max_position_embeddings.

    Returns the policy set (None for models without LongRoPE). Replaces `model.config` in place.
    """
    c = model.config
    if c.rope_scaling is None:
        return None
    policy = "long" if context_length > c.original_max_position_embeddings else "short"
    model.config = c.replace(longrope_policy=policy)
    return policy


class SlotKVCache:
    """Keys/values of `slots` rows, each row at its own length; the `cache` object `forward_batched` takes."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device, kv_type: str | None = None):
        self.shape = (config.num_hidden_layers, slots, config.num_key_value_heads, 0, config.head_dim)
        self.max_len = max_len
        self.dtype, self.device, self.kv_type = dtype, device, kv_type
        # tensors, or QuantizedKV stores for a quantized --kv-cache (pocketlm.kvcache)
        self.k = kv_store(self.shape, kv_type, dtype, device)
        self.v = kv_store(self.shape, kv_type, dtype, device)
        self.rows = self.pos = None
        self.L = 0
        self.contiguous = False

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def ensure(self, length: int) -> None:
        """Grow the position axis to hold `length` positions (rounded up to CAPACITY_STEP)."""
        if length <= self.capacity:
            return
        assert length <= self.max_len, (length, self.max_len)
        new = min(self.max_len, -(-length // CAPACITY_STEP) * CAPACITY_STEP)
        shape = self.shape[:3] + (new,) + self.shape[4:]
        for name in ("k", "v"):
            old = getattr(self, name)
            t = kv_store(shape, self.kv_type, self.dtype, self.device)
            t[:, :, :, :old.shape[3]] = old
            setattr(self, name, t)

    def load(self, slot: int, kv, n: int) -> None:
        """Copy the first n positions of a batch-1 core KVCache into `slot`."""
        self.ensure(n)
        self.k[:, slot, :, :n] = kv.k[:, 0, :, :n]
        self.v[:, slot, :, :n] = kv.v[:, 0, :, :n]

    def begin(self, rows: list[int], positions: list[int]) -> None:
        """Set the rows (slots) and the position each writes its one new key at, for the next forward."""
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.L = max(positions) + 1
        self.ensure(self.L)
        self.contiguous = rows == list(range(len(rows)))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        assert k.shape[2] == 1, "the slot cache takes one new position per row (decode steps)"
        store = k.to(self.k.dtype) if isinstance(self.k, torch.Tensor) else k  # index_put does not convert dtypes
        self.k[layer, self.rows, :, self.pos] = store[:, :, 0]  # (an f16 cache of an f32 model)
        store = v.to(self.v.dtype) if isinstance(self.v, torch.Tensor) else v
        self.v[layer, self.rows, :, self.pos] = store[:, :, 0]
        if self.contiguous:
            n = len(self.rows)
            return dense(self.k[layer, :n, :, :self.L], k.dtype), dense(self.v[layer, :n, :, :self.L], v.dtype)
        return (dense(self.k[layer, :, :, :self.L][self.rows], k.dtype),
                dense(self.v[layer, :, :, :self.L][self.rows], v.dtype))


@dataclass(eq=False)
class Sequence:
    """One choice of one prompt of a request."""

    req: "EngineRequest"
    index: int  # choice index in the response
    prompt_index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    constraint: JsonConstraint | None
    detok: IncrementalDecoder
    filter: StopStringFilter
    out: list[int] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    slot: int | None = None
    length: int = 0  # positions in the slot cache
    prefill_cache: object = None
    prefill_pos: int = 0
    finished: bool = False
    reserved: int = 0  # KV pool positions held for this sequence (prompt + max_tokens) until it ends
    plain: bool = False  # greedy with no penalty or constraint: its decode-step pick is the batch's argmax
    penalized: bool = False  # greedy with a repetition penalty and nothing else: penalty and pick batched too
    pen_ids: set[int] | None = None  # a penalized row's penalized ids so far (penalized_ids' set), once made
    prompt_scores: list = field(default_factory=list)  # echo: (logprob, [(id, logprob), ...]) per prompt token 1..


@dataclass
class _Chunk:
    """Prompt positions [start, end) of one sequence, prefilled this step with LongRoPE factor set `mode`."""

    seq: Sequence
    start: int
    end: int
    mode: str
    score: bool  # echo with logprobs: every position's logits are needed


class _PrefillBatch:
    """The `cache` forward_batched takes for several prompts' chunks at once: row r holds its `n` new positions
    at the end of the padded T (left padding); each layer's new keys/values go into the row's own batch-1
    KVCache at [start, start + n), and the row attends over that cache's first start + n positions (zeros past
    them, masked by the caller)."""

    def __init__(self, parts: list[tuple[object, int, int]], T: int):
        self.parts, self.T = parts, T
        self.L = max(start + n for _, start, n in parts)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        B, H, _, D = k.shape
        keys, values = k.new_zeros(B, H, self.L, D), v.new_zeros(B, H, self.L, D)
        for r, (kv, start, n) in enumerate(self.parts):
            end = start + n
            kv.k[layer, 0, :, start:end] = k[r, :, self.T - n:]
            kv.v[layer, 0, :, start:end] = v[r, :, self.T - n:]
            keys[r, :, :end] = dense(kv.k[layer, 0, :, :end], k.dtype)
            values[r, :, :end] = dense(kv.v[layer, 0, :, :end], v.dtype)
        return keys, values


@dataclass
class _RowView:
    """One slot row of the slot cache, shaped like a batch-1 KVCache's k/v (what PrefixCache.insert reads)."""

    k: torch.Tensor
    v: torch.Tensor


class _Outbox:
    """Events the scheduler thread emits during one step, delivered when the step ends with ONE
    `call_soon_threadsafe` per event loop: each call writes to the loop's wake-up pipe, so 32 streams would
    otherwise wake the loop (and take the GIL from the scheduler) 32 times a step. Order per request is kept.
    Events emitted from another thread, or outside a step, go out at once."""

    def __init__(self):
        self.items: list | None = None  # (request, event) while a step runs
        self.thread: threading.Thread | None = None

    def open(self) -> None:
        self.items, self.thread = [], threading.current_thread()

    def add(self, req: "EngineRequest", event: dict) -> bool:
        if self.items is None or threading.current_thread() is not self.thread:
            return False
        self.items.append((req, event))
        return True

    def flush(self) -> None:
        items, self.items = self.items or [], None
        by_loop: dict = {}
        for req, event in items:
            by_loop.setdefault(req.loop, []).append((req.queue, event))
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _put_all(events: list) -> None:
    for queue, event in events:
        queue.put_nowait(event)


class EngineRequest:
    """A submitted request: its sequences and the asyncio queue its events go to."""

    _ids = itertools.count()

    def __init__(self, gen: GenRequest, loop, queue, outbox: _Outbox | None = None):
        self.gen = gen
        self.loop = loop
        self.queue = queue
        self.outbox = outbox
        self.number = next(self._ids)
        self.seqs: list[Sequence] = []
        self.cancelled = threading.Event()
        self.aborted = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.unfinished = 0
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # bias_tensors

    def bias_tensors(self, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's logit_bias as (ids (n,) int64, values (n,) float32), ids < V only; made once."""
        if self._bias is None:
            items = [(tid, b) for tid, b in self.gen.logit_bias.items() if tid < V]
            self._bias = (torch.tensor([t for t, _ in items], dtype=torch.int64, device=device),
                          torch.tensor([b for _, b in items], dtype=torch.float32, device=device))
        return self._bias

    def emit(self, event: dict) -> None:
        if self.outbox is not None and self.outbox.add(self, event):
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Engine:
    """The scheduler. `submit` from the event loop; the thread does everything else."""

    def __init__(self, model, tokenizer, *, max_slots: int = 8, max_queue: int = 64, context_length: int | None = None,
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE, metrics=None, prefix_cache: bool = True,
                 prefix_cache_tokens: int | None = None, prefix_block_size: int = DEFAULT_BLOCK_SIZE,
                 kv_pool_tokens: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_length = context_length or model.config.max_position_embeddings
        self.max_slots, self.max_queue = max_slots, max_queue
        if prefill_chunk_size < 1:
            raise ConfigError(f"prefill chunk size {prefill_chunk_size} must be >= 1")
        self.chunk = prefill_chunk_size
        if kv_pool_tokens is not None and kv_pool_tokens < self.context_length:
            raise ConfigError(f"kv_pool_tokens {kv_pool_tokens} must be >= the context length "
                              f"{self.context_length}, so that any one valid request fits an empty pool")
        self.kv_pool_tokens = kv_pool_tokens
        self._reserved = 0  # KV positions promised to admitted sequences (prompt + max_tokens each)
        self.metrics = metrics
        self.vocab_limit = min(len(tokenizer), model.config.vocab_size)
        p = next(model.parameters())
        self.device = p.device
        # decode steps in one C call per step when the linears run on the CPU kernels (engine/cpu_batch.py)
        self.batch_decoder = BatchDecoder.for_model(model) if self.device.type == "cpu" else None
        self.c_decode_steps = 0  # decode steps that went through it
        # prompt chunks in one C call each (engine/cpu.py FastDecoder.prefill_chunk, pl_prefill): the prefill
        # `generate` runs, so a prompt's keys/values and first token are the same as there; its own decoder (own
        # scratch) so that a generate call elsewhere in the process shares nothing with the scheduler thread
        self.fast = None
        if self.batch_decoder is not None and cpu.eligible(model):
            try:
                self.fast = cpu.FastDecoder(model)
            except (GenerationError, ConfigError):
                self.fast = None
        self.c_prefill_chunks = 0  # prompt chunks that went through it
        self.c_prefill_calls = 0  # C prefill calls (one per step when several prompts' chunks share it)
        kv_type = getattr(model, "kv_cache_type", None)  # --kv-cache: the slot, prefill and prefix caches' type
        if kv_type is None and self.batch_decoder is not None:
            kv_type = "f16"  # the C decoder's default, as generate's (engine/cpu.py) and llama.cpp's: same replies
        self.kv_type = kv_type
        self.cache = SlotKVCache(model.config, max_slots, self.context_length, p.dtype, p.device, kv_type)
        self.prefix = None
        if prefix_cache:
            self.prefix = PrefixCache(model.config, max_blocks=0, block_size=prefix_block_size,
                                      dtype=model.lm_head.weight.dtype, kv_type=kv_type)
            if prefix_cache_tokens is None:  # 8192 positions, fewer for a model whose keys/values are large
                per_token = self.prefix.block_bytes / prefix_block_size
                prefix_cache_tokens = min(DEFAULT_PREFIX_CACHE_TOKENS, int(DEFAULT_PREFIX_CACHE_BYTES // per_token))
            if prefix_cache_tokens < 0:
                raise ConfigError(f"prefix_cache_tokens {prefix_cache_tokens} must be >= 0")
            self.prefix.max_blocks = prefix_cache_tokens // prefix_block_size
            if self.prefix.max_blocks == 0:
                self.prefix = None  # too small to hold one block: off
        self.table = token_table(tokenizer)
        self._detok_memo: dict = {}  # short id windows -> text, shared by the requests' IncrementalDecoders
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._free = list(range(max_slots))[::-1]
        self._active: list[Sequence] = []  # holding a slot (prefilling or decoding); scheduler thread only
        self._n_active = 0  # len(_active), readable from other threads under the lock
        self._cancel_flag = False
        self._stop = False
        self._outbox = _Outbox()
        self._worked = False  # steps ran since the last trim of the C heap (see TRIM_INTERVAL_S)
        self._trimmed = 0.0
        self.aborts = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="pocketlm-scheduler", daemon=True)
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------------------------------

    def submit(self, gen: GenRequest, loop, queue) -> EngineRequest:
        req = EngineRequest(gen, loop, queue, self._outbox)
        for p_i, (prompt, params) in enumerate(zip(gen.prompts, gen.params)):
            for j in range(gen.n):
                seed = None if params.seed is None else (params.seed + j) % 2**63
                sp = params if seed == params.seed else SamplingParams(**{**params.__dict__, "seed": seed})
                constraint = (constraint_for(gen.response_format, self.table, gen.stop_token_ids,
                                             budget=sp.max_tokens)
                              if gen.response_format else None)
                greedy_only = (sp.greedy and constraint is None and not gen.presence_penalty
                               and not gen.frequency_penalty)
                req.seqs.append(Sequence(
                    req=req, index=p_i * gen.n + j, prompt_index=p_i, prompt=list(prompt), params=sp,
                    generator=None if sp.greedy else make_generator(sp, self.device), constraint=constraint,
                    detok=IncrementalDecoder(self.tokenizer, skip_special=True, memo=self._detok_memo),
                    filter=StopStringFilter(sp.stop),
                    plain=greedy_only and sp.repetition_penalty == 1.0,
                    penalized=greedy_only and sp.repetition_penalty != 1.0))
        req.unfinished = len(req.seqs)
        with self._cond:
            if self._stop:
                raise QueueFullError("the server is shutting down", retry_after=5)
            if len(self._waiting) + self._n_active + len(req.seqs) > self.max_slots + self.max_queue:
                raise QueueFullError(f"the server is at capacity ({self.max_slots} concurrent sequences and "
                                     f"{self.max_queue} queued); retry later", retry_after=1)
            need = [min(len(s.prompt) + s.params.max_tokens, self.context_length) for s in req.seqs]
            if self.kv_pool_tokens is not None and self._reserved + sum(need) > self.kv_pool_tokens:
                raise QueueFullError(f"the KV cache pool is full: this request needs {sum(need)} positions "
                                     f"(prompt + max_tokens per choice), {self.kv_pool_tokens - self._reserved} of "
                                     f"{self.kv_pool_tokens} are free; retry later", retry_after=2)
            for s, k in zip(req.seqs, need):
                s.reserved = k
            self._reserved += sum(need)
            self._waiting.extend(req.seqs)
            self._cond.notify()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """Stop a request's generation (client gone); idempotent. Its slots are free before the next step."""
        if req.unfinished == 0 or req.cancelled.is_set():
            return
        req.cancelled.set()
        with self._cond:
            self._cancel_flag = True
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"active": self._n_active, "waiting": len(self._waiting), "free_slots": len(self._free),
                    "slots": self.max_slots, "aborts": self.aborts, "steps": self.steps,
                    "cache_capacity": self.cache.capacity, "kv_pool_tokens": self.kv_pool_tokens,
                    "kv_reserved_tokens": self._reserved,
                    **(self.prefix.stats() if self.prefix is not None else {})}

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        for seq in list(self._active) + list(self._waiting):
            if not seq.finished:
                self._fail(seq.req, "the server shut down")

    # ---- the scheduler thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            trim = False
            with self._cond:
                if self._stop:
                    return
                if not self._waiting and not self._active and not self._cancel_flag:
                    if not self._worked or time.monotonic() - self._trimmed < TRIM_INTERVAL_S:
                        self._cond.wait(0.5)
                        continue
                    trim, self._worked = True, False
            if trim:  # idle after serving: the freed heap pages go back to the OS (outside the lock)
                release_free_memory()
                self._trimmed = time.monotonic()
                continue
            with self._cond:
                self._reap_cancelled()
                while self._waiting and self._free:
                    seq = self._waiting.popleft()
                    seq.slot = self._free.pop()
                    self._active.append(seq)
                self._n_active = len(self._active)
            if not self._active:
                continue
            self._outbox.open()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a bug must not kill the loop: fail what was running and go on
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._fail(seq.req, f"internal error during generation ({type(e).__name__})")
            finally:
                self._outbox.flush()  # the step's events, one wake-up per event loop
            self.steps += 1
            self._worked = True

    def _reap_cancelled(self) -> None:
        """Under the lock: drop cancelled requests from the queue and the slots, one abort per request."""
        self._cancel_flag = False
        gone = [s for s in itertools.chain(self._waiting, self._active) if s.req.cancelled.is_set()]
        if not gone:
            return
        self._waiting = collections.deque(s for s in self._waiting if not s.req.cancelled.is_set())
        for seq in gone:
            self._release(seq, locked=True)
        for req in {s.req for s in gone}:
            if not req.aborted:
                req.aborted = True
                self.aborts += 1
                if self.metrics:
                    self.metrics.aborted()

    def _release(self, seq: Sequence, locked: bool = False) -> None:
        if seq.reserved:
            if locked:
                self._reserved -= seq.reserved
            else:
                with self._cond:
                    self._reserved -= seq.reserved
            seq.reserved = 0
        if seq.finished and seq.slot is None:
            return
        seq.finished = True
        seq.prefill_cache = None
        if seq in self._active:
            self._active.remove(seq)
        if seq.slot is not None:
            if locked:
                self._free.append(seq.slot)
            else:
                with self._cond:
                    self._free.append(seq.slot)
            seq.slot = None
        self._n_active = len(self._active)

    def _fail(self, req: EngineRequest, message: str) -> None:
        for seq in req.seqs:
            self._release(seq)
        req.cancelled.set()
        req.unfinished = 0
        req.emit({"type": "error", "message": message})

    def _step(self) -> None:
        # 1) prefill: up to `chunk` prompt tokens, in the chunks `_chunk_end` plans; several prompts' chunks go
        #    through one batched forward or one C call (one prompt alone: exactly the core prefill)
        budget = self.chunk
        leading: set[tuple[int, int]] = set()
        work: list[_Chunk] = []
        for seq in [s for s in self._active if s.length == 0 and not s.finished]:
            key = (seq.req.number, seq.prompt_index)
            if key in leading:
                continue  # a sibling choice (n > 1) prefills this prompt; this one takes its keys/values
            leading.add(key)
            if budget <= 0:
                break
            gen = seq.req.gen
            score = bool(gen.echo and gen.logprobs)
            mode = self.model.rope_mode_for(len(seq.prompt))
            if seq.prefill_cache is None:
                if self.prefix is not None and not score and self._block_in_flight(seq, mode, work):
                    continue  # this step computes the same next block for another prompt: take it next step
                seq.prefill_cache = (self.model.make_cache(1, len(seq.prompt))
                                     if self.kv_type == getattr(self.model, "kv_cache_type", None) else
                                     KVCache(self.model.config, 1, len(seq.prompt), self.cache.dtype, self.device,
                                             self.kv_type))  # the kernels' f16 default (see __init__)
                if self.prefix is not None and not score:  # echo scores need every position's logits
                    seq.prefill_pos = self.prefix.match(seq.prompt, mode, self._hit_limit(seq), seq.prefill_cache)
            start = seq.prefill_pos
            end = self._chunk_end(seq, start)
            work.append(_Chunk(seq, start, end, mode, score))
            budget -= end - start
        for item, logits in self._prefill_forward(work):
            seq = item.seq
            if seq.finished:  # another prompt of its request failed while sampling: the request is over
                continue
            if item.score:
                self._score_prompt(seq, item.start, logits)
            logits = logits[-1]
            seq.prefill_pos = item.end
            kv = seq.prefill_cache
            if self.prefix is not None:  # full blocks become shareable as soon as they are computed
                self.prefix.insert(seq.prompt[:item.end], item.mode, kv)
            if seq.prefill_pos == len(seq.prompt):
                scores = seq.prompt_scores
                seq.prefill_cache, seq.prompt_scores = None, []
                followers = [s for s in self._active if s is not seq and s.req is seq.req and s.length == 0
                             and s.prompt_index == seq.prompt_index and not s.finished and s.prefill_cache is None]
                for s in [seq] + followers:
                    if not s.finished:  # a failed sample of one choice fails (finishes) the whole request
                        self._prefilled(s, kv, logits if s is seq else logits.clone(), scores)
        # 2) one decode step for every row that has a token to feed
        rows = [s for s in self._active if s.length > 0 and not s.finished]
        if not rows:
            return
        if self.batch_decoder is not None and self.batch_decoder.supports(self.cache):
            # all rows through every layer in one C call (engine/cpu_batch.py); each row's own position,
            # sliding window and LongRoPE factor set
            self.cache.ensure(max(s.length for s in rows) + 1)
            logits = self.batch_decoder.step([s.out[-1] for s in rows], [s.slot for s in rows],
                                             [s.length for s in rows], self.cache)
            self.c_decode_steps += 1
        else:
            self.cache.begin([s.slot for s in rows], [s.length for s in rows])
            ids = torch.tensor([[s.out[-1]] for s in rows], device=self.device)
            positions = self.cache.pos[:, None]
            k_pos = torch.arange(self.cache.L, device=self.device)[None, :].expand(len(rows), -1)
            mask = self.model.attention_mask(positions, k_pos)
            logits = self.model.forward_batched(ids, positions, mask, self.cache)
        logits = self._mask_padding(logits)[:, -1]  # (B, vocab)
        self._accept_rows(rows, logits)

    def _accept_rows(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """The decode step's picks: every row's logit_bias in one indexed add (float32 logits, in place: the same
        sums as `_choose`'s on a copy), the plain greedy rows' ids in one argmax over the batch (in C on the
        kernels: `argmax_rows`), then each row's sampling (the others) and bookkeeping (`_accept`).
        logits: (B, vocab), padding masked; row i is rows[i]'s."""
        biased = logits.dtype == torch.float32
        if biased:
            flat, vals = [], []
            V = logits.shape[-1]
            for i, seq in enumerate(rows):
                if seq.req.gen.logit_bias:
                    ids, v = seq.req.bias_tensors(V, logits.device)
                    flat.append(ids + i * V)
                    vals.append(v)
            if flat:  # (row, id) pairs are distinct: one read-add-write per pair
                logits.view(-1).index_add_(0, torch.cat(flat), torch.cat(vals))
        # the batch picks for greedy rows; a row with logit_bias only where the bias is in (float32 logits)
        ready = [not seq.finished and (biased or not seq.req.gen.logit_bias) for seq in rows]
        plain = [i for i, seq in enumerate(rows) if seq.plain and ready[i]]
        pen = [i for i, seq in enumerate(rows) if seq.penalized and ready[i]]
        # a penalized row's logits are penalized in place (nothing reads them afterwards), unless one of them
        # reports logprobs, which are of its unpenalized logits (as `_choose` leaves them): then on a copy
        copied = [i for i in pen if rows[i].req.gen.logprobs]
        if copied:
            pen = [i for i in pen if i not in copied]
            sub = logits[copied]
            self._penalize(sub, [rows[i] for i in copied], range(len(copied)))
            picks = dict(zip(copied, self._argmax(sub)))
        else:
            picks = {}
        if pen:
            self._penalize(logits, [rows[i] for i in pen], pen)
        if plain or pen:  # one argmax over the whole batch (no copy of a subset: a fresh 2 MB buffer every step
            best = self._argmax(logits)  # slowed the next C step by a fifth, measured)
            picks.update((i, best[i]) for i in plain + pen)
        for i, seq in enumerate(rows):
            seq.length += 1
            self._guarded_accept(seq, logits[i], picks.get(i), biased)

    @staticmethod
    def _pen_ids(seq: Sequence) -> set[int]:
        """The ids a penalized row's repetition penalty covers (`penalized_ids` of prompt + output: the stop ids
        left out), kept up to date by `_accept` once made."""
        if seq.pen_ids is None:
            seq.pen_ids = set(penalized_ids(seq.prompt + seq.out, seq.req.gen.stop_token_ids))
        return seq.pen_ids

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence], where) -> None:
        """Each seq's repetition penalty on its penalized ids in row where[k] of `logits`, in place: the ids
        gathered, penalized and written back in one indexed pass per penalty value (`penalized_scores`, as
        `sample`'s apply_repetition_penalty, on the same float values)."""
        by_penalty: dict[float, tuple[list[int], list[int]]] = {}
        for k, seq in zip(where, seqs):
            ids = self._pen_ids(seq)
            r, c = by_penalty.setdefault(seq.params.repetition_penalty, ([], []))
            r.extend([k] * len(ids))
            c.extend(ids)
        for penalty, (r, c) in by_penalty.items():
            if c:
                ix = (torch.tensor(r, device=logits.device), torch.tensor(c, device=logits.device))
                logits[ix] = penalized_scores(logits[ix], penalty)

    def _argmax(self, logits: torch.Tensor) -> list[int]:
        """Each row's greedy pick (B, vocab) -> B ids: in C on the kernels, else torch.argmax."""
        return argmax_rows(logits) if self.batch_decoder is not None else logits.argmax(dim=-1).tolist()

    def _free_chunks(self, seq: Sequence) -> bool:
        """Whether `seq`'s prompt chunks may end anywhere: on the kernels (pl_prefill computes every row alone, so
        a row's keys, values and logits do not depend on the chunk it is in) with a prefill cache C stores into."""
        return self.fast is not None and self.fast.c_prefill and cpu.cache_view(seq.prefill_cache) is not None

    def _generate_alone_row(self, seq: Sequence) -> bool:
        """Whether `generate` computes this prompt's last token alone: a last chunk of one token (length % chunk
        == 1) is the decode step's arithmetic there, which can differ from a prefill row's in float rounding."""
        return len(seq.prompt) > 1 and len(seq.prompt) % self.chunk == 1

    def _hit_limit(self, seq: Sequence) -> int:
        """The most prompt tokens a prefix hit may cover. At least the last token is computed (its logits give
        the first sampled token); on the kernels at least two, unless generate computes the last one alone, so
        that the last row is computed by the same arithmetic as in `generate` (a prefill row or the decode step)."""
        n = len(seq.prompt)
        if self._free_chunks(seq) and not self._generate_alone_row(seq):
            return max(0, n - 2)
        return n - 1

    def _chunk_end(self, seq: Sequence, start: int) -> int:
        """Where the prompt chunk from `start` ends. In PyTorch: generate.prefill's grid (multiples of `chunk`),
        whose chunks give the same floats as `generate`. On the kernels (`_free_chunks`) a chunk resumed from the
        prefix cache is not cut at the grid: a 500-token system prompt hit at 480 finishes in one 45-token chunk,
        not [480, 512) and [512, 525) in two steps; the last token stays alone where generate's is."""
        n, c = len(seq.prompt), self.chunk
        if not self._free_chunks(seq):
            return min(n, (start // c + 1) * c)
        last = n - 1 if self._generate_alone_row(seq) else n  # rows [start, last) in prefill chunks
        if start >= last:
            return n  # the last token alone, as in generate
        end = min(last, start + c)
        if last - end == 1 and end - start > 2:
            end -= 1  # never leave a one-token chunk (it would not be a prefill row: `_c_prefill`)
        return end

    def _block_in_flight(self, seq: Sequence, mode: str, work: list["_Chunk"]) -> bool:
        """Whether a chunk already planned this step computes the block `seq` would prefill first (the same
        tokens from position 0): then `seq` waits one step and takes that block from the prefix cache."""
        bs = self.prefix.block_size
        h = self.prefix.cached_len(seq.prompt, mode, len(seq.prompt) - 1)
        if h + bs > len(seq.prompt) - 1:
            return False  # only a partial block is left to compute: nothing to share
        head = seq.prompt[:h + bs]
        return any(w.mode == mode and w.start <= h and w.end >= h + bs and w.seq.prompt[:h + bs] == head
                   for w in work)

    def _prefill_forward(self, work: list["_Chunk"]):
        """Run the planned prompt chunks; yield (chunk, logits (T, V) or (1, V)) with padding ids masked.

        One chunk (or an echo-scoring one) runs alone through `model(...)` with its batch-1 cache, exactly as
        `generate.prefill` does; the others of one LongRoPE mode go through one `forward_batched` call, left-padded
        so that every row's last real token is the last position (`last_only`)."""
        batched: dict[str, list[_Chunk]] = {}
        in_c = [item for item in work if not item.score and self._c_prefill(item)]
        shared = {id(w) for w in in_c} if len(in_c) > 1 else set()
        if shared:  # every C chunk in one call: the matrix products shared, attention per prompt
            self.c_prefill_chunks += len(in_c)
            self.c_prefill_calls += 1
            out = self.fast.prefill_chunks([(torch.tensor([w.seq.prompt[w.start:w.end]], device=self.device),
                                             w.seq.prefill_cache, w.mode) for w in in_c])
            for w, logits in zip(in_c, out):
                yield w, self._mask_padding(logits)[0]
        for item in work:
            if id(item) in shared:
                continue
            if item.score or self._c_prefill(item):  # one C chunk alone, as generate does
                yield item, self._prefill_alone(item)
            else:
                batched.setdefault(item.mode, []).append(item)
        for mode, items in batched.items():
            if len(items) == 1:
                yield items[0], self._prefill_alone(items[0])
                continue
            T = max(w.end - w.start for w in items)
            parts = [(w.seq.prefill_cache, w.start, w.end - w.start) for w in items]
            cache = _PrefillBatch(parts, T)
            pad = 0  # any id: padded positions are masked out of every real query's keys and discarded
            ids = torch.tensor([[pad] * (T - (w.end - w.start)) + w.seq.prompt[w.start:w.end] for w in items],
                               device=self.device)
            positions = torch.tensor([[max(w.start, w.end - T + t) for t in range(T)] for w in items],
                                     device=self.device)
            k_pos = torch.arange(cache.L, device=self.device)[None, :].expand(len(items), -1)
            ends = torch.tensor([w.end for w in items], device=self.device)
            mask = self.model.attention_mask(positions, k_pos, k_valid=k_pos < ends[:, None])
            logits = self._mask_padding(self.model.forward_batched(ids, positions, mask, cache, rope_mode=mode,
                                                                   last_only=True))
            for w in items:
                w.seq.prefill_cache.length, w.seq.prefill_cache.rope_mode = w.end, mode
            for i, w in enumerate(items):
                yield w, logits[i]

    def _c_prefill(self, item: "_Chunk") -> bool:
        """Whether this chunk runs in C (pl_prefill): a kernels model and a prefill cache C stores into, more
        than one token (one token is the decode step's arithmetic in `generate` too: the core forward here)."""
        return self.fast is not None and item.end - item.start > 1 and \
            cpu.cache_view(item.seq.prefill_cache) is not None

    def _prefill_alone(self, item: "_Chunk") -> torch.Tensor:
        seq = item.seq
        tokens = torch.tensor([seq.prompt[item.start:item.end]], device=self.device)
        if self._c_prefill(item):
            self.c_prefill_chunks += 1
            self.c_prefill_calls += 1
            return self._mask_padding(self.fast.prefill_chunk(tokens, seq.prefill_cache, last_only=not item.score,
                                                              rope_mode=item.mode))[0]
        return self._mask_padding(self.model(tokens, seq.prefill_cache, last_only=not item.score,
                                             rope_mode=item.mode))[0]

    def _prefilled(self, seq: Sequence, kv, logits: torch.Tensor, scores: list) -> None:
        """A prompt's prefill is done (kv: its batch-1 cache, logits: its last position's): echo its scores, load
        its keys/values into the sequence's slot and sample the first token. Called once per choice (n > 1
        shares one prefill)."""
        gen = seq.req.gen
        if gen.echo:
            seq.req.emit({"type": "prompt", "index": seq.index, "scores": scores})
        if gen.echo_only:
            self._finish_echo_only(seq)
            return
        self.cache.load(seq.slot, kv, len(seq.prompt))
        seq.length = len(seq.prompt)
        self._guarded_accept(seq, logits)

    def _keep_conversation(self, seq: Sequence) -> None:
        """A finished sequence's prompt + reply blocks go to the prefix cache (from its slot row), so a chat client
        that resends the conversation with one more message prefills only that message. Skipped under the
        "dynamic" LongRoPE policy, where decode steps of a mixed batch may use another factor set than the
        prompt's (the server pins a static policy: `fix_longrope_policy`)."""
        c = self.model.config
        if self.prefix is None or seq.slot is None or seq.length == 0 or (
                c.rope_scaling is not None and c.longrope_policy == "dynamic"):
            return
        tokens = (seq.prompt + seq.out)[:seq.length]  # every id whose keys/values the slot row holds
        row = _RowView(self.cache.k[:, seq.slot:seq.slot + 1], self.cache.v[:, seq.slot:seq.slot + 1])
        self.prefix.insert(tokens, self.model.rope_mode_for(len(seq.prompt)), row)

    def _score_prompt(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Echo: logits (T, V) of prompt positions start..start+T-1 (padding masked) -> the logprob (and top-k)
        of each next prompt token."""
        targets = seq.prompt[start + 1:start + 1 + logits.shape[0]]
        if not targets:
            return
        lp = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
        tgt = torch.tensor(targets, dtype=torch.long, device=lp.device)
        vals = lp.gather(1, tgt[:, None])[:, 0].tolist()
        k = seq.req.gen.top_logprobs
        if k:
            top = torch.topk(lp, k)
            tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [[] for _ in vals]
        seq.prompt_scores.extend(zip(vals, tops))

    def _finish_echo_only(self, seq: Sequence) -> None:
        """max_tokens 0 with echo: the prompt was scored; end the sequence without sampling anything."""
        req = seq.req
        if req.t_first is None:
            req.t_first = time.perf_counter()
        req.emit({"type": "token", "index": seq.index, "text": "", "finish_reason": "length",
                  "completion_tokens": 0})
        self._release(seq)
        req.unfinished -= 1
        if req.unfinished == 0:
            req.emit({"type": "done"})

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Embedding rows past the tokenizer are never sampled: -inf in place, as `generate._pick` does on a copy
        (the same full-size tensor reaches the sampler, so seeded draws match the single-request path)."""
        if self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit:] = -math.inf
        return logits

    def _guarded_accept(self, seq: Sequence, logits: torch.Tensor, token: int | None = None,
                        biased: bool = False) -> None:
        try:
            self._accept(seq, logits, token, biased)
        except Exception as e:
            log.exception("sampling failed")
            self._fail(seq.req, f"internal error while sampling ({type(e).__name__})")

    # ---- one row's token -----------------------------------------------------------------------------------------

    def _choose(self, seq: Sequence, logits: torch.Tensor, biased: bool = False) -> tuple[int, torch.Tensor]:
        """Pick the next id; return it with the row's processed logits (ids past the tokenizer at -inf).
        biased: the row's logit_bias is already added (in place, float32: `_accept_rows`)."""
        gen = seq.req.gen
        lg = logits  # ids past the tokenizer are already -inf (`_mask_padding`)
        bias = gen.logit_bias if not biased else {}
        if bias or gen.presence_penalty or gen.frequency_penalty:
            lg = lg.float().clone()
            for tid, b in bias.items():
                if tid < lg.shape[0]:
                    lg[tid] += b
            if seq.counts and (gen.presence_penalty or gen.frequency_penalty):
                ids = torch.tensor(list(seq.counts), device=lg.device)
                cnt = torch.tensor(list(seq.counts.values()), dtype=lg.dtype, device=lg.device)
                lg[ids] -= gen.presence_penalty + gen.frequency_penalty * cnt
        seen = (penalized_ids(seq.prompt + seq.out, seq.req.gen.stop_token_ids)
                if seq.params.repetition_penalty != 1.0 else ())
        c = seq.constraint
        if c is None:
            return sample(lg, seq.params, seq.generator, seen_ids=seen), lg
        if seq.params.greedy and seq.params.repetition_penalty == 1.0:
            for tid in torch.topk(lg, 64).indices.tolist():  # usually the best candidate already fits
                if c.allows(tid):
                    return tid, lg
        allowed = torch.tensor(c.allowed_ids(), dtype=torch.long, device=lg.device)
        masked = torch.full_like(lg, -math.inf, dtype=torch.float32)
        masked[allowed] = lg.float()[allowed]
        return sample(masked, seq.params, seq.generator, seen_ids=seen), lg

    def _accept(self, seq: Sequence, logits: torch.Tensor, token: int | None = None, biased: bool = False) -> None:
        """Take the row's next id (`token` when the batch already picked it: `_accept_rows`) and emit it."""
        if seq.finished:
            return
        req = seq.req
        if token is None:
            token, lg = self._choose(seq, logits, biased)
        else:
            lg = logits
        seq.out.append(token)
        seq.counts[token] += 1
        if seq.pen_ids is not None and token not in req.gen.stop_token_ids:
            seq.pen_ids.add(token)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        event = {"type": "token", "index": seq.index, "token": token, "text": "", "finish_reason": None}
        if req.gen.logprobs:
            lp = torch.log_softmax(lg.float(), dim=-1)
            event["logprob"] = float(lp[token])
            if req.gen.top_logprobs:
                top = torch.topk(lp, req.gen.top_logprobs)
                event["top"] = list(zip(top.indices.tolist(), top.values.tolist()))
        finish = None
        if token in req.gen.stop_token_ids:
            finish = "stop"
        else:
            event["text"] = seq.filter.push(seq.detok.push(token))
            if seq.filter.stopped:
                finish = "stop"
        if finish is None and len(seq.out) >= seq.params.max_tokens:
            finish = "length"
        if finish is not None:  # the same tail handling as pocketlm.engine.generate._text_events
            tail = seq.filter.push(seq.detok.flush())
            finish = "stop" if seq.filter.stopped else finish
            event["text"] += tail + seq.filter.flush()
            event["finish_reason"] = finish
            event["completion_tokens"] = len(seq.out)
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
            if self.metrics:
                self.metrics.first_token(now - req.t_submit)
        if self.metrics:
            self.metrics.token()
        req.emit(event)
        if finish is not None:
            self._keep_conversation(seq)
            self._release(seq)
            req.unfinished -= 1
            if req.unfinished == 0:
                req.emit({"type": "done"})
