"""The recipe report: one Markdown file and one self-contained HTML file (plots embedded) per recipe run.

Sections: steps (status, seconds), the data funnel (documents and tokens after each pipeline stage, the phase
mixtures), the loss curves of each training stage (pretraining with its phase boundary, SFT, DPO with its reward
accuracy), the evaluation table (held-out tasks per model) and the sample chats at temperature 0. Plots are PNGs
written beside the report (matplotlib, Agg backend); without matplotlib the report is written without them.
Everything is read from the run folder, so `write_report(out)` can be re-run at any time.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

from pocketlm.fsutil import atomic_write_bytes, atomic_write_text

STAGE_RUNS = ("pretrain", "sft", "dpo")


def _read_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def _metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("pocketlm recipe: matplotlib is not installed; the report has no plots", file=sys.stderr)
        return None


def _save(fig, plt, path: Path) -> Path:
    import io
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_funnel(stages: dict, path: Path) -> Path | None:
    plt = _plt()
    if plt is None or not stages:
        return None
    names = list(stages)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(names) + 1)
    tokens = [stages[names[0]]["tokens_in"]] + [stages[n]["tokens_out"] for n in names]
    docs = [stages[names[0]]["docs_in"]] + [stages[n]["docs_out"] for n in names]
    ax.bar(x, [t / 1e6 for t in tokens], color="tab:blue")
    ax.set_xticks(list(x), ["corpus"] + names)
    ax.set_ylabel("tokens (millions)")
    for i, (t, d) in enumerate(zip(tokens, docs)):
        ax.text(i, t / 1e6, f"{t / 1e6:.2f}M\n{d} docs", ha="center", va="bottom", fontsize=7)
    ax.set_title("data funnel")
    ax.margins(y=0.25)
    return _save(fig, plt, path)


def plot_losses(name: str, records: list[dict], path: Path) -> Path | None:
    plt = _plt()
    if plt is None or not records:
        return None
    extra = "rewards/accuracies" if any("rewards/accuracies" in r for r in records) else None
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(9 if extra else 6, 3.2))
    ax = axes[0] if extra else axes
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], lw=1)
    for a, b in zip(records, records[1:]):
        if a.get("phase") != b.get("phase"):
            ax.axvline(b["step"], color="grey", ls="--", lw=0.8)
            ax.text(b["step"], max(r["loss"] for r in records), f" {b.get('phase')}", va="top", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name} loss")
    if extra:
        axes[1].plot(steps, [r.get(extra, float("nan")) for r in records], color="tab:green", lw=1)
        axes[1].set_xlabel("step")
        axes[1].set_title(extra)
    return _save(fig, plt, path)


class _Doc:
    """Builds the Markdown and the HTML side by side."""

    def __init__(self, folder: Path):
        self.folder, self.md, self.html = folder, [], []

    def h(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, headers: list[str], rows: list[list]) -> None:
        if not rows:
            self.p("(none)")
            return
        fmt = [[_fmt(c) for c in r] for r in rows]
        self.md.append("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
                       + "".join("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |\n"
                                 for r in fmt))
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in fmt)
                         + "</table>")

    def image(self, path: Path | None, alt: str) -> None:
        if path is None:
            return
        self.md.append(f"![{alt}]({path.name})\n")
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')

    def chat(self, prompt: str, reply: str, finish: str) -> None:
        self.md.append(f"> **user:** {prompt}\n>\n> **assistant:** {reply.strip() or '(empty)'}\n>\n"
                       f"> *finish: {finish}*\n")
        self.html.append(f'<div class="chat"><p><b>user:</b> {html.escape(prompt)}</p><p><b>assistant:</b> '
                         f"{html.escape(reply.strip() or '(empty)')}</p><p><i>finish: {html.escape(finish)}</i>"
                         "</p></div>")


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:,.4g}" if abs(c) < 1e4 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return "" if c is None else str(c)


def write_report(out: str | Path) -> list[Path]:
    """Write report/report.md, report/report.html and the plots; return the files written."""
    out = Path(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = _read_json(out / "recipe.json") or {}
    doc = _Doc(folder)
    doc.h(1, f"pocketlm recipe {recipe.get('name', '?')}")
    doc.p(recipe.get("description", "") or "")
    doc.p(f"Model: preset {recipe.get('preset')} {recipe.get('model_overrides') or ''}; device "
          f"{recipe.get('device')}; budget {recipe.get('budget_minutes')} minutes.")

    from pocketlm.recipe.runner import STEPS, read_marker
    doc.h(2, "Steps")
    rows, total = [], 0.0
    for s in STEPS:
        m = read_marker(out, s)
        if s == "report":
            rows.append([s, "this report", ""])
            continue
        if m is None:
            rows.append([s, "not done", ""])
            continue
        secs = m["seconds"] + m.get("seconds_earlier_runs", 0.0)
        total += secs if not m.get("from_archive") else 0.0
        rows.append([s, "from archive" if m.get("from_archive") else "done", round(secs, 1)])
    doc.table(["step", "status", "seconds"], rows)
    doc.p(f"Total step time: {total / 60:.1f} minutes.")

    data = _read_json(out / "data" / "report" / "report.json")
    doc.h(2, "Data funnel")
    if data:
        order = ("read", "filter", "dedup", "edu", "knowledge", "decontam")  # pocketlm.data.pipeline.STAGES
        raw = data.get("stages", {})
        stages = {k: raw[k] for k in sorted(raw, key=lambda k: order.index(k) if k in order else len(order))}
        doc.table(["stage", "docs in", "docs out", "tokens in", "tokens out"],
                  [[k, v["docs_in"], v["docs_out"], v["tokens_in"], v["tokens_out"]] for k, v in stages.items()])
        doc.image(plot_funnel(stages, folder / "funnel.png"), "data funnel")
        mix = data.get("mixture", {})
        doc.table(["phase", "source", "documents", "tokens", "upsampling"],
                  [[ph, s, v["documents"], v["tokens"], v["weight"]] for ph, m in mix.items() for s, v in m.items()])
    else:
        doc.p("(no data report)")
    chat = read_marker(out, "chat-data")
    if chat:
        sm = chat["summary"]
        doc.p("Chat data: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sm.items() if isinstance(v, int)))
        h = sm.get("heldout")
        if h:
            doc.p(f"Held-out evaluation sets (pocketlm.eval.heldout): {h['heldout_documents']} corpus documents held "
                  f"out of training; {h['arith']['items']} arithmetic and {h['cloze']['items']} cloze items "
                  f"(chance {h['arith']['chance']}); bits per byte on {h['ppl']['web_docs']} web and "
                  f"{h['ppl']['synthetic_docs']} synthetic documents.")

    doc.h(2, "Training")
    rows = []
    for step in ("pretrain-phase1", "pretrain-phase2", "sft", "dpo"):
        m = read_marker(out, step)
        if m:
            sm = m["summary"]
            rows.append([step, sm.get("steps"), sm.get("tokens"), sm.get("loss_last10"), sm.get("tokens_per_s"),
                         sm.get("rewards/accuracies", "")])
    doc.table(["stage", "steps (cumulative)", "tokens (cumulative)", "loss (last 10 steps)", "tokens/s",
               "DPO reward accuracy"], rows)
    for run in STAGE_RUNS:
        recs = _metrics(out / run)
        doc.image(plot_losses(run, recs, folder / f"loss-{run}.png") if recs else None, f"{run} loss")

    results = _read_json(out / "eval" / "results.json")
    doc.h(2, "Evaluation")
    if results:
        table = results["table"]
        keys = [k for k in dict.fromkeys(k for row in table for k in row) if k != "model"]
        doc.table(["model"] + keys, [[row["model"]] + [row.get(k, "") for k in keys] for row in table])
        doc.h(2, "Sample chats (temperature 0)")
        for name, r in results["models"].items():
            if r["samples"]:
                doc.h(3, name)
                for s in r["samples"]:
                    doc.chat(s["prompt"], s["reply"], f"{s['finish_reason']}, {s['completion_tokens']} tokens")
    else:
        doc.p("(not evaluated yet)")

    md = folder / "report.md"
    atomic_write_text(md, "\n".join(doc.md))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pocketlm recipe report</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}td:first-child,th:first-child{text-align:left}"
            ".chat{border-left:3px solid #69c;padding-left:1em;margin:1em 0}img{max-width:100%}"
            "</style></head><body>" + "\n".join(doc.html) + "</body></html>\n")
    htm = folder / "report.html"
    atomic_write_text(htm, page)
    return [md, htm] + sorted(folder.glob("*.png"))
