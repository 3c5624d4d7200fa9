"""Training under faults and misuse (issue 20): the RNG streams survive a resume, a corrupt checkpoint is caught by
its sha256s, a torn metrics log is repaired, one trainer per run directory, TensorBoard without replayed steps,
a resume that says so, and errors that name the fix (vocabulary, missing sources, --resume values, config
changes). CPU, tiny model, seconds each."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pocketlm.cli import main as cli_main
from pocketlm.data.shards import write_shards
from pocketlm.errors import ConfigError
from pocketlm.train import checkpoint as ckpt
from pocketlm.train import loop, metrics
from pocketlm.train.config import apply_overrides
from pocketlm.train.loop import Trainer, train
from test_train import make_pretrain_data, pretrain_cfg

SHORT = ("phases.0.steps=4", "phases.1.steps=4", "save_every=2")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_pretrain_data(root)
    return root


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """Losses of the 8-step run that is never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    return [r["loss"] for r in train(pretrain_cfg(data_root, *SHORT), run, progress=False)]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli_args(data_root, run, *extra):
    return ["train", "pretrain", "--recipe", "tiny-pretrain", "--run-dir", str(run), "--no-progress",
            "--set", f"sources.web={data_root / 'web'}", "--set", f"sources.synthetic={data_root / 'synthetic'}",
            "--set", "tensorboard=false", "--set", "plot=false", *[a for s in SHORT for a in ("--set", s)], *extra]


# ---- RNG ------------------------------------------------------------------------------------------------------------

def _rng():
    n = np.random.get_state()
    return torch.get_rng_state(), random.getstate(), (n[1].tolist(), n[2])


def test_rng_state_at_step_n_is_identical_with_and_without_an_interruption(data_root, tmp_path, monkeypatch):
    cfg = pretrain_cfg(data_root, *SHORT)
    monkeypatch.setattr(metrics, "_cpu_peak_cache", {})  # every Trainer below starts like a fresh process
    whole = Trainer(cfg, tmp_path / "whole", progress=False)
    whole.run(max_steps=6)
    expected = _rng()

    monkeypatch.setattr(metrics, "_cpu_peak_cache", {})
    train(cfg, tmp_path / "cut", progress=False, max_steps=5)  # checkpoint at step 4, then the process "dies"
    monkeypatch.setattr(metrics, "_cpu_peak_cache", {})
    torch.manual_seed(999)  # a new process starts from other states; the trainer must restore the saved ones
    resumed = Trainer(cfg, tmp_path / "cut", progress=False)
    assert resumed.step == 4
    resumed.run(max_steps=6)
    got = _rng()
    assert torch.equal(got[0], expected[0]), "torch CPU RNG differs after the resume"
    assert got[1] == expected[1] and got[2] == expected[2]


# ---- checkpoint integrity -------------------------------------------------------------------------------------------

def _flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bit_in_newest_checkpoint_falls_back_to_the_previous_one(data_root, reference, tmp_path, capsys):
    cfg = pretrain_cfg(data_root, *SHORT)
    run = tmp_path / "run"
    train(cfg, run, progress=False, max_steps=6)  # checkpoints 4 and 6 (keep_checkpoints=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    _flip_bit(run / "checkpoints" / "step-00000006" / "model" / "model.safetensors")
    capsys.readouterr()
    trainer = Trainer(cfg, run, progress=False)
    err = capsys.readouterr().err
    assert trainer.step == 4
    warning = [line for line in err.splitlines() if "corrupt" in line]
    assert len(warning) == 1 and "step-00000006" in warning[0] and "model.safetensors" in warning[0]
    assert "sha256" in warning[0] and "step-00000004" in warning[0]
    assert (run / "checkpoints" / "step-00000006.corrupt").is_dir()  # kept aside for inspection, never resumed
    trainer.run()
    trainer.close()
    assert _losses(run) == reference
    assert ckpt.latest(run).name == "step-00000008" and ckpt.verify(ckpt.latest(run)) is None


def test_no_intact_checkpoint_is_one_typed_error(data_root, tmp_path, capsys):
    cfg = pretrain_cfg(data_root, *SHORT)
    run = tmp_path / "run"
    train(cfg, run, progress=False, max_steps=6)
    (run / "checkpoints" / "step-00000006" / "train_state.pt").write_bytes(b"")  # emptied by a full disk
    _flip_bit(run / "checkpoints" / "step-00000004" / "rng-rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint") as e:
        Trainer(cfg, run, progress=False)
    assert "train_state.pt" in str(e.value) and "rng-rank0.pt" in str(e.value)
    assert not list((run / "checkpoints").glob("*.corrupt"))  # nothing moved when there is nothing to fall back on
    # an explicitly named corrupt checkpoint is refused too, and an empty state file never leaks an EOFError
    with pytest.raises(ckpt.CheckpointError, match="is corrupt"):
        Trainer(cfg, run, progress=False, resume=str(run / "checkpoints" / "step-00000006"))
    with pytest.raises(ckpt.CheckpointError, match="train_state.pt: unreadable"):
        ckpt.load_state(run / "checkpoints" / "step-00000006", "train_state.pt")
    capsys.readouterr()
    assert cli_main(_cli_args(data_root, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0]


# ---- metrics log ----------------------------------------------------------------------------------------------------

def test_torn_metrics_line_is_repaired_on_resume(data_root, reference, tmp_path, capsys):
    cfg = pretrain_cfg(data_root, *SHORT)
    run = tmp_path / "run"
    train(cfg, run, progress=False, max_steps=5)  # checkpoint 4, step 5 logged
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "phase": "phase2", "lo')  # power loss in the middle of a line
    trainer = Trainer(cfg, run, progress=False)
    assert "dropped 1 torn" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    trainer.run()
    trainer.close()
    assert _losses(run) == reference
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "{not json\n")
    with pytest.raises(metrics.MetricsError, match="metrics.jsonl:9"):
        metrics.read_metrics(run)


def test_metrics_are_fsynced_before_a_checkpoint_is_complete(data_root, tmp_path, monkeypatch):
    events = []
    real_fsync, real_commit = os.fsync, ckpt.commit

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def commit(tmp, step):
        events.append(("commit", step))
        return real_commit(tmp, step)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt, "commit", commit)
    train(pretrain_cfg(data_root, *SHORT), tmp_path / "run", progress=False, max_steps=2)
    log = str((tmp_path / "run" / "metrics.jsonl").resolve())
    before = events[:events.index(("commit", 2))]
    assert ("fsync", log) in before


# ---- one trainer per run directory -----------------------------------------------------------------------------------

def test_second_trainer_on_the_same_run_dir_is_refused_naming_the_first(data_root, tmp_path):
    cfg = pretrain_cfg(data_root, *SHORT)
    run = tmp_path / "run"
    holder = Trainer(cfg, run, progress=False)
    holder.run(max_steps=1)
    log_before = (run / "metrics.jsonl").read_text()
    code = f"import sys\nfrom pocketlm.cli import main\nsys.exit(main({_cli_args(data_root, run)!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode == 2, other.stderr
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another trainer" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert (run / "metrics.jsonl").read_text() == log_before  # the second trainer touched nothing
    with pytest.raises(ckpt.RunLockedError):  # also from another open file description in this process
        _flock_elsewhere(run)
    holder.close()
    _flock_elsewhere(run)  # released


def _flock_elsewhere(run):
    import fcntl
    fd = os.open(run / "run.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ckpt.RunLockedError("held") from None
    finally:
        os.close(fd)


# ---- TensorBoard ----------------------------------------------------------------------------------------------------

def test_tensorboard_has_each_step_once_after_a_resume(data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = pretrain_cfg(data_root, *SHORT, "tensorboard=true")
    run = tmp_path / "run"
    train(cfg, run, progress=False, max_steps=5)  # steps 1-5 in TensorBoard, checkpoint at 4
    train(cfg, run, progress=False)  # replays step 5
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, 9))
    assert [e.value for e in events] == pytest.approx(_losses(run), rel=1e-6)


# ---- messages -------------------------------------------------------------------------------------------------------

def test_resume_and_already_complete_are_announced(data_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cli_main(_cli_args(data_root, run, "--max-steps", "5")) == 0
    capsys.readouterr()
    assert cli_main(_cli_args(data_root, run)) == 0
    err = capsys.readouterr().err
    assert f"resuming from step 4 (checkpoint {run / 'checkpoints' / 'step-00000004'})" in err
    log = (run / "metrics.jsonl").read_text()

    def no_work(*a, **k):
        raise AssertionError("a finished run built a trainer")

    monkeypatch.setattr(loop, "Trainer", no_work)
    assert cli_main(_cli_args(data_root, run)) == 0
    assert "already complete" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == log


def test_resume_values_are_listed(data_root, tmp_path, capsys):
    assert cli_main(_cli_args(data_root, tmp_path / "run", "--resume", "yes")) == 2
    err = capsys.readouterr().err
    assert "--resume 'yes'" in err and "auto" in err and "never" in err and "checkpoint" in err


def test_config_change_on_resume_names_the_fields(data_root, tmp_path):
    cfg = pretrain_cfg(data_root, *SHORT)
    run = tmp_path / "run"
    train(cfg, run, progress=False, max_steps=2)
    changed = apply_overrides(cfg, ["optim.lr=0.1", "phases.1.steps=9", "log_every=2"])
    with pytest.raises(ckpt.CheckpointError, match="config hash") as e:
        Trainer(changed, run, progress=False)
    message = str(e.value)
    assert "optim.lr: 0.003 -> 0.1" in message and "phases.1.steps: 4 -> 9" in message
    assert "log_every" not in message.split("changed:")[1].split(".")[0]  # logging cadence may change


# ---- data -> train ---------------------------------------------------------------------------------------------------

def test_shard_ids_beyond_the_vocabulary_are_refused_before_the_first_step(tmp_path, capsys):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 32064, size=60).tolist() for _ in range(40)]  # Phi-3 ids, as the data pipeline writes
    web = write_shards(tmp_path / "web", docs, eos_id=32000)
    syn = write_shards(tmp_path / "synthetic", docs[:20], eos_id=32000)
    top = max(max(d) for d in docs + [[32000]])
    run = tmp_path / "run"
    args = ["train", "pretrain", "--recipe", "tiny-pretrain", "--run-dir", str(run), "--no-progress",
            "--set", f"sources.web={web}", "--set", f"sources.synthetic={syn}", "--set", "tensorboard=false",
            "--set", "plot=false"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"token id {top}" in err[0] and "vocab_size 512" in err[0]
    assert "--set model_overrides.vocab_size=32064" in err[0]
    log = run / "metrics.jsonl"
    assert not (log.exists() and log.read_text()) and ckpt.latest(run) is None  # refused before the first step
    # the suggested override trains
    assert cli_main(args + ["--set", "model_overrides.vocab_size=32064", "--max-steps", "1"]) == 0


def test_missing_source_names_the_set_that_provides_it(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative default data/tiny/synthetic does not exist here
    args = ["train", "pretrain", "--recipe", "tiny-pretrain", "--run-dir", str(tmp_path / "run"),
            "--set", f"sources.web={data_root / 'web'}"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "pretrain recipe 'tiny-pretrain' needs sources.synthetic" in err
    assert "add --set sources.synthetic=PATH" in err and "sources.web" not in err
    assert cli_main(args + ["--set", "sources.synthetic=nowhere"]) == 2
    assert "--set sources.synthetic=nowhere: no such file or folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs sources.synthetic"):  # the Python API says the same
        Trainer(apply_overrides(pretrain_cfg(data_root), ["sources.synthetic=nowhere"]), tmp_path / "api",
                progress=False)
