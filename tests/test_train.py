"""pocketlm.train on CPU with tiny models: configs, schedules, pretraining, SFT masking and packing, DPO against a
hand-computed reference, checkpoints that survive a crash while saving."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import pocketlm
from pocketlm.cli import main as cli_main
from pocketlm.data.shards import write_shards
from pocketlm.errors import ConfigError
from pocketlm.tokenizer import Tokenizer
from pocketlm.train import checkpoint as ckpt
from pocketlm.train.config import RECIPES, apply_overrides, recipe
from pocketlm.train.dpo import DPOObjective, dpo_loss, sequence_logps
from pocketlm.train.loop import Trainer, lr_at, train
from pocketlm.train.sft import IGNORE, encode_chat, pack, sft_loss


def make_pretrain_data(root):
    """Two sources with learnable structure: strided ramps ("web") and short repeating cycles ("synthetic")."""
    rng = np.random.default_rng(0)
    web = [[int((s + 3 * j) % 500 + 2) for j in range(int(rng.integers(20, 80)))]
           for s in rng.integers(0, 500, 300)]
    syn = [[int(a + j % 7) for j in range(int(rng.integers(10, 40)))] for a in rng.integers(2, 50, 300)]
    return (write_shards(root / "web", web, eos_id=2, shard_tokens=4000),
            write_shards(root / "synthetic", syn, eos_id=2, shard_tokens=4000))


def pretrain_cfg(root, *extra):
    web, syn = (root / "web", root / "synthetic")
    if not web.exists():
        make_pretrain_data(root)
    return apply_overrides(recipe("tiny-pretrain"), [f"sources.web={web}", f"sources.synthetic={syn}",
                                                     "tensorboard=false", "plot=false", *extra])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    make_pretrain_data(root)
    return root


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


# ---- config ---------------------------------------------------------------------------------------------------------

def test_recipes_exact_lookup_and_overrides():
    for name, fn in RECIPES.items():
        assert fn() == recipe(name) and fn.__doc__
    with pytest.raises(ConfigError, match="not a training recipe"):
        recipe("tiny_pretrain")
    cfg = apply_overrides(recipe("tiny-pretrain"), ["optim.lr=0.01", "phases.1.steps=5", "sources.web=/x",
                                                    "schedule.kind=cosine", "model_overrides.vocab_size=1024"])
    assert cfg.optim.lr == 0.01 and cfg.phases[1].steps == 5 and cfg.sources["web"] == "/x"
    assert cfg.schedule.kind == "cosine" and cfg.model_overrides["vocab_size"] == 1024 and cfg.total_steps == 29
    with pytest.raises(ConfigError, match="unknown field 'lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(cfg, ["optim.lr"])
    with pytest.raises(ConfigError, match="schedule.kind"):
        apply_overrides(cfg, ["schedule.kind=linear"])
    with pytest.raises(ConfigError, match="not a multiple"):
        apply_overrides(cfg, ["micro_batch_size=3"])
    assert cfg.hash() == apply_overrides(cfg, ["save_every=7"]).hash() != apply_overrides(cfg, ["seed=1"]).hash()


def test_schedules():
    cfg = apply_overrides(recipe("tiny-pretrain"), ["schedule.kind=cosine", "schedule.warmup_steps=4"])
    lr, total = cfg.optim.lr, cfg.total_steps
    assert lr_at(cfg, 0) == pytest.approx(lr / 4) and lr_at(cfg, 3) == pytest.approx(lr)
    assert lr_at(cfg, total - 1) == pytest.approx(0.1 * lr, rel=0.02)
    mid = 4 + (total - 4) // 2
    assert lr_at(cfg, mid) == pytest.approx(lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 4) / (total - 4)))))
    wsd = apply_overrides(cfg, ["schedule.kind=wsd", "schedule.decay_fraction=0.25"])
    assert [lr_at(wsd, s) for s in (4, 29)] == [lr, lr]  # stable until the last 10 of 40 steps
    assert lr_at(wsd, 30) < lr and lr_at(wsd, 39) == pytest.approx(0.1 * lr)


def test_cli_recipes_and_print_config(capsys):
    assert cli_main(["train", "recipes"]) == 0
    assert "tiny-pretrain" in capsys.readouterr().out
    assert cli_main(["train", "pretrain", "--recipe", "tiny-pretrain", "--run-dir", "x", "--print-config",
                     "--set", "seq_len=16"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 16
    assert cli_main(["train", "sft", "--recipe", "tiny-pretrain", "--run-dir", "x"]) == 2
    assert "is a pretrain recipe" in capsys.readouterr().err


# ---- pretraining ----------------------------------------------------------------------------------------------------

def test_pretrain_two_phases_loss_decreases_and_exports_official_layout(data_root, tmp_path):
    cfg = pretrain_cfg(data_root, "plot=true", "tensorboard=true")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(max_steps=24)  # phase 1: web 0.9 / synthetic 0.1
    phase1 = dict(trainer.loader.counts)
    records = trainer.run()  # phase 2: web 0.4 / synthetic 0.6
    phase2 = {k: trainer.loader.counts[k] - phase1[k] for k in phase1}
    assert phase1["web"] / sum(phase1.values()) > 0.8 and 0.45 < phase2["synthetic"] / sum(phase2.values()) < 0.75
    losses = [r["loss"] for r in records]
    assert len(losses) == 40 and [r["phase"] for r in records][23:25] == ["phase1", "phase2"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5, losses
    assert all(0 < r["mfu"] and r["tokens_per_s"] > 0 for r in records)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 1000 and any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000030", "step-00000040"]
    # the exported model is the official layout and equals the trained weights
    model = pocketlm.load(run / "model")
    assert json.loads((run / "model" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], p.detach()), name
    # initialise a new run from it (our own checkpoint folder, official layout)
    follow = apply_overrides(cfg, [f"model={run / 'model'}", "model_overrides={}", "phases.0.steps=2",
                                   "phases.1.steps=1", "plot=false", "tensorboard=false"])
    more = train(follow, tmp_path / "run2", progress=False)
    assert more[0]["loss"] < losses[0] - 1.0  # starts where the first run ended, not from scratch


def test_resume_after_stop_matches(data_root, tmp_path):
    """In-process stop/resume (the kill -9 variant is in test_train_resume.py)."""
    cfg = pretrain_cfg(data_root, "phases.0.steps=8", "phases.1.steps=6", "save_every=5")
    full = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, max_steps=7)  # last checkpoint: step 5; steps 6-7 are redone
    assert [r["step"] for r in train(cfg, tmp_path / "b", progress=False)] == list(range(1, 15))
    resumed = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [r["loss"] for r in full]
    with pytest.raises(ckpt.CheckpointError, match="already holds"):
        Trainer(cfg, tmp_path / "b", resume="never")
    with pytest.raises(ckpt.CheckpointError, match="config hash"):
        Trainer(apply_overrides(cfg, ["optim.lr=0.1"]), tmp_path / "b")


def test_crash_while_saving_never_looks_complete(data_root, tmp_path, monkeypatch):
    cfg = pretrain_cfg(data_root, "phases.0.steps=4", "phases.1.steps=4", "save_every=2")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(max_steps=2)
    good = ckpt.latest(tmp_path / "run")
    digest = {p.name: ckpt.sha256_file(p) for p in good.rglob("*") if p.is_file()}
    real = ckpt.save_torch
    calls = {"n": 0}

    def failing(obj, path):  # the disk fills up in the middle of the next checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_torch", failing)
    with pytest.raises(OSError):
        trainer.run(max_steps=4)
    monkeypatch.setattr(ckpt, "save_torch", real)
    assert ckpt.latest(tmp_path / "run") == good  # the partial step-4 is ignored
    assert (tmp_path / "run" / "checkpoints" / "step-00000004.tmp").exists()
    assert {p.name: ckpt.sha256_file(p) for p in good.rglob("*") if p.is_file()} == digest
    # a folder renamed into place but without COMPLETE does not count either
    (tmp_path / "run" / "checkpoints" / "step-00000003").mkdir()
    assert ckpt.latest(tmp_path / "run") == good
    again = Trainer(cfg, tmp_path / "run", progress=False)  # start: partial folders are cleaned
    assert again.step == 2 and sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [good.name]
    again.run()
    done = ckpt.latest(tmp_path / "run")
    assert done.name == "step-00000008"
    marker = json.loads((done / "COMPLETE").read_text())
    assert all(ckpt.sha256_file(done / f) == h for f, h in marker["files"].items())
    # the train state loads with weights_only=True (no arbitrary unpickling)
    state = torch.load(done / "train_state.pt", weights_only=True)
    assert state["step"] == 8 and state["loader"]["samples"] == 8 * 8


# ---- SFT ------------------------------------------------------------------------------------------------------------

CONV = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}]


def test_sft_masks_exactly_the_non_assistant_tokens(tok):
    ids, trained = encode_chat(CONV, tok)
    # <|system|> Be nice. <|end|> <|user|> Hi there <|end|> <|assistant|> Hello! How can I help? <|end|> <|endoftext|>
    assert ids == [32006, 1522, 7575, 29889, 32007, 32010, 6324, 727, 32007, 32001,
                   15043, 29991, 1128, 508, 306, 1371, 29973, 32007, 32000]
    assert [i for i, t in zip(ids, trained) if t] == [15043, 29991, 1128, 508, 306, 1371, 29973, 32007]
    # two assistant turns, the user turn between them is context
    conv = CONV + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    ids, trained = encode_chat(conv, tok)
    trained_text = tok.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text.replace(" ", "") == "Hello!HowcanIhelp?<|end|>Goodbye<|end|>"
    assert tok.decode([i for i, t in zip(ids, trained) if not t]).count("<|user|>") == 2
    # the older format (a): <s>, no system, assistant turn right after <|assistant|>
    ids, trained = encode_chat(CONV, tok, format="phi3-mini-2024-04")
    assert ids[0] == 1 and 32006 not in ids
    assert [i for i, t in zip(ids, trained) if t] == [15043, 29991, 1128, 508, 306, 1371, 29973, 32007]


def test_sft_packing_labels_and_no_cross_contamination(tok):
    convs = [encode_chat(CONV, tok),
             encode_chat([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], tok),
             encode_chat([{"role": "user", "content": "Name a colour."},
                          {"role": "assistant", "content": "Blue, like the sky."}], tok)]
    rows = pack(convs, 48, pad_id=32000)
    assert len(rows) == 1
    row = rows[0]
    n = [len(c[0]) for c in convs]
    assert row["positions"][:n[0]].tolist() == list(range(n[0]))
    assert row["positions"][n[0]:n[0] + n[1]].tolist() == list(range(n[1]))  # restart per conversation
    expected, t = [], 0
    for ids, trained in convs:
        expected += [ids[j + 1] if trained[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]
        t += len(ids)
    expected += [IGNORE] * (48 - t)
    assert row["labels"].tolist() == expected
    # packed logits equal each conversation run alone
    model = pocketlm.load("tiny", seed=0)
    batch = {k: torch.from_numpy(v)[None] for k, v in row.items()}
    ids_t, pos, doc = batch["input_ids"], batch["positions"], batch["doc"]
    packed = model.forward_batched(ids_t, pos, model.attention_mask(pos, pos, q_doc=doc, k_doc=doc))
    start = 0
    for ids, _ in convs:
        alone = model(torch.tensor([ids]))
        torch.testing.assert_close(packed[:, start:start + len(ids)], alone, atol=2e-5, rtol=1e-4)
        start += len(ids)
    loss, count, _ = sft_loss(model, batch)
    assert int(count) == sum(sum(tr[1:]) for _, tr in convs)
    assert torch.isfinite(loss)
    # long conversations are truncated to the row, and a row never exceeds seq_len
    assert all(len(r["input_ids"]) == 16 for r in pack(convs, 16, pad_id=0))


def test_sft_training_learns_the_end_token(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
             for w in ("yes", "no", "maybe", "blue", "red", "green")]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = apply_overrides(recipe("tiny-sft"), [f"sources.chat={path}", "phases.0.steps=12", "save_every=12",
                                               "tensorboard=false", "plot=false", "optim.lr=0.003"])
    records = train(cfg, tmp_path / "run", progress=False)
    assert records[-1]["loss"] < records[0]["loss"] / 2
    model = pocketlm.load(tmp_path / "run" / "model")  # the tokenizer files went with it
    assert (tmp_path / "run" / "model" / "tokenizer.json").exists()
    from pocketlm.chat import render
    ids = render(convs[0][:1], tok)
    out = pocketlm.generate(model, tok, convs[0][:1], max_tokens=5, temperature=0)
    assert out == "yes", (out, ids)


# ---- DPO ------------------------------------------------------------------------------------------------------------

def _dpo_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (4, 10), generator=g)
    labels = torch.full((4, 10), IGNORE)
    labels[:, 4:9] = ids[:, 5:10]  # prompt = 5 tokens; completions = the last 5
    labels[1, 7:] = IGNORE  # a shorter chosen completion
    return {"chosen_ids": ids[:2], "chosen_labels": labels[:2], "rejected_ids": ids[2:], "rejected_labels": labels[2:],
            "index": torch.tensor([[0], [1]])}


def test_dpo_loss_and_gradients_equal_hand_computed():
    from pocketlm.config import preset
    from pocketlm.formats import hf
    config = preset("tiny").replace(vocab_size=512, pad_token_id=0)
    model = hf.init_weights(hf.empty_model(config, torch.float32), seed=1)
    batch, beta = _dpo_batch(), 0.5
    ref = torch.tensor([[-30.0, -31.0], [-25.0, -24.0]])
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logits = model(ids).detach().double()

    # by hand: log-probs as explicit sums of log-softmax terms, the loss with math.log/exp
    def hand_logp(row):
        total = 0.0
        for t in range(10):
            if labels[row, t] != IGNORE:
                x = logits[row, t]
                total += float(x[labels[row, t]]) - math.log(float(torch.exp(x - x.max()).sum())) - float(x.max())
        return total
    pi = [hand_logp(r) for r in range(4)]
    z = [beta * ((pi[i] - float(ref[i, 0])) - (pi[2 + i] - float(ref[i, 1]))) for i in range(2)]
    hand_loss = sum(-math.log(1 / (1 + math.exp(-zi))) for zi in z) / 2

    objective = DPOObjective(beta, ref_table=ref)
    loss_sum, n, metrics = objective(model, batch)
    assert int(n) == 2
    assert float(loss_sum.detach()) / 2 == pytest.approx(hand_loss, rel=1e-5)
    assert float(metrics["rewards/accuracies"]) == sum(zi > 0 for zi in z)
    assert float(metrics["rewards/margins"]) == pytest.approx(sum(z), rel=1e-5)
    assert float(metrics["logps/chosen"]) == pytest.approx(pi[0] + pi[1], rel=1e-5)

    # gradient w.r.t. the logits, by hand: dL/dlogit[t] = c * (onehot(label_t) - softmax(logit_t)),
    # c = -beta/N * sigmoid(-z) for the chosen row and +beta/N * sigmoid(-z) for the rejected row
    sig = [1 / (1 + math.exp(zi)) for zi in z]
    coef = [-beta / 2 * sig[0], -beta / 2 * sig[1], beta / 2 * sig[0], beta / 2 * sig[1]]
    hand_grad = torch.zeros_like(logits)
    for r in range(4):
        for t in range(10):
            if labels[r, t] != IGNORE:
                onehot = torch.zeros(512, dtype=torch.float64)
                onehot[labels[r, t]] = 1
                hand_grad[r, t] = coef[r] * (onehot - torch.softmax(logits[r, t], -1))
    leaf = logits.float().requires_grad_()
    lp = sequence_logps(leaf, labels)
    losses, _, _ = dpo_loss(lp[:2], lp[2:], ref[:, 0], ref[:, 1], beta)
    losses.mean().backward()
    torch.testing.assert_close(leaf.grad.double(), hand_grad, atol=1e-7, rtol=1e-4)
    # and through the model: the objective's parameter gradients = the hand logit gradient back-propagated
    model.zero_grad()
    (loss_sum / 2).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids).backward(hand_grad.float())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-7, rtol=1e-3)


def test_dpo_run_with_and_without_precomputed_reference(tok, tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Is {w} a colour?", "chosen": "Yes, it is.", "rejected": "I refuse to answer."}
            for w in ("red", "blue", "green", "teal")]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                 "chosen": "Hi!", "rejected": "Hello there, how may I be of assistance today?"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"sources.prefs={path}", "phases.0.steps=6", "save_every=6", "tensorboard=false", "plot=false",
            "optim.lr=0.001"]
    pre = train(apply_overrides(recipe("tiny-dpo"), base), tmp_path / "a", progress=False)
    live = train(apply_overrides(recipe("tiny-dpo"), base + ["dpo_precompute_ref=false"]), tmp_path / "b",
                 progress=False)
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert pre[0]["rewards/margins"] == 0.0
    for a, b in zip(pre, live):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert pre[-1]["loss"] < pre[0]["loss"] and pre[-1]["rewards/accuracies"] == 1.0
    assert pre[-1]["rewards/margins"] > 0 and pre[-1]["logps/rejected"] < pre[0]["logps/rejected"]


def test_activation_checkpointing_changes_nothing_but_memory(data_root, tmp_path):
    cfg = pretrain_cfg(data_root, "phases.0.steps=2", "phases.1.steps=1", "save_every=3")
    plain = train(cfg, tmp_path / "a", progress=False)
    ac = train(apply_overrides(cfg, ["activation_checkpointing=true"]), tmp_path / "b", progress=False)
    assert [r["loss"] for r in ac] == [r["loss"] for r in plain]
