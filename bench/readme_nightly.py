"""README.md as executable documentation: its commands, and a nightly run of the expensive ones.

Every ```bash block of README.md is a list of commands (one per line; a trailing backslash continues a line),
every ```python block one program. A command may carry a directive, either as a trailing comment on its line or,
for a whole block, as an HTML comment on the line just before the block's fence (invisible on the rendered page):

    # readme-test: skip (REASON)        not run by tests/test_readme.py; REASON says why. A reason that starts
                                        with "expensive" marks a command this script runs instead.
    # readme-test: run as: COMMAND      tests/test_readme.py runs COMMAND, a small variant (a placeholder such as
                                        MODEL or DATA replaced, fewer tokens), in its place.

tests/test_readme.py (in the normal suite) runs every command that is not skipped, or its variant, in order, in
a fresh folder with a fresh HOME. This script runs, in the same kind of folder, the same commands plus the ones
marked expensive, as one bash script (so `&` and `wait` work as a user's shell would run them):

    python bench/readme_nightly.py --dry-run          list what would run, and what is left out and why
    python bench/readme_nightly.py --work runs/readme-nightly   run it (hours: the corpus, the recipes, the
                                                                data-quality experiment; root for apt-get)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIRECTIVE = "# readme-test:"
_HTML_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(\w*)\s*$")
# entries of the repository a fresh clone has (and .venv, which the README's install creates)
CLONE_ENTRIES = ("src", "scripts", "bench", "tests", "pyproject.toml", "README.md", "LICENSE", ".venv")


@dataclass(frozen=True)
class Command:
    """One README command: its text as written, where it is, and what its directive says."""

    text: str
    lang: str              # "bash" or "python"
    line: int              # 1-based line of README.md
    skip: str | None       # the reason, when the test does not run it
    variant: str | None    # the small variant the test runs instead

    @property
    def expensive(self) -> bool:
        return self.skip is not None and self.skip.startswith("expensive")

    @property
    def test_command(self) -> str | None:
        """What tests/test_readme.py runs (None: nothing)."""
        return None if self.skip is not None else (self.variant or self.text)


def _parse_directive(text: str, where: str) -> tuple[str | None, str | None]:
    """(skip reason, variant) of the text after `readme-test:`."""
    text = text.strip()
    m = re.fullmatch(r"skip\s*\((.+)\)", text)
    if m:
        return m.group(1).strip(), None
    m = re.fullmatch(r"run as:\s*(.+)", text)
    if m:
        return None, m.group(1).strip()
    raise ValueError(f"README.md {where}: a readme-test directive is 'skip (REASON)' or 'run as: COMMAND', got "
                     f"{text!r}")


def extract(readme: str) -> list[Command]:
    """Every command of the README's bash and python blocks, in order."""
    lines = readme.splitlines()
    out: list[Command] = []
    i = 0
    pending_block: str | None = None
    while i < len(lines):
        m = _HTML_DIRECTIVE.match(lines[i])
        if m:
            pending_block = m.group(1)
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if not fence:
            if lines[i].strip():
                pending_block = None
            i += 1
            continue
        lang, start = fence.group(1), i + 1
        j = start
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[start:j]
        block_skip, block_variant = (_parse_directive(pending_block, f"line {i}") if pending_block
                                     else (None, None))
        pending_block = None
        if lang == "python":
            out.append(Command("\n".join(body) + "\n", "python", start + 1, block_skip, block_variant))
        elif lang in ("bash", "sh", "shell", "console"):
            k = 0
            while k < len(body):
                first, text = k, body[k]
                while text.endswith("\\") and k + 1 < len(body):
                    k += 1
                    text = text[:-1] + " " + body[k].strip()
                k += 1
                if not text.strip() or text.lstrip().startswith("#"):
                    continue
                skip, variant = block_skip, block_variant
                if DIRECTIVE in text:
                    text, _, directive = text.partition(DIRECTIVE)
                    skip, variant = _parse_directive(directive, f"line {start + first + 1}")
                out.append(Command(text.rstrip(), "bash", start + first + 1, skip, variant))
        i = j + 1
    return out


def make_clone(folder: Path) -> Path:
    """A fresh-clone-like folder: the repository's entries linked in, no outputs of earlier runs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CLONE_ENTRIES:
        if (REPO / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(REPO / name)
    if not (folder / ".venv").exists():  # no project venv (another install layout): the running interpreter's
        (folder / ".venv").symlink_to(Path(sys.prefix))
    return folder


def fresh_env(folder: Path, *, kernel_cache: str | None = None) -> dict[str, str]:
    """A new user's environment in `folder`: HOME and every cache inside it, the venv activated. The compiled CPU
    kernels may stay in `kernel_cache` (they only depend on the machine) so that they are not rebuilt."""
    home = folder / "home"
    for sub in ("", ".cache", ".config", ".local/share", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETLM_", "XDG_", "VIRTUAL_ENV", "PYTHON"))}
    venv = folder / ".venv"
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"), POCKETLM_HOME=str(home / ".cache" / "pocketlm"),
               TMPDIR=str(home / "tmp"), VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if kernel_cache:
        env["POCKETLM_CACHE"] = kernel_cache
    return env


def nightly_script(commands: list[Command]) -> str:
    """One bash script: every command the test runs and every expensive one, as written, in README order."""
    lines = ["set -eo pipefail"]
    for c in commands:
        if c.lang != "bash" or (c.skip is not None and not c.expensive):
            continue
        text = c.text if c.expensive or c.variant is None else c.variant
        lines.append(f"echo {_quote('+ ' + text)}")
        lines.append(text)
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default=str(REPO / "README.md"))
    ap.add_argument("--work", default="runs/readme-nightly", help="the fresh folder to run in (default "
                                                                 "runs/readme-nightly)")
    ap.add_argument("--dry-run", action="store_true", help="list the script and what is left out; run nothing")
    a = ap.parse_args(argv)
    commands = extract(Path(a.readme).read_text(encoding="utf-8"))
    script = nightly_script(commands)
    if a.dry_run:
        print(script, end="")
        for c in commands:
            if c.skip is not None and not c.expensive:
                print(f"# left out (README line {c.line}): {c.text.splitlines()[0][:80]}  -- {c.skip}")
        return 0
    folder = make_clone(Path(a.work).absolute())
    return subprocess.run(["bash", "-c", script], cwd=folder, env=fresh_env(folder)).returncode


if __name__ == "__main__":
    sys.exit(main())
