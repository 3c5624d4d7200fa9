"""The chat page in headless Chromium (Debian's `chromium`), driven over the Chrome DevTools Protocol.

Send a message and see the streamed reply (equal to the greedy reply of `pocketlm.engine.generate`, kept in
localStorage) with its figures from the server's usage chunk (prompt and completion tokens, time to first token,
tokens/s); send a second one and press Stop mid-stream: the page marks the reply stopped and the server frees the
slot (one abort). Screenshots are written to $POCKETLM_ARTIFACTS (default: pytest's tmp dir) and their paths
printed. Skipped, with the reason, when chromium or the `websockets` package is missing:
`scripts/install-browser.sh` installs both. The helpers here (launch_chromium, open_page, ...) are shared with
tests/test_serve_chat_page.py, which covers Markdown, sanitising, persistence, editing and failures.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm import Tokenizer
from pocketlm.engine.generate import generate_full
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
websockets_sync = pytest.importorskip("websockets.sync.client", reason="websockets is not installed "
                                      "(scripts/install-browser.sh installs it)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed; run scripts/install-browser.sh")


class CDP:
    """A minimal synchronous Chrome DevTools Protocol client over one browser websocket (flattened sessions)."""

    def __init__(self, ws_url: str):
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(websockets_sync.connect(ws_url, max_size=None, open_timeout=20))
        self.next_id = 0
        self.session = None

    def call(self, method: str, params: dict | None = None, *, timeout: float = 20.0, session=True) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(method)

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self):
        self._stack.close()


@contextlib.contextmanager
def launch_chromium(profile: Path, window: str = "1000,760"):
    """Headless Chromium with a fresh profile in `profile`, and a CDP client on its browser websocket."""
    profile.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--window-size={window}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            time.sleep(0.05)
        port, path = port_file.read_text().split("\n")[:2]
        cdp = CDP(f"ws://127.0.0.1:{port}{path}")
        try:
            yield cdp
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def open_page(cdp: CDP, url: str) -> None:
    """Open `url` in a new tab, attach `cdp` to it, and wait until the page has loaded its model list."""
    target = cdp.call("Target.createTarget", {"url": url}, session=False)["targetId"]
    cdp.session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
    cdp.call("Page.enable")
    cdp.call("Runtime.enable")
    wait_ready(cdp)


def wait_ready(cdp: CDP) -> None:
    cdp.wait_for("document.readyState === 'complete' && document.body.dataset.ready === 'true'",
                 what="the page to load its scripts and the model list")


def set_field(cdp: CDP, element_id: str, value: str) -> None:
    """Set a settings field as typing would (the page saves settings on `input` events)."""
    cdp.eval(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); e.value = {json.dumps(value)}; "
             "e.dispatchEvent(new Event('input')); return true; })()")


def type_and_send(cdp: CDP, text: str) -> None:
    cdp.eval("document.getElementById('input').focus(); true")
    cdp.call("Input.insertText", {"text": text})
    cdp.eval("document.getElementById('send').click(); true")


@pytest.fixture
def browser(tmp_path):
    with launch_chromium(tmp_path / "chromium-profile") as cdp:
        yield cdp


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("POCKETLM_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_chat_page_streams_and_stops(browser, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_page_test(browser, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run_page_test(cdp: CDP, tmp_path: Path):
    model, tok = pocketlm.load("tiny"), Tokenizer.default()
    app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=2, context_length=2048))
    first = "Hello! Who are you?"
    ref1 = generate_full(model, tok, [{"role": "user", "content": first}], max_tokens=24, temperature=0)
    # a second message whose greedy reply runs at least 400 tokens, so Stop surely lands mid-stream
    second = None
    for candidate in ("Tell me a long story.", "Write an essay about rivers.", "Count to a thousand.",
                      "Describe the whole world.", "List every prime number."):
        conv = [{"role": "user", "content": first}, {"role": "assistant", "content": ref1.text},
                {"role": "user", "content": candidate}]
        if generate_full(model, tok, conv, max_tokens=400, temperature=0).finish_reason == "length":
            second = candidate
            break
    assert second is not None, "no candidate prompt runs 400 tokens on this model"
    out = _artifacts(tmp_path)
    with BackgroundServer(app) as srv:
        engine = app.state.engine
        open_page(cdp, srv.url + "/")
        assert cdp.eval("document.getElementById('model').value") == "tiny"
        set_field(cdp, "temperature", "0")
        set_field(cdp, "max-tokens", "24")

        # 1) a short exchange: the streamed reply equals the greedy reply; its figures come from the usage chunk
        type_and_send(cdp, first)
        cdp.wait_for("(() => { const m = document.querySelectorAll('.msg.assistant'); "
                     "return m.length === 1 && m[0].dataset.state === 'done'; })()", what="the first reply")
        saved = json.loads(cdp.eval("localStorage.getItem('pocketlm.chats.v1')"))
        conv = next(c for c in saved["conversations"] if c["id"] == saved["current"])
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        assert conv["messages"][1]["content"] == ref1.text
        figures = cdp.eval("document.querySelector('.msg.assistant .figures').textContent")
        assert f"{ref1.completion_tokens} completion tokens" in figures and "tokens/s" in figures, figures
        assert f"{ref1.prompt_tokens} prompt tokens" in figures and "first token" in figures, figures
        # 2) a long reply: watch it stream, then press Stop
        set_field(cdp, "max-tokens", "1500")
        type_and_send(cdp, second)
        lengths = []
        for _ in range(1000):  # bounded (about 20 s): until the text has grown at least twice while streaming
            state, text = cdp.eval("(() => { const m = document.querySelectorAll('.msg.assistant'); const d = "
                                   "m[m.length - 1]; return [m.length === 2 ? d.dataset.state : '', "
                                   "m.length === 2 ? d.textContent : '']; })()")
            if state == "streaming" and text and (not lengths or len(text) > lengths[-1]):
                lengths.append(len(text))
            if len(lengths) >= 3 or state in ("done", "error", "stopped"):
                break
            time.sleep(0.02)
        assert len(lengths) >= 3, f"did not see the reply grow while streaming: {lengths}, state {state}"
        streaming_png = cdp.screenshot(out / "serve_chat_page_streaming.png")
        aborts = engine.stats()["aborts"]
        assert engine.stats()["active"] == 1
        cdp.eval("document.getElementById('stop').click(); true")
        cdp.wait_for("document.querySelectorAll('.msg.assistant')[1].dataset.state === 'stopped'",
                     what="the reply to be marked stopped")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and engine.stats()["active"] != 0:
            time.sleep(0.01)
        s = engine.stats()
        assert s["active"] == 0 and s["aborts"] == aborts + 1, s
        assert cdp.eval("document.getElementById('send').disabled === false && "
                        "document.getElementById('stop').disabled === true")
        note = cdp.eval("document.querySelectorAll('.msg.assistant')[1].textContent")
        assert "stopped" in note and "completion tokens" in note, note
        stopped_png = cdp.screenshot(out / "serve_chat_page_stopped.png")
    for p in (streaming_png, stopped_png):
        assert p.stat().st_size > 1000
        print(f"\nscreenshot: {p}")
