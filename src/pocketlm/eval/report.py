"""The report: a text table beside the paper's numbers, JSON for machines, a PNG bar chart for people.

Scores are percentages (mean x 100) with their standard error (sample std / sqrt(n) x 100). The paper columns
shown are phi-3-mini, -small and -medium (phi3-spec.md §6.1, later revision of the report); all nine columns
are in the JSON. "Average" is over the tasks that were run and that the paper averages (not GPQA).
"""

from __future__ import annotations

import json
from pathlib import Path

SHOWN = ("phi-3-mini", "phi-3-small", "phi-3-medium")


def _pct(x):
    return None if x is None else 100.0 * x


def table(run: dict) -> str:
    res = run["results"]
    head = f"{'task':<16} {'metric':<11} {'n':>6} {'shots':>5} {'score':>7} {'± se':>6}  " + \
        "  ".join(f"{c:>12}" for c in SHOWN)
    lines = [head, "-" * len(head)]
    for name, r in res.items():
        s, se = _pct(r["score"]), _pct(r["stderr"])
        paper = "  ".join(f"{r['paper'].get(c, float('nan')):>12.1f}" if c in r["paper"] else f"{'-':>12}"
                          for c in SHOWN)
        lines.append(f"{r['title']:<16.16} {r['metric']:<11} {r['n']:>6} {r['shots']:>5} "
                     f"{s if s is not None else float('nan'):>7.1f} {se if se is not None else 0:>6.1f}  {paper}")
    avg = [r for n, r in res.items() if n != "gpqa" and r["score"] is not None]
    if len(avg) > 1:
        mean = 100 * sum(r["score"] for r in avg) / len(avg)
        lines.append("-" * len(head))
        lines.append(f"{'Average':<16} {'':<11} {'':>6} {'':>5} {mean:>7.1f}")
    return "\n".join(lines)


def write_partial(run: dict, out: Path) -> None:
    """After each finished task: its samples_<task>.jsonl, and results.json with every task finished so far
    (`config.complete: false` until `write` runs at the end). Each file is replaced atomically."""
    import os
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def put(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    for name, rows in run["samples"].items():
        put(out / f"samples_{name}.jsonl",
            "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))
    put(out / "results.json", json.dumps({"results": run["results"], "config": run["config"] | {"complete": False}},
                                         indent=2, sort_keys=True) + "\n")


def write(run: dict, out: Path, *, chart: bool = True) -> list[Path]:
    """results.json (scores, config), samples_<task>.jsonl (every item), report.txt, scores.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "results.json"
    p.write_text(json.dumps({"results": run["results"], "config": run["config"] | {"complete": True}}, indent=2,
                            sort_keys=True) + "\n")
    written.append(p)
    for name, rows in run["samples"].items():
        p = out / f"samples_{name}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
        written.append(p)
    p = out / "report.txt"
    p.write_text(table(run) + "\n")
    written.append(p)
    if chart:
        try:
            written.append(bar_chart(run, out / "scores.png"))
        except ImportError:
            import sys
            print("pocketlm eval: matplotlib is not installed: no scores.png (pip install matplotlib)",
                  file=sys.stderr)
    return written


def bar_chart(run: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = run["results"]
    names = [r["title"] for r in res.values()]
    ours = [_pct(r["score"]) or 0.0 for r in res.values()]
    errs = [_pct(r["stderr"]) or 0.0 for r in res.values()]
    mini = [r["paper"].get("phi-3-mini", 0.0) for r in res.values()]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=errs, capsize=3, label=run["config"].get("backend", "this model"))
    ax.bar([i + 0.2 for i in x], mini, 0.4, label="phi-3-mini (paper)", alpha=0.6)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("pocketlm eval")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no timestamps: same run, same bytes
    plt.close(fig)
    return path
