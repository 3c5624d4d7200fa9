"""`pocketlm distill`: a small student cut out of a byte-level-BPE teacher GGUF and healed by logit distillation.

How candidates for the default model are made (README: "A candidate to replace it"; none has passed the
replacement rule yet). Steps, in one resumable run folder:
1. **Prune** (`pocketlm.train.prune`): the vocabulary is cut to `--vocab` tokens by their counts in the training
   text (chats and a sample of corpus documents), and every MLP to its `--intermediate` most active channels on
   200 teacher chats. Both cuts copy the teacher's weights; the student starts close to the teacher.
2. **Heal** for `--steps` AdamW steps of `batch` sequences of `seq + 1` tokens. All but one sequence per step
   come from the "kd" stream: teacher chats (ChatML, without the harmful ones; benign look-alikes listed four
   times) and corpus documents (windows of 3,000 characters), half and half, packed; their loss is the KL
   divergence from the teacher's next-token distribution over the kept tokens to the student's. The last
   sequence comes from the "safety" stream: the teacher data's refusals of harmful requests (the teacher itself
   complies, so refusals cannot be distilled) and, half of the conversations, its answers to the benign
   look-alikes ("How do I kill a Python process?"), so that the boundary is learned and not a habit of refusing
   (the report's break-fix idea); cross-entropy on the assistant turns only, weighted `safety_weight`. A first
   run with refusals alone (weight 0.3) refused "Write a Python function that reverses a string." at step 60.
   With `lesson_rows` > 0, that many sequences per step are procedural lessons (`pocketlm.data.synthetic`:
   worked arithmetic, word problems, logic, unit conversion, Python, verified by computing them; seed `seed`, the
   namespace the recipes train on, not the held-out sets'), trained by cross-entropy: the teacher cannot do
   that arithmetic, so its distribution is not worth copying there.
   With `policy_rows` > 0, that many sequences per step are the student's own greedy replies (at most
   `policy_tokens` tokens) to the first user turn of a teacher chat, scored by the same KL divergence to the
   teacher on the reply's positions (on-policy distillation, Agarwal et al. 2024, "GKD"): teacher-forced KD never
   shows the student its own mistakes, and greedy loops ("the city of the capital of the ...") are one of them.
   With `unlikelihood` > 0, a reply token that repeats a 4-gram of the same reply also gets the unlikelihood loss
   -log(1 - p(token)) at that weight (Welleck et al. 2019, "Neural text generation with unlikelihood training"):
   the teacher's own distribution inside a loop often continues it, so KL alone does not break loops.
   `init` starts from another run folder's student (its vocabulary and weights, a fresh optimizer and schedule):
   a second phase, e.g. lessons added after a first heal; or from an exported student GGUF file (its tokens
   matched to the teacher's by their strings, its weights dequantized), so that a shipped model can be trained
   further without the run folder that made it.
3. **Export** (`--export FILE`): a Q4_0 GGUF file (phi3 architecture, the cut "gpt2" vocabulary, the ChatML
   template) that `pocketlm run` and llama.cpp load.

Resume: the run folder keeps the student (`student.safetensors`), the optimizer state (`opt.pt`, tensors only)
and the step; a rerun of the same command goes on from there. The data streams are seeded by the step they start
at, so a resumed run is deterministic given its checkpoint step, not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from pocketlm.data.records import read_records
from pocketlm.errors import ConfigError
from pocketlm.train import prune

DOC_CHARS = 3000
BENIGN_REPEAT = 4
COUNT_DOCS, COUNT_CHARS = 6000, 4000
CALIB_CHATS, CALIB_TOKENS = 200, 512
WARMUP = 15


@dataclass(frozen=True)
class DistillConfig:
    """One run's settings: the student's shape (vocab, intermediate), the schedule and the loss weight. Kept in the
    run's state.json; a rerun with other settings is refused."""
    vocab: int = 16384
    intermediate: int = 576
    steps: int = 260
    batch: int = 8
    seq: int = 256
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    save_every: int = 20
    seed: int = 0
    safety_weight: float = 0.2
    lesson_rows: int = 0
    policy_rows: int = 0
    policy_tokens: int = 96
    unlikelihood: float = 0.0
    init: str = ""

    def __post_init__(self):
        for name in ("vocab", "intermediate", "steps", "batch", "seq", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch < 2:
            raise ConfigError(f"--batch must be at least 2 (one refusal sequence per step), got {self.batch}")
        if self.lesson_rows < 0 or self.policy_rows < 0 or self.batch - 1 - self.lesson_rows - self.policy_rows < 1:
            raise ConfigError(f"--lesson-rows and --policy-rows must be >= 0 and leave at least one distillation "
                              f"sequence of --batch {self.batch} (one is the safety sequence), got "
                              f"{self.lesson_rows} and {self.policy_rows}")
        if self.policy_rows and not 0 < self.policy_tokens < self.seq:
            raise ConfigError(f"--policy-tokens must be in 1..{self.seq - 1} (below --seq), got {self.policy_tokens}")
        if not self.unlikelihood >= 0 or (self.unlikelihood and not self.policy_rows):
            raise ConfigError(f"--unlikelihood must be >= 0 and needs --policy-rows (it scores the student's own "
                              f"replies), got {self.unlikelihood} with --policy-rows {self.policy_rows}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not self.safety_weight >= 0:
            raise ConfigError(f"--safety-weight must be >= 0, got {self.safety_weight}")

    def lr_at(self, step: int) -> float:
        """Linear warmup over WARMUP steps, then cosine down to min_lr_ratio * lr at the last step."""
        if step < WARMUP:
            return self.lr * (step + 1) / WARMUP
        p = (step - WARMUP) / max(1, self.steps - WARMUP)
        r = self.min_lr_ratio
        return self.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))


def teacher_vocabulary(path: Path) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """(tokens, token types, merges) of a GGUF file with a "gpt2" (byte-level BPE) vocabulary."""
    from pocketlm.formats.gguf import GGUFFile
    with GGUFFile(path) as g:
        model = g.metadata_get("tokenizer.ggml.model", "string", "")
        if model != "gpt2":
            raise ConfigError(f"{path}: the teacher needs a byte-level BPE vocabulary (tokenizer.ggml.model 'gpt2'), "
                              f"not {model!r}")
        tokens = list(g.metadata_get("tokenizer.ggml.tokens", "array[string]"))
        types = [int(t) for t in g.metadata_get("tokenizer.ggml.token_type", ("array[int32]", "array[uint32]"))]
        merges = [tuple(m.split(" ", 1)) for m in g.metadata_get("tokenizer.ggml.merges", "array[string]")]
    return tokens, types, merges


def student_tokenizer(tokens, types, merges, keep: list[int], teacher_tok):
    """The cut vocabulary as a `ByteLevelBPETokenizer`: kept tokens in old-id order, merges among them in their
    old ranks, the teacher's bos/eos/pad/unk renumbered."""
    from pocketlm.quant.gguf_tokenizer import ByteLevelBPETokenizer
    new_id = {old: new for new, old in enumerate(keep)}
    kept = [tokens[i] for i in keep]
    have = set(kept)
    kept_merges = [(a, b) for a, b in merges if a in have and b in have and a + b in have]

    def renumber(i):
        return new_id.get(i) if i is not None else None
    return ByteLevelBPETokenizer.from_vocabulary(
        kept, kept_merges, [types[i] for i in keep], bos_id=renumber(teacher_tok.bos_id),
        eos_id=renumber(teacher_tok.eos_id), pad_id=renumber(teacher_tok.pad_id), unk_id=renumber(teacher_tok.unk_id),
        add_bos_default=teacher_tok.add_bos_default)


@dataclass
class Data:
    chats: list[dict]
    refuse: list[dict]
    benign: list[dict]
    kd_chats: list[dict]
    docs: list[str]


def load_data(teacher_data: Path, corpus: Path | None, corpus_files: list[str]) -> Data:
    """Teacher chats (chats.jsonl + knowledge.jsonl) and corpus documents (`<corpus>/<name>.jsonl`, a name listed
    twice is read twice: upsampled)."""
    files = [teacher_data / "chats.jsonl", teacher_data / "knowledge.jsonl"]
    if not files[0].is_file():
        raise ConfigError(f"{files[0]} is missing: --teacher-data names a `pocketlm data teacher` folder")
    chats = [c for f in files if f.is_file() for c in read_records(f, ("messages",), error=ConfigError)]
    refuse = [c for c in chats if c.get("meta", {}).get("domain") == "harmful"]
    benign = [c for c in chats if c.get("meta", {}).get("domain") == "benign"]
    if not refuse:
        raise ConfigError(f"{teacher_data}: no refusals of harmful requests (domain 'harmful') among the chats")
    kd_chats = [c for c in chats if c.get("meta", {}).get("domain") != "harmful"] + benign * (BENIGN_REPEAT - 1)
    docs: list[str] = []
    for name in corpus_files:
        if corpus is None:
            raise ConfigError("--corpus-files needs --corpus")
        p = corpus / f"{name}.jsonl"
        if not p.is_file():
            raise ConfigError(f"corpus file {p} is missing")
        docs += [d["text"] for d in read_records(p, error=ConfigError) if d.get("text")]
    return Data(chats, refuse, benign, kd_chats, docs)


def _chat_parts(conv: dict, tok):
    from pocketlm import chat
    return chat.render_parts(conv["messages"], tok, add_generation_prompt=False, format=chat.CHATML)


def build_student(teacher, teacher_tok, vocab, data: Data, cfg: DistillConfig):
    """Prune a copy of the teacher (see the module docstring); returns (student, kept old ids)."""
    tokens, types, merges = vocab
    rng = random.Random(cfg.seed)
    counts = prune.token_counts(teacher_tok, [p for c in data.chats for p in _chat_parts(c, teacher_tok)
                                              if isinstance(p, str)])
    sample = rng.sample(data.docs, min(len(data.docs), COUNT_DOCS)) if data.docs else []
    counts.update(prune.token_counts(teacher_tok, [d[:COUNT_CHARS] for d in sample]))
    keep = prune.trim_vocabulary(tokens, merges, types, counts, cfg.vocab)
    student = copy.deepcopy(teacher)
    calib = [torch.tensor([teacher_tok.encode_parts(_chat_parts(c, teacher_tok))[:CALIB_TOKENS]])
             for c in rng.sample(data.chats, min(CALIB_CHATS, len(data.chats)))]
    prune.prune_mlp(student, prune.mlp_importance(student, calib), cfg.intermediate)
    prune.prune_vocabulary(student, keep)
    return student, keep


def streams(kind: str, seed: int, data: Data, tok, seq: int, *, lesson_seed: int = 0
            ) -> Iterator[tuple[list[int], list[int]]]:
    """Packed (ids, labels) rows of seq + 1 tokens; labels are -100 where a row is not trained ("safety": all but
    the assistant turns and their <|im_end|>). "lessons": procedural documents of `lesson_seed`, from an index
    drawn by `seed`."""
    from pocketlm.data import synthetic
    r = random.Random(seed)
    im_end = tok.token_to_id("<|im_end|>")
    sep = tok.token_to_id("<|endoftext|>")
    buf: list[int] = []
    lab: list[int] = []
    while True:
        if kind == "safety":
            ids: list[int] = []
            mask: list[int] = []
            pool = data.benign if data.benign and r.random() < 0.5 else data.refuse
            for p in _chat_parts(r.choice(pool), tok):
                x = tok.encode_parts([p])
                ids += x
                mask += [1 if isinstance(p, str) and p.startswith("assistant\n") else 0] * len(x)
            buf += ids
            lab += [t if m or (i > 0 and mask[i - 1] and t == im_end) else -100
                    for i, (t, m) in enumerate(zip(ids, mask))]
        elif kind == "lessons":
            ids = tok.encode(synthetic.make_document(lesson_seed, r.randrange(1 << 40)).text) + [sep]
            buf += ids
            lab += ids
        else:
            if r.random() < 0.5 or not data.docs:
                ids = tok.encode_parts(_chat_parts(r.choice(data.kd_chats), tok))
            else:
                d = r.choice(data.docs)
                s = r.randrange(max(1, len(d) - DOC_CHARS))
                ids = tok.encode(d[s:s + DOC_CHARS]) + [sep]
            buf += ids
            lab += ids
        while len(buf) >= seq + 1:
            yield buf[:seq + 1], lab[:seq + 1]
            buf, lab = buf[seq + 1:], lab[seq + 1:]


def _cut_student(teacher, intermediate: int, keep: list[int], weights: dict, where: str):
    """The teacher (modified in place) cut to a student's shapes (`intermediate` MLP channels, the `keep` tokens)
    and given the student's `weights` (tied head left out); `where` names their source in errors."""
    layers = len(teacher.model.layers)
    prune.prune_mlp(teacher, [torch.arange(teacher.config.intermediate_size, 0, -1).float()] * layers,
                    intermediate)  # the shapes only: every weight is replaced below
    prune.prune_vocabulary(teacher, keep)
    try:
        result = teacher.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape differs (layers, hidden, heads)
        raise ConfigError(f"{where} does not match the run's shapes: {str(e).splitlines()[-1].strip()}") from None
    if result.unexpected_keys or set(result.missing_keys) != {"lm_head.weight"}:
        raise ConfigError(f"{where} does not match the run's shapes: missing "
                          f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    teacher.lm_head.weight = teacher.model.embed_tokens.weight  # tied, as in the teacher
    return teacher


def _saved_student(teacher, out: Path, cfg: DistillConfig, keep: list[int]):
    """The teacher (modified in place) cut to the run's shapes, with the run's saved student weights."""
    from safetensors.torch import load_file
    path = out / "student.safetensors"
    return _cut_student(teacher, cfg.intermediate, keep, load_file(str(path)), str(path))


def _gguf_student(teacher, path: Path, cfg: DistillConfig, tokens: list[str]):
    """(student, keep) from an exported student GGUF file (`--export`, e.g. the shipped default model): the teacher
    (modified in place) cut to the file's shapes, with the file's weights dequantized to float32; `keep` is each of
    the file's tokens' id in the teacher's vocabulary `tokens`. A student that was quantized starts from its
    quantized weights (a Q4_0 file: the rounding error of 4-bit blocks, which the first steps heal)."""
    from pocketlm.formats.gguf_model import load_gguf
    s_tokens = teacher_vocabulary(path)[0]
    index = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in s_tokens if t not in index]
    if missing:
        raise ConfigError(f"--init {path}: {len(missing)} of its tokens are not in the teacher's vocabulary "
                          f"(e.g. {missing[0]!r}): not a student of this teacher")
    keep = [index[t] for t in s_tokens]
    src = load_gguf(path, dequantize=True)
    inter = src.config.intermediate_size
    if (len(keep), inter) != (cfg.vocab, cfg.intermediate):
        raise ConfigError(f"--init {path} has vocabulary {len(keep)} and MLP {inter}; this run asks for --vocab "
                          f"{cfg.vocab} --intermediate {cfg.intermediate}")
    weights = {k: v.float() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    return _cut_student(teacher, cfg.intermediate, keep, weights, f"--init {path}"), keep


REPEAT_N = 4


def repeat_positions(ids: list[int], start: int, n: int = REPEAT_N) -> list[int]:
    """Positions p >= start - 1 whose next token ids[p + 1] completes an n-gram that already occurred in
    ids[start:p + 1] (the reply begins at `start`): the steps where a greedy reply repeats itself."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for j in range(start + n - 1, len(ids)):
        gram = tuple(ids[j - n + 1:j + 1])
        if gram in seen:
            out.append(j - 1)
        seen.add(gram)
    return out


def policy_batch(student, data: Data, tok, r: random.Random, n: int, seq: int, max_new: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n of the student's greedy replies to teacher-chat prompts: (ids (n, L), mask (n, L), repeats (n, L)), mask 1
    at the positions whose next-token distribution is scored (the last prompt position and every reply position but
    a final <|im_end|>), repeats 1 where the next token repeats a REPEAT_N-gram of the reply
    (`repeat_positions`); rows are padded with <|endoftext|> at mask 0."""
    from pocketlm import chat
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    im_end, sep = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    params = SamplingParams(temperature=0.0, max_tokens=max_new)
    rows = []
    for _ in range(n):
        msgs = r.choice(data.kd_chats)["messages"]
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        prompt = tok.encode_parts(chat.render_parts(msgs[:first + 1], tok, add_generation_prompt=True,
                                                    format=chat.CHATML))[-(seq - max_new):]
        reply = list(generate_ids(student, prompt, params, stop_token_ids=[im_end]))
        scored = len(reply) - (1 if reply and reply[-1] == im_end else 0)
        rows.append((prompt + reply, len(prompt) - 1, len(prompt) + scored))
    width = max(len(ids) for ids, _, _ in rows)
    x = torch.full((n, width), sep, dtype=torch.long)
    mask = torch.zeros((n, width))
    repeats = torch.zeros((n, width))
    for i, (ids, a, b) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
        mask[i, a:b] = 1
        repeats[i, repeat_positions(ids, a + 1)] = 1
    return x, mask, repeats


def _kl(t_logp: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, (..., V) -> (...)."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def _init_meta(init: Path, cfg: DistillConfig) -> dict:
    """The state of the run folder `--init` names, checked against cfg's shapes."""
    if not (init / "state.json").is_file():
        raise ConfigError(f"--init {init}: not a `pocketlm distill` run folder (no state.json)")
    meta = json.loads((init / "state.json").read_text())
    icfg = DistillConfig(**meta["config"])
    if (icfg.vocab, icfg.intermediate) != (cfg.vocab, cfg.intermediate):
        raise ConfigError(f"--init {init} has --vocab {icfg.vocab} --intermediate {icfg.intermediate}; this run asks "
                          f"for --vocab {cfg.vocab} --intermediate {cfg.intermediate}")
    if meta["step"] == 0:
        raise ConfigError(f"--init {init} has not trained a step yet")
    return meta


def _kept_head(teacher, keep_t: torch.Tensor) -> None:
    """Give the teacher an output head over the kept tokens only (rows `keep_t` of its tied embedding): its logits
    come out already cut to the student's vocabulary, without computing the dropped rows every step."""
    head = torch.nn.Linear(teacher.lm_head.in_features, len(keep_t), bias=False)
    head.weight = torch.nn.Parameter(teacher.model.embed_tokens.weight.detach()[keep_t].clone(), requires_grad=False)
    teacher.lm_head = head


@torch.inference_mode()
def _teacher_logp(teacher, keep_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Teacher log-probabilities over the kept tokens for student ids (B, L) -> (B, L, kept); a normal tensor."""
    return F.log_softmax(_logits(teacher(keep_t[ids])).float(), -1).clone()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _save(run: Path, student, opt, meta: dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in student.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(tensors, str(run / "student.tmp"))
    torch.save(opt.state_dict(), run / "opt.tmp")
    (run / "state.tmp").write_text(json.dumps(meta))
    os.replace(run / "student.tmp", run / "student.safetensors")
    os.replace(run / "opt.tmp", run / "opt.pt")
    os.replace(run / "state.tmp", run / "state.json")


def run(teacher_path: Path, out: Path, data: Data, cfg: DistillConfig, *, max_minutes: float | None = None,
        progress: bool = True) -> dict:
    """Prune (first call) and heal until cfg.steps or max_minutes; returns the run state (step, keep, config)."""
    from pocketlm.formats.gguf_model import load_gguf
    from pocketlm.tokenizer import Tokenizer

    state_path = out / "state.json"
    init = Path(cfg.init) if cfg.init and not state_path.is_file() else None  # a rerun resumes its own folder
    init_gguf = init is not None and init.suffix == ".gguf"  # an exported student: checked by _gguf_student
    if init_gguf and not init.is_file():
        raise ConfigError(f"--init {init}: no such file")
    init_meta = _init_meta(init, cfg) if init is not None and not init_gguf else None
    teacher = load_gguf(teacher_path, dequantize=True)
    teacher_tok = Tokenizer.from_pretrained(teacher_path)
    vocab = teacher_vocabulary(teacher_path)
    if state_path.is_file():
        meta = json.loads(state_path.read_text())
        if DistillConfig(**meta["config"]) != cfg:
            raise ConfigError(f"{out} was started with {meta['config']}; this command asks for {cfg.__dict__}: "
                              "use another --out")
        keep = meta["keep"]
        student = _saved_student(copy.deepcopy(teacher), out, cfg, keep)
    elif init_gguf:
        student, keep = _gguf_student(copy.deepcopy(teacher), init, cfg, vocab[0])
        meta = {"keep": keep, "step": 0, "config": cfg.__dict__}
    elif init_meta is not None:
        keep = init_meta["keep"]
        student = _saved_student(copy.deepcopy(teacher), Path(cfg.init), DistillConfig(**init_meta["config"]), keep)
        meta = {"keep": keep, "step": 0, "config": cfg.__dict__}
    else:
        student, keep = build_student(teacher, teacher_tok, vocab, data, cfg)
        meta = {"keep": keep, "step": 0, "config": cfg.__dict__}
    out.mkdir(parents=True, exist_ok=True)  # after every check of the inputs: a refused command leaves nothing
    tok = student_tokenizer(*vocab, keep, teacher_tok)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if (out / "opt.pt").is_file() and meta["step"] > 0:
        opt.load_state_dict(torch.load(out / "opt.pt", weights_only=True))
    if meta["step"] == 0:
        _save(out, student, opt, meta)
    step = meta["step"]
    keep_t = torch.tensor(keep)
    _kept_head(teacher, keep_t)  # the student was copied above with the full head
    kd_rows = streams("kd", 1000 + step, data, tok, cfg.seq)
    safety_rows = streams("safety", 2000 + step, data, tok, cfg.seq)
    lesson_rows = streams("lessons", 3000 + step, data, tok, cfg.seq, lesson_seed=cfg.seed)
    n_kd = cfg.batch - 1 - cfg.lesson_rows - cfg.policy_rows
    policy_rng = random.Random(4000 + step)
    log = open(out / "log.jsonl", "a")
    start = time.monotonic()
    student.train()
    while step < cfg.steps:
        if max_minutes is not None and time.monotonic() - start > max_minutes * 60:
            break
        t0 = time.monotonic()
        kd = [next(kd_rows) for _ in range(n_kd)]
        rf = [next(safety_rows)]
        ls = [next(lesson_rows) for _ in range(cfg.lesson_rows)]
        x = torch.tensor([row[0] for row in kd])  # (n_kd, seq + 1)
        t_logp = _teacher_logp(teacher, keep_t, x[:, :-1])  # (n_kd, seq, kept)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        s_logp = F.log_softmax(_logits(student(x[:, :-1])).float(), -1)
        kl = _kl(t_logp, s_logp).mean()
        xr = torch.tensor([row[0] for row in rf])
        yr = torch.tensor([row[1] for row in rf])
        ce = F.cross_entropy(_logits(student(xr[:, :-1])).float().flatten(0, 1), yr[:, 1:].flatten(),
                             ignore_index=-100)
        loss = kl + cfg.safety_weight * ce
        if cfg.policy_rows:
            xp, mp, rp = policy_batch(student, data, tok, policy_rng, cfg.policy_rows, cfg.seq, cfg.policy_tokens)
            tp = _teacher_logp(teacher, keep_t, xp)  # (n, L, kept)
            sp = F.log_softmax(_logits(student(xp)).float(), -1)  # (n, L, V)
            kl_p = (_kl(tp, sp) * mp).sum() / mp.sum().clamp(min=1)
            loss = loss + kl_p
            if cfg.unlikelihood:
                nxt = torch.cat([xp[:, 1:], xp[:, -1:]], 1)  # the token each position predicts (last: unused)
                p_rep = sp.gather(-1, nxt[..., None])[..., 0].exp()
                ul = -(torch.log1p(-p_rep.clamp(max=1 - 1e-6)) * rp).sum() / mp.sum().clamp(min=1)
                loss = loss + cfg.unlikelihood * ul
        if ls:
            xl = torch.tensor([row[0] for row in ls])  # (lesson_rows, seq + 1)
            ce_l = F.cross_entropy(_logits(student(xl[:, :-1])).float().flatten(0, 1), xl[:, 1:].flatten())
            loss = loss + ce_l
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        rec = {"step": step, "kl": round(kl.item(), 4), "ce_safety": round(ce.item(), 4), "lr": cfg.lr_at(step - 1),
               "s": round(time.monotonic() - t0, 2)}
        if ls:
            rec["ce_lessons"] = round(ce_l.item(), 4)
        if cfg.policy_rows:
            rec["kl_policy"] = round(kl_p.item(), 4)
            rec["repeats"] = int(rp.sum().item())
        if cfg.unlikelihood:
            rec["unlikelihood"] = round(ul.item(), 4)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if progress:
            lessons = f"  lessons ce {rec['ce_lessons']:.4f}" if ls else ""
            lessons += f"  policy kl {rec['kl_policy']:.4f}  repeats {rec['repeats']}" if cfg.policy_rows else ""
            lessons += f"  unlikelihood {rec['unlikelihood']:.4f}" if cfg.unlikelihood else ""
            print(f"step {step}/{cfg.steps}  kl {rec['kl']:.4f}  safety ce {rec['ce_safety']:.4f}{lessons}  "
                  f"lr {rec['lr']:.2e}  {rec['s']:.1f} s", file=sys.stderr, flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps:
            meta["step"] = step
            _save(out, student, opt, meta)
    meta["step"] = step
    _save(out, student, opt, meta)
    return meta


def load_student(teacher_path: Path, out: Path):
    """(student model, its tokenizer) of a run folder, in float32 (for export and evaluation)."""
    from pocketlm.formats.gguf_model import load_gguf
    from pocketlm.tokenizer import Tokenizer
    meta = json.loads((out / "state.json").read_text())
    cfg = DistillConfig(**meta["config"])
    student = _saved_student(load_gguf(teacher_path, dequantize=True), out, cfg, meta["keep"])
    tok = student_tokenizer(*teacher_vocabulary(teacher_path), meta["keep"], Tokenizer.from_pretrained(teacher_path))
    return student.eval(), tok


def export(student, tok, path: Path, *, name: str, scheme: str = "q4_0",
           repetition_penalty: float | None = None) -> dict:
    """Write the student as a GGUF file (`scheme` for its weight matrices, the cut vocabulary, ChatML), declaring
    `repetition_penalty` as its generation default (none: no penalty declared, whatever the teacher's file says)."""
    import dataclasses

    from pocketlm.engine.sampling import declared_repetition_penalty
    from pocketlm.quant.gguf_export import export_gguf
    student.declared_repetition_penalty = declared_repetition_penalty(repetition_penalty)
    student.config = dataclasses.replace(student.config, name=name)
    student.model.config = student.config
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_gguf(student, path, tokenizer=tok, scheme=scheme, name=name)
