"""`pocketlm serve` with a vision model, through the official `openai` client: image_url parts as data URLs (and
local paths only inside --image-dir), streamed and whole replies equal to `vision.generate_full` alone, typed 400s
for bad images, URLs and text-only models; and `pocketlm run --image` on the command line."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
Image = pytest.importorskip("PIL.Image")

import pocketlm  # noqa: E402
from pocketlm import Tokenizer, vision  # noqa: E402
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app  # noqa: E402


def png(w, h, seed):
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("images")
    (folder / "cat.png").write_bytes(png(90, 60, 1))
    (tmp_path_factory.mktemp("elsewhere") / "secret.png").write_bytes(png(20, 20, 2))
    model = pocketlm.load("tiny-vision")
    tok = Tokenizer.default()
    app = create_app(model, tok, ServerConfig(model_name="tiny-vision", max_slots=2, context_length=512,
                                              image_dir=str(folder)))
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, model, tok, folder
    torch.set_num_threads(threads)


def _messages(*urls, text="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
             + [{"type": "text", "text": text}]}]


def test_openai_client_sends_an_image(setup):
    client, model, tok, _ = setup
    msgs = _messages(data_url(png(70, 50, 3)))
    ref = vision.generate_full(model, tok, msgs, max_tokens=8, temperature=0, chat_format="phi3.5")
    r = client.chat.completions.create(model="tiny-vision", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ref.text and ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens > 27  # the image's positions are counted
    assert r.usage.completion_tokens == ref.completion_tokens
    # another image, another answer's prompt length
    other = client.chat.completions.create(model="tiny-vision", messages=_messages(data_url(png(300, 60, 4))),
                                           max_tokens=2, temperature=0)
    assert other.usage.prompt_tokens != r.usage.prompt_tokens


def test_stream_and_two_images(setup):
    client, model, tok, _ = setup
    msgs = _messages(data_url(png(40, 80, 5)), data_url(png(64, 64, 6)), text="Compare them.")
    ref = vision.generate_full(model, tok, msgs, max_tokens=6, temperature=0, chat_format="phi3.5")
    chunks = list(client.chat.completions.create(model="tiny-vision", messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens


def test_local_paths_only_inside_image_dir(setup):
    client, model, tok, folder = setup
    r = client.chat.completions.create(model="tiny-vision", messages=_messages(str(folder / "cat.png")),
                                       max_tokens=3, temperature=0)
    ref = vision.generate_full(model, tok, _messages(data_url((folder / "cat.png").read_bytes())), max_tokens=3,
                               temperature=0, chat_format="phi3.5")
    assert r.choices[0].message.content == ref.text
    secret = next(folder.parent.glob("elsewhere*")) / "secret.png"
    for url, pattern in ((str(secret), "outside the allowed image directory"),
                         (str(folder / ".." / secret.parent.name / "secret.png"), "outside the allowed"),
                         ("https://example.com/cat.png", "never fetches URLs"),
                         ("file:///etc/passwd", "never fetches URLs"),
                         ("data:image/png;base64,!!!", "invalid base64"),
                         (data_url(b"not a picture at all"), "not an image"),
                         (data_url(png(100, 100, 7)[:200]), "truncated or corrupt")):
        with pytest.raises(openai.BadRequestError, match=pattern):
            client.chat.completions.create(model="tiny-vision", messages=_messages(url), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="'n' is not supported together with images"):
        client.chat.completions.create(model="tiny-vision", messages=_messages(data_url(png(20, 20, 8))), n=2)


def test_text_requests_still_use_the_engine(setup):
    client, model, tok, _ = setup
    msgs = [{"role": "user", "content": "Hello"}]
    from pocketlm.engine.generate import generate_full
    ref = generate_full(model, tok, msgs, max_tokens=5, temperature=0, chat_format="phi3.5")
    r = client.chat.completions.create(model="tiny-vision", messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == ref.text


def test_text_only_model_refuses_images():
    model = pocketlm.load("tiny")
    app = create_app(model, Tokenizer.default(), ServerConfig(model_name="tiny", max_slots=1, context_length=256))
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="reads text only"):
            client.chat.completions.create(model="tiny", messages=_messages(data_url(png(20, 20, 9))),
                                           max_tokens=2)


def test_cli_run_with_images(tmp_path, capsys):
    from pocketlm import cli
    (tmp_path / "a.png").write_bytes(png(50, 70, 10))
    (tmp_path / "b.png").write_bytes(png(80, 30, 11))
    code = cli.main(["run", "tiny-vision", "What is in these pictures?", "--image", str(tmp_path / "a.png"),
                     "--image", str(tmp_path / "b.png"), "--max-tokens", "4", "-v"])
    out, err = capsys.readouterr()
    assert code == 0
    model = pocketlm.load("tiny-vision")
    ref = vision.generate_full(model, Tokenizer.default(), [{"role": "user", "content": "What is in these pictures?"}],
                               [str(tmp_path / "a.png"), str(tmp_path / "b.png")], max_tokens=4, temperature=0,
                               chat_format="phi3.5")
    assert out == ref.text + "\n"
    assert "image count:          2 image(s)" in err and "image encode:" in err
    assert f"prompt eval count:    {ref.prompt_tokens} token(s)" in err
    assert cli.main(["run", "tiny-vision", "hi", "--image", str(tmp_path / "missing.png")]) != 0
    assert "missing.png: no such image file" in capsys.readouterr().err


def test_chat_repl_image_command(tmp_path, capsys, monkeypatch):
    import io as _io
    import sys
    from pocketlm import cli
    (tmp_path / "a.png").write_bytes(png(60, 40, 12))
    (tmp_path / "b.png").write_bytes(png(40, 90, 13))
    script = (f"/image {tmp_path / 'a.png'}\nWhat is this?\n/image {tmp_path / 'nope.png'}\n"
              f"/image {tmp_path / 'b.png'}\nAnd this one?\n/bye\n")
    monkeypatch.setattr(sys, "stdin", _io.StringIO(script))
    assert cli.main(["chat", "tiny-vision", "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "Added image" in err and "nope.png: no such image file" in err
    replies = out.strip("\n").split("\n")
    model, tok = pocketlm.load("tiny-vision"), Tokenizer.default()
    first = vision.generate_full(model, tok, [{"role": "user", "content": "What is this?"}], [str(tmp_path / "a.png")],
                                 max_tokens=3, temperature=0, chat_format="phi3.5")
    conv = [{"role": "user", "content": "<|image_1|>\nWhat is this?"}, {"role": "assistant", "content": first.text},
            {"role": "user", "content": "<|image_2|>\nAnd this one?"}]
    second = vision.generate_full(model, tok, conv, [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                                  max_tokens=3, temperature=0, chat_format="phi3.5")
    assert replies == [first.text, second.text]


def test_a_bad_image_in_a_stream_is_a_400(setup):
    client, *_ = setup
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.chat.completions.create(model="tiny-vision", messages=_messages(data_url(b"nope")), max_tokens=2,
                                       stream=True)


def test_roles_and_tags_in_image_requests(setup):
    client, model, tok, _ = setup
    url = data_url(png(30, 30, 14))
    msgs = [{"role": "developer", "content": "Be brief."}] + _messages(url)
    ref = vision.generate_full(model, tok, [{"role": "system", "content": "Be brief."}] + _messages(url),
                               max_tokens=3, temperature=0, chat_format="phi3.5")
    r = client.chat.completions.create(model="tiny-vision", messages=msgs, max_tokens=3, temperature=0)
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == ref.prompt_tokens
    with pytest.raises(openai.BadRequestError, match=r"names images \[1, 2\] but 1 image"):
        client.chat.completions.create(model="tiny-vision", messages=_messages(url, text="and <|image_2|>?"),
                                       max_tokens=2)
