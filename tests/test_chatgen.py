"""Procedural chat / preference data (`pocketlm.data.chatgen`): determinism, verified answers, and that every
record goes through the real SFT / DPO encoders."""

from __future__ import annotations

import json
import re

import pytest

from pocketlm.chat import render
from pocketlm.data import chatgen
from pocketlm.data.chatgen import ChatGenError, generate_chat, generate_prefs, verify_meta, write_jsonl
from pocketlm.data.synthetic import fmt, safe_eval
from pocketlm.tokenizer import Tokenizer
from pocketlm.train.dpo import PreferencePairs
from pocketlm.train.sft import PackedChat, encode_chat, read_jsonl


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_deterministic_and_prefix_stable():
    a = generate_chat(60, 3)
    assert a == generate_chat(60, 3)
    assert generate_chat(20, 3) == a[:20]
    assert a != generate_chat(60, 4)
    p = generate_prefs(40, 3)
    assert p == generate_prefs(40, 3)
    assert p != generate_prefs(40, 4)


def test_no_exact_duplicates():
    convs = generate_chat(600, 0)
    keys = [json.dumps(c["messages"], sort_keys=True) for c in convs]
    assert len(set(keys)) == len(keys)
    prefs = generate_prefs(300, 0)
    keys = [json.dumps(p, sort_keys=True) for p in prefs]
    assert len(set(keys)) == len(keys)


def test_every_arithmetic_answer_reverified():
    convs = generate_chat(400, 1, keep_meta=True)
    checked = 0
    for c in convs:
        answers = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        assert len(answers) == len(c["meta"])
        for meta, text in zip(c["meta"], answers):
            if meta["kind"] == "arith":
                # independent of verify_meta: recompute and find the value in the text as a whole number
                value = fmt(safe_eval(meta["expression"]))
                assert re.search(rf"(?<![\d/]){re.escape(value)}(?![\d/])", text), (meta, text)
                verify_meta(meta, text)
                checked += 1
    assert checked > 100


def test_verify_meta_catches_a_wrong_answer():
    with pytest.raises(ChatGenError, match="does not state"):
        verify_meta({"kind": "arith", "expression": "2 + 3", "answer": "5"}, "2 + 3 = 6.")
    with pytest.raises(ChatGenError, match="record says"):
        verify_meta({"kind": "arith", "expression": "2 + 3", "answer": "6"}, "2 + 3 = 6.")


def test_covers_the_topics():
    kinds = {m["kind"] for c in generate_chat(300, 2, keep_meta=True) for m in c["meta"]}
    assert {"greeting", "identity", "arith", "define", "tech", "refusal"} <= kinds
    convs = generate_chat(300, 2)
    multi = sum(sum(m["role"] == "user" for m in c["messages"]) >= 2 for c in convs)
    assert 0.15 < multi / len(convs) < 0.7
    assert any(c["messages"][0]["role"] == "system" for c in convs)
    ident = [c for c in convs if c["messages"][-2]["content"] == "Who are you?"]
    assert ident and "pocketlm" in ident[0]["messages"][-1]["content"]


def test_every_conversation_renders_and_encodes(tok):
    for c in generate_chat(150, 5):
        ids = render(c["messages"], tok, add_generation_prompt=False)
        full, trained = encode_chat(c["messages"], tok)
        assert full == ids and any(trained)
        # every trained span ends with <|end|>
        end = tok.token_to_id("<|end|>")
        spans = [i for i in range(len(full)) if trained[i] and (i + 1 == len(full) or not trained[i + 1])]
        assert spans and all(full[i] == end for i in spans)


def test_prefs_chosen_differs_and_loads(tok, tmp_path):
    prefs = generate_prefs(120, 0, keep_meta=True)
    for p in prefs:
        assert p["chosen"] != p["rejected"]
        assert p["prompt"][-1]["role"] == "user"
        verify_meta(p["meta"], p["chosen"])
        if p["meta"]["kind"] == "refusal":
            assert p["chosen"] in chatgen.REFUSALS
    path = tmp_path / "prefs.jsonl"
    write_jsonl([{k: v for k, v in p.items() if k != "meta"} for p in prefs], path)
    src = PreferencePairs(path, tok, 256)
    assert len(src) == 120 and src.skipped == 0


def test_write_jsonl_roundtrip_into_packed_chat(tok, tmp_path):
    convs = generate_chat(50, 0)
    path = tmp_path / "chat.jsonl"
    write_jsonl(convs, path)
    assert read_jsonl(path) == convs
    src = PackedChat(path, tok, 256)
    assert src.num_conversations == 50 and src.truncated == 0


def test_corpus_definitions(tmp_path):
    lines = [f'{w}, syn (noun): {g}; "an example with {w}"' for w, _, g in chatgen.GLOSSARY[:40]]
    lines.append("the (noun): a rare word that is skipped because its gloss is fine but the word is short")
    rec = {"id": "wordnet/noun-000000", "text": "\n".join(lines)}
    (tmp_path / "wordnet.jsonl").write_text(json.dumps(rec) + "\n")
    convs = generate_chat(200, 0, corpus_dir=str(tmp_path), keep_meta=True)
    defined = [(m, c) for c in convs for m in c["meta"] if m["kind"] == "define"]
    assert defined
    for meta, c in defined:
        assert meta["word"] in {w for w, _, _ in chatgen.GLOSSARY[:40]}
    assert any("For example" in m["content"] for _, c in defined for m in c["messages"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ChatGenError, match="non-negative"):
        generate_chat(-1, 0)
    with pytest.raises(ChatGenError, match="not a folder"):
        generate_chat(3, 0, corpus_dir=str(tmp_path / "missing"))
    (tmp_path / "wordnet.jsonl").write_text("not json\n")
    with pytest.raises(ChatGenError, match="not a corpus record"):
        generate_chat(3, 0, corpus_dir=str(tmp_path))
    assert generate_chat(0, 0) == []
