"""Backends: shared-prefix batching is exact; an OpenAI-compatible endpoint is scored the same way."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from http_helpers import fake_server, send_json

import pocketlm
from pocketlm.eval.backends import EvalBackendError, OpenAIBackend, PocketLMBackend
from pocketlm.eval.runner import evaluate
from pocketlm.eval.tasks import get_task

DATA = Path(__file__).parent / "data" / "eval"
REQS = [("Question: What is 2+2?\nAnswer:", " four"), ("Question: What is 2+2?\nAnswer:", " five, surely"),
        ("Question: What is 2+2?\nAnswer:", " 4"), ("The sky is ", "blue"), ("Hello", " world")]


@pytest.fixture(scope="module")
def backend():
    return PocketLMBackend(pocketlm.load("tiny", seed=5), pocketlm.Tokenizer.default(), batch_size=2)


def _reference(b: PocketLMBackend, ctx: list[int], cont: list[int]) -> float:
    with torch.inference_mode():
        logits = b.model(torch.tensor([ctx + cont]))[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_shared_prefix_batches_equal_one_full_forward_each(backend):
    got = backend.loglikelihood(REQS)
    for (c, x), (ll, _) in zip(REQS, got):
        ctx, cont = backend.encode_pair(c, x)
        assert ll == pytest.approx(_reference(backend, ctx, cont), abs=1e-4)
    assert backend.encode_pair("The sky is ", "blue")[1] == backend.encode_pair("The sky is", " blue")[1]


def test_left_truncation_to_the_context_window(backend):
    short = PocketLMBackend(backend.model, backend.tok, max_length=8)
    ll, _ = short.loglikelihood([("one two three four five six seven eight nine ten", " eleven")])[0]
    ctx, cont = short.encode_pair("one two three four five six seven eight nine ten", " eleven")
    inp = (ctx + cont)[-9:]
    assert ll == pytest.approx(_reference(backend, inp[:-len(cont)], cont), abs=1e-4)


class _FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/completions with echo logprobs computed by a pocketlm model; canned generations."""
    backend: PocketLMBackend = None  # set by the fixture
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        b = self.backend
        if self.path == "/v1/completions" and body.get("echo"):
            ids = b.tok.encode(body["prompt"], add_bos=True)
            with torch.inference_mode():
                lp = torch.log_softmax(b.model(torch.tensor([ids]))[0].float(), -1)
            toks = [b.tok.id_to_token(i) for i in ids]
            offs = [len(b.tok.decode(ids[1:i], skip_special=True)) if i > 1 else 0 for i in range(len(ids))]
            vals = [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
            top = [None] + [{b.tok.id_to_token(int(lp[i - 1].argmax())): 0.0} for i in range(1, len(ids))]
            out = {"choices": [{"text": body["prompt"], "logprobs": {"tokens": toks, "text_offset": offs,
                                                                    "token_logprobs": vals, "top_logprobs": top}}]}
        elif self.path == "/v1/completions":
            out = {"choices": [{"text": "Janet has 3 + 4 = 7 apples. The answer is 7.\n\nQ: more"}]}
        elif self.path == "/v1/chat/completions":
            out = {"choices": [{"message": {"role": "assistant", "content": "The answer is (B)."}}]}
        else:
            self.send_response(404)
            self.end_headers()
            return
        send_json(self, out)


@pytest.fixture
def server(backend):
    _FakeOpenAI.backend, _FakeOpenAI.seen = backend, []
    with fake_server(_FakeOpenAI) as url:
        yield url


def test_openai_loglikelihood_matches_the_local_model(server, backend):
    api = OpenAIBackend(server, "tiny")
    reqs = REQS[:3]
    remote, local = api.loglikelihood(reqs), backend.loglikelihood(reqs)
    for (r, rg), (l, lg) in zip(remote, local):
        assert r == pytest.approx(l, abs=1e-4) and rg == lg
    path, body = _FakeOpenAI.seen[0]
    assert path == "/v1/completions" and body["echo"] is True and body["logprobs"] == 1


def test_openai_generation_text_and_chat(server):
    api = OpenAIBackend(server, "tiny")
    run = evaluate(api, [get_task("gsm8k")], data_dir=DATA, limit=2, progress=False)
    rows = run["samples"]["gsm8k"]
    assert rows[0]["generation"] == "Janet has 3 + 4 = 7 apples. The answer is 7."  # cut at the "Q:" stop
    assert [r["scores"]["exact_match"] for r in rows] == [1.0, 0.0]
    assert run["results"]["gsm8k"]["score"] == 0.5
    chat = evaluate(api, [get_task("mmlu")], data_dir=DATA, limit=1, fmt="letter", chat=True, progress=False)
    assert chat["samples"]["mmlu"][0]["pred"] == "B" and chat["results"]["mmlu"]["score"] == 1.0
    path, body = _FakeOpenAI.seen[-1]
    assert path == "/v1/chat/completions" and body["messages"][0]["role"] == "user" and body["temperature"] == 0


def test_openai_errors_are_typed(server):
    with pytest.raises(EvalBackendError, match="HTTP 404"):
        OpenAIBackend(server.replace("/v1", "/nope/v1"), "tiny").generate(["x"])
    with pytest.raises(EvalBackendError):
        OpenAIBackend("http://127.0.0.1:9/v1", "tiny", timeout=2).generate(["x"])
