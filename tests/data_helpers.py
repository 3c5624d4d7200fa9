"""Shared builders for tests/test_data*.py: a tiny corpus whose right answers are known."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["rivers", "volcanoes", "fractions", "photosynthesis", "the printing press", "binary search",
          "magnetism", "the water cycle", "prime numbers", "compilers", "tides", "bridges", "vaccines",
          "glaciers", "recursion", "electric circuits", "the roman roads", "sorting algorithms", "lenses", "soil"]
VERBS = ["explains", "describes", "shows", "examines", "introduces", "considers", "outlines", "discusses"]
NOUNS = ["process", "structure", "method", "principle", "pattern", "mechanism", "system", "idea", "model", "rule"]
ADJS = ["simple", "careful", "central", "useful", "general", "surprising", "important", "practical", "basic"]


SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gor", "lin", "mar", "sel", "tun", "bri"]
STOP = ["the", "of", "and", "to", "that", "with", "be", "have", "is", "in"]


def prose(seed: int, sentences: int = 14) -> str:
    """Varied English-like prose that passes the Gopher/C4/FineWeb rules, different for every seed."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(400)]
    lines, sent = [], []
    for i in range(sentences):
        ws = [rng.choice(vocab) if rng.random() < 0.7 else rng.choice(STOP) for _ in range(rng.randint(9, 15))]
        sent.append(" ".join(ws).capitalize() + ".")
        if i % 3 == 2:
            lines.append(" ".join(sent))
            sent = []
    if sent:
        lines.append(" ".join(sent))
    return "\n".join(lines)


SPORTS = """Premier League results from Saturday 14 March 2020, as reported by our sports desk.
Arsenal won 2-1 against Chelsea in front of a crowd of 60,312 at the Emirates Stadium on a cold afternoon.
Liverpool beat Everton 3-0 at Anfield with goals from Mohamed Salah, Sadio Mane and Roberto Firmino.
Manchester United drew 1-1 with Tottenham Hotspur at Old Trafford after kick-off at 17:30 on the same day.
On Sunday 15 March 2020 Leeds United lost 0-2 to Wolverhampton Wanderers, with Raul Jimenez scoring twice.
Tickets for the derby sold for $45 to $120 and the club shop sold scarves for $25 and shirts for $70.
The top scorers were Jamie Vardy with 19, Pierre-Emerick Aubameyang with 17 and Danny Ings with 15 goals.
Next week, on Saturday 21 March 2020, Burnley play Newcastle United at 15:00 and Brighton visit Crystal Palace."""


def write_corpus(folder: Path, n_good: int = 40) -> dict:
    """A JSONL corpus with known outcomes; returns {category: [ids]}."""
    folder.mkdir(parents=True, exist_ok=True)
    recs, cats = [], {}

    def add(cat, text, rid=None):
        rid = rid or f"{cat}-{len(recs)}"
        recs.append({"id": rid, "text": text})
        cats.setdefault(cat, []).append(rid)

    for i in range(n_good):
        add("good", prose(i))
    add("short", "Too short to keep. Only a few words here.")
    add("repetitive", "\n".join(["Buy cheap watches now at the best price ever."] * 30))
    add("exact_dup", prose(0).upper().replace("\n", "  \n"))     # same text after normalisation as good-0
    near = prose(1).split(" ")
    near[5] = "changed"
    add("near_dup", " ".join(near))
    add("sports", SPORTS)
    add("contaminated", prose(999) + "\nQuestion: which of the following statements best describes the reason "
        "that the moon shows phases to an observer standing on the earth at night?")
    with open(folder / "web.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    items = folder.parent / "bench-items.jsonl"
    items.write_text(json.dumps({"id": "moon", "task": "toy", "text": "Which of the following statements best "
                                 "describes the reason that the moon shows phases to an observer standing on the "
                                 "earth at night?"}) + "\n")
    return cats

