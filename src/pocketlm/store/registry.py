"""Model names: the Phi-3 family's tags (as `ollama run phi3:mini` spells them) and `hf.co/OWNER/REPO[:FILE]`.

A name resolves to a `Source`: which hub repository to download, which file of it (GGUF) or which files
(safetensors checkpoint), and what to do after (quantize locally). Every tag of the family names a model pocketlm
runs; a `Source` marked `unsupported` would be refused at `pull`, before any download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pocketlm.errors import ModelNotFoundError


@dataclass(frozen=True)
class Source:
    """Where a store name comes from on the hub.

    Args:
        repo: `owner/name` of the hub repository.
        file: one file to download (a GGUF); None = the checkpoint (config, tokenizer, safetensors, licence).
        quantize: after the download, quantize locally with pocketlm's quantizer to this scheme (e.g. "q4_k").
        unsupported: why pocketlm cannot run this model (then `pull` refuses); None when it can.
        description: one line for `pocketlm pull --list`.
    """

    repo: str
    file: str | None = None
    quantize: str | None = None
    unsupported: str | None = None
    description: str = ""


TAGS: dict[str, Source] = {
    "phi3:mini": Source("microsoft/Phi-3-mini-4k-instruct", description="3.8B, 4k context (bf16 safetensors)"),
    "phi3:mini-128k": Source("microsoft/Phi-3-mini-128k-instruct",
                             description="3.8B, 128k context with LongRoPE (bf16 safetensors)"),
    "phi3:medium": Source("microsoft/Phi-3-medium-4k-instruct", description="14B, 4k context (bf16 safetensors)"),
    "phi3:medium-128k": Source("microsoft/Phi-3-medium-128k-instruct",
                               description="14B, 128k context with LongRoPE (bf16 safetensors)"),
    "phi3.5:mini": Source("microsoft/Phi-3.5-mini-instruct", description="3.8B, 128k context (bf16 safetensors)"),
    "phi3.5:moe": Source("microsoft/Phi-3.5-MoE-instruct",
                         description="16 experts top-2: 41.9B total, 6.6B active (84 GB bf16 safetensors)"),
    "phi3.5:vision": Source("microsoft/Phi-3.5-vision-instruct",
                            description="4.1B, image + text, 128k context (bf16 safetensors)"),
    "phi3:small": Source("microsoft/Phi-3-small-8k-instruct",
                         description="7.4B, 8k context, block-sparse attention (bf16 safetensors)"),
    "phi3:small-128k": Source("microsoft/Phi-3-small-128k-instruct",
                              description="7.4B, 128k context, block-sparse attention (bf16 safetensors)"),
    "phi3:mini-q4": Source("microsoft/Phi-3-mini-4k-instruct-gguf", file="Phi-3-mini-4k-instruct-q4.gguf",
                           description="3.8B, Microsoft's own 4-bit GGUF (2.2 GB)"),
    "phi3:mini-q4_k": Source("microsoft/Phi-3-mini-4k-instruct", quantize="q4_k",
                             description="3.8B, quantized to Q4_K here by pocketlm after the download"),
}
ALIASES = {"phi3": "phi3:mini", "phi3:latest": "phi3:mini", "phi3:3.8b": "phi3:mini", "phi3:14b": "phi3:medium",
           "phi3.5": "phi3.5:mini", "phi3.5:latest": "phi3.5:mini", "phi3.5:3.8b": "phi3.5:mini"}

# a store name: lower-case letters, digits and . _ - with an optional :tag; or an hf.co/OWNER/REPO[:FILE] name
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}(:[a-z0-9][a-z0-9._-]{0,63})?")
_HF = re.compile(r"(?:hf\.co|huggingface\.co)/([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})(?::([^:/\\][^:\\]*))?")


def canonical(name: str) -> str:
    """The store's spelling of a name: aliases resolved (`phi3` -> `phi3:mini`), `huggingface.co/` -> `hf.co/`,
    a bare local name given the tag `latest`. Raises ModelNotFoundError for something that cannot be a name."""
    name = name.strip()
    m = _HF.fullmatch(name)
    if m:
        owner, repo, file = m.groups()
        return f"hf.co/{owner}/{repo}" + (f":{file}" if file else "")
    lowered = name.lower()
    if lowered in ALIASES:
        return ALIASES[lowered]
    if not _NAME.fullmatch(lowered):
        raise ModelNotFoundError(f"{name!r} is not a model name: names look like phi3:mini, my-model:v1 or "
                                 "hf.co/OWNER/REPO[:FILE]")
    return lowered if ":" in lowered else f"{lowered}:latest"


def is_name(text: str) -> bool:
    """True when `text` is spelled like a store name (it may or may not be in the store)."""
    try:
        canonical(text)
    except ModelNotFoundError:
        return False
    return True


def source_for(name: str) -> Source:
    """The hub source of a canonical name: a family tag or an `hf.co/` name. Raises ModelNotFoundError
    (listing the tags) for any other name: only those two can be pulled."""
    if name in TAGS:
        return TAGS[name]
    m = _HF.fullmatch(name)
    if m:
        owner, repo, file = m.groups()
        return Source(f"{owner}/{repo}", file=file, description=f"hub repository {owner}/{repo}")
    raise ModelNotFoundError(f"{name!r} is not a tag pocketlm knows; the tags are {', '.join(sorted(TAGS))} "
                             f"(and {', '.join(sorted(ALIASES))}), or name any hub repository as "
                             "hf.co/OWNER/REPO[:FILE]")
