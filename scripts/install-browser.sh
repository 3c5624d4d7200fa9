#!/usr/bin/env bash
# Install what the chat-page browser test (tests/test_serve_browser.py) needs: Debian's Chromium and
# ChromeDriver from apt, and the `websockets` client (Chrome DevTools Protocol) into ./.venv if it exists.
# Idempotent; needs root for apt-get (CI runs as root). No browser is downloaded by a test tool.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi
if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip install --quiet "websockets>=13"
fi
echo "browser: $(chromium --version 2>/dev/null || echo 'chromium not found')"
