"""Whether evaluation puts `<s>` (BOS) in front of each text: the `--add-bos {auto,true,false}` rule.

A Hugging Face tokenizer folder states it twice: `tokenizer_config.json` has `add_bos_token`, and `tokenizer.json`
may carry a `TemplateProcessing` post-processor that puts `<s>` first. The two can disagree (`add_bos_token:
false`, with `<s>` still in the converted `tokenizer.json`): a third-party verbatim copy of a Phi-3(.5)-mini
`tokenizer_config.json` says `false` (the hub files themselves were not checked here). The tools read such a folder
differently:

- transformers 4.x (`LlamaTokenizerFast.update_post_processor`) rebuilds the post-processor from
  `add_bos_token`: no `<s>`; llama.cpp's converter copies `add_bos_token` into the GGUF: no `<s>`.
- transformers 5.x (checked here with 5.25: `AutoTokenizer.from_pretrained(folder).encode(...)`) keeps the
  post-processor from `tokenizer.json` and ignores `add_bos_token` from the file (it only rebuilds the
  post-processor when `add_bos_token` is passed as an argument): `<s>` first. lm-evaluation-harness 0.4.13 encodes
  with the tokenizer's default `add_special_tokens=True`, so under transformers 5 it scores with `<s>`, under 4
  without.

The rule (`auto`): `add_bos_token` from `tokenizer_config.json` when the file says it (the authors' stated
setting; the paper: "We remove BoS tokens"; it is also what `Tokenizer.from_pretrained` and the GGUF carry),
else the post-processor of `tokenizer.json`, else the tokenizer's own default. When the two files disagree,
`resolve` says so in its note (printed by `pocketlm eval` and kept in results.json): `--add-bos true` reproduces
lm-eval under transformers 5, `--add-bos false` lm-eval under transformers 4 (or lm-eval's
`add_bos_token=False`).

The rule applies to plain-text prompts (log-likelihood and generation); chat prompts (`--chat`, MT-bench,
safety) are rendered by the model's chat format, which says itself whether `<s>` comes first.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.errors import PocketLMError

MODES = ("auto", "true", "false")


def folder_flags(folder: Path) -> tuple[bool | None, bool | None]:
    """(tokenizer_config.json's add_bos_token, whether tokenizer.json's post-processor puts a token first);
    None where a file is absent, unreadable or silent."""
    config_flag = post_flag = None
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and isinstance(cfg.get("add_bos_token"), bool):
            config_flag = cfg["add_bos_token"]
    except (OSError, ValueError):
        pass
    try:
        doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        post = doc.get("post_processor") if isinstance(doc, dict) else None
        if isinstance(post, dict) and post.get("type") == "TemplateProcessing":
            first = (post.get("single") or [{}])[0]
            post_flag = isinstance(first, dict) and "SpecialToken" in first
        elif isinstance(doc, dict) and "post_processor" in doc:
            post_flag = False
    except (OSError, ValueError):
        pass
    return config_flag, post_flag


def resolve(mode: str, tokenizer) -> tuple[bool, str]:
    """(add BOS?, a one-line note on where that came from) for `--add-bos MODE` and this tokenizer."""
    if mode not in MODES:
        raise PocketLMError(f"--add-bos {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        if mode == "true" and tokenizer.bos_id is None:
            raise PocketLMError(f"--add-bos true: the tokenizer {tokenizer.source} has no bos token")
        return mode == "true", f"--add-bos {mode}"
    source = Path(str(getattr(tokenizer, "source", "")))
    config_flag, post_flag = folder_flags(source.parent) if source.name == "tokenizer.json" else (None, None)
    if config_flag is not None:
        note = f"tokenizer_config.json add_bos_token={str(config_flag).lower()}"
        if post_flag is not None and post_flag != config_flag:
            note += (f" (tokenizer.json's post-processor {'adds' if post_flag else 'adds no'} <s>, which lm-eval "
                     f"under transformers 5 follows: --add-bos {str(post_flag).lower()} reproduces its numbers)")
        return config_flag, note
    if post_flag is not None:
        return post_flag, f"tokenizer.json post-processor ({'adds' if post_flag else 'no'} <s>)"
    flag = bool(tokenizer.add_bos_default and tokenizer.bos_id is not None)
    return flag, f"tokenizer default ({'adds' if flag else 'no'} <s>)"


class BosTokenizer:
    """A tokenizer seen with another `add_bos_default` (everything else is the wrapped tokenizer's)."""

    def __init__(self, tokenizer, add_bos: bool):
        self._tok, self._add_bos = tokenizer, bool(add_bos)

    @property
    def add_bos_default(self) -> bool:
        return self._add_bos

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)
