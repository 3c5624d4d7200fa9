"""Named end-to-end recipes: what `pocketlm recipe NAME` runs, as frozen dataclasses looked up exactly.

A recipe fixes the whole Phi-3 pipeline at one scale (phi3-spec.md section 6): the corpus sources and data
pipeline settings, the two pretraining phases (phase 1 mostly filtered web text; phase 2 the more heavily filtered
subset plus synthetic lessons and chat-formatted text), SFT on generated conversations, a short DPO, the
quantization scheme, and the evaluation (held-out tasks and sample chats). Only where the corpus lives and where
the outputs go are left to the command line.

Recipes:
- `nano`: the nano preset (4 layers x 256, tied, 32,064 vocab, 11.6M parameters) on the 2-core CPU, < 30 minutes
  for every step on an idle machine. Its budget (~0.6M pretraining tokens, ~0.3M SFT token positions, a short
  DPO) follows from the measured ~1,000-1,700 tokens/s of the nano model with two threads (seq 256, batch 16) on
  an idle machine, with room for the 3-5x slowdown measured when other jobs share the two cores (~200-500 tokens/s).
- `micro`: the micro preset (8 layers x 512, tied, 43.7M parameters) on one GPU in bf16 autocast, every source
  of the corpus: ~31M pretraining tokens (about 5 epochs of the ~6M filtered tokens: the corpus, not the GPU, is
  the limit), sized for well under 20 minutes of H100 time in 10-minute leases (`--max-minutes`, resumed from its
  own checkpoints; `--pack-data` / `--data-archive` carry the data). NOT yet run on a GPU: its step times are
  estimates.
- `small-cpu`: the default model's recipe since issue 17: nano's width with 8 layers (15.0M parameters), bf16
  autocast on the CPU, trained on the corpus plus the teacher's data (`pocketlm data teacher`: SmolLM2-135M-Instruct
  behind `pocketlm serve` writes chats, knowledge chats and preference pairs; `--teacher-data DIR`), about 70
  minutes of training on an idle 2-core CPU, then simple-qa besides the held-out tasks. The size follows the
  budget: measured on the idle machine (2 threads, seq 256, micro-batch 8), 8 layers train at ~1,900 tokens/s
  with bf16 autocast (4 layers ~2,150, fp32 ~1,000), so the run sees ~7.4M tokens; compute-optimal scaling
  (C = 6ND, N ~ sqrt(C/120)) puts the non-embedding body at a few million parameters, and the 32,064-row head
  costs more per token than the 8 layers. 40 MB of shipped weights (bf16 + Q4_0 GGUF) cap it near 15M.
- `nano-smoke`: a 1-layer, 64-wide model with the real vocabulary and a few steps of each stage: the test recipe
  (seconds per step), on the first 60 documents of two files `scripts/build-corpus.sh` writes (debian-handbook,
  fortunes).

Sampling weights of the pretraining sources: a source's share of the rows of a phase is proportional to
`tokens x weight` (weight = the recipe's upsampling factor for that source, default 1), i.e. a weight of 1
everywhere samples the data in proportion to its size. Deviations from Phi-3: the scale (millions of tokens, not
trillions), no teacher-written synthetic data (procedural lessons and template conversations instead), and the
same tokenizer vocabulary (32,064 rows) even for these small models, so that the chat format is the official one.
`small-cpu` does use teacher-written data (a 135M model as the teacher, where Phi-3 used GPT-4-class models).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pocketlm.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    """One training stage (a pretraining phase, SFT or DPO)."""
    steps: int
    seq_len: int = 256
    batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    save_every: int = 50


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    preset: str
    model_overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    """Default device ("cpu" or "cuda"); `--device` overrides it."""
    threads: int | None = None
    """torch CPU threads for training (None: torch's default)."""
    # ---- data -------------------------------------------------------------------------------------------------
    corpus_sources: tuple[tuple[str, str], ...] = ()
    """(name, kind) of the corpus files `<corpus>/<name>.jsonl` the data pipeline reads; kind web, code, or
    reference (a curated glossary: web text without the prose quality filters)."""
    corpus_docs: int | None = None
    """Read only the first this many documents of each corpus file (None: all of them)."""
    synthetic_docs: int = 0
    """Procedural synthetic lessons (`pocketlm.data.synthetic`) added by the pipeline for phase 2."""
    phase1_weights: dict[str, float] = field(default_factory=dict)
    """Per-source upsampling factors in phase 1 (missing: the "*" entry, else 1.0; 0 drops the source)."""
    phase2_weights: dict[str, float] = field(default_factory=dict)
    """Per-source upsampling factors in phase 2; "synthetic" and "chat" (chat-formatted conversations as
    plain token streams) are phase-2-only sources."""
    pipeline: dict[str, Any] = field(default_factory=dict)
    """Extra `pocketlm.data.pipeline.PipelineConfig` fields (filters, dedup, part sizes)."""
    chat_conversations: int = 2000
    """SFT conversations from `pocketlm.data.chatgen.generate_chat`."""
    chat_text_conversations: int = 1000
    """Further conversations (another seed) rendered in the chat format into phase 2's "chat" source."""
    preference_pairs: int = 400
    """DPO pairs from `pocketlm.data.chatgen.generate_prefs`."""
    data_seed: int = 0
    heldout_fraction: float = 0.02
    """Corpus documents held out of training for evaluation (`pocketlm.eval.heldout.is_heldout`, by id)."""
    heldout_items: int = 150
    """Items of each held-out multiple-choice set (arithmetic, cloze) and synthetic bits-per-byte documents."""
    # ---- training ---------------------------------------------------------------------------------------------
    phase1: StageSpec = StageSpec(steps=100)
    phase2: StageSpec = StageSpec(steps=50)
    sft: StageSpec = StageSpec(steps=50, lr=5e-4, weight_decay=0.0)
    dpo: StageSpec = StageSpec(steps=20, lr=1e-5, weight_decay=0.0, batch_size=8, micro_batch_size=8)
    dpo_beta: float = 0.1
    seed: int = 0
    compile: bool = False
    cpu_bf16: bool = False
    """bf16 autocast on the CPU (`TrainConfig.cpu_bf16`): faster matmuls where the CPU has bf16 instructions."""
    # ---- teacher data (`pocketlm data teacher`) -----------------------------------------------------------------
    teacher_data: bool = False
    """The recipe needs `--teacher-data DIR` (chats.jsonl, and optionally knowledge.jsonl, prefs.jsonl,
    lessons.jsonl as `pocketlm data teacher` writes them): its chats join the SFT set and phase 2's chat text, its
    pairs the DPO set, its lessons phase 2 as a "teacher" source."""
    teacher_sft_repeat: int = 1
    """How many times each teacher chat is listed in the SFT set (beside the template conversations)."""
    teacher_text_repeat: int = 1
    """How many times each teacher chat and lesson is written into phase 2's "teacher" token source."""
    # ---- after training ---------------------------------------------------------------------------------------
    quant_scheme: str = "q4_0"
    eval_limit: int | None = None
    """Items per held-out task (None: all)."""
    simple_qa: bool = False
    """Also score the final model and its GGUF on simple-qa (`pocketlm.eval.simple_qa`, 118 chat questions)."""
    sample_prompts: tuple[str, ...] = (
        "Hello, who are you?",
        "What is 7 times 8?",
        "What does the git commit command do?",
        "What is SQLite?",
    )
    sample_max_tokens: int = 96
    budget_minutes: float | None = None
    """The wall-clock budget the recipe is sized for (stated in the report; not enforced)."""

    def __post_init__(self) -> None:
        for stage in ("phase1", "phase2", "sft", "dpo"):
            s = getattr(self, stage)
            if s.steps <= 0 or s.batch_size % s.micro_batch_size:
                raise ConfigError(f"recipe {self.name}: {stage} needs positive steps and batch_size a multiple of "
                                  f"micro_batch_size, got {s}")
        if self.teacher_sft_repeat < 1 or self.teacher_text_repeat < 0:
            raise ConfigError(f"recipe {self.name}: teacher_sft_repeat must be >= 1 and teacher_text_repeat >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"recipe {self.name}: device {self.device!r} is not cpu or cuda")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def replace(self, **changes: Any) -> Recipe:
        return replace(self, **changes)


def fingerprint(obj: Any) -> str:
    """sha256 (16 hex digits) of a JSON-able object, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The Debian-docs corpus (scripts/build-corpus.sh). Left out of nano: gcide (42 MB, nothing passes the
# filters), perl-doc (19 MB for 18k surviving tokens), bible-kjv and python-src (0.9M and 1.3M tokens that would
# crowd out the documentation the conversations are about).
NANO_SOURCES = (
    ("linux-doc", "web"), ("python-doc", "web"), ("postgresql-doc", "web"), ("sqlite-doc", "web"),
    ("git-doc", "web"), ("debian-handbook", "web"), ("rust-books", "web"), ("manpages", "web"),
    ("fortunes", "web"), ("wordnet", "web"),
)
FULL_SOURCES = NANO_SOURCES + (("bible-kjv", "web"), ("perl-doc", "web"), ("python-src", "code"))

_FILTERS = {"filters": {"gopher_repetition": {}, "gopher_quality": {},
                        "c4": {"unwrap_paragraphs": True, "filter_curly_bracket": False}, "fineweb": {}},
            "part_docs": 200, "lines_per_task": 1000, "shard_tokens": 1 << 24}


def nano() -> Recipe:
    """The nano preset end to end on this 2-core CPU in under 30 minutes (the embedded default model)."""
    return Recipe(
        name="nano", description=nano.__doc__, preset="nano", device="cpu", threads=2,
        corpus_sources=NANO_SOURCES, synthetic_docs=1500,
        phase1_weights={"linux-doc": 0.5, "fortunes": 0.5, "wordnet": 2.0},
        phase2_weights={"*": 0.7, "linux-doc": 0.35, "wordnet": 2.0, "synthetic": 12.0, "chat": 25.0},
        pipeline=_FILTERS, chat_conversations=3000, chat_text_conversations=1500, preference_pairs=400,
        phase1=StageSpec(steps=100, lr=2e-3, warmup_steps=15, schedule="wsd", save_every=25),
        phase2=StageSpec(steps=50, lr=2e-3, schedule="wsd", save_every=25),
        sft=StageSpec(steps=70, lr=1e-3, warmup_steps=7, weight_decay=0.0, save_every=35),
        dpo=StageSpec(steps=16, seq_len=192, batch_size=8, micro_batch_size=8, lr=2e-5, warmup_steps=2,
                      weight_decay=0.0, save_every=16),
        eval_limit=60, budget_minutes=30.0)


def micro() -> Recipe:
    """The micro preset (43.7M parameters) on one H100, bf16 autocast, resumable across 10-minute leases."""
    return Recipe(
        name="micro", description=micro.__doc__, preset="micro", device="cuda", threads=None,
        corpus_sources=FULL_SOURCES, synthetic_docs=4000,
        phase1_weights={"fortunes": 0.5, "wordnet": 0.5, "bible-kjv": 0.3, "python-src": 0.5},
        phase2_weights={"synthetic": 2.0, "chat": 1.0, "fortunes": 0.3, "wordnet": 0.3, "bible-kjv": 0.1,
                        "python-src": 0.3},
        pipeline=_FILTERS, chat_conversations=20000, chat_text_conversations=10000, preference_pairs=3000,
        phase1=StageSpec(steps=360, seq_len=1024, batch_size=64, micro_batch_size=32, lr=2e-3, warmup_steps=40,
                         schedule="wsd", save_every=60),
        phase2=StageSpec(steps=120, seq_len=1024, batch_size=64, micro_batch_size=32, lr=2e-3, schedule="wsd",
                         save_every=60),
        sft=StageSpec(steps=240, seq_len=512, batch_size=64, micro_batch_size=32, lr=5e-4, warmup_steps=20,
                      weight_decay=0.0, save_every=60),
        dpo=StageSpec(steps=100, seq_len=256, batch_size=32, micro_batch_size=16, lr=1e-5, warmup_steps=10,
                      weight_decay=0.0, save_every=50),
        compile=False, eval_limit=None, budget_minutes=20.0)


# small-cpu reads the sources with knowledge in them (WordNet's glosses, the Python and SQLite manuals, the
# handbook) and leaves out the kernel and PostgreSQL manuals and the Rust books: at ~6M tokens in all, every token
# spent on them is one not spent on what the chat questions ask about.
SMALL_SOURCES = (("wordnet", "reference"), ("python-doc", "web"), ("debian-handbook", "web"), ("fortunes", "web"),
                 ("git-doc", "web"), ("sqlite-doc", "web"), ("manpages", "web"))


def small_cpu() -> Recipe:
    """A 15M-parameter model (nano's width, 8 layers) from the corpus plus teacher-written data on the 2-core CPU,
    about 70 minutes of training; the embedded default model since issue 17."""
    return Recipe(
        name="small-cpu", description=small_cpu.__doc__, preset="nano",
        model_overrides={"num_hidden_layers": 8}, device="cpu", threads=2, cpu_bf16=True,
        corpus_sources=SMALL_SOURCES, synthetic_docs=3000,
        phase1_weights={"wordnet": 1.0, "fortunes": 0.5, "manpages": 0.5},
        phase2_weights={"*": 0.3, "wordnet": 0.5, "synthetic": 4.0, "chat": 6.0, "teacher": 12.0},
        pipeline=_FILTERS, chat_conversations=6000, chat_text_conversations=4000, preference_pairs=1500,
        teacher_data=True, teacher_sft_repeat=2, teacher_text_repeat=1,
        phase1=StageSpec(steps=800, lr=2e-3, warmup_steps=40, schedule="wsd", save_every=50),
        phase2=StageSpec(steps=600, lr=2e-3, schedule="wsd", save_every=50),
        sft=StageSpec(steps=400, lr=1e-3, warmup_steps=20, weight_decay=0.0, save_every=50),
        dpo=StageSpec(steps=40, seq_len=192, batch_size=8, micro_batch_size=8, lr=2e-5, warmup_steps=4,
                      weight_decay=0.0, save_every=20),
        quant_scheme="q4_0", eval_limit=60, simple_qa=True,
        sample_prompts=("Hello, who are you?", "What is 7 times 8?", "What is the capital of France?",
                        "Why is the sky blue?", "How do I make a bomb?"),
        budget_minutes=100.0)


def nano_smoke() -> Recipe:
    """A seconds-per-step cut of nano (1 layer x 64 wide, real vocabulary, 60 documents of 2 corpus files): the test
    recipe."""
    return Recipe(
        name="nano-smoke", description=nano_smoke.__doc__, preset="nano",
        model_overrides={"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256},
        device="cpu", threads=1, corpus_sources=(("debian-handbook", "web"), ("fortunes", "web")), corpus_docs=60,
        synthetic_docs=40,
        phase2_weights={"synthetic": 1.0, "chat": 1.0},
        pipeline={"part_docs": 50, "lines_per_task": 200, "shard_tokens": 1 << 16,
                  "filters": {"gopher_repetition": {}}, "knowledge": None},
        chat_conversations=40, chat_text_conversations=20, preference_pairs=12,
        phase1=StageSpec(steps=4, seq_len=32, batch_size=4, micro_batch_size=4, lr=3e-3, save_every=2),
        phase2=StageSpec(steps=2, seq_len=32, batch_size=4, micro_batch_size=4, lr=3e-3, save_every=2),
        sft=StageSpec(steps=3, seq_len=128, batch_size=2, micro_batch_size=2, lr=1e-3, weight_decay=0.0,
                      save_every=3),
        dpo=StageSpec(steps=2, seq_len=96, batch_size=2, micro_batch_size=2, lr=1e-5, weight_decay=0.0,
                      save_every=2),
        heldout_fraction=0.3, heldout_items=12, eval_limit=6,
        sample_prompts=("What is 7 times 8?", "Hello, who are you?"), sample_max_tokens=8,
        budget_minutes=2.0)


RECIPES = {"nano": nano, "small-cpu": small_cpu, "micro": micro, "nano-smoke": nano_smoke}


def get_recipe(name: str) -> Recipe:
    """The named recipe, looked up exactly."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"{name!r} is not a recipe; choose from {sorted(RECIPES)}")
    return RECIPES[name]()
