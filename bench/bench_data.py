"""Data pipeline throughput: documents/s per core for each stage (one process, one thread).

Documents: the first N documents of a corpus JSONL (`--corpus`, e.g. the built Debian-docs corpus), else
synthetic lessons. Each stage runs alone over the same documents in this process; the baseline, measured in
the same run, is the cheapest possible stage (JSON decode + whitespace split), and each stage's ratio is its
docs/s over the baseline's. Writes a table and `bench/results/bench_data.json`.

The edu classifier (MiniLM embeddings + ridge head) has its own comparison (`bench_edu`, also alone with
`--edu-only`): today's embedder as it was (`precision="reference"`: transformers BertModel, fp32, padded batches of
32 in input order, 256 tokens) against the fast paths (int8 weights and per-token int8 activations, equal-length
batches, at 256/224/192/160/128 tokens; fp32 at 256), on the same `--edu-docs` real documents (the corpus, else Python
standard-library modules, man pages and package documentation found on this machine), configurations timed in
turn for `--edu-rounds` rounds (other processes share the CPU: ratios from the same round are what to compare).
Speed is documents per CPU-second of this process (= docs/s/core: one torch thread, tokenizers parallelism off)
and per wall second. Agreement with the baseline: Spearman of the edu scores, the share of keep/drop decisions that
match (head trained on the shipped seed annotations with the baseline embedder, or `--edu-head`), kept-set overlap,
the largest score change and the lowest cosine between embeddings. The content cache is timed on a second pass
from its SQLite file. Writes `bench/results/bench_data_edu.json`.

    python bench/bench_data.py [--corpus FILE.jsonl] [--docs 2000] [--edu-docs 256]
    python bench/bench_data.py --edu-only [--corpus FILE.jsonl] [--edu-docs 256] [--edu-rounds 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", action="append", default=[])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--edu-docs", type=int, default=256)
    ap.add_argument("--edu-rounds", type=int, default=2)
    ap.add_argument("--edu-head", default=None, help="a trained edu head folder (default: train one on the seed set)")
    ap.add_argument("--edu-only", action="store_true", help="run only the edu classifier comparison")
    ap.add_argument("--out", default=str(RESULTS / "bench_data.json"))
    ap.add_argument("--edu-out", default=str(RESULTS / "bench_data_edu.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    if args.edu_only:
        bench_edu(args)
        return
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

        emb = Embedder(cache_size=0)
        emb.embed(["warm up"])
        sub = [d.text for d in docs[:args.edu_docs]]
        add("edu embed (MiniLM int8, 1 thread)", timed(emb.embed, sub), len(sub))
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
    bench_edu(args)


RESULTS = Path(__file__).parent / "results"
# (name, Embedder options); the first is today's embedder as it was, the baseline of every ratio
EDU_CONFIGS = [("baseline: reference fp32, 256 tok", {"precision": "reference", "max_length": 256}),
               ("fp32, 256 tok, equal-length batches", {"precision": "fp32", "max_length": 256}),
               ("int8, 256 tok (default)", {"precision": "int8", "max_length": 256}),
               ("int8, 224 tok", {"precision": "int8", "max_length": 224}),
               ("int8, 192 tok", {"precision": "int8", "max_length": 192}),
               ("int8, 160 tok", {"precision": "int8", "max_length": 160}),
               ("int8, 128 tok", {"precision": "int8", "max_length": 128})]


def local_documents(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(source, text) for n real documents present on any Debian-like machine with Python: standard-library
    modules (code), man pages (reference prose) and /usr/share/doc files (licences, release notes, READMEs): the
    mixed quality the edu classifier sees in the corpus. Seeded; the set follows what is installed."""
    from pocketlm.data.corpus import man_to_text

    def read(p: Path) -> str:
        data = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        return data.decode("utf-8", errors="replace")

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"python-src": (sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")), read),
              "man1": (sorted(Path("/usr/share/man/man1").glob("*.1.gz")), lambda p: man_to_text(read(p))),
              "package-docs": (sorted(p for pat in ("*/copyright", "*/NEWS.gz", "*/README*", "*/changelog.gz")
                                      for p in Path("/usr/share/doc").glob(pat) if p.is_file()), read)}
    rng, out = random.Random(seed), []
    for name, (files, convert) in groups.items():
        rng.shuffle(files)
        got = 0
        for f in files:
            if got > n // len(groups):
                break
            try:
                text = convert(f).strip()
            except (OSError, UnicodeError, EOFError):
                continue
            if len(text) >= 200:
                out.append((name, text))
                got += 1
    rng.shuffle(out)
    return out[:n]


def _spearman(a, b) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def bench_edu(args) -> dict:
    """Baseline and fast edu embedders on the same documents, timed in turn; speed, speedup and agreement."""
    import numpy as np
    import torch

    from pocketlm.data.edu import SEED_PATH, EduHead, Embedder, read_annotations, train_head
    from pocketlm.data.records import Document

    torch.set_num_threads(1)
    if args.corpus:
        texts, where = [], "corpus " + ", ".join(args.corpus)
        per = max(1, args.edu_docs // len(args.corpus))
        for c in args.corpus:
            with open(c) as f:
                for k, line in enumerate(f):
                    if k >= per:
                        break
                    texts.append(Document.from_dict(json.loads(line)).text)
    else:
        docs = local_documents(args.edu_docs)
        texts = [t for _, t in docs]
        where = "local documents: " + ", ".join(f"{s} {sum(1 for x, _ in docs if x == s)}"
                                               for s in sorted({x for x, _ in docs}))
    embedders = {name: Embedder(cache_size=0, **opts) for name, opts in EDU_CONFIGS}
    for e in embedders.values():
        e.embed(["warm up: load the model"])
    base_name = EDU_CONFIGS[0][0]
    t0 = time.perf_counter()
    if args.edu_head:
        head, head_from = EduHead.load(args.edu_head), args.edu_head
    else:
        seed_texts, y, _ = read_annotations(SEED_PATH)
        head = train_head(embedders[base_name].embed(seed_texts), y)
        head_from = f"trained on {SEED_PATH.name} ({len(y)} passages) with the baseline embedder"
    print(f"edu head: {head_from} ({time.perf_counter() - t0:.0f} s); cut {head.cut}")
    timings = {name: [] for name in embedders}
    vectors = {}
    for rnd in range(args.edu_rounds):
        for name, e in embedders.items():
            c, w = time.process_time(), time.perf_counter()
            vectors[name] = e.embed(texts)
            timings[name].append((time.process_time() - c, time.perf_counter() - w))
            print(f"  round {rnd + 1} {name}: {timings[name][-1][0]:.1f} CPU s", flush=True)
    n = len(texts)
    ref_scores = head.predict(vectors[base_name])
    ref_keep = head.keep(ref_scores)
    rows = []
    for name, e in embedders.items():
        cpu = [c for c, _ in timings[name]]
        ratio = [timings[base_name][r][0] / cpu[r] for r in range(args.edu_rounds)]   # same-round ratios
        s = head.predict(vectors[name])
        keep = head.keep(s)
        union = int((keep | ref_keep).sum())
        rows.append({"config": name, "options": dict(EDU_CONFIGS)[name], "docs": n,
                     "docs_per_cpu_s": [round(n / c, 2) for c in cpu],
                     "docs_per_wall_s": [round(n / w, 2) for _, w in timings[name]],
                     "speedup_same_round": [round(r, 3) for r in ratio],
                     "speedup_min": round(min(ratio), 3),
                     "spearman_vs_baseline": round(_spearman(ref_scores, s), 4),
                     "decision_agreement": round(float(np.mean(keep == ref_keep)), 4),
                     "kept": int(keep.sum()), "kept_baseline": int(ref_keep.sum()),
                     "kept_overlap_jaccard": round(int((keep & ref_keep).sum()) / union, 4) if union else 1.0,
                     "max_abs_score_change": round(float(np.abs(s - ref_scores).max()), 4),
                     "mean_abs_score_change": round(float(np.abs(s - ref_scores).mean()), 4),
                     "min_cosine_vs_baseline": round(float((vectors[name] * vectors[base_name]).sum(1).min()), 4)})
    # the content cache: a first pass fills the SQLite file, a fresh embedder (a rerun) reads it back
    with tempfile.TemporaryDirectory() as d:
        fill = Embedder(cache_dir=d)
        fill.embed(texts)
        rerun = Embedder(cache_dir=d)
        c, w = time.process_time(), time.perf_counter()
        again = rerun.embed(texts)
        cache_row = {"config": "int8, 256 tok, rerun from the disk cache", "docs": n,
                     "docs_per_cpu_s": [round(n / max(time.process_time() - c, 1e-9), 1)],
                     "docs_per_wall_s": [round(n / (time.perf_counter() - w), 1)],
                     "identical_to_first_pass": bool(np.array_equal(again, vectors["int8, 256 tok (default)"])),
                     "recomputed": rerun.stats["embedded"], "disk_hits": rerun.stats["disk_hits"]}
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    try:
        load = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env = {"cpu": cpu_model, "instruction_set": torch.backends.cpu.get_cpu_capability(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "cores_visible": os.cpu_count(),
           "nice": os.nice(0), "uptime": load, "python": sys.version.split()[0]}
    print(f"\nedu stage: {n} documents ({where}); mean {sum(map(len, texts)) / n:.0f} characters")
    print(f"{env['cpu']}, instruction set {env['instruction_set']}, torch {env['torch']} with {env['torch_threads']} "
          f"thread(s), tokenizers parallelism {env['tokenizers_parallelism']}, nice {env['nice']}")
    print(f"load: {load}")
    print(f"{'configuration':<38} {'docs/s/core':>16} {'speedup':>13} {'spearman':>8} {'decisions':>9} "
          f"{'kept':>7} {'overlap':>7} {'max|ds|':>7}")
    for r in rows:
        rate = "/".join(f"{x:.1f}" for x in r["docs_per_cpu_s"])
        sp = "/".join(f"{x:.2f}" for x in r["speedup_same_round"])
        print(f"{r['config']:<38} {rate:>16} {sp:>13} {r['spearman_vs_baseline']:>8.4f} "
              f"{100 * r['decision_agreement']:>8.1f}% {r['kept']:>3}/{r['kept_baseline']:<3} "
              f"{r['kept_overlap_jaccard']:>7.2f} {r['max_abs_score_change']:>7.3f}")
    print(f"{cache_row['config']:<38} {cache_row['docs_per_cpu_s'][0]:>16.1f}   (recomputed {cache_row['recomputed']}, "
          f"identical {cache_row['identical_to_first_pass']})")
    result = {"documents": n, "source": where, "mean_chars": round(sum(map(len, texts)) / n),
              "head": head_from, "head_cut": head.cut, "rounds": args.edu_rounds, "environment": env,
              "rows": rows, "cache": cache_row}
    Path(args.edu_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.edu_out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.edu_out}")
    return result


if __name__ == "__main__":
    main()
