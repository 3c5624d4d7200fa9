"""kill -9 in the middle of training, resume with `--resume auto`: every logged loss `==` the uninterrupted run's,
final weights bit-identical (RELIABILITY.md item 20, CPU tiny fp32). One trial kills at a random step, one
kills the trainer inside a checkpoint write (after the rename, before COMPLETE)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pocketlm.formats.safetensors_io import CheckpointReader
from test_train import make_pretrain_data

ARGS = ["train", "pretrain", "--recipe", "tiny-pretrain", "--no-progress", "--set", "tensorboard=false",
        "--set", "plot=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    web, syn = make_pretrain_data(root)
    return root, ["--set", f"sources.web={web}", "--set", f"sources.synthetic={syn}"]


def _cmd(run_dir, sources, prelude=""):
    code = (f"import sys\n{prelude}\nfrom pocketlm.cli import main\n"
            f"sys.exit(main({ARGS + ['--run-dir', str(run_dir)] + sources!r}))")
    return [sys.executable, "-c", code]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    with CheckpointReader(run_dir / "model") as r:
        return {n: r.get(n) for n in r.keys()}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    root, sources = data
    run = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_cmd(run, sources), check=True, capture_output=True, timeout=300)
    return _losses(run), _weights(run)


def _same_as_reference(run, reference):
    losses, weights = reference
    assert len(losses) == 40
    assert _losses(run) == losses  # bit for bit, every step
    got = _weights(run)
    assert set(got) == set(weights) and all(torch.equal(got[n], weights[n]) for n in weights)


def test_kill9_at_random_step_then_resume_is_bit_identical(data, reference, tmp_path):
    root, sources = data
    kill_at = random.Random(os.getpid()).randint(5, 35)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, sources), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the trainer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 40
    done = subprocess.run(_cmd(run, sources[:] + ["--resume", "auto"]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _same_as_reference(run, reference)


def test_kill9_inside_a_checkpoint_write_then_resume_is_bit_identical(data, reference, tmp_path):
    root, sources = data
    run = tmp_path / "run"
    prelude = ("import os, signal\nfrom pocketlm.train import checkpoint as c\nreal = c.commit\n"
               "def commit(tmp, step):\n"
               "    if step == 20:\n"
               "        os.replace(tmp, tmp.with_name(f'step-{step:08d}'))\n"
               "        os.kill(os.getpid(), signal.SIGKILL)\n"
               "    return real(tmp, step)\n"
               "c.commit = commit")
    killed = subprocess.run(_cmd(run, sources, prelude), capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    step20 = run / "checkpoints" / "step-00000020"
    assert step20.is_dir() and not (step20 / "COMPLETE").exists()  # renamed, never marked complete
    done = subprocess.run(_cmd(run, sources), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _same_as_reference(run, reference)
