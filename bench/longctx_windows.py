"""What the long-context benchmarks share (bench_longrope.py, bench_longctx_finetune.py): text the default model
never trained on, cut into windows of a fixed number of tokens, and the model's mean NLL at each position over
such windows.

Text: the GPL-3 as Debian ships it (/usr/share/common-licenses) is the test text, every other license there (not
GPL-3 nor its `GPL` link) the training text; without that folder, README.md's first third and the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LICENSES = Path("/usr/share/common-licenses")


def test_and_train_text() -> tuple[str, str]:
    """(test text, training text), see the module docstring."""
    gpl = LICENSES / "GPL-3"
    if gpl.exists():
        rest = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(LICENSES.iterdir())
                           if p.is_file() and p.name not in ("GPL-3", "GPL"))
        return gpl.read_text(encoding="utf-8"), rest
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[: len(text) // 3], text[len(text) // 3:]


def windows(ids: list[int], length: int, limit: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `length` tokens from the start of `ids` (at most `limit`)."""
    n = len(ids) // length if limit is None else min(limit, len(ids) // length)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


@torch.inference_mode()
def nll_by_position(model, windows: list[list[int]]) -> torch.Tensor:
    """Mean NLL at each position 1..T-1 over the windows (T-1,), with the model's own rotary setting."""
    rows = []
    for w in windows:
        x = torch.tensor([w])
        rows.append(torch.nn.functional.cross_entropy(model(x)[0, :-1].float(), x[0, 1:], reduction="none"))
    return torch.stack(rows).mean(0)
