"""The chat page with a vision model in headless Chromium: attach an image with the attach button (file input),
see its preview, send it with a question, and get the streamed reply equal to `vision.generate_full` on the same
image and text (greedy, tiny random `tiny-vision`); the user message shows the image as a thumbnail, and the
prompt-token figure counts the image's positions. The page's CSP must let the data: preview load (naturalWidth
> 0). Screenshot to $POCKETLM_ARTIFACTS; with POCKETLM_VISION_SCREENSHOT=path also there (docs/vision-chat-page.png
for the README). Skipped, with the reason, without chromium or `websockets` (scripts/install-browser.sh).
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
import torch

Image = pytest.importorskip("PIL.Image")
from test_serve_browser import (CHROMIUM, _artifacts, launch_chromium, open_page, set_field,  # noqa: E402
                                type_and_send)

import pocketlm  # noqa: E402
from pocketlm import Tokenizer, vision  # noqa: E402
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed; run scripts/install-browser.sh")


def drawing() -> bytes:
    """A red disc and a blue square on white, as PNG bytes."""
    from PIL import ImageDraw
    im = Image.new("RGB", (240, 160), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.ellipse((20, 30, 120, 130), fill=(220, 30, 30))
    d.rectangle((140, 40, 220, 120), fill=(30, 60, 220))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_attach_an_image_and_ask(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path: Path):
    model, tok = pocketlm.load("tiny-vision"), Tokenizer.default()
    data = drawing()
    (tmp_path / "shapes.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    question = "What is in this picture?"
    ref = vision.generate_full(model, tok, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
        max_tokens=12, temperature=0, chat_format="phi3.5")
    app = create_app(model, tok, ServerConfig(model_name="tiny-vision", max_slots=1, context_length=512))
    with BackgroundServer(app) as srv, launch_chromium(tmp_path / "profile") as cdp:
        open_page(cdp, srv.url + "/")
        set_field(cdp, "temperature", "0")
        set_field(cdp, "max-tokens", "12")
        doc = cdp.call("DOM.getDocument")["root"]["nodeId"]
        node = cdp.call("DOM.querySelector", {"nodeId": doc, "selector": "#attach-file"})["nodeId"]
        # a file that is not an image is refused with a message, nothing is attached
        (tmp_path / "notes.txt").write_text("hello")
        cdp.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(tmp_path / "notes.txt")]})
        cdp.wait_for("document.getElementById('stats').textContent.includes('could not attach notes.txt')",
                     what="the refusal of a text file")
        assert cdp.eval("document.querySelectorAll('#attachments img').length") == 0
        # the picture: previewed (and loaded: the CSP allows data: images) before sending
        cdp.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(tmp_path / "shapes.png")]})
        cdp.wait_for("(() => { const i = document.querySelector('#attachments img'); "
                     "return i && i.complete && i.naturalWidth === 240; })()", what="the preview")
        assert cdp.eval("document.querySelector('#attachments img').src") == url
        type_and_send(cdp, question)
        cdp.wait_for("(() => { const m = document.querySelectorAll('.msg.assistant'); "
                     "return m.length === 1 && m[0].dataset.state === 'done'; })()", timeout=60, what="the reply")
        reply = cdp.eval("document.querySelector('.msg.assistant .content').textContent")
        assert reply.strip() == ref.text.strip() and ref.text.strip()
        figures = cdp.eval("document.querySelector('.msg.assistant .figures').textContent")
        assert f"{ref.prompt_tokens} prompt tokens" in figures, figures
        assert cdp.eval("document.querySelectorAll('#attachments img').length") == 0  # sent: the tray is empty
        assert cdp.eval("(() => { const i = document.querySelector('.msg.user img.thumb'); "
                        "return i && i.naturalWidth; })()") == 240
        assert cdp.eval("document.querySelector('.msg.user .content').textContent") == question
        png = cdp.screenshot(_artifacts(tmp_path) / "vision_chat_page.png")
        docs = os.environ.get("POCKETLM_VISION_SCREENSHOT")
        if docs:
            cdp.screenshot(Path(docs))
        print(f"\nscreenshot: {png}")
