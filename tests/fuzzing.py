"""Shared mutation-fuzz harness for the file readers (RELIABILITY.md §6 item 4).

Each case: mutate a valid file, write it, load it under a 1 s alarm. The only outcomes allowed are success and
the reader's typed error; any other exception, or a case over 1 s, fails with the seed and the file's bytes.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout()


def flip_bytes(data: bytes, rng: random.Random, extremes: list[tuple[int, int]]) -> bytes:
    """1-8 random edits: bit/byte flips, little-endian integer extremes, deletions, insertions."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # byte flip
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        elif op == 1:  # integer extreme
            value, size = rng.choice(extremes)
            buf[pos:pos + size] = value.to_bytes(size, "little")
        elif op == 2:  # deletion
            del buf[pos:pos + rng.randint(1, 16)]
        else:  # insertion
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(buf)


def run_mutation_fuzz(name: str, path: Path, make_case: Callable[[random.Random], bytes],
                      load: Callable[[Path, bytes], None], expected: type[Exception], *,
                      default_seconds: float) -> tuple[int, dict[str, int]]:
    """Run cases until the budget ($POCKETLM_FUZZ_SECONDS) is spent; return (cases, outcome counts)."""
    seed = int(os.environ.get("POCKETLM_FUZZ_SEED", "20240607"))
    budget = float(os.environ.get("POCKETLM_FUZZ_SECONDS", str(default_seconds)))
    print(f"{name} mutation fuzz seed={seed} budget={budget}s")
    rng = random.Random(seed)
    outcomes = {"ok": 0, expected.__name__: 0}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    t_end, case = time.perf_counter() + budget, 0
    try:
        while time.perf_counter() < t_end:
            data = make_case(rng)
            path.write_bytes(data)
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            try:
                load(path, data)
                outcomes["ok"] += 1
            except expected:
                outcomes[expected.__name__] += 1
            except CaseTimeout:
                pytest.fail(f"case {case} (seed {seed}) took > 1 s: {data.hex()}")
            except BaseException as e:  # noqa: BLE001 - the point of the test
                signal.setitimer(signal.ITIMER_REAL, 0)
                pytest.fail(f"case {case} (seed {seed}) raised {type(e).__name__}: {e}\nfile: {data.hex()}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert time.perf_counter() - t0 < 1.0
            case += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"{case} cases: {outcomes}")
    return case, outcomes
