"""Token shards and the resumable mixture loader (RELIABILITY.md item 21)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from pocketlm.data.shards import (DataError, MixtureLoader, ShardSet, ShardWriter, TokenWindows, write_shards)


def _docs(seed: int, n: int, vocab: int = 500):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(5, 60))).tolist() for _ in range(n)]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_writer_roundtrip_deterministic_and_atomic(tmp_path):
    docs = _docs(0, 50)
    a = write_shards(tmp_path / "a", docs, eos_id=1, shard_tokens=300)
    b = write_shards(tmp_path / "b", docs, eos_id=1, shard_tokens=300)
    assert _digest(a) == _digest(b)  # same input, same bytes
    index = json.loads((a / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["num_documents"] == 50 and len(index["shards"]) > 2
    stream = np.concatenate([np.asarray(d + [1]) for d in docs])
    s = ShardSet(a, verify=True)
    assert s.num_tokens == len(stream)
    assert np.array_equal(s.read(0, s.num_tokens), stream)
    assert np.array_equal(s.read(295, 10), stream[295:305])  # across a shard boundary
    # until close() the folder does not exist; a leftover .tmp is not a dataset
    w = ShardWriter(tmp_path / "c", shard_tokens=100)
    w.add([5, 6, 7] * 50)
    assert not (tmp_path / "c").exists()
    with pytest.raises(DataError, match="no index.json"):
        ShardSet(tmp_path / "c.tmp")
    w.close()
    assert ShardSet(tmp_path / "c").num_tokens == 150
    with pytest.raises(DataError, match="already exists"):
        ShardWriter(tmp_path / "c")
    with pytest.raises(DataError, match="does not fit uint16"):
        ShardWriter(tmp_path / "d").add([70000])
    big = write_shards(tmp_path / "e", [[70000, 1]], dtype="uint32")
    assert ShardSet(big).read(0, 2).tolist() == [70000, 1]


def _loader(sources, **kw):
    return MixtureLoader(sources, {"a": 0.7, "b": 0.3}, global_batch=4, seed=3, **kw)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    a = write_shards(root / "a", _docs(1, 20), eos_id=1, shard_tokens=200)
    b = write_shards(root / "b", _docs(2, 10), eos_id=1, shard_tokens=200)
    return {"a": TokenWindows(a, 16), "b": TokenWindows(b, 16)}


def test_windows_are_shifted_pairs(sources):
    w = sources["a"]
    row = w.item(3)
    full = w.shards.read(3 * 16, 17)
    assert np.array_equal(row["input_ids"], full[:-1]) and np.array_equal(row["labels"], full[1:])


def test_loader_resume_exact_across_epochs(sources):
    ref = _loader(sources)
    for _ in range(40):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # survives JSON, i.e. plain values only
    assert state["positions"]["b"]["epoch"] >= 1  # 160 samples crossed at least one epoch of source b
    expected = [ref.next_batch() for _ in range(8)]
    again = _loader(sources)
    again.load_state_dict(state)
    for e in expected:
        got = again.next_batch()
        assert all(torch.equal(got[k], e[k]) for k in e)


def test_loader_world_size_split_and_restart(sources):
    whole = _loader(sources)
    ranks = [_loader(sources, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        full = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), full["input_ids"])
    # restart the 2-rank run on 1 rank (and the reverse): the same global stream continues
    state = ranks[1].state_dict()
    one = _loader(sources)
    one.load_state_dict(state)
    assert torch.equal(one.next_batch()["labels"], whole.next_batch()["labels"])


def test_loader_mixture_weights_and_errors(sources):
    loader = _loader(sources)
    for _ in range(100):
        loader.next_batch()
    share = loader.counts["a"] / loader.samples
    assert 0.6 < share < 0.8
    loader.set_weights({"b": 1.0})
    before = loader.counts["a"]
    for _ in range(5):
        loader.next_batch()
    assert loader.counts["a"] == before
    with pytest.raises(DataError, match="unknown sources"):
        loader.set_weights({"c": 1.0})
    with pytest.raises(DataError, match="positive sum"):
        loader.set_weights({"a": 0.0})
    other = MixtureLoader(sources, {"a": 1.0}, global_batch=4, seed=4)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(loader.state_dict())
