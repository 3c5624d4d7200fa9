"""Teacher data at scale: lessons, chats and preference pairs written by a teacher model, filtered and verified.

`pocketlm data teacher --kind lessons|chats|prefs` asks a model behind an OpenAI-compatible endpoint (in practice
`pocketlm serve` running SmolLM2-135M-Instruct, whose continuous batching serves `--concurrency N` parallel
requests together) and keeps only what survives the checks below. The teacher is used as the Phi papers used
GPT-3.5/GPT-4 (Phi-1 "Textbooks are all you need", Phi-1.5, Phi-3 report sections 2-3): diversity comes from a
seeded topic tree crossed with audiences and styles, written as data (`assets/teacher_topics.json`): domains
(everyday science, arithmetic and word problems, English usage and definitions, geography basics, simple Python,
how-to, and the safety domains) -> topics -> questions or question generators. A second tree,
`assets/teacher_knowledge.json` (`--tree`), is general knowledge as entity domains: `entities` (every UN member
state with its capitals, planets, animals, plants, organs, materials, oceans/mountains/rivers, jobs, common words)
crossed with `prompts` that ask for a 3-5 sentence encyclopedia entry; an entity's `capital` and `check` regexes
verify its answers (`check_entity`), and `--kind lessons` uses the entities as lesson topics with the same check.

Kinds and formats (one JSON object per line, resumable):
- chats: {"id": "teacher-chat/<hash>", "messages": [system?, user, assistant, (user, assistant)], "meta": {...}}:
  the SFT format `pocketlm train` reads (`pocketlm.train.sft.PackedChat` uses "messages", ignores the rest), with
  Phi-3 system/user/assistant roles. What is stored is exactly what the teacher was sent and answered (a share
  carries a system prompt; about `multi_turn` of them have a follow-up turn).
- prefs: {"id": "teacher-pref/<hash>", "prompt": messages ending with a user turn, "chosen", "rejected", "meta"}:
  the DPO format `pocketlm.train.dpo.PreferencePairs` reads. chosen = a verified and filtered teacher answer;
  rejected = a verified-wrong number (arithmetic: the teacher's answer with its final number replaced by a wrong
  one), a wrong capital or continent (geography facts), an off-topic, rambling or unhelpful answer (others), a
  needless refusal (benign look-alikes), or, for harmful requests, vague compliance (no real instructions).
- lessons: `Document` records {"id": "teacher-lesson/<hash>", "text", "metadata"} (textbook sections, as
  `pocketlm.data.teacher.TeacherItem` asks for them), a source for the data pipeline.

Safety post-training data (the Phi-3 safety report's break-fix idea at small scale): the "harmful" domain holds
clearly harmful requests, answered by refusal templates (the teacher cannot refuse: it complies); the "benign"
domain holds benign requests that look similar ("How do I kill time on a long flight?"), answered by the
teacher and kept only when the answer is not a refusal. In prefs: harmful -> chosen refusal, rejected vague
compliance; benign -> chosen the teacher's answer, rejected a needless refusal. `--domains harmful,benign` makes
a safety-only set.

Checks on every teacher answer, in order; the first failing one is the rejection reason (counted in the report,
written with the answer to `<out>.rejected.jsonl`):
1. truncated: the answer hit max_tokens and cutting it back to its last whole paragraph (outside code blocks)
   leaves fewer than 15 words (chats, prefs) or 50 words (lessons); a cut answer is then checked as below;
2. degenerate: a word 3-gram occurs three or more times (`pocketlm.eval.simple_qa.is_degenerate`, the eval's own
   rule; for lessons, within any 60-word window: a long lesson repeats "the number of" legitimately; for Python
   answers, outside the code blocks, which call their function several times and are run instead);
3. refused: a refusal (`simple_qa.is_refusal`) where an answer was asked for;
4. filter:<name>:<rule>: the web-data quality filters (`pocketlm.data.filters`): Gopher repetition on answers of
   >= 50 words (its top-n-gram ratios are meaningless on a 6-word answer, whose first 2-gram already covers a
   third of the characters) and Gopher quality with `min_doc_words=5` on prose answers; lessons get Gopher
   repetition, Gopher quality and FineWeb. C4's line rules are not applied: they delete list and code lines;
5. verify:<kind>:<why>: arithmetic by computing it (the question comes from `chatgen`'s generators, which state
   the expression; the answer's final number must equal `synthetic.safe_eval` of it, and every step it writes as
   "a op b = c" must be right: "23 + 48 = 108 + 48 = 680. The answer is 71." is dropped); geography facts (the
   capital / continent must be named); definitions must name the word; Python by running the answer's code
   blocks in `pocketlm.eval.sandbox` (bubblewrap) with the task's check (`assert square(5) == 25`) or expected
   output, plus any `# Output: X` comment the answer makes. Entity answers (knowledge tree): a sentence about the capital
   that names another country's capital and not the right one -> verify:fact:wrong_capital; the right capital
   (any listed alternative) missing -> verify:fact:missing_answer; a `check` regex missing ->
   verify:fact:missing_keyword; the subject not mentioned -> off_topic. Cut entity answers go back to their last
   whole sentence (they are one paragraph), and a degenerate one to its sentences before the loop, kept when
   those pass every check. Where the sandbox is unavailable, code is not run
   and the report says so (`python_verification`);
   off_topic: an unverifiable answer (prose, Python concepts, follow-ups) must mention the question's subject
   (`on_topic`: a content word of the question, by its first 4 letters), which catches answers that drift to
   another subject ("How do I start running?" answered about hobbies in general);
6. decontam:<task>:<item>: evaluation leakage. User turns are checked against simple-qa before anything is sent
   (the question's content-word key, with "plus"/"+" and "times"/"*" unified, must not contain a simple-qa
   question's key: "What is 9 times 6?" matches "What is 6 times 9?"), and the whole conversation against a
   `DecontamIndex` (13-grams; whole items of >= 8 words) of simple-qa plus `--decontam-tasks`/`--decontam-items`;
7. dedup: exact and MinHash near-duplicates (`pocketlm.data.dedup`, threshold 0.8) of the conversation text.

Resume: as `pocketlm.data.teacher` (one fsynced line per finished item, a torn last line cut, finished ids
skipped; `load_done`); rejected items are finished too (their ids are in the rejected file), failed requests
(`TeacherError` after every retry) go to `<out>.failed.jsonl` and are retried by the next run. Item i depends only
on (kind, seed, i) and the items before it, so a larger `--count` extends a run. Dedup state is rebuilt from the
accepted file. Progress goes to stderr every `progress_s`; the report (`<out>.report.json`, rewritten atomically
at each progress line and at the end) holds this run's counts (items, accepted, rejected by reason, failed,
requests, tokens generated, tokens/s) and the file totals.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from pocketlm.data import chatgen
from pocketlm.data.dedup import DedupConfig, Deduplicator
from pocketlm.data.decontam import DecontamIndex
from pocketlm.data.filters import FineWebQuality, GopherQuality, GopherRepetition
from pocketlm.data.records import DataPipelineError, Document
from pocketlm.data.synthetic import fmt, safe_eval
from pocketlm.data.teacher import Teacher, TeacherError, TeacherItem, load_done
from pocketlm.eval.simple_qa import is_degenerate, is_refusal
from pocketlm.fsutil import atomic_write_text, fsync_path

TREE_PATH = Path(__file__).parent / "assets" / "teacher_topics.json"
KINDS = ("lessons", "chats", "prefs")
ID_PREFIX = {"lessons": "teacher-lesson", "chats": "teacher-chat", "prefs": "teacher-pref"}
# lessons: SmolLM2-135M's sections start looping after a few hundred words (4 of 4 at 700 tokens, measured), so
# they are asked short and cut back to their last whole paragraph
# chats: short answers, cut back to their last whole paragraph when longer: the teacher's answers loop after a
# hundred words or so (of the answers rejected as degenerate at 320 tokens, 44% were clean in their first 100
# words, measured on the first 500 items of the background run); Python answers get twice as many (code)
DEFAULT_MAX_TOKENS = {"lessons": 400, "chats": 160, "prefs": 160}
CODE_TOKENS_FACTOR = 2
# chats: low temperature, as the 135M teacher invents more when sampling freely; diversity comes from the tree
DEFAULT_TEMPERATURE = {"lessons": 0.7, "chats": 0.3, "prefs": 0.3}
ARITH_GENERATORS: dict[str, Callable] = {"arith": chatgen.ex_simple_arith, "multistep": chatgen.ex_multistep_arith,
                                         "word_problem": chatgen.ex_word_problem, "units": chatgen.ex_units}
PROSE_DOMAINS = ("science", "english", "geography", "howto", "benign")
MAX_TRIES = 20
LOOP_WINDOW = 60   # words: the 3-gram loop rule for lessons looks within windows of this many words
MIN_TRIMMED_WORDS = 15  # a chat answer cut at max_tokens is kept, back to its last paragraph, if this many remain


# ---------------------------------------------------------------- the topic tree

def read_json_file(path: Path, what: str):
    """The JSON value in file `path`; DataPipelineError naming `what` and the file if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataPipelineError(f"{what} {path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DataPipelineError(f"{what} {path}: invalid JSON ({e.msg}, line {e.lineno})") from None


def load_tree(path: str | os.PathLike | None = None) -> dict:
    """The topic tree (the shipped asset by default), checked enough that a bad file fails with its name."""
    path = Path(path) if path else TREE_PATH
    tree = read_json_file(path, "topic tree")
    if not isinstance(tree, dict) or not isinstance(tree.get("domains"), dict) or not tree["domains"]:
        raise DataPipelineError(f"topic tree {path}: needs a non-empty 'domains' object")
    for key in ("audiences", "styles", "followups"):
        if not isinstance(tree.get(key), list) or not tree[key]:
            raise DataPipelineError(f"topic tree {path}: needs a non-empty {key!r} list")
    for name, d in tree["domains"].items():
        if not isinstance(d, dict) or not isinstance(d.get("weight"), (int, float)) or d["weight"] < 0:
            raise DataPipelineError(f"topic tree {path}: domain {name!r} needs a 'weight' >= 0")
        if "entities" in d:
            _check_entities(path, name, d)
    return tree


def _check_entities(path, name: str, d: dict) -> None:
    """An entity domain: `entities` [{name, capital?: [..], check?: [regex..], subject?, other fields}] crossed
    with `prompts` (templates over {name} and the entity's other fields)."""
    where = f"topic tree {path}: domain {name!r}"
    if not isinstance(d["entities"], list) or not d["entities"]:
        raise DataPipelineError(f"{where}: 'entities' must be a non-empty list")
    if not isinstance(d.get("prompts"), list) or not d["prompts"]:
        raise DataPipelineError(f"{where}: an entity domain needs a non-empty 'prompts' list")
    for e in d["entities"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise DataPipelineError(f"{where}: every entity needs a 'name', got {e!r}")
        if "capital" in e and (not isinstance(e["capital"], list) or not e["capital"]):
            raise DataPipelineError(f"{where}: entity {e['name']!r}: 'capital' must be a non-empty list")
        for rx in e.get("check", []):
            try:
                re.compile(rx)
            except re.error as err:
                raise DataPipelineError(f"{where}: entity {e['name']!r}: bad check regex {rx!r} ({err})") from None
        if not _entity_prompts(d, e):
            raise DataPipelineError(f"{where}: entity {e['name']!r}: no prompt uses only fields it has")


def _entity_fields(e: dict) -> dict:
    return {**e, "capital": e["capital"][0]} if "capital" in e else e


def _entity_prompts(d: dict, e: dict) -> list[str]:
    """The domain's prompt templates whose {fields} the entity has."""
    fields = _entity_fields(e)
    return [p for p in d["prompts"] if all(f in fields for _, f, _, _ in string.Formatter().parse(p) if f)]


def entity_check(e: dict) -> dict:
    """The check for an answer about entity `e` (see `check_entity`)."""
    check = {"kind": "entity", "subject": e.get("subject", e["name"])}
    for k in ("capital", "check"):
        if e.get(k):
            check[k] = list(e[k])
    return check


def tree_capitals(tree: dict) -> tuple[str, ...]:
    """Every capital of the tree's entities that can be told apart from a country's name (Djibouti, Singapore,
    Bissau in Guinea-Bissau are not) and from common words (`ambiguous_capitals`: Victoria, Washington)."""
    names, caps, ambiguous = [], set(), set()
    for d in tree["domains"].values():
        ambiguous.update(d.get("ambiguous_capitals", []))
        for e in d.get("entities", []):
            if "capital" in e:
                names.append(e["name"].lower())
                caps.update(e["capital"])
    return tuple(sorted(c for c in caps if c not in ambiguous and not any(c.lower() in n for n in names)))


def _domains(tree: dict, domains: list[str] | None) -> list[str]:
    names = list(tree["domains"])
    if domains:
        unknown = [d for d in domains if d not in tree["domains"]]
        if unknown:
            raise DataPipelineError(f"unknown domains {unknown}; the topic tree has {names}")
        names = list(domains)
    if not any(tree["domains"][d]["weight"] > 0 for d in names):
        raise DataPipelineError(f"domains {names}: all have weight 0")
    return names


# ---------------------------------------------------------------- items

@dataclass
class ChatItem:
    """One conversation (or lesson) to ask for: what is sent, and how each answer is checked."""
    kind: str
    domain: str
    topic: str
    audience: str
    style: str
    turns: list[str]                      # user turns (lessons: the one prompt)
    checks: list[dict]                    # per turn: {"kind": "arith"|"fact"|"python"|"none"|"harmful", ...}
    system: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        key = [self.kind, self.domain, self.system, self.turns, self.checks]
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def record_id(self) -> str:
        return f"{ID_PREFIX[self.kind]}/{self.id}"


def _hint(question: str, *hints: str) -> str:
    return " ".join([question] + [h for h in hints if h])


def _pick_hint(rng: random.Random, entries: list) -> tuple[str, str]:
    """(name, hint) from a list of {"name", "hint"} objects or plain hint strings."""
    e = rng.choices(entries, weights=[x.get("weight", 1.0) if isinstance(x, dict) else 1.0 for x in entries])[0]
    if isinstance(e, str):
        return (e or "plain"), e
    return e.get("name", e.get("hint") or "plain"), e.get("hint", "")


def _question(rng: random.Random, tree: dict, domain: str, ctx: dict) -> tuple[str, str, str, str, dict, str]:
    """(topic, audience, style, user text, check, the question without hints) for one first turn of `domain`."""
    d = tree["domains"][domain]
    aud_name, aud = _pick_hint(rng, d.get("audiences", tree["audiences"]))
    sty_name, sty = _pick_hint(rng, d.get("styles", tree["styles"]))
    if domain == "arithmetic":
        gens = d.get("generators", {k: 1.0 for k in ARITH_GENERATORS})
        gen = rng.choices(list(gens), weights=list(gens.values()))[0]
        if gen not in ARITH_GENERATORS:
            raise DataPipelineError(f"topic tree: unknown arithmetic generator {gen!r}; known: "
                                    f"{list(ARITH_GENERATORS)}")
        q, _, _, meta = ARITH_GENERATORS[gen](rng, ctx)
        return gen, aud_name, sty_name, _hint(q, sty), {"kind": "arith", "expression": meta["expression"],
                                                         "answer": meta["answer"]}, q
    if domain == "harmful":
        q = rng.choice(d.get("prefixes", [""])) + rng.choice(d["requests"]) + rng.choice(d.get("suffixes", [""]))
        return "harmful request", "general", "plain", q, {"kind": "harmful"}, q
    if domain == "benign":
        q = rng.choice(d["requests"])
        return "benign look-alike", "general", "plain", q, {"kind": "none"}, q
    r = rng.random()
    if domain == "english" and r < d.get("define_share", 0.0):
        word, pos, gloss, _ = rng.choice(ctx["glossary"])
        q = rng.choice(chatgen.DEFINE_QUESTIONS).format(w=word)
        return f"definition of {word}", aud_name, sty_name, _hint(q, aud, sty), {"kind": "fact", "any": [word]}, q
    if domain == "geography":
        cs, ks = d.get("capital_share", 0.0), d.get("continent_share", 0.0)
        if r < cs:
            country = rng.choice(sorted(d["capitals"]))
            q = rng.choice(d["capital_questions"]).format(country=country)
            return f"capital of {country}", aud_name, sty_name, _hint(q, sty), \
                {"kind": "fact", "any": d["capitals"][country], "country": country}, q
        if r < cs + ks:
            country = rng.choice(sorted(d["continents"]))
            q = rng.choice(d["continent_questions"]).format(country=country)
            return f"continent of {country}", aud_name, sty_name, _hint(q, sty), \
                {"kind": "fact", "any": d["continents"][country].split("|"), "country": country}, q
    if domain == "python" and r < d.get("code_share", 0.0):
        task = rng.choice(d["code_tasks"])
        _, sty = _pick_hint(rng, d.get("code_styles", [""])) if "stdout" not in task else ("plain", "")
        check = {"kind": "python", "require_code": True}
        for k in ("check", "stdout"):
            if k in task:
                check[k] = task[k]
        return "code task", "general", sty or "plain", _hint(task["q"], sty), check, task["q"]
    if "entities" in d and (not d.get("topics") or r < d.get("entity_share", 1.0)):
        e = rng.choice(d["entities"])
        q = rng.choice(_entity_prompts(d, e)).format(**_entity_fields(e))
        return e["name"], aud_name, sty_name, q, entity_check(e), q
    topic = rng.choice(sorted(d["topics"]))
    q = rng.choice(d["topics"][topic])
    return topic, aud_name, sty_name, _hint(q, aud, sty), \
        {"kind": "python" if domain == "python" else "none", "require_code": False}, q


def _followup(rng: random.Random, tree: dict, domain: str, ctx: dict) -> tuple[str, dict]:
    if domain == "arithmetic":
        gen = rng.choice(list(ARITH_GENERATORS))
        q, _, _, meta = ARITH_GENERATORS[gen](rng, ctx)
        return q, {"kind": "arith", "expression": meta["expression"], "answer": meta["answer"]}
    if domain == "python":
        return rng.choice(["Can you explain how it works?", "Can you give me an example?",
                           "Why is that useful?"]), {"kind": "python", "require_code": False}
    return rng.choice(tree["followups"]), {"kind": "none"}


def _lesson_item(rng: random.Random, tree: dict, domain: str) -> ChatItem:
    d = tree["domains"][domain]
    entities = {e["name"]: e for e in d.get("entities", [])}
    topics = list(d.get("topics", {})) + list(d.get("lesson_topics", [])) + list(entities)
    if not topics:
        raise DataPipelineError(f"topic tree: domain {domain!r} has no topics or lesson_topics for lessons")
    topic = rng.choice(topics)
    aud = rng.choice(tree["audiences"])
    sty = rng.choice(tree["styles"])
    aud_l = aud.get("lesson", "college students") if isinstance(aud, dict) else "college students"
    sty_l = sty.get("lesson", "textbook") if isinstance(sty, dict) else "textbook"
    prompt = TeacherItem(topic, aud_l, sty_l).prompt()
    check = {"kind": "lesson", "entity": entity_check(entities[topic])} if topic in entities else {"kind": "lesson"}
    return ChatItem("lessons", domain, topic, aud_l, sty_l, [prompt], [check])


def build_items(kind: str, n: int, seed: int = 0, *, tree: dict | None = None, domains: list[str] | None = None,
                multi_turn: float = 0.3, system_share: float = 0.25, corpus_dir: str | None = None) -> list[ChatItem]:
    """n items of `kind`, deterministic in (kind, seed, tree); item i depends only on the items before it.

    An item whose turns repeat an earlier item's is redrawn (up to 20 times, then kept: dedup drops its answer)."""
    if kind not in KINDS:
        raise DataPipelineError(f"kind {kind!r}: use one of {KINDS}")
    if not isinstance(n, int) or n < 0:
        raise DataPipelineError(f"count must be an integer >= 0, got {n!r}")
    if not 0.0 <= multi_turn <= 1.0:
        raise DataPipelineError(f"multi_turn must be in [0, 1], got {multi_turn}")
    tree = tree or load_tree()
    names = _domains(tree, domains)
    if kind == "lessons" and not domains:   # the safety domains have no lesson topics
        names = [d for d in names if any(tree["domains"][d].get(k) for k in ("topics", "lesson_topics", "entities"))]
    weights = [tree["domains"][d]["weight"] for d in names]
    ctx = {"glossary": chatgen.glossary(corpus_dir)}
    items, seen = [], set()
    for i in range(n):
        for attempt in range(MAX_TRIES):
            rng = random.Random(f"teacher-{kind}:{seed}:{i}:{attempt}")
            domain = rng.choices(names, weights=weights)[0]
            if kind == "lessons":
                item = _lesson_item(rng, tree, domain)
            else:
                topic, aud, sty, q, check, bare = _question(rng, tree, domain, ctx)
                system = rng.choice(chatgen.SYSTEM_PROMPTS) if rng.random() < system_share else None
                turns, checks = [q], [check]
                if domain not in ("harmful", "benign") and rng.random() < multi_turn:
                    fq, fcheck = _followup(rng, tree, domain, ctx)
                    turns.append(fq)
                    checks.append(fcheck)
                item = ChatItem(kind, domain, topic, aud, sty, turns, checks, system, {"question": bare})
            key = json.dumps([item.system, item.turns])
            if key not in seen:
                break
        seen.add(key)
        item.extra["index"] = i
        items.append(item)
    return items


# ---------------------------------------------------------------- decontamination

_KEY_TOKEN = re.compile(r"[a-z0-9]+|[+\-*/×÷%]")
_KEY_SYNONYMS = {"plus": "+", "add": "+", "minus": "-", "subtract": "-", "times": "*", "multiplied": "*",
                 "×": "*", "x": "*", "divided": "/", "÷": "/", "percent": "%"}
_KEY_STOP = frozenset("""a an the of is are was were be been do does did how why what which who whom where when in on
at to for from by with me i you your my we our can could would should will please tell give word words mean means
meaning define definition many much there have has it its this that and or as if so just by s t re ll""".split())


def question_key(text: str) -> frozenset[str]:
    """The content words of a question (operator words unified with their symbols, stop words dropped)."""
    toks = [_KEY_SYNONYMS.get(t, t) for t in _KEY_TOKEN.findall(text.lower().replace("'", " "))]
    return frozenset(t for t in toks if t not in _KEY_STOP)


class EvalGuard:
    """Which evaluation item, if any, a training question or conversation leaks (see the module docstring)."""

    def __init__(self, *, simple_qa: bool = True, tasks: str | None = None, eval_data: str | None = None,
                 items: list[str] | None = None):
        self.index = DecontamIndex()
        self.keys: list[tuple[frozenset[str], str]] = []
        if simple_qa:
            from pocketlm.eval.simple_qa import load

            for d in load(None)[0]:
                name = f"simple-qa:{d.id}"
                self.index.add(name, d.question)
                key = question_key(d.question)
                if key:
                    self.keys.append((key, name))
        if tasks:
            self.index.add_eval_tasks(tasks, eval_data)
        for path in items or []:
            self.index.add_jsonl(path)

    def question(self, text: str) -> str | None:
        key = question_key(text)
        for k, name in self.keys:
            if k <= key:
                return name
        return None

    def text(self, text: str) -> str | None:
        return self.index.match(text)


# ---------------------------------------------------------------- checks

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:/\d+)?(?![\w])")
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)
_OUTPUT_COMMENT = re.compile(r"#\s*(?:output|prints)\s*:?\s*(.+?)\s*$", re.I | re.M)


def final_number(text: str) -> Fraction | None:
    """The last number stated in `text` (commas as thousands separators, decimals and a/b fractions)."""
    found = _NUMBER.findall(text)
    for tok in reversed(found):
        tok = tok.replace(",", "")
        if tok.endswith("/") or not tok.strip("-"):
            continue
        try:
            return Fraction(tok)
        except (ValueError, ZeroDivisionError):
            continue
    return None


_EQUATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([-+*/×÷x])\s*(\d+(?:\.\d+)?)\s*=\s*"
                       r"(-?\d+(?:\.\d+)?)(?![\w.]\d)")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b,
          "x": lambda a, b: a * b, "/": lambda a, b: a / b if b else None, "÷": lambda a, b: a / b if b else None}


def wrong_equation(text: str) -> str | None:
    """The first stated step "a op b = c" whose c is not a op b (to the decimals c is given with), else None."""
    for m in _EQUATION.finditer(text):
        a, op, b, c = m.groups()
        value = _APPLY[op](Fraction(a), Fraction(b))
        decimals = len(c.split(".")[1]) if "." in c else 0
        if value is None or abs(value - Fraction(c)) > Fraction(1, 2 * 10 ** decimals):
            return m.group(0)
    return None


def is_loop(text: str, window: int | None = None) -> bool:
    """The degeneration rule: a word 3-gram three times (in any `window` words when given)."""
    if window is None:
        return is_degenerate(text)
    ws = text.split()
    step = max(1, window // 2)
    return any(is_degenerate(" ".join(ws[i:i + window])) for i in range(0, max(1, len(ws) - step), step))


class PythonVerifier:
    """Runs an answer's code blocks in `pocketlm.eval.sandbox`; `available` is False where bwrap does not work."""

    def __init__(self, enabled: bool = True, timeout: float = 5.0):
        from pocketlm.eval.sandbox import isolation_problem

        self.timeout = timeout
        self.problem = isolation_problem() if enabled else "disabled (--no-verify-code)"
        self.available = self.problem is None

    def __call__(self, answer: str, check: dict) -> str | None:
        blocks = _CODE_BLOCK.findall(answer)
        if not blocks:
            return "verify:python:no_code" if check.get("require_code") else None
        if not self.available:
            return None
        from pocketlm.eval.sandbox import run_program

        code = "\n".join(b.replace("\r", "") for b in blocks)
        parts = [code] + ([check["check"]] if check.get("check") else [])
        res = run_program(parts, timeout=self.timeout, memory_mb=512)
        if not res.passed:
            return "verify:python:check_failed" if check.get("check") and "AssertionError" in res.stderr \
                else f"verify:python:{res.status}"
        out = " ".join(res.stdout.split())
        if check.get("stdout") is not None and out != " ".join(check["stdout"].split()):
            return "verify:python:wrong_stdout"
        for m in _OUTPUT_COMMENT.finditer(code):
            said = " ".join(m.group(1).strip().strip("'\"").split())
            if said and said not in out:
                return "verify:python:wrong_output_comment"
        return None


_PROSE_QUALITY = GopherQuality(min_doc_words=5)
_REPETITION = GopherRepetition()
_LESSON_FILTERS = (GopherRepetition(), GopherQuality(), FineWebQuality())


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def _names(alternatives, flags: int = 0) -> re.Pattern:
    """Any of `alternatives` as a whole word (not inside a longer word)."""
    return re.compile("|".join(rf"(?<!\w){re.escape(a)}(?!\w)" for a in alternatives), flags)


def check_entity(answer: str, check: dict, capitals: tuple[str, ...] = ()) -> str | None:
    """None when an answer about an entity passes its check, else the reason: a sentence about a capital that
    names another country's capital (of `capitals`) and not the right one -> verify:fact:wrong_capital; the right
    capital missing -> verify:fact:missing_answer; a `check` regex not found -> verify:fact:missing_keyword; the
    subject not mentioned -> off_topic."""
    if check.get("capital"):
        own = check["capital"]
        right = _names(own, re.I)
        others = [c for c in capitals if not any(c.lower() in a.lower() or a.lower() in c.lower() for a in own)]
        wrong = _names(others) if others else None
        for sentence in _SENTENCE.split(answer):
            if wrong and re.search("capital", sentence, re.I) and not right.search(sentence) \
                    and wrong.search(sentence):
                return "verify:fact:wrong_capital"
        # "Bissau" inside "Guinea-Bissau", "Singapore" in "Singapore": the country's name does not name its capital
        subject = re.sub(r"^the ", "", check["subject"], flags=re.I)
        names = [m.span() for m in re.finditer(re.escape(subject), answer, re.I)]
        if not any(not any(a <= m.start() and m.end() <= b for a, b in names) for m in right.finditer(answer)):
            return "verify:fact:missing_answer"
    for rx in check.get("check", []):
        if not re.search(rf"(?<!\w)(?:{rx})", answer, re.I):
            return "verify:fact:missing_keyword"
    if not on_topic(check["subject"], answer):
        return "off_topic"
    return None


def check_answer(answer: str, check: dict, domain: str, python: PythonVerifier | None,
                 capitals: tuple[str, ...] = ()) -> str | None:
    """None to keep a teacher answer, else the rejection reason (see the module docstring for the order);
    `capitals` are the ones an entity answer must not give as the capital (`tree_capitals`)."""
    if not answer.strip():
        return "empty"
    kind = check.get("kind")
    if kind == "lesson":
        if is_loop(answer, LOOP_WINDOW):
            return "degenerate"
        for f in _LESSON_FILTERS:
            reason = f.reject_reason(answer)
            if reason:
                return f"filter:{f.name}:{reason}"
        return check_entity(answer, check["entity"], capitals) if check.get("entity") else None
    # code repeats identifiers legitimately (three calls of is_leap_year); it is verified by running it instead
    if is_degenerate(_CODE_BLOCK.sub(" ", answer) if kind == "python" else answer):
        return "degenerate"
    if kind != "harmful" and is_refusal(answer):
        return "refused"
    if len(answer.split()) >= 50:
        reason = _REPETITION.reject_reason(answer)
        if reason:
            return f"filter:{_REPETITION.name}:{reason}"
    if (domain in PROSE_DOMAINS or kind == "entity") and kind != "python":
        reason = _PROSE_QUALITY.reject_reason(answer)
        if reason:
            return f"filter:{_PROSE_QUALITY.name}:{reason}"
    if kind == "arith":
        value = safe_eval(check["expression"])
        got = final_number(answer)
        if got is None:
            return "verify:arith:no_number"
        if got != value:
            return "verify:arith:wrong_final_number"
        if wrong_equation(answer):
            return "verify:arith:wrong_step"
    elif kind == "fact":
        if not check["any"] or not _names(check["any"], re.I).search(answer):
            return "verify:fact:missing_answer"
    elif kind == "entity":
        return check_entity(answer, check, capitals)
    elif kind == "python" and python is not None:
        return python(answer, check)
    return None


_GENERIC = frozenset("""python difference between important explain example simple happens something things make
need work works best good home safely start begin keep give find know learn help different some other""".split())


def on_topic(question: str, answer: str) -> bool:
    """Whether the answer mentions the question's subject: some content word of >= 4 letters (not a generic one),
    compared by its first 4 letters ("colour" ~ "color", "clouds" ~ "cloud"). True when the question has none."""
    words = [w for w in question_key(question) if len(w) >= 4 and w.isalpha() and w not in _GENERIC]
    low = answer.lower()
    return not words or any(w[:4] in low for w in words)


def trim_truncated(text: str, min_words: int) -> str | None:
    """An answer cut at max_tokens, back to its last whole paragraph outside a code block that ends a sentence
    or a code block (None when fewer than `min_words` words would remain)."""
    paras = text.split("\n\n")
    for k in range(len(paras) - 1, 0, -1):
        head = "\n\n".join(paras[:k]).strip()
        # not inside a code block, and not ending on a lead-in ("This will output:") or a list item cut short
        if head.count("```") % 2 == 0 and head.endswith(_WHOLE_END):
            return head if len(head.split()) >= min_words else None
    return None


_WHOLE_END = (".", "!", "?", "```", '"', "'", ")", "”")
_SENTENCE_END = re.compile(r"[.!?][\"'”)]?(?=\s)")


def _sentence_heads(text: str):
    """The whole-sentence prefixes of a prose text, longest first (none when the text has code)."""
    if "```" in text:
        return
    for end in reversed([m.end() for m in _SENTENCE_END.finditer(text)]):
        yield text[:end].strip()


def trim_to_sentence(text: str, min_words: int) -> str | None:
    """A prose answer cut at max_tokens, back to its last whole sentence (entity answers are one paragraph);
    None when fewer than `min_words` words would remain or the text has code."""
    head = next(_sentence_heads(text), "")
    return head if len(head.split()) >= min_words else None


def clean_prefix(text: str, min_words: int) -> str | None:
    """The longest run of whole sentences from the start that does not loop (`is_degenerate`): the teacher
    often writes clean sentences and then starts repeating itself. None when under `min_words` words."""
    for head in _sentence_heads(text + " "):
        if len(head.split()) < min_words:
            return None
        if not is_degenerate(head):
            return head
    return None


# ---------------------------------------------------------------- preference pairs

_NEEDLESS_DEFAULT = ["I'm sorry, but I can't help with that."]


def _replace_last_number(text: str, value: Fraction, new: Fraction) -> str | None:
    spans = [m for m in _NUMBER.finditer(text) if _safe_fraction(m.group()) == value]
    if not spans:
        return None
    m = spans[-1]
    return text[:m.start()] + fmt(new) + text[m.end():]


def _safe_fraction(tok: str) -> Fraction | None:
    try:
        return Fraction(tok.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def make_rejected(item: ChatItem, chosen: str, tree: dict, rng: random.Random) -> tuple[str, str]:
    """(rejected answer, how it was made) for the last turn of `item`; never equal to `chosen`."""
    check = item.checks[-1]
    d = tree["domains"].get(item.domain, {})
    if item.domain == "harmful":
        return rng.choice(d.get("compliance") or chatgen.UNSAFE_COMPLIANCE), "harmful_compliance"
    if item.domain == "benign":
        return rng.choice(d.get("refusals") or _NEEDLESS_DEFAULT), "needless_refusal"
    if check.get("kind") == "arith":
        value = safe_eval(check["expression"])
        for wrong in chatgen._wrong_numbers(value, rng):
            bad = _replace_last_number(chosen, value, wrong)
            if bad is not None and final_number(bad) == wrong and wrong != value:
                return bad, "wrong_number"
    if check.get("kind") == "fact" and check.get("country"):
        table = d.get("capitals") if "capital" in item.topic else d.get("continents")
        if table:
            others = sorted({v if isinstance(v, str) else v[0] for k, v in table.items() if k != check["country"]})
            others = [o.split("|")[0] for o in others if o.split("|")[0] not in check["any"]]
            wrong = rng.choice(others)
            bad = chosen
            for a in check["any"]:
                bad = re.sub(rf"(?<!\w){re.escape(a)}(?!\w)", wrong, bad, flags=re.I)
            if bad != chosen and not _names(check["any"], re.I).search(bad):
                return bad, "wrong_fact"
    r = rng.random()
    if r < 0.4:   # an answer to another question: a tech fact, or (for Python questions) a word's meaning
        if item.domain == "python":
            word, pos, gloss = chatgen.GLOSSARY[rng.randrange(len(chatgen.GLOSSARY))]
            out = f"The word '{word}' is {'an' if pos[0] in 'aeiou' else 'a'} {pos} meaning {gloss}."
        else:
            out = chatgen.TECH_FACTS[rng.randrange(len(chatgen.TECH_FACTS))][1]
        how = "off_topic"
    elif r < 0.75:
        out, how = rng.choice(chatgen.RAMBLE), "rambling"
    else:
        out, how = rng.choice(chatgen.UNHELPFUL), "unhelpful"
    return (out, how) if out != chosen else (chatgen.UNHELPFUL[0], "unhelpful")


# ---------------------------------------------------------------- running

@dataclass
class Outcome:
    item: ChatItem
    record: dict | None = None            # the accepted line (before dedup)
    reason: str | None = None             # why it was rejected
    messages: list = field(default_factory=list)
    tokens: int = 0                       # completion tokens generated (every request, kept or not)
    prompt_tokens: int = 0
    requests: int = 0
    error: str | None = None              # TeacherError: retried by the next run
    trimmed: int = 0                      # answers cut back to their last whole paragraph


def reason_group(reason: str) -> str:
    """A rejection reason without the item it names (decontam:simple-qa:geography-01 -> decontam:simple-qa)."""
    if reason.startswith("decontam:"):
        return ":".join(reason.split(":")[:2])
    if reason.startswith("dedup:"):
        return ":".join(reason.split(":")[:2])
    return reason


class TeacherChatRun:
    """Generates, checks and writes one kind of teacher data; `run(items)` returns the report dict."""

    def __init__(self, teacher: Teacher, kind: str, out: str | os.PathLike, *, tree: dict | None = None,
                 concurrency: int = 1, guard: EvalGuard | None = None, verify_code: bool = True,
                 dedup: DedupConfig | None = None, progress_s: float = 10.0, seed: int = 0, log=None):
        if kind not in KINDS:
            raise DataPipelineError(f"kind {kind!r}: use one of {KINDS}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise DataPipelineError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        self.teacher, self.kind, self.out = teacher, kind, Path(out)
        self.tree = tree or load_tree()
        self.capitals = tree_capitals(self.tree)
        self.concurrency, self.seed, self.progress_s = concurrency, seed, progress_s
        self.guard = guard if guard is not None else EvalGuard()
        self.python = PythonVerifier(verify_code)
        self.dedup = Deduplicator(dedup or DedupConfig())
        self.rejected_path = self.out.with_name(self.out.name + ".rejected.jsonl")
        self.failed_path = self.out.with_name(self.out.name + ".failed.jsonl")
        self.report_path = self.out.with_name(self.out.name + ".report.json")
        self.log = log if log is not None else (lambda s: print(s, file=sys.stderr, flush=True))
        self.counts = Counter()
        self.reasons: Counter = Counter()
        self.by_domain: Counter = Counter()
        self.rejected_by_domain: Counter = Counter()
        self._lock = threading.Lock()

    # -- one item (runs in a worker thread)
    def _ask(self, messages: list[dict], o: Outcome, max_tokens: int | None = None) -> tuple[str, str | None]:
        text, usage, finish = self.teacher.chat(messages, max_tokens)
        o.requests += 1
        o.tokens += int(usage.get("completion_tokens") or 0)
        o.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        return text.strip(), finish

    def process(self, item: ChatItem) -> Outcome:
        o = Outcome(item)
        try:
            if self.kind == "lessons":
                return self._process_lesson(item, o)
            for turn in item.turns:
                hit = self.guard.question(turn)
                if hit:
                    o.reason = f"decontam:{hit}"
                    o.messages = [{"role": "user", "content": turn}]
                    return o
            messages = [{"role": "system", "content": item.system}] if item.system else []
            for turn, check in zip(item.turns, item.checks):
                messages.append({"role": "user", "content": turn})
                if check["kind"] == "harmful":
                    refusals = self.tree["domains"]["harmful"].get("refusals") or chatgen.REFUSALS
                    answer = random.Random(f"refusal:{item.id}").choice(refusals)
                else:
                    longer = self.teacher.max_tokens * CODE_TOKENS_FACTOR if item.domain == "python" else None
                    answer, finish = self._ask(messages, o, longer)
                    if finish == "length":
                        cut = trim_truncated(answer, MIN_TRIMMED_WORDS)
                        if cut is None and check["kind"] == "entity":
                            cut = trim_to_sentence(answer, MIN_TRIMMED_WORDS)
                        if cut is None:
                            o.reason = "truncated"
                            o.messages = messages + [{"role": "assistant", "content": answer}]
                            return o
                        answer = cut
                        o.trimmed += 1
                    reason = check_answer(answer, check, item.domain, self.python, self.capitals)
                    if reason == "degenerate" and check["kind"] == "entity":
                        cut = clean_prefix(answer, MIN_TRIMMED_WORDS)
                        if cut is not None and check_answer(cut, check, item.domain, None, self.capitals) is None:
                            answer, reason = cut, None
                            o.trimmed += 1
                    if reason is None and check["kind"] in ("none", "python") and not check.get("require_code") \
                            and not on_topic(item.extra.get("question", item.turns[0]), answer):
                        reason = "off_topic"
                    if reason:
                        o.reason = reason
                        o.messages = messages + [{"role": "assistant", "content": answer}]
                        return o
                messages.append({"role": "assistant", "content": answer})
            o.messages = messages
            hit = self.guard.text("\n".join(m["content"] for m in messages))
            if hit:
                o.reason = f"decontam:{hit}"
                return o
            meta = {"domain": item.domain, "topic": item.topic, "audience": item.audience, "style": item.style,
                    "turns": len(item.turns), "checks": [c["kind"] for c in item.checks],
                    "model": self.teacher.model, "trimmed": o.trimmed}
            if self.kind == "chats":
                o.record = {"id": item.record_id, "messages": messages, "meta": meta}
            else:
                chosen = messages[-1]["content"]
                rejected, how = make_rejected(item, chosen, self.tree, random.Random(f"pref:{item.id}"))
                assert rejected != chosen
                meta["rejected_kind"] = how
                o.record = {"id": item.record_id, "prompt": messages[:-1], "chosen": chosen, "rejected": rejected,
                            "meta": meta}
        except TeacherError as e:
            o.error = str(e)
        return o

    def _process_lesson(self, item: ChatItem, o: Outcome) -> Outcome:
        text, finish = self._ask([{"role": "user", "content": item.turns[0]}], o)
        o.messages = [{"role": "user", "content": item.turns[0]}, {"role": "assistant", "content": text}]
        if finish == "length":
            cut = trim_truncated(text, 50)
            if cut is None:
                o.reason = "truncated"
                return o
            text = cut
        reason = check_answer(text, item.checks[0], item.domain, None, self.capitals)
        if reason is None:
            hit = self.guard.text(text)
            reason = f"decontam:{hit}" if hit else None
        if reason:
            o.reason = reason
            return o
        doc = Document(item.record_id, text, {"source": "teacher", "domain": item.domain, "topic": item.topic,
                                              "audience": item.audience, "style": item.style,
                                              "model": self.teacher.model, "truncated": finish == "length"})
        o.record = json.loads(doc.to_json())
        return o

    # -- bookkeeping (main thread only)
    def _dedup_text(self, rec: dict) -> str:
        """What dedup compares: the user and assistant turns (not the system prompt), or a lesson's text."""
        if "messages" in rec:
            return "\n".join(m["content"] for m in rec["messages"] if m["role"] != "system")
        if "prompt" in rec:
            return "\n".join(m["content"] for m in rec["prompt"] if m["role"] != "system") + "\n" + rec["chosen"]
        return rec["text"]

    def _restore_dedup(self) -> None:
        if not self.out.exists():
            return
        with open(self.out, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    self.dedup.check(rec["id"], self._dedup_text(rec))

    def _write(self, f, rec: dict) -> None:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def _handle(self, o: Outcome, out_f, rej_f) -> None:
        self.counts["tokens_generated"] += o.tokens
        self.counts["prompt_tokens"] += o.prompt_tokens
        self.counts["requests"] += o.requests
        if o.error is not None:
            self.counts["failed"] += 1
            with open(self.failed_path, "a", encoding="utf-8") as ff:
                ff.write(json.dumps({"id": o.item.record_id, "error": o.error}) + "\n")
            return
        reason = o.reason
        if reason is None:
            reason = self.dedup.check(o.record["id"], self._dedup_text(o.record))
        self.counts["processed"] += 1
        if reason is None:
            self._write(out_f, o.record)
            self.counts["accepted"] += 1
            self.counts["accepted_trimmed"] += bool(o.trimmed)
            self.by_domain[o.item.domain] += 1
            return
        self.counts["rejected"] += 1
        self.reasons[reason_group(reason)] += 1
        self.rejected_by_domain[o.item.domain] += 1
        self._write(rej_f, {"id": o.item.record_id, "reason": reason, "domain": o.item.domain,
                            "messages": o.messages})

    def report(self, elapsed: float, total: int) -> dict:
        c = self.counts
        rep = {"kind": self.kind, "out": str(self.out), "model": self.teacher.model, "seed": self.seed,
               "concurrency": self.concurrency, "items": total, "skipped_done": c["skipped_done"],
               "processed": c["processed"], "accepted": c["accepted"], "rejected": c["rejected"],
               "failed": c["failed"], "accepted_trimmed": c["accepted_trimmed"],
               "rejected_by_reason": dict(self.reasons.most_common()),
               "accepted_by_domain": dict(sorted(self.by_domain.items())),
               "rejected_by_domain": dict(sorted(self.rejected_by_domain.items())),
               "requests": c["requests"], "retries": self.teacher.stats["retries"],
               "tokens_generated": c["tokens_generated"], "prompt_tokens": c["prompt_tokens"],
               "elapsed_s": round(elapsed, 3),
               "tokens_per_s": round(c["tokens_generated"] / elapsed, 3) if elapsed > 0 else 0.0,
               "accepted_per_min": round(60 * c["accepted"] / elapsed, 3) if elapsed > 0 else 0.0,
               "acceptance_rate": round(c["accepted"] / c["processed"], 4) if c["processed"] else 0.0,
               "python_verification": "sandbox (bubblewrap)" if self.python.available else
               f"skipped: {self.python.problem}",
               "files": {"accepted": str(self.out), "rejected": str(self.rejected_path),
                         "failed": str(self.failed_path)},
               "file_totals": {"accepted": _count_lines(self.out), "rejected": _count_lines(self.rejected_path)}}
        return rep

    def _progress(self, t0: float, total: int, final: bool = False) -> dict:
        rep = self.report(time.monotonic() - t0, total)
        atomic_write_text(self.report_path, json.dumps(rep, indent=1) + "\n")
        top = ", ".join(f"{k} {v}" for k, v in self.reasons.most_common(4))
        self.log(f"[teacher {self.kind}] {'done' if final else 'progress'}: {rep['skipped_done'] + rep['processed']}"
                 f"/{total} items, accepted {rep['accepted']}, rejected {rep['rejected']}"
                 f"{f' ({top})' if top else ''}, failed {rep['failed']}; {rep['tokens_generated']} tokens, "
                 f"{rep['tokens_per_s']:.1f} tok/s, {rep['accepted_per_min']:.1f} accepted/min")
        return rep

    def run(self, items: list[ChatItem]) -> dict:
        """Process every item not already finished (accepted or rejected) in `out`; returns the report."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        done = load_done(self.out) | load_done(self.rejected_path)
        self._restore_dedup()
        todo = []
        for it in items:
            if it.id in done:
                self.counts["skipped_done"] += 1
            else:
                done.add(it.id)         # an id drawn twice (after MAX_TRIES) is asked once
                todo.append(it)
        t0 = time.monotonic()
        last = t0
        with open(self.out, "a", encoding="utf-8") as out_f, \
                open(self.rejected_path, "a", encoding="utf-8") as rej_f, \
                ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            queue = iter(todo)
            pending = set()
            try:
                for it in queue:
                    pending.add(ex.submit(self.process, it))
                    if len(pending) >= 2 * self.concurrency:
                        break
                while pending:
                    finished, pending = wait(pending, timeout=self.progress_s, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        self._handle(fut.result(), out_f, rej_f)
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending.add(ex.submit(self.process, nxt))
                    if time.monotonic() - last >= self.progress_s:
                        last = time.monotonic()
                        self._progress(t0, len(items))
            finally:
                for fut in pending:
                    fut.cancel()
        fsync_path(self.out.parent)
        return self._progress(t0, len(items), final=True)


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------- CLI

def run_cli(args) -> int:
    """`pocketlm data teacher --kind ...` (the arguments are added in `pocketlm.data.commands`)."""
    tree = load_tree(args.tree)
    if args.count is None:
        raise DataPipelineError("--kind needs --count N (how many items to ask for)")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    items = build_items(args.kind, args.count, args.seed, tree=tree, domains=domains, multi_turn=args.multi_turn,
                        corpus_dir=args.corpus_dir)
    temperature = DEFAULT_TEMPERATURE[args.kind] if args.temperature is None else args.temperature
    teacher = Teacher(args.base_url, args.model, api_key=args.api_key, temperature=temperature,
                      max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS[args.kind], timeout_s=args.timeout,
                      requests_per_minute=args.rpm, seed=args.seed)
    guard = EvalGuard(tasks=args.decontam_tasks, eval_data=args.eval_data,
                      items=[args.decontam_items] if args.decontam_items else None)
    run = TeacherChatRun(teacher, args.kind, args.out, tree=tree, concurrency=args.concurrency, guard=guard,
                         verify_code=not args.no_verify_code, seed=args.seed)
    if not run.python.available:
        print(f"pocketlm data teacher: Python answers are NOT run: {run.python.problem}", file=sys.stderr)
    rep = run.run(items)
    print(json.dumps(rep, indent=1))
    print(f"report: {run.report_path}", file=sys.stderr)
    return 0
