#!/usr/bin/env bash
# Build "the web" of our experiments (see src/pocketlm/data/corpus.py): install the Debian documentation
# packages, then convert them and the Python standard library to JSONL documents under OUT (default
# data/corpus). Needs root for apt-get (run as root, or with sudo). Re-running resumes: finished sources are kept.
set -euo pipefail
OUT="${1:-data/corpus}"
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
