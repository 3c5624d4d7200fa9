"""The data pipeline: read -> filter -> dedup -> edu score -> knowledge -> decontaminate -> tokenize + pack.

Layout of the output folder `out/` (all paths relative to it):

    parts/<stage>/<source>/<part>.jsonl      documents after each stage (JSONL, `records.Document`)
    rejects/<stage>/<source>/<part>.jsonl    dropped documents with metadata["reject_reason"]
    markers/<stage>/<source>/<part>.json     completion marker + stats (docs/tokens in/out, reasons)
    dedup/signatures/<source>/<part>.npz     MinHash signatures (step 1, per part, in parallel)
    dedup/decisions.json                     the global keep/drop decisions (step 2, one pass in stream order)
    decontam-index.json                      the benchmark n-gram index
    tokens/<phase>/<source>/                 token shards (`pocketlm.data.shards` format, index.json)
    tokens/mixture.json                      phase -> source -> {path, weight, tokens, documents}
    report/report.json, report.md, *.png     per-stage docs/tokens in/out, reject reasons, histograms

Resumability: every unit of work (a part of a stage) writes its outputs atomically (`pocketlm.fsutil`), then
its marker; a unit whose marker exists is skipped on the next run, and an output without a marker is redone,
with the same bytes because every stage is deterministic (documents keep their stream order: source order of
the config, then part order, then position; dedup keeps the first of a cluster; MinHash and synthetic data are
seeded; edu embeddings run with one torch thread per worker). Token shard folders appear atomically (the shard
writer renames `<folder>.tmp/` after writing index.json), so a crash never leaves a half-written shard folder
that looks complete. `tokens/mixture.json` is written last. Killing a run at any point and running it again
gives byte-identical shards (tested with SIGKILL in tests/test_data_pipeline.py).

Parallelism: units of a stage run in a `multiprocessing` pool (`workers`, default all cores, fork start
method); the dedup decision pass and the shard writer are the only sequential steps. Progress bars: tqdm on
stderr. For corpora beyond one machine, `pocketlm.data.distributed` runs the same unit functions on Dask.

Configuration: a JSON file (see `PipelineConfig`; `assets/pipeline-example.json` is the run over the Debian-docs
corpus of `corpus.py`); `pocketlm data run CONFIG`. Mixture phases follow Phi-3
(phi3-spec.md section 6): phase 1 mostly web, phase 2 "even more heavily filtered web data (a subset used in
phase 1) with some synthetic data"; a phase names sources with a weight and a selection: `edu_keep` (the edu
head's chosen cut), `min_edu` (a raw-score floor), `exclude_demoted` (the knowledge filter's tag).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pocketlm.data.records import DataPipelineError, Document, encode_part, read_part
from pocketlm.fsutil import atomic_write_bytes, atomic_write_text

STAGES = ("read", "filter", "dedup", "edu", "knowledge", "decontam")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class SourceSpec:
    name: str
    kind: str = "web"                   # web | code | synthetic
    path: str | None = None             # file or folder (web/code)
    filters: Any = "default"            # "default" | None/{} (no filters) | filters.build_filters spec
    count: int = 0                      # synthetic: documents
    seed: int = 0                       # synthetic: seed
    generators: list[str] | None = None  # synthetic: which generators


@dataclass
class PipelineConfig:
    sources: list[SourceSpec]
    out: str = "data-out"
    part_docs: int = 500
    files_per_task: int = 64
    lines_per_task: int = 2000          # a JSONL file is read in chunks of this many lines, in parallel
    workers: int = 0                    # 0: os.cpu_count()
    filters: Any = None                 # default filter spec for web sources (None: all four, defaults)
    code_filters: Any = field(default_factory=lambda: {"gopher_repetition": {}})
    dedup: dict | None = field(default_factory=dict)    # DedupConfig fields; None disables
    edu: dict | None = None             # {"head": folder, "threshold": 3}; None disables
    knowledge: dict | None = field(default_factory=dict)  # KnowledgeFilter fields; None disables
    decontam: dict | None = None        # {"items": [jsonl...], "eval_tasks": "all", "eval_data": dir, "n": 13}
    mixture: dict = field(default_factory=dict)  # phase -> source -> {"weight", "min_edu"?, "exclude_demoted"?}
    shard_tokens: int = 1 << 24
    count_tokens: bool = True
    progress: bool = True
    throttle_s: float = 0.0             # sleep per unit (for crash-recovery tests)

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        d = dict(d)
        try:
            d["sources"] = [SourceSpec(**s) for s in d.get("sources", [])]
            cfg = cls(**d)
        except TypeError as e:
            raise DataPipelineError(f"pipeline config: {e}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PipelineConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise DataPipelineError(f"{path}: cannot read pipeline config ({e})") from None

    def validate(self) -> None:
        names = [s.name for s in self.sources]
        if not names:
            raise DataPipelineError("pipeline config: no sources")
        if len(set(names)) != len(names):
            raise DataPipelineError(f"pipeline config: duplicate source names {names}")
        for s in self.sources:
            if s.kind not in ("web", "code", "synthetic"):
                raise DataPipelineError(f"source {s.name}: kind {s.kind!r} is not web, code or synthetic")
            if s.kind != "synthetic" and not s.path:
                raise DataPipelineError(f"source {s.name}: needs a path")
            if not s.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise DataPipelineError(f"source name {s.name!r}: use letters, digits, '-', '_', '.'")
        for phase, spec in self.mixture.items():
            for src, opts in spec.items():
                if src not in names:
                    raise DataPipelineError(f"mixture {phase}: unknown source {src!r}; sources are {names}")
                if (opts.get("min_edu") is not None or opts.get("edu_keep")) and self.edu is None:
                    raise DataPipelineError(f"mixture {phase}/{src}: min_edu needs the edu stage (config 'edu')")
        if self.part_docs < 1:
            raise DataPipelineError(f"part_docs must be >= 1, got {self.part_docs}")

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)


# ----------------------------------------------------------------------------------------------- worker state
_STATE: dict[str, Any] = {}


def _tokenizer():
    if "tok" not in _STATE:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from pocketlm.tokenizer import Tokenizer

        _STATE["tok"] = Tokenizer.default()
    return _STATE["tok"]


def _count_tokens(text: str) -> int:
    return len(_tokenizer().encode(text)) if text else 0


def _marker(out: Path, stage: str, source: str, part: str) -> Path:
    return out / "markers" / stage / source / f"{part}.json"


def _write_marker(path: Path, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(stats, sort_keys=True) + "\n")


def _tokens(docs: Iterable[Document]) -> int:
    return sum(int(d.metadata.get("tokens", 0)) for d in docs)


# ----------------------------------------------------------------------------------------------- read
def read_units(cfg: PipelineConfig) -> list[dict]:
    """The read stage's units, numbered per source in a stable order: a group of `files_per_task` small files,
    a chunk of `lines_per_task` lines of an uncompressed JSONL file, or a whole synthetic source."""
    from pocketlm.data.readers import jsonl_chunks, list_files

    units = []
    for s in cfg.sources:
        if s.kind == "synthetic":
            units.append({"source": s.name, "group": 0, "files": []})
            continue
        root, group, pending = Path(s.path), 0, []

        def flush():
            nonlocal group, pending
            if pending:
                units.append({"source": s.name, "group": group, "files": pending, "root": str(root)})
                group, pending = group + 1, []
        for path, rel in list_files(s.path):
            if path.name.endswith(".jsonl"):
                flush()
                for span in jsonl_chunks(path, cfg.lines_per_task):
                    units.append({"source": s.name, "group": group, "files": [rel], "root": str(root),
                                  "span": list(span)})
                    group += 1
            else:
                pending.append(rel)
                if len(pending) >= cfg.files_per_task:
                    flush()
        flush()
    return units


def run_read_unit(cfg: PipelineConfig, unit: dict) -> dict:
    from pocketlm.data.readers import read_file, read_jsonl

    out, src = Path(cfg.out), cfg.source(unit["source"])
    marker = _marker(out, "read", src.name, f"g{unit['group']:05d}")
    if marker.exists():
        return json.loads(marker.read_text())
    if src.kind == "synthetic":
        from pocketlm.data.synthetic import generate

        docs, _ = generate(src.count, src.seed, src.generators)
    else:
        root = Path(unit["root"])
        docs = []
        for rel in unit["files"]:
            p = root / rel if root.is_dir() else root
            docs_in = read_jsonl(p, src.name, rel, tuple(unit["span"])) if "span" in unit else \
                read_file(p, src.name, rel)
            for d in docs_in:
                d.metadata.setdefault("source", src.name)
                docs.append(d)
    docs = [d for d in docs if d.text.strip()]
    if cfg.count_tokens:
        for d in docs:
            d.metadata["tokens"] = _count_tokens(d.text)
    parts = []
    for k in range(0, len(docs), cfg.part_docs):
        name = f"g{unit['group']:05d}-{k // cfg.part_docs:04d}"
        path = out / "parts" / "read" / src.name / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_part(docs[k:k + cfg.part_docs]))
        parts.append(name)
    stats = {"stage": "read", "source": src.name, "parts": parts, "docs_in": len(docs), "docs_out": len(docs),
             "tokens_in": _tokens(docs), "tokens_out": _tokens(docs), "reasons": {}}
    _write_marker(marker, stats)
    return stats


def list_parts(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(source, part) in stream order, from the read markers."""
    out, res = Path(cfg.out), []
    for s in cfg.sources:
        d = out / "markers" / "read" / s.name
        for m in sorted(d.glob("g*.json")) if d.exists() else []:
            res.extend((s.name, p) for p in json.loads(m.read_text())["parts"])
    return res


# ----------------------------------------------------------------------------------------------- map stages
def _stage_fn(cfg: PipelineConfig, stage: str, source: str) -> Callable[[list[Document]], list[tuple]]:
    """A function docs -> [(doc or None, reason or None)] for one stage and source (cached per worker)."""
    key = (stage, source, cfg.out)
    if key in _STATE:
        return _STATE[key]
    src = cfg.source(source)
    if stage == "filter":
        from pocketlm.data.filters import apply_filters, build_filters

        spec = src.filters
        if spec == "default":
            spec = {"web": cfg.filters, "code": cfg.code_filters, "synthetic": {}}[src.kind]
        flist = build_filters(spec)

        def fn(docs):
            res = []
            for d in docs:
                d2, reason = apply_filters(d, flist)
                if d2 is not None and d2.text != d.text and cfg.count_tokens:
                    d2.metadata["tokens"] = _count_tokens(d2.text)
                res.append((d2, reason))
            return res
    elif stage == "knowledge":
        from pocketlm.data.knowledge import KnowledgeFilter

        kf = KnowledgeFilter(**(cfg.knowledge or {}))
        fn = lambda docs: [kf.check(d) for d in docs]  # noqa: E731
    elif stage == "decontam":
        from pocketlm.data.decontam import DecontamIndex

        idx = DecontamIndex.from_json((Path(cfg.out) / "decontam-index.json").read_text())
        fn = lambda docs: [idx.check(d) for d in docs]  # noqa: E731
    elif stage == "edu":
        import torch

        from pocketlm.data.edu import EduScorer

        torch.set_num_threads(1)
        scorer = EduScorer(cfg.edu["head"])

        def fn(docs):
            scores = scorer.score([d.text for d in docs])
            keep = scorer.head.keep(scores)
            res = []
            for d, s, k in zip(docs, scores, keep):
                meta = dict(d.metadata)
                meta["edu_score"] = round(float(s), 4)
                meta["edu_int"] = int(np.rint(s))
                meta["edu_keep"] = bool(k)
                res.append((Document(d.id, d.text, meta), None))
            return res
    else:
        raise AssertionError(stage)
    _STATE[key] = fn
    return fn


def _prev_stage(cfg: PipelineConfig, stage: str) -> str:
    enabled = enabled_stages(cfg)
    return enabled[enabled.index(stage) - 1]


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    st = ["read", "filter"]
    if cfg.dedup is not None:
        st.append("dedup")
    if cfg.edu is not None:
        st.append("edu")
    if cfg.knowledge is not None:
        st.append("knowledge")
    if cfg.decontam is not None:
        st.append("decontam")
    return st


def run_map_unit(cfg: PipelineConfig, stage: str, source: str, part: str) -> dict:
    out = Path(cfg.out)
    marker = _marker(out, stage, source, part)
    if marker.exists():
        return json.loads(marker.read_text())
    prev = _prev_stage(cfg, stage)
    docs = list(read_part(out / "parts" / prev / source / f"{part}.jsonl"))
    if stage == "dedup":
        drop = _STATE.get(("dedup-drop", cfg.out))
        if drop is None:
            drop = json.loads((out / "dedup" / "decisions.json").read_text())["drop"]
            _STATE[("dedup-drop", cfg.out)] = drop
        results = [(None, drop[k]) if (k := f"{source}/{part}#{i}") in drop else (d, None)
                   for i, d in enumerate(docs)]
    else:
        results = _stage_fn(cfg, stage, source)(docs)
    kept, rejected, reasons = [], [], Counter()
    for d, (d2, reason) in zip(docs, results):
        if d2 is None:
            meta = dict(d.metadata)
            meta["reject_reason"] = reason
            rejected.append(Document(d.id, d.text, meta))
            reasons[reason_key(reason)] += 1
        else:
            kept.append(d2)
    for kind, items in (("parts", kept), ("rejects", rejected)):
        path = out / kind / stage / source / f"{part}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_part(items))
    if cfg.throttle_s:
        time.sleep(cfg.throttle_s)
    stats = {"stage": stage, "source": source, "part": part, "docs_in": len(docs), "docs_out": len(kept),
             "tokens_in": _tokens(docs), "tokens_out": _tokens(kept), "reasons": dict(sorted(reasons.items()))}
    _write_marker(marker, stats)
    return stats


def reason_key(reason: str) -> str:
    """The rule part of a reason ("dedup:near_dup_of:<id>:0.9" -> "dedup:near_dup_of")."""
    return ":".join(reason.split(":")[:2])


# ----------------------------------------------------------------------------------------------- dedup
def run_signature_unit(cfg: PipelineConfig, source: str, part: str) -> str:
    from pocketlm.data.dedup import DedupConfig, signature_batch

    out = Path(cfg.out)
    path = out / "dedup" / "signatures" / source / f"{part}.npz"
    if path.exists():
        return str(path)
    docs = list(read_part(out / "parts" / "filter" / source / f"{part}.jsonl"))
    hashes, sigs = signature_batch([d.text for d in docs], DedupConfig(**cfg.dedup))
    import io

    buf = io.BytesIO()
    np.savez(buf, hashes=np.asarray(hashes, dtype="U40"), sigs=sigs, ids=np.asarray([d.id for d in docs], dtype=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def run_dedup_decisions(cfg: PipelineConfig, parts: list[tuple[str, str]]) -> dict:
    from pocketlm.data.dedup import DedupConfig, Deduplicator

    out = Path(cfg.out)
    path = out / "dedup" / "decisions.json"
    if path.exists():
        return json.loads(path.read_text())
    dcfg = DedupConfig(**cfg.dedup)
    dd = Deduplicator(dcfg)
    drop = {}
    for source, part in parts:
        z = np.load(out / "dedup" / "signatures" / source / f"{part}.npz")
        for i, (h, sig, doc_id) in enumerate(zip(z["hashes"], z["sigs"], z["ids"])):
            key = f"{source}/{part}#{i}"
            reason = dd.check_signed(key, str(h), sig, label=str(doc_id))
            if reason:
                drop[key] = reason
    decisions = {"config": dcfg.as_dict(), "stats": dd.stats, "drop": drop}
    atomic_write_text(path, json.dumps(decisions, sort_keys=True) + "\n")
    return decisions


# ----------------------------------------------------------------------------------------------- decontam
def build_decontam_index(cfg: PipelineConfig) -> None:
    from pocketlm.data.decontam import DecontamIndex

    path = Path(cfg.out) / "decontam-index.json"
    if path.exists():
        return
    d = cfg.decontam or {}
    idx = DecontamIndex(n=d.get("n", 13), min_short_words=d.get("min_short_words", 8))
    for f in d.get("items", []):
        idx.add_jsonl(f)
    if d.get("eval_tasks"):
        idx.add_eval_tasks(d["eval_tasks"], d.get("eval_data"))
    atomic_write_text(path, idx.to_json())


# ----------------------------------------------------------------------------------------------- pack
def _selected(doc: Document, opts: dict) -> bool:
    if opts.get("min_edu") is not None and doc.metadata.get("edu_score", -1) < opts["min_edu"]:
        return False
    if opts.get("edu_keep") and not doc.metadata.get("edu_keep", False):
        return False
    if opts.get("exclude_demoted") and doc.metadata.get("knowledge", {}).get("demoted"):
        return False
    return True


def tokenize_part(cfg: PipelineConfig, source: str, part: str, opts: dict) -> list[np.ndarray]:
    last = enabled_stages(cfg)[-1]
    tok = _tokenizer()
    return [np.asarray(tok.encode(d.text), dtype=np.int64)
            for d in read_part(Path(cfg.out) / "parts" / last / source / f"{part}.jsonl") if _selected(d, opts)]


def pack_jobs(cfg: PipelineConfig) -> list[tuple[str, str, dict]]:
    return [(phase, src, opts) for phase, spec in sorted(cfg.mixture.items()) for src, opts in spec.items()]


# ----------------------------------------------------------------------------------------------- driver
def _pool_map(pool, fn, args: list, progress: bool, desc: str) -> list:
    """Ordered map over a pool (or inline when pool is None), with a progress bar."""
    from tqdm import tqdm

    it = pool.imap(fn, args) if pool is not None else map(fn, args)
    return list(tqdm(it, total=len(args), desc=desc, disable=not progress, file=sys.stderr, leave=False))


def _call(job):
    fn, args = job
    return fn(*args)


Mapper = Callable[[list, str], list]   # (jobs [(fn, args)], description) -> results in job order


def run(cfg: PipelineConfig, *, mapper: Mapper | None = None) -> dict:
    """Run (or resume) every stage; returns the report dict. `mapper` runs a list of unit jobs somewhere (default:
    a multiprocessing pool of `cfg.workers`; `pocketlm.data.distributed` passes a Dask one)."""
    import multiprocessing as mp

    from pocketlm.data.shards import ShardWriter
    from pocketlm.tokenizer import Tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(_config_dict(cfg), indent=1, sort_keys=True) + "\n")
    workers = cfg.workers or os.cpu_count() or 1
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and mapper is None else None
    if mapper is None:
        def mapper(jobs, desc):
            return _pool_map(pool, _call, jobs, cfg.progress, desc)
    timings = {}
    try:
        t0 = time.perf_counter()
        mapper([(run_read_unit, (cfg, u)) for u in read_units(cfg)], "read")
        timings["read"] = time.perf_counter() - t0
        parts = list_parts(cfg)
        for stage in enabled_stages(cfg)[1:]:
            t0 = time.perf_counter()
            if stage == "dedup":
                mapper([(run_signature_unit, (cfg, s, p)) for s, p in parts], "minhash")
                run_dedup_decisions(cfg, parts)
            if stage == "decontam":
                build_decontam_index(cfg)
            mapper([(run_map_unit, (cfg, stage, s, p)) for s, p in parts], stage)
            timings[stage] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eos = Tokenizer.default().eos_id
        mixture = {}
        for phase, src, opts in pack_jobs(cfg):
            folder = out / "tokens" / phase / src
            src_parts = [(s, p) for s, p in parts if s == src]
            if not (folder / "index.json").exists():
                with ShardWriter(folder, dtype="uint16", shard_tokens=cfg.shard_tokens, eos_id=eos) as w:
                    for arrays in mapper([(tokenize_part, (cfg, s, p, opts)) for s, p in src_parts],
                                         f"pack {phase}/{src}"):
                        for a in arrays:
                            w.add(a.tolist())
            index = json.loads((folder / "index.json").read_text())
            mixture.setdefault(phase, {})[src] = {
                "path": f"{phase}/{src}", "weight": float(opts.get("weight", 1.0)),
                "select": {k: v for k, v in opts.items() if k != "weight"},
                "tokens": index["num_tokens"], "documents": index["num_documents"]}
        if mixture:
            atomic_write_text(out / "tokens" / "mixture.json", json.dumps(mixture, indent=1, sort_keys=True) + "\n")
        timings["pack"] = time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    from pocketlm.data.report import write_report

    return write_report(cfg, timings)


def _config_dict(cfg: PipelineConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
