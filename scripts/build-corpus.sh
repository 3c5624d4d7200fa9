#!/usr/bin/env bash
# Build "the web" of our experiments (see src/pocketlm/data/corpus.py): install the Debian documentation
# packages, then convert them and the Python standard library to JSONL documents under OUT (default
# data/corpus, relative to the current folder; run it from the repository root). Needs root for apt-get (run as
# root, or it calls sudo) and Debian 12 "bookworm": the package names (linux-doc-6.1, python3.11-doc,
# postgresql-doc-15) are bookworm's. Re-running resumes: finished sources are kept.
#   bash scripts/build-corpus.sh [OUT] [--sources a,b] [--workers N]
set -euo pipefail
OUT="${1:-data/corpus}"
if [ -r /etc/os-release ] && ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
  echo "build-corpus.sh: note: this is not Debian 12 (bookworm); the package names below are bookworm's, and" \
       "apt-get may not find some of them" >&2
fi
PKGS=(linux-doc-6.1 python3.11-doc perl-doc rust-doc postgresql-doc-15 sqlite3-doc git-doc debian-handbook
      manpages dict-gcide wordnet-base bible-kjv-text bible-kjv fortunes)
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m pocketlm.data.corpus --out "$OUT" "${@:2}"
