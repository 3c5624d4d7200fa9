"""Held-out evaluation sets built procedurally from data no training arm sees: arithmetic multiple choice, cloze
multiple choice from held-out corpus documents, and bits per byte on held-out documents.

API:
    is_heldout(doc_id, fraction=HELDOUT_FRACTION) -> bool
        The document split: sha256(SALT + id) below `fraction`. Every training arm of the data-quality experiment
        drops these ids (corpus ids are kept by the data pipeline, so the same test works on its part files).
    build(out_dir, *, corpus_dir=None, docs=None, n_arith=400, n_cloze=400, n_synth=200, seed=HELDOUT_SEED,
          exclude_texts=(), web_bytes=200_000) -> dict
        Writes out_dir/heldout-arith/test.jsonl, out_dir/heldout-cloze/test.jsonl, out_dir/heldout-ppl/
        {web,synthetic}.jsonl and out_dir/manifest.json (counts, dropped-by-decontamination counts, doc ids,
        chance levels). `docs` (an iterable of {"id", "text", "source"}) replaces reading corpus_dir.
    ARITH_TASK, CLOZE_TASK: `pocketlm.eval.tasks.Task` objects (kind "mc", 0-shot) whose loaders read those files;
        run them with `pocketlm.eval.runner.evaluate(backend, [ARITH_TASK, CLOZE_TASK], overrides={name: folder})`.
        `register_tasks()` adds them to the task registry (not done on import: see "Not registered" below).
    bits_per_byte(model, tokenizer, texts, *, seq_len=256, batch_size=8) -> dict
    evaluate_heldout(model, tokenizer, data_dir, *, limit=None, seq_len=256) -> dict
        acc / acc_norm (mean, stderr, chance) of both MC tasks and bits/byte on web and synthetic.

The sets:
1. heldout-arith: word problems and bracketed expressions from `pocketlm.data.synthetic` (its generators and its
   `safe_eval`, so answers are verified) drawn from a seed namespace no training data uses, then decontaminated:
   an item is dropped when its question (normalised: lowercase, single spaces) occurs in any of `exclude_texts`
   (the training arms' synthetic documents). Prompt "Question: {q}\\nAnswer:", continuations " {number}": the
   answer and 3 distractors (another operation, off by one, off by ten, doubled), shuffled.
2. heldout-cloze: a sentence of a held-out prose document (not code) with one content word removed; the context
   is up to 300 characters of the document before the sentence plus the sentence up to the gap, each continuation
   is " {word}{rest of the sentence}", with the right word or 3 distractor words from the same frequency band
   (floor(log2(count)) of word counts over the held-out documents) that do not occur in the sentence. At most 3
   sentences per document; sources are interleaved round-robin so that no one source dominates.
3. heldout-ppl: held-out web documents (each cut to its first 4,000 characters, sources interleaved, up to
   `web_bytes` UTF-8 bytes in all) and `n_synth` synthetic documents (seed namespace as in 1, exact duplicates of
   training texts dropped). Metric: bits per byte = sum of token NLL (nats) / ln 2 / UTF-8 bytes, each document
   scored from an `<|endoftext|>` token (the separator the training shards put before every document) in
   non-overlapping windows of `seq_len` tokens: tokenizer-independent (Gao et al. 2020, The Pile, section 5).

Scoring is lm-evaluation-harness's: acc = argmax of summed log-likelihood, acc_norm = argmax of log-likelihood /
length in characters (`pocketlm.eval.scoring.mc_metrics`), through `pocketlm.eval.backends.PocketLMBackend`.
Chance is 0.25 for both MC sets (4 choices).

Not registered: adding the two tasks to `pocketlm.eval.tasks.REGISTRY` on import would add them to
`--tasks paper` and `all` (that list is asserted to be the paper's 20/21 rows). `register_tasks()` exists for a
registry that can hold non-paper tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from pocketlm.data import synthetic
from pocketlm.data.synthetic import fmt, safe_eval
from pocketlm.errors import PocketLMError
from pocketlm.eval.tasks import Doc, Task
from pocketlm.fsutil import atomic_write_text

SALT = "pocketlm-heldout-v1:"
HELDOUT_FRACTION = 0.02
HELDOUT_SEED = 90210
CODE_SOURCES = ("python-src",)
CHANCE = 0.25
STOPWORDS = frozenset("""about above after again against also because been before being below between both could
does doing down during each every from further have having here hers herself himself itself just more most other
ought ours ourselves over same should some such than that their theirs them themselves then there these they this
those through under until upon very were what when where which while whom will with would your yours yourself
yourselves into only shall thee thou thy hath unto""".split())


class HeldoutError(PocketLMError, ValueError):
    """The held-out sets cannot be built or read (missing corpus, too few usable items, malformed files)."""


def is_heldout(doc_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    h = int.from_bytes(hashlib.sha256((SALT + doc_id).encode()).digest()[:8], "big")
    return h < fraction * 2 ** 64


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def read_corpus_file(path: str | os.PathLike) -> Iterator[dict]:
    """{"id", "text", "source"} of every document of one corpus JSONL file (source = the file's stem)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                yield {"id": rec["id"], "text": rec["text"], "source": path.stem}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HeldoutError(f"{path}:{n}: not a corpus record ({e})") from None


def read_corpus(corpus_dir: str | os.PathLike) -> Iterator[dict]:
    """{"id", "text", "source"} of every document of corpus_dir/*.jsonl, files in name order."""
    files = sorted(Path(corpus_dir).glob("*.jsonl"))
    if not files:
        raise HeldoutError(f"{corpus_dir}: no *.jsonl corpus files")
    for path in files:
        yield from read_corpus_file(path)


# ---------------------------------------------------------------- 1. arithmetic multiple choice
_SWAP = {"+": "-", "-": "+", "*": "+", "/": "*"}


def _distractors(expr: str, value: Fraction, rng: random.Random) -> list[Fraction]:
    ops = [(m.start(), m.group()) for m in re.finditer(r"(?<=\s)[-+*/](?=\s)", expr)]
    wrong_op = []
    for pos, op in ops:  # the same expression with one operation changed
        try:
            wrong_op.append(safe_eval(expr[:pos] + _SWAP[op] + expr[pos + 1:]))
        except ZeroDivisionError:
            pass
    near = [value + rng.choice([-1, 1]), value + rng.choice([-10, 10])]
    extra = [value * 2, value + 2, value - 2, value + 100]
    out: list[Fraction] = []
    for cand in ([rng.choice(wrong_op)] if wrong_op else []) + near + extra + wrong_op:
        if cand != value and cand not in out and (cand >= 0 or value < 0) and cand.denominator == 1:
            out.append(cand)
        if len(out) == 3:
            return out
    raise HeldoutError(f"no 3 distractors for {expr} = {value}")  # pragma: no cover - extra always gives enough


def arith_items(n: int, seed: int = HELDOUT_SEED, *, exclude_texts: Iterable[str] = ()) -> tuple[list[dict], int]:
    """(n verified multiple-choice items, number dropped by decontamination or as duplicates)."""
    blob = "\n".join(normalise(t) for t in exclude_texts)
    items, seen, dropped, i = [], set(), 0, 0
    while len(items) < n:
        if i > 20 * n + 100:
            raise HeldoutError(f"only {len(items)} of {n} arithmetic items survive decontamination")
        rng = random.Random(f"heldout-arith:{seed}:{i}")
        i += 1
        if rng.random() < 0.6:
            text, info = synthetic.gen_word_problem(rng)
            q = re.match(r"Exercise: (.*?)\n\nSolution:", text, re.S).group(1)
            expr, kind = info["formula"], info["problem"]
        else:
            _, info = synthetic.gen_arithmetic(rng)
            expr, kind = info["expression"], "expression"
            q = f"What is {expr}?"
        value = safe_eval(expr)
        if value.denominator != 1 or fmt(value) != info["answer"]:
            raise HeldoutError(f"{expr}: evaluator gives {fmt(value)}, generator says {info['answer']}")
        core = normalise(q if kind != "expression" else expr)
        if core in seen or (blob and core in blob):
            dropped += 1
            continue
        seen.add(core)
        choices = [value] + _distractors(expr, value, rng)
        order = list(range(4))
        rng.shuffle(order)
        items.append({"id": f"heldout-arith/{len(items):05d}", "context": f"Question: {q}\nAnswer:",
                      "choices": [fmt(choices[k]) for k in order], "gold": order.index(0), "kind": kind,
                      "expression": expr, "answer": fmt(value)})
    return items, dropped


# ---------------------------------------------------------------- 2. cloze multiple choice
_WORD = re.compile(r"[a-z]+")
_SENT = re.compile(r"(?:^|(?<=[.!?] ))[A-Z][^.!?\n]{30,240}[.!?](?= |$)", re.M)


def word_counts(texts: Iterable[str]) -> Counter:
    c: Counter = Counter()
    for t in texts:
        c.update(_WORD.findall(t.lower()))
    return c


def _content(word: str, counts: Counter) -> bool:
    return len(word) >= 4 and word not in STOPWORDS and counts[word] >= 3


def cloze_items(docs: list[dict], n: int, seed: int = HELDOUT_SEED, *, counts: Counter | None = None) -> list[dict]:
    """Up to n cloze items from prose documents ({"id", "text", "source"}), at most 3 per document."""
    counts = counts if counts is not None else word_counts(d["text"] for d in docs)
    bands: dict[int, list[str]] = {}
    for w in sorted(counts):
        if _content(w, counts) and w.isalpha():
            bands.setdefault(int(math.log2(counts[w])), []).append(w)
    rng = random.Random(f"heldout-cloze:{seed}")
    by_src: dict[str, list] = {}
    for d in docs:
        if d.get("source") in CODE_SOURCES:
            continue
        found = 0
        for m in _SENT.finditer(d["text"]):
            sent = m.group()
            words = sent.split()
            alpha = sum(w.strip(",;:.!?'\"()").isalpha() for w in words)
            if not (8 <= len(words) <= 40 and alpha >= 0.85 * len(words)):
                continue
            by_src.setdefault(d.get("source", ""), []).append((d["id"], d["text"], m.start(), sent))
            found += 1
            if found == 3:
                break
    queues = []
    for src in sorted(by_src):  # sources interleaved, so that no one source (a dictionary) dominates
        rng.shuffle(by_src[src])
        queues.append(by_src[src])
    cands = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
    items = []
    for doc_id, text, start, sent in cands:
        if len(items) == n:
            break
        spots = [m for m in re.finditer(r"(?<= )[a-z]+(?=[ ,;:.!?])", sent) if _content(m.group(), counts)]
        if not spots:
            continue
        spot = rng.choice(spots)
        word = spot.group()
        band = int(math.log2(counts[word]))
        in_sent = set(_WORD.findall(sent.lower()))
        pool = [w for b in (band, band - 1, band + 1) for w in bands.get(b, []) if w != word and w not in in_sent]
        if len(pool) < 3:
            continue
        distract = rng.sample(pool[:max(3, len(bands.get(band, [])))], 3)
        before = text[max(0, start - 300):start]
        before = before[before.find(" ") + 1:] if start > 300 else before
        ctx = (before + sent[:spot.start()]).rstrip()
        rest = sent[spot.end():]
        choices = [word] + distract
        order = list(range(4))
        rng.shuffle(order)
        items.append({"id": f"heldout-cloze/{len(items):05d}", "doc": doc_id, "context": ctx,
                      "choices": [choices[k] + rest for k in order], "gold": order.index(0), "word": word,
                      "band": band})
    return items


# ---------------------------------------------------------------- 3. perplexity sets, build
def _web_ppl_docs(docs: list[dict], budget: int) -> list[dict]:
    by_src: dict[str, list[dict]] = {}
    for d in docs:
        by_src.setdefault(d["source"], []).append(d)
    out, used, k = [], 0, 0
    queues = [by_src[s] for s in sorted(by_src)]
    while used < budget and any(k < len(q) for q in queues):
        for q in queues:
            if k < len(q) and used < budget:
                text = q[k]["text"][:4000]
                if text.strip():
                    out.append({"id": q[k]["id"], "source": q[k]["source"], "text": text})
                    used += len(text.encode("utf-8"))
        k += 1
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build(out_dir: str | os.PathLike, *, corpus_dir: str | os.PathLike | None = None, docs: Iterable[dict] | None = None,
          n_arith: int = 400, n_cloze: int = 400, n_synth: int = 200, seed: int = HELDOUT_SEED,
          exclude_texts: Iterable[str] = (), web_bytes: int = 200_000, fraction: float = HELDOUT_FRACTION) -> dict:
    """Write the three held-out sets under out_dir; return the manifest (also written as manifest.json)."""
    if docs is None:
        if corpus_dir is None:
            raise HeldoutError("build needs corpus_dir or docs")
        held = [d for d in read_corpus(corpus_dir) if is_heldout(d["id"], fraction)]
    else:
        held = [d for d in docs if is_heldout(d["id"], fraction)]
    if not held:
        raise HeldoutError(f"no held-out documents (fraction {fraction}) in the corpus")
    exclude = list(exclude_texts)
    out = Path(out_dir)
    arith, arith_dropped = arith_items(n_arith, seed, exclude_texts=exclude)
    cloze = cloze_items(held, n_cloze, seed)
    if len(cloze) < min(n_cloze, 20):
        raise HeldoutError(f"only {len(cloze)} cloze items from {len(held)} held-out documents")
    web = _web_ppl_docs(held, web_bytes)
    train_hashes = {hashlib.sha1(normalise(t).encode()).hexdigest() for t in exclude}
    synth_docs, _ = synthetic.generate(n_synth, seed=seed)
    synth = [{"id": d.id, "source": "synthetic", "text": d.text} for d in synth_docs
             if hashlib.sha1(normalise(d.text).encode()).hexdigest() not in train_hashes]
    _write_jsonl(out / "heldout-arith" / "test.jsonl", arith)
    _write_jsonl(out / "heldout-cloze" / "test.jsonl", cloze)
    _write_jsonl(out / "heldout-ppl" / "web.jsonl", web)
    _write_jsonl(out / "heldout-ppl" / "synthetic.jsonl", synth)
    manifest = {"salt": SALT, "fraction": fraction, "seed": seed, "heldout_documents": len(held),
                "heldout_ids_sha256": hashlib.sha256("\n".join(sorted(d["id"] for d in held)).encode()).hexdigest(),
                "arith": {"items": len(arith), "dropped_decontam_or_duplicate": arith_dropped, "chance": CHANCE},
                "cloze": {"items": len(cloze), "chance": CHANCE},
                "ppl": {"web_docs": len(web), "web_bytes": sum(len(d["text"].encode()) for d in web),
                        "synthetic_docs": len(synth), "synthetic_dropped": n_synth - len(synth),
                        "synthetic_bytes": sum(len(d["text"].encode()) for d in synth)},
                "exclude_texts": len(exclude)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------- tasks
def _load_mc(name: str):
    def load(root: Path) -> tuple[list[Doc], list[Doc]]:
        path = Path(root) / "test.jsonl"
        if not path.is_file():
            raise HeldoutError(f"{path}: missing; build it with pocketlm.eval.heldout.build(out_dir, ...)")
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                r = json.loads(line)
                docs.append(Doc(id=r["id"], text=r["context"], choices=list(r["choices"]), gold=int(r["gold"]),
                                extra={k: v for k, v in r.items() if k not in ("context", "choices", "gold")}))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise HeldoutError(f"{path}:{n}: not a {name} item ({e})") from None
        return docs, []
    return load


ARITH_TASK = Task("heldout-arith", "Held-out arithmetic (MC)", "mc", 0, "heldout-arith",
                  "heldout-arith/test.jsonl written by pocketlm.eval.heldout.build", _load_mc("heldout-arith"),
                  "acc", notes="4 choices, chance 0.25; synthetic-generator items with a held-out seed, decontaminated")
CLOZE_TASK = Task("heldout-cloze", "Held-out cloze (MC)", "mc", 0, "heldout-cloze",
                  "heldout-cloze/test.jsonl written by pocketlm.eval.heldout.build", _load_mc("heldout-cloze"),
                  "acc", notes="4 choices, chance 0.25; sentences of held-out corpus documents")
TASKS = (ARITH_TASK, CLOZE_TASK)


def register_tasks() -> None:
    from pocketlm.eval.tasks import REGISTRY, register
    for t in TASKS:
        if t.name not in REGISTRY:
            register(t)


# ---------------------------------------------------------------- bits per byte
@torch.inference_mode()
def bits_per_byte(model, tokenizer, texts: list[str], *, seq_len: int = 256, batch_size: int = 8) -> dict:
    """Sum of NLL over every token of every text (each after an <|endoftext|>), in bits per UTF-8 byte."""
    sep = tokenizer.eos_id
    windows = []  # (inputs, targets)
    n_bytes = n_tokens = 0
    for t in texts:
        ids = [sep] + tokenizer.encode(t)
        n_bytes += len(t.encode("utf-8"))
        n_tokens += len(ids) - 1
        for s in range(0, len(ids) - 1, seq_len):
            windows.append((ids[s:s + seq_len], ids[s + 1:s + seq_len + 1]))
    if not windows or n_bytes == 0:
        raise HeldoutError("bits_per_byte: no text to score")
    windows.sort(key=lambda w: len(w[0]))  # similar lengths together: less padding
    dev = next(model.parameters()).device
    nll = 0.0
    was_training = model.training
    model.eval()
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo:lo + batch_size]
        T = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), T), sep, dtype=torch.long)
        tgt = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, (x, y) in enumerate(chunk):
            ids[b, :len(x)] = torch.tensor(x)
            tgt[b, :len(y)] = torch.tensor(y)
        logits = model(ids.to(dev))  # causal: right padding does not change the real positions
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), tgt.to(dev).flatten(), ignore_index=-100,
                                     reduction="sum"))
    model.train(was_training)
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "nats_per_token": nll / n_tokens, "bytes": n_bytes,
            "tokens": n_tokens, "documents": len(texts)}


def read_texts(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise HeldoutError(f"{path}: missing; build it with pocketlm.eval.heldout.build(out_dir, ...)")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_heldout(model, tokenizer, data_dir: str | os.PathLike, *, limit: int | None = None, seq_len: int = 256,
                     batch_size: int = 16) -> dict:
    """Both MC tasks (acc, acc_norm with stderr, chance) and bits/byte on web and synthetic, as one dict."""
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.eval.runner import evaluate
    data_dir = Path(data_dir)
    backend = PocketLMBackend(model, tokenizer, batch_size=batch_size)
    run = evaluate(backend, list(TASKS), overrides={t.name: data_dir / t.folder for t in TASKS}, limit=limit,
                   progress=False)
    out: dict = {}
    for t in TASKS:
        r = run["results"][t.name]
        out[t.name] = {"acc": r["metrics"]["acc"]["mean"], "acc_stderr": r["metrics"]["acc"]["stderr"],
                       "acc_norm": r["metrics"]["acc_norm"]["mean"],
                       "acc_norm_stderr": r["metrics"]["acc_norm"]["stderr"], "n": r["n"], "chance": CHANCE}
    for kind in ("web", "synthetic"):
        texts = read_texts(data_dir / "heldout-ppl" / f"{kind}.jsonl")
        out[f"bpb-{kind}"] = bits_per_byte(model, tokenizer, texts[:limit] if limit else texts, seq_len=seq_len)
    return out
