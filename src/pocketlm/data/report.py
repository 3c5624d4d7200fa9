"""The pipeline report: documents and tokens in/out per stage, rejection reasons, score histograms (PNG).

Built from the per-part markers (so a resumed run reports the whole run, not just its last piece) and from the
final documents' metadata. Writes `report/report.json`, `report/report.md`, `report/edu-scores.png` and
`report/knowledge-scores.png` atomically.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

from pocketlm.data.records import read_part
from pocketlm.fsutil import atomic_write_bytes, atomic_write_text


def _hist_png(values: list[float], bins, title: str, xlabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(values, bins=bins, color="#4a7", edgecolor="black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("documents")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def collect(cfg) -> dict:
    from pocketlm.data.pipeline import enabled_stages

    out = Path(cfg.out)
    stages = {}
    for stage in enabled_stages(cfg):
        tot = {"docs_in": 0, "docs_out": 0, "tokens_in": 0, "tokens_out": 0, "units": 0}
        reasons, per_source = Counter(), {}
        for m in sorted((out / "markers" / stage).rglob("*.json")):
            st = json.loads(m.read_text())
            for k in ("docs_in", "docs_out", "tokens_in", "tokens_out"):
                tot[k] += st[k]
                ps = per_source.setdefault(st["source"], {"docs_in": 0, "docs_out": 0, "tokens_in": 0,
                                                          "tokens_out": 0})
                ps[k] += st[k]
            tot["units"] += 1
            reasons.update(st["reasons"])
        stages[stage] = {**tot, "reasons": dict(reasons.most_common()), "per_source": per_source}
    return stages


def write_report(cfg, timings: dict | None = None) -> dict:
    from pocketlm.data.pipeline import enabled_stages

    out = Path(cfg.out)
    rep_dir = out / "report"
    rep_dir.mkdir(parents=True, exist_ok=True)
    stages = collect(cfg)
    last = enabled_stages(cfg)[-1]
    edu, know = [], []
    for f in sorted((out / "parts" / last).rglob("*.jsonl")):
        for d in read_part(f):
            if "edu_score" in d.metadata:
                edu.append(d.metadata["edu_score"])
            if "knowledge" in d.metadata:
                know.append(d.metadata["knowledge"]["score"])
    report = {"stages": stages, "timings_s": {k: round(v, 3) for k, v in (timings or {}).items()}}
    if (out / "dedup" / "decisions.json").exists():
        dec = json.loads((out / "dedup" / "decisions.json").read_text())
        report["dedup"] = {"config": dec["config"], "stats": dec["stats"]}
    if cfg.edu:
        meta = Path(cfg.edu["head"]) / "edu-head.json"
        if meta.exists():
            report["edu_classifier"] = json.loads(meta.read_text())
        report["edu_histogram"] = Counter(int(round(x)) for x in edu)
        if edu:
            atomic_write_bytes(rep_dir / "edu-scores.png",
                               _hist_png(edu, [x / 4 for x in range(0, 21)], "educational value (final documents)",
                                         "predicted score 0-5"))
    if know:
        report["knowledge_demoted"] = sum(1 for x in know if x >= (cfg.knowledge or {}).get("threshold", 0.6))
        atomic_write_bytes(rep_dir / "knowledge-scores.png",
                           _hist_png(know, [x / 20 for x in range(21)], "ephemeral-fact score (final documents)",
                                     "score (higher = more trivia)"))
    if (out / "tokens" / "mixture.json").exists():
        report["mixture"] = json.loads((out / "tokens" / "mixture.json").read_text())
    if "edu_histogram" in report:
        report["edu_histogram"] = {str(k): v for k, v in sorted(report["edu_histogram"].items())}
    atomic_write_text(rep_dir / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(rep_dir / "report.md", to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    lines = ["# Data pipeline report", "", "| stage | docs in | docs out | tokens in | tokens out | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage, st in report["stages"].items():
        lines.append(f"| {stage} | {st['docs_in']} | {st['docs_out']} | {st['tokens_in']} | {st['tokens_out']} | "
                     f"{report['timings_s'].get(stage, '')} |")
    lines += ["", "## Rejection reasons", "", "| stage | reason | documents |", "|---|---|---:|"]
    for stage, st in report["stages"].items():
        for r, n in st["reasons"].items():
            lines.append(f"| {stage} | {r} | {n} |")
    if "dedup" in report:
        lines += ["", f"Dedup: {json.dumps(report['dedup'])}"]
    if "edu_classifier" in report:
        m = (report["edu_classifier"].get("metrics") or {}).get("heldout_binary", {})
        lines += ["", f"Edu classifier held-out F1 at score >= {m.get('threshold')}: {m.get('f1', 0):.3f} "
                      f"(precision {m.get('precision', 0):.3f}, recall {m.get('recall', 0):.3f})",
                  f"Edu score histogram (final documents): {report.get('edu_histogram')}"]
    if "mixture" in report:
        lines += ["", "## Mixture", "", "| phase | source | weight | documents | tokens |", "|---|---|---:|---:|---:|"]
        for phase, spec in report["mixture"].items():
            for src, m in spec.items():
                lines.append(f"| {phase} | {src} | {m['weight']} | {m['documents']} | {m['tokens']} |")
    return "\n".join(lines) + "\n"
