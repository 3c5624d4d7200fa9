"""`pocketlm chat` as a person uses it: through a pseudo-terminal (pexpect), typing keys.

One session covers multi-line input, /set system, /set parameter, /show, /save, /clear, /load and Ctrl-C (during a
reply and at the prompt); a second session checks the readline history it left (arrow keys) and line editing."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

import pocketlm

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
TIMEOUT = 90


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A store holding a tiny model as `tiny-chat`, in a home of its own."""
    from pocketlm.formats.hf import save_checkpoint
    from pocketlm.store import Store
    tmp = tmp_path_factory.mktemp("chat")
    save_checkpoint(pocketlm.load("tiny", seed=3), tmp / "ckpt", tokenizer=pocketlm.Tokenizer.default())
    e = dict(os.environ, POCKETLM_HOME=str(tmp / "home"), HF_HUB_OFFLINE="1", TERM="xterm", INPUTRC="/dev/null",
             PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    old = os.environ.get("POCKETLM_HOME")
    os.environ["POCKETLM_HOME"] = e["POCKETLM_HOME"]
    try:
        Store().import_path(tmp / "ckpt", "tiny-chat")
    finally:
        if old is None:
            del os.environ["POCKETLM_HOME"]
        else:
            os.environ["POCKETLM_HOME"] = old
    return e


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _spawn(env: dict):
    # started with SIGINT ignored, as a shell's background job (or nohup) starts it: Ctrl-C must still work
    child = pexpect.spawn(sys.executable, ["-m", "pocketlm.cli", "chat", "tiny-chat", "--max-tokens", "4"], env=env,
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200), preexec_fn=_ignore_sigint)
    child.expect("pocketlm chat: tiny-chat:latest")
    child.expect_exact(PROMPT)
    return child


def _say(child, line: str, expect: str | None = None) -> None:
    child.sendline(line)
    if expect is not None:
        child.expect(expect)
    child.expect_exact(PROMPT)


def _saved(env: dict, name: str) -> dict:
    return json.loads((Path(env["POCKETLM_HOME"]) / "conversations" / f"{name}.json").read_text())


def test_chat_session_through_a_terminal(env):
    child = _spawn(env)
    try:
        _say(child, "Hi", r"\[\d+ tokens at")
        # \"\"\" ... \"\"\" is one message over several lines
        child.sendline('"""')
        child.expect_exact("... ")
        child.sendline("line one")
        child.expect_exact("... ")
        child.sendline('line two"""')
        child.expect(r"\[\d+ tokens at")
        child.expect_exact(PROMPT)
        _say(child, "/set system You are a test.", "Set system message.")
        _say(child, "/show system", "You are a test.")
        _say(child, "/set parameter temperature 0.5", "Set parameter 'temperature' to '0.5'")
        _say(child, "/set parameter stop END \"two words\"", "Set parameter 'stop'")
        _say(child, "/show parameters", r"temperature\s+0\.5")
        _say(child, "/set parameter top_p 7", r"error: parameter top_p '7': expected a number in \(0, 1\]")
        _say(child, "/set parameter mirostat 2", "unknown parameter 'mirostat'")
        _say(child, "/show modelfile", 'FROM tiny-chat:latest\r?\nSYSTEM """You are a test."""')
        _say(child, "/show license", "No license was specified")
        _say(child, "/frobnicate", "Unknown command '/frobnicate'")
        _say(child, "/save conv1", "Saved conversation as 'conv1' \\(4 messages")
        saved = _saved(env, "conv1")
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
        assert saved["messages"][0]["content"] == "Hi"
        assert saved["messages"][2]["content"] == "line one\nline two"
        assert saved["system"] == "You are a test."
        assert saved["parameters"]["temperature"] == 0.5 and saved["parameters"]["stop"] == ["END", "two words"]
        _say(child, "/clear", "Cleared session context")
        _say(child, "/save empty", "Saved conversation as 'empty' \\(0 messages")
        _say(child, "/set system Someone else.")
        _say(child, "/load conv1", "Loaded conversation 'conv1' \\(4 messages\\)")
        _say(child, "/show system", "You are a test.")
        _say(child, "/load ../etc", "conversation name '../etc'")
        _say(child, "/load nothing", "no saved conversation 'nothing'; saved: conv1, empty")
        # Ctrl-C stops a long reply; the chat goes on and the stopped exchange is not kept
        _say(child, "/set parameter num_predict 3000")
        child.sendline("Tell me a long story")
        child.expect(r"Tell me a long story\r?\n")
        child.expect(r"\S")  # the reply has started
        child.sendintr()
        child.expect_exact("(reply stopped)")
        child.expect_exact(PROMPT)
        _say(child, "/set parameter num_predict 4")
        _say(child, "Still there?", r"\[\d+ tokens at")
        _say(child, "/save after", "Saved conversation as 'after' \\(6 messages")
        assert "Tell me a long story" not in json.dumps(_saved(env, "after"))
        # Ctrl-C at the prompt only clears the line
        # wait for the echo: readline then sits in its select() on the terminal. A Ctrl-C sent before that is
        # a race Python's readline loses (the tty flushes the typed text, the signal lands before select() and
        # nothing wakes it); a person's Ctrl-C always comes after the echo
        child.send("half a line")
        child.expect_exact("half a line")
        child.sendintr()
        child.expect_exact("Use Ctrl + d or /bye to exit.")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_history_and_line_editing_across_sessions(env):
    child = _spawn(env)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    history = Path(env["POCKETLM_HOME"]) / "chat_history"
    assert history.read_text().splitlines()[-1] == "/bye"
    child = _spawn(env)
    try:
        child.send("/show systemXY\x7f\x7f\r")  # two backspaces edit the line before Enter
        child.expect("No system message was specified")
        child.expect_exact(PROMPT)
        child.send("\x1b[A\x1b[A\r")  # arrow up twice: the /bye of the last session
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    lines = history.read_text().splitlines()
    assert lines[-2:] == ["/show system", "/bye"]


def test_ctrl_d_leaves_and_a_pipe_still_works(env):
    child = _spawn(env)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    import subprocess
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "chat", "tiny-chat", "--max-tokens", "3"], env=env,
                       input='Hi\n"""\na\nb"""\n/show system\n/bye\n', capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert len([x for x in r.stderr.splitlines() if x.startswith("[")]) == 2
    assert "No system message was specified" in r.stderr
