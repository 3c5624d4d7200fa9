#!/usr/bin/env bash
# Install what the chat-page browser test (tests/test_serve_browser.py) needs: Debian's Chromium and
# ChromeDriver from apt, and the `websockets` client (Chrome DevTools Protocol) into ./.venv if it exists.
# Also Debian's bubblewrap (`bwrap`), which isolates the generated code of HumanEval/MBPP
# (src/pocketlm/eval/sandbox.py; tests/test_eval_sandbox.py, tests/test_sandbox_escape.py).
# Idempotent; needs root for apt-get (CI runs as root). No browser is downloaded by a test tool.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver fonts-dejavu-core)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip install --quiet "websockets>=13"
fi
echo "browser: $(chromium --version 2>/dev/null || echo 'chromium not found')"
echo "sandbox: $(bwrap --version 2>/dev/null || echo 'bwrap not found')"
