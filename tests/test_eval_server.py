"""`pocketlm eval` against the pocketlm server: OpenAIBackend (echo + logprobs over /v1/completions) scores
multiple-choice tasks exactly as the in-process PocketLMBackend does.

The server runs in-process (uvicorn on 127.0.0.1, a free port). The model is the `tiny` preset's architecture
with its vocabulary cut to the tokenizer's 32011 ids: the server (like every OpenAI-style server) takes the
log-softmax over the tokenizer's real ids only, while PocketLMBackend (like lm-eval's HFLM) takes it over all
embedding rows. On the stock random `tiny` model (32064 rows) those 53 padding rows hold ~0.17% of the mass
(~0.0018 nats per token); with no padding rows both sides compute the same distribution. (A trained model puts
next to nothing on its padding rows.) test_serve_api.py checks the echo logprobs on the stock model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm.config import preset
from pocketlm.eval.backends import OpenAIBackend, PocketLMBackend
from pocketlm.eval.runner import evaluate
from pocketlm.eval.tasks import get_task
from pocketlm.formats.hf import empty_model, init_weights
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

DATA = Path(__file__).parent / "data" / "eval"
REQS = [("Question: What is 2+2?\nAnswer:", " four"), ("Question: What is 2+2?\nAnswer:", " five, surely"),
        ("Question: What is 2+2?\nAnswer:", " 4"), ("The sky is ", "blue"), ("Hello", " world"),
        ("Caf\u00e9 \U0001F600 na\u00efve:", " r\u00e9sum\u00e9 \U0001F680")]


@pytest.fixture(scope="module")
def both():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread is faster for a tiny model
    tok = pocketlm.Tokenizer.default()
    model = init_weights(empty_model(preset("tiny").replace(vocab_size=len(tok)), torch.float32), seed=3).eval()
    local = PocketLMBackend(model, tok, batch_size=4)
    app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=4, context_length=2048))
    with BackgroundServer(app) as srv:
        yield local, OpenAIBackend(srv.url + "/v1", "tiny", timeout=120)
    torch.set_num_threads(threads)


def test_per_choice_loglikelihoods_match_in_process(both):
    local, remote = both
    got, ref = remote.loglikelihood(REQS), local.loglikelihood(REQS)
    for (c, x), (r, rg), (l, lg) in zip(REQS, got, ref):
        assert r == pytest.approx(l, abs=1e-4), (c, x)
        assert rg == lg, (c, x)
    assert len({round(v, 3) for v, _ in ref}) == len(ref)  # the scores really differ (the check can fail)


@pytest.mark.parametrize("task", ["arc_easy", "piqa"])
def test_evaluate_gives_identical_accuracy_through_both_backends(both, task):
    local, remote = both
    a = evaluate(local, [get_task(task)], data_dir=DATA, limit=4, progress=False)
    b = evaluate(remote, [get_task(task)], data_dir=DATA, limit=4, progress=False)
    for ra, rb in zip(a["samples"][task], b["samples"][task]):
        assert ra["prompt"] == rb["prompt"]
        assert rb["loglikelihoods"] == pytest.approx(ra["loglikelihoods"], abs=1e-4)
        assert (ra["pred"], ra["pred_norm"]) == (rb["pred"], rb["pred_norm"])
        assert ra["scores"] == rb["scores"]
    ma, mb = a["results"][task]["metrics"], b["results"][task]["metrics"]
    assert {k: ma[k]["mean"] for k in ("acc", "acc_norm")} == {k: mb[k]["mean"] for k in ("acc", "acc_norm")}
