"""Data pipeline throughput: documents/s per core for each stage (one process, one thread).

Documents: the first N documents of a corpus JSONL (`--corpus`, e.g. the built Debian-docs corpus), else
synthetic lessons. Each stage runs alone over the same documents in this process; the baseline, measured in
the same run, is the cheapest possible stage (JSON decode + whitespace split), and each stage's ratio is its
docs/s over the baseline's. The edu classifier (MiniLM embeddings) is measured on fewer documents (`--edu-docs`).
Writes a table and `bench/results/bench_data.json`.

    python bench/bench_data.py [--corpus FILE.jsonl] [--docs 2000] [--edu-docs 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", action="append", default=[])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--edu-docs", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_data.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from pocketlm.data.decontam import DecontamIndex
    from pocketlm.data.dedup import DedupConfig, Deduplicator, signature_batch
    from pocketlm.data.filters import C4Lines, FineWebQuality, GopherQuality, GopherRepetition
    from pocketlm.data.knowledge import KnowledgeFilter
    from pocketlm.data.records import Document
    from pocketlm.data.synthetic import generate
    from pocketlm.tokenizer import Tokenizer

    lines = []
    for c in args.corpus:
        with open(c) as f:
            for line in f:
                lines.append(line)
                if len(lines) >= args.docs * (args.corpus.index(c) + 1) // len(args.corpus):
                    break
    if not lines:
        docs, _ = generate(args.docs, seed=0)
        lines = [d.to_json() + "\n" for d in docs]
    docs = [Document.from_dict(json.loads(x)) for x in lines]
    n, chars = len(docs), sum(len(d.text) for d in docs)

    def timed(fn, items):
        t = time.perf_counter()
        fn(items)
        return time.perf_counter() - t

    rows = []

    def add(name, seconds, count=n):
        rows.append({"stage": name, "docs": count, "seconds": round(seconds, 4), "docs_per_s": count / seconds})

    add("baseline: json decode + split", timed(lambda xs: [len(json.loads(x)["text"].split()) for x in xs], lines))
    for f in (GopherRepetition(), GopherQuality(), C4Lines(), FineWebQuality()):
        add(f"filter {f.name}", timed(lambda xs: [f.check(d) for d in xs], docs))
    cfg = DedupConfig()
    t0 = time.perf_counter()
    hashes, sigs = signature_batch([d.text for d in docs], cfg)
    add("dedup minhash signatures", time.perf_counter() - t0)
    dd = Deduplicator(cfg)
    add("dedup LSH decisions (sequential)",
        timed(lambda xs: [dd.check_signed(str(i), h, s) for i, (h, s) in enumerate(xs)], list(zip(hashes, sigs))))
    kf = KnowledgeFilter()
    add("knowledge score", timed(lambda xs: [kf.check(d) for d in xs], docs))
    idx = DecontamIndex()
    for k, d in enumerate(docs[:200:4]):   # 50 fake benchmark items from the corpus itself
        idx.add(f"b:{k}", " ".join(d.text.split()[:30]))
    add("decontam 13-gram", timed(lambda xs: [idx.check(d) for d in xs], docs))
    tok = Tokenizer.default()
    add("tokenize (Phi-3 BPE)", timed(lambda xs: [tok.encode(d.text) for d in xs], docs))
    try:
        from pocketlm.data.edu import Embedder

        emb = Embedder()
        emb.embed(["warm up"])
        sub = [d.text for d in docs[:args.edu_docs]]
        add("edu embed + head (MiniLM, 1 thread)", timed(emb.embed, sub), len(sub))
    except Exception as e:  # report, do not hide
        rows.append({"stage": "edu embed", "error": f"{type(e).__name__}: {e}"})
    base = rows[0]["docs_per_s"]
    print(f"{n} documents, {chars / 1e6:.1f} M characters ({'corpus' if args.corpus else 'synthetic'}); "
          f"{platform.processor() or platform.machine()}, 1 process, 1 thread")
    print(f"{'stage':<40} {'docs':>6} {'seconds':>8} {'docs/s/core':>12} {'vs baseline':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['stage']:<40} {r['error']}")
            continue
        r["ratio_vs_baseline"] = r["docs_per_s"] / base
        print(f"{r['stage']:<40} {r['docs']:>6} {r['seconds']:>8.3f} {r['docs_per_s']:>12.1f} "
              f"{r['ratio_vs_baseline']:>12.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"documents": n, "characters": chars, "corpus": args.corpus,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
