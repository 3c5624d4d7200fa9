"""Build "the web" of our experiments from Debian documentation packages and Python source (set-up time).

`scripts/build-corpus.sh` installs the packages (`apt-get update` once, then `apt-get install`), then runs
`python -m pocketlm.data.corpus --out DIR`, which writes one JSONL file per source (`DIR/<source>.jsonl`,
atomically; an existing file is kept, so a re-run resumes) and `DIR/manifest.json` (documents, characters,
bytes, licence per source). Every document carries `metadata.source`, `metadata.licence` and
`metadata.path`. The corpus is not committed: the licences are mixed (table below). It is deliberately of mixed
quality, like the web: textbook prose (the Rust books, the Python tutorial, the PostgreSQL tutorial), reference
text (man pages, API pages, kernel ABI files), definitions, verse, jokes, and code.

| source | package | what | licence | size on disk (package) |
|---|---|---|---|---|
| linux-doc | linux-doc-6.1 | kernel Documentation/ (reStructuredText and text, gzipped) | GPL-2.0 (some files GPL-2.0 OR CC-BY-4.0) | 18.7 MB |
| python-doc | python3.11-doc | the Python 3.11 documentation (HTML -> text with trafilatura) | PSF-2.0 | 71.6 MB (HTML) |
| perl-doc | perl-doc | perl*.pod manual pages (pod2text) | GPL-1.0+ OR Artistic-1.0 | 14.8 MB |
| rust-books | rust-doc | The Rust Programming Language, Rust by Example, the Reference, the Nomicon, edition guide, embedded book, rustc/rustdoc books (HTML; API pages under std/core/alloc are left out) | MIT OR Apache-2.0 | 76 MB package, books ~38 MB HTML |
| postgresql-doc | postgresql-doc-15 | the PostgreSQL 15 manual (HTML) | PostgreSQL | 16.3 MB |
| sqlite-doc | sqlite3-doc | the SQLite documentation (HTML, top level) | public domain | 28.1 MB |
| git-doc | git-doc | git manual pages and guides (AsciiDoc text) | GPL-2.0 | 13.0 MB |
| debian-handbook | debian-handbook | The Debian Administrator's Handbook, en-US (HTML) | GPL-2.0+ OR CC-BY-SA-3.0 | 7.4 MB (all languages) |
| manpages | manpages | Linux man pages, sections 2-7 (groff -> text) | per page: GPL-2.0+, BSD, "verbatim" and other free licences | 1.4 MB gz |
| gcide | dict-gcide | GNU Collaborative International Dictionary of English, 40 entries per document | GPL-3.0+ | 17.5 MB |
| wordnet | wordnet-base | WordNet 3.0 synsets with glosses, 100 per document | WordNet 3.0 licence (BSD-like) | 29.2 MB |
| bible-kjv | bible-kjv-text (+ bible-kjv for the reader) | King James Bible, one chapter per document | public domain (Crown copyright in the UK) | 2.6 MB |
| fortunes | fortunes | fortune cookie files, 10 per document | BSD-style (fortune-mod collection, mixed authors) | 2.6 MB |
| python-src | (the interpreter) | Python 3.11 standard library source, one module per document | PSF-2.0 | 54 MB |

Produced here (2026-11-25, Debian 12 packages, `manifest.json`): 17,060 documents, 146.8 M characters.

| source | documents | characters | JSONL |
|---|---:|---:|---:|
| linux-doc | 5127 | 27.4 M | 30.5 MB |
| python-doc | 499 | 8.8 M | 9.1 MB |
| perl-doc | 414 | 18.5 M | 19.3 MB |
| rust-books | 1027 | 3.1 M | 3.4 MB |
| postgresql-doc | 1169 | 6.5 M | 6.8 MB |
| sqlite-doc | 424 | 5.7 M | 5.9 MB |
| git-doc | 292 | 2.9 M | 3.1 MB |
| debian-handbook | 127 | 0.8 M | 0.8 MB |
| manpages | 249 | 2.5 M | 2.7 MB |
| python-src | 665 | 11.3 M | 11.8 MB |
| gcide | 3156 | 39.9 M | 41.9 MB |
| wordnet | 1179 | 12.3 M | 12.6 MB |
| bible-kjv | 1189 | 4.3 M | 4.5 MB |
| fortunes | 1543 | 2.6 M | 2.9 MB |

Known gaps: Debian's `manpages` package holds sections 1, 4, 5, 7 and a few others (sections 2 and 3 are in
`manpages-dev`, not installed); the Python source is the standard library of the system interpreter only
(Debian ships its test suite separately), so "hundreds of MB of code" would need more packages; many rust-doc
pages of the first/second-edition book are redirect stubs ("no longer distributed"), kept as the web's junk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

from pocketlm.data.records import DataPipelineError, Document
from pocketlm.fsutil import atomic_write_text, fsync_path

PACKAGES = ["linux-doc-6.1", "python3.11-doc", "perl-doc", "rust-doc", "postgresql-doc-15", "sqlite3-doc", "git-doc",
            "debian-handbook", "manpages", "dict-gcide", "wordnet-base", "bible-kjv-text", "bible-kjv", "fortunes"]
RUST_BOOKS = ["book", "rust-by-example", "reference", "nomicon", "edition-guide", "embedded-book", "rustc", "rustdoc"]


def _read(path: Path) -> str:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _html(path: Path) -> str:
    from pocketlm.data.readers import html_to_text

    return html_to_text(_read(path))


_MAN_DROP = re.compile(r"^\.(?:\\\"|PP|LP|P|br|sp|RS|RE|nf|fi|in|ad|na|hy|nh|ne|ti|ft|ps|vs|TH|UC|PD|ie|el|if|"
                       r"de|ds|nr|so|EX|EE|IX|\.|ta|tr|ll|lf|SS?\s*$)\b.*$")


def man_to_text(src: str) -> str:
    """A small groff -man to text conversion (macros dropped, fonts stripped); enough for prose and options."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        m = re.match(r"^\.(SH|SS)\s+(.*)$", line)
        if m:
            out.append("\n" + m.group(2).strip('"'))
            continue
        m = re.match(r"^\.(B|I|BR|IR|RB|RI|BI|IB|SM|SB)\s+(.*)$", line)
        if m:
            line = m.group(2).replace('"', "")
        elif re.match(r"^\.(TP|IP|HP)\b", line):
            rest = line.split(None, 1)[1] if " " in line else ""
            out.append(rest.strip('"') if rest and not rest[0].isdigit() else "")
            continue
        elif line.startswith(".") or _MAN_DROP.match(line):
            continue
        line = re.sub(r"\\f[BIRP1-4]|\\f\(..|\\f\[[^\]]*\]", "", line)
        line = line.replace("\\-", "-").replace("\\(em", "—").replace("\\(en", "–").replace("\\(aq", "'") \
            .replace("\\(dq", '"').replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ").replace("\\~", " ")
        line = re.sub(r"\\\((..)", "", line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _pod(path: Path) -> str:
    try:
        return subprocess.run(["pod2text", str(path)], capture_output=True, timeout=60, check=True).stdout.decode(
            "utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError):
        return _read(path)


def _files(root: str, patterns: list[str], exclude: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    r = Path(root)
    if not r.exists():
        return []
    return sorted({p for pat in patterns for p in r.glob(pat) if p.is_file() and not exclude(p)})


# source -> (licence, list of files, converter) for one-file-one-document sources
def file_sources() -> dict[str, tuple[str, Callable[[], list[Path]], Callable[[Path], str], str]]:
    return {
        "linux-doc": ("GPL-2.0", lambda: _files("/usr/share/doc/linux-doc-6.1/Documentation",
                                                 ["**/*.rst.gz", "**/*.txt.gz", "**/*.rst", "**/*.txt"]),
                      _read, "/usr/share/doc/linux-doc-6.1/Documentation"),
        "python-doc": ("PSF-2.0", lambda: _files("/usr/share/doc/python3.11/html", ["**/*.html"],
                                                 lambda p: p.name in ("genindex-all.html", "search.html")
                                                 or p.name.startswith("genindex")),
                       _html, "/usr/share/doc/python3.11/html"),
        "perl-doc": ("GPL-1.0+ OR Artistic-1.0", lambda: _files("/usr/share/perl", ["*/pod/*.pod"]), _pod,
                     "/usr/share/perl"),
        "rust-books": ("MIT OR Apache-2.0", lambda: [p for b in RUST_BOOKS for p in _files(
            f"/usr/share/doc/rust-doc/html/{b}", ["**/*.html"], lambda p: p.name in ("print.html", "toc.html",
                                                                                    "404.html"))],
                       _html, "/usr/share/doc/rust-doc/html"),
        "postgresql-doc": ("PostgreSQL", lambda: _files("/usr/share/doc/postgresql-doc-15/html", ["*.html"]), _html,
                           "/usr/share/doc/postgresql-doc-15/html"),
        "sqlite-doc": ("public-domain", lambda: _files("/usr/share/doc/sqlite3", ["*.html", "c3ref/*.html",
                                                                                 "lang_*.html"]), _html,
                       "/usr/share/doc/sqlite3"),
        "git-doc": ("GPL-2.0", lambda: _files("/usr/share/doc/git-doc", ["*.txt", "**/*.txt"]), _read,
                    "/usr/share/doc/git-doc"),
        "debian-handbook": ("GPL-2.0+ OR CC-BY-SA-3.0", lambda: _files("/usr/share/doc/debian-handbook/html/en-US",
                                                                        ["*.html"]), _html,
                            "/usr/share/doc/debian-handbook/html/en-US"),
        "manpages": ("various free (GPL-2.0+, BSD, verbatim)", lambda: _files(
            "/usr/share/man", [f"man{s}/*.gz" for s in "234567"],
            lambda p: not _owned_by_manpages(p)), lambda p: man_to_text(_read(p)), "/usr/share/man"),
        "python-src": ("PSF-2.0", lambda: _files(f"/usr/lib/python3.{sys.version_info.minor}", ["**/*.py"],
                                                 lambda p: "site-packages" in p.parts or "dist-packages" in p.parts),
                       _read, f"/usr/lib/python3.{sys.version_info.minor}"),
    }


_MANPAGES: set[str] | None = None


def _owned_by_manpages(p: Path) -> bool:
    global _MANPAGES
    if _MANPAGES is None:
        try:
            _MANPAGES = set(Path("/var/lib/dpkg/info/manpages.list").read_text().split())
        except OSError:
            _MANPAGES = set()
    return str(p) in _MANPAGES


def _convert(job: tuple[str, str, str]) -> tuple[str, str] | None:
    name, path, root = job
    licence, _, conv, _ = file_sources()[name]
    try:
        text = conv(Path(path))
    except Exception as e:  # one broken file must not stop the build; it is reported
        print(f"corpus: {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return Path(path).relative_to(root).as_posix(), text


# grouped sources
def gcide_docs(per_doc: int = 40) -> Iterator[tuple[str, str]]:
    idx = Path("/usr/share/dictd/gcide.index")
    data = Path("/usr/share/dictd/gcide.dict.dz")
    if not idx.exists():
        return
    raw = gzip.open(data).read()
    b64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def num(s):
        v = 0
        for c in s:
            v = v * 64 + b64[c]
        return v
    spans = set()   # several headwords (variants) index the same entry: keep each entry once, in file order
    for line in idx.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.add((num(parts[1]), num(parts[2])))
    entries = [raw[o:o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans)]
    for i in range(0, len(entries), per_doc):
        yield f"entries-{i:07d}", "\n\n".join(entries[i:i + per_doc])


def wordnet_docs(per_doc: int = 100) -> Iterator[tuple[str, str]]:
    for pos in ("noun", "verb", "adj", "adv"):
        f = Path(f"/usr/share/wordnet/data.{pos}")
        if not f.exists():
            continue
        rows = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            n = int(fields[3], 16)
            words = [fields[4 + 2 * k].replace("_", " ") for k in range(n)]
            rows.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
        for i in range(0, len(rows), per_doc):
            yield f"{pos}-{i:06d}", "\n".join(rows[i:i + per_doc])


def fortune_docs(per_doc: int = 10) -> Iterator[tuple[str, str]]:
    root = Path("/usr/share/games/fortunes")
    for f in sorted(root.glob("*")) if root.exists() else []:
        if f.suffix in (".dat", ".u8") or not f.is_file() or f.is_symlink():
            continue
        items = [x.strip() for x in f.read_text(encoding="utf-8", errors="replace").split("\n%\n") if x.strip()]
        for i in range(0, len(items), per_doc):
            yield f"{f.name}-{i:05d}", "\n\n".join(items[i:i + per_doc])


def bible_docs() -> Iterator[tuple[str, str]]:
    """One chapter per document, via the `bible` reader of the bible-kjv package (the data file is compressed)."""
    exe = shutil.which("bible")
    if not exe:
        return
    books = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, timeout=300).stdout.decode(
        "utf-8", errors="replace")
    chapter, lines = None, []
    for line in books.splitlines():
        m = re.match(r"^(\w[\w ]*?)\s?(\d+):(\d+)\s*(.*)$", line.strip())
        if m:
            key = f"{m.group(1).strip()} {m.group(2)}"
            if key != chapter and lines:
                yield chapter, "\n".join(lines)
                lines = []
            chapter = key
            lines.append(f"{m.group(2)}:{m.group(3)} {m.group(4)}")
        elif line.strip() and lines:
            lines[-1] += " " + line.strip()
    if lines:
        yield chapter, "\n".join(lines)


GROUPED = {"gcide": ("GPL-3.0+", gcide_docs), "wordnet": ("WordNet-3.0", wordnet_docs),
           "bible-kjv": ("public-domain", bible_docs), "fortunes": ("BSD-style (fortune-mod)", fortune_docs)}
ALL_SOURCES = list(file_sources()) + list(GROUPED)


def build_source(name: str, out: Path, workers: int) -> dict:
    target = out / f"{name}.jsonl"
    if target.exists():
        return json.loads((out / f".{name}.stats.json").read_text())
    tmp = out / f".{name}.jsonl.tmp"
    n = chars = 0
    with open(tmp, "w", encoding="utf-8") as f:
        if name in GROUPED:
            licence, gen = GROUPED[name]
            items = ((key, text) for key, text in gen())
        else:
            licence, lister, _, root = file_sources()[name]
            jobs = [(name, str(p), root) for p in lister()]
            with get_context("fork").Pool(workers) as pool:
                items = [r for r in pool.imap(_convert, jobs, chunksize=8) if r]
        for key, text in items:
            if not text.strip():
                continue
            doc = Document(f"{name}/{key}", text, {"source": name, "licence": licence, "path": key})
            f.write(doc.to_json() + "\n")
            n, chars = n + 1, chars + len(text)
        f.flush()
        os.fsync(f.fileno())
    stats = {"source": name, "licence": licence, "documents": n, "characters": chars,
             "bytes": tmp.stat().st_size}
    atomic_write_text(out / f".{name}.stats.json", json.dumps(stats) + "\n")
    os.replace(tmp, target)
    fsync_path(out)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pocketlm.data.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sources", default="all", help=f"comma list of {ALL_SOURCES} or 'all'")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    names = ALL_SOURCES if args.sources == "all" else args.sources.split(",")
    unknown = set(names) - set(ALL_SOURCES)
    if unknown:
        raise DataPipelineError(f"unknown corpus sources {sorted(unknown)}; known: {ALL_SOURCES}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in names:
        st = build_source(name, out, args.workers)
        manifest[name] = st
        print(f"{name:<16} {st['documents']:>8} documents {st['characters'] / 1e6:>9.1f} M chars  {st['licence']}",
              flush=True)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
