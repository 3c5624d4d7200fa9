"""Modelfiles, as Ollama writes them: per-model defaults that `run`, `chat` and `serve` apply.

    # comment
    FROM phi3:mini                      a store name, a checkpoint folder or a .gguf file (required, once)
    SYSTEM You are a terse assistant.   the system message (a value may be \"\"\"multi-line\"\"\")
    PARAMETER temperature 0.7           temperature, top_p, top_k, min_p, repeat_penalty, num_ctx, num_predict,
    PARAMETER stop "<|end|>"            seed; stop may repeat
    LICENSE \"\"\"...\"\"\"

Instructions are case-insensitive. TEMPLATE, ADAPTER and MESSAGE are Ollama features pocketlm does not have; a
Modelfile using them is refused with a message that says so (rather than silently ignored).
"""

from __future__ import annotations

import json
import math
import re

from pocketlm.errors import StoreError

# name -> (type, check, description); the checks match what the sampler accepts
PARAMETERS: dict[str, tuple[type, str]] = {
    "temperature": (float, "a number >= 0 (0 = greedy)"),
    "top_p": (float, "a number in (0, 1]"),
    "top_k": (int, "an integer >= 0 (0 = off)"),
    "min_p": (float, "a number in [0, 1)"),
    "repeat_penalty": (float, "a number > 0 (1 = off)"),
    "num_ctx": (int, "an integer >= 1 (tokens of context)"),
    "num_predict": (int, "an integer >= 1 (most tokens per reply)"),
    "seed": (int, "an integer"),
    "stop": (str, "a non-empty string"),
}
_OK = {
    "temperature": lambda v: v >= 0 and math.isfinite(v),
    "top_p": lambda v: 0 < v <= 1,
    "top_k": lambda v: v >= 0,
    "min_p": lambda v: 0 <= v < 1,
    "repeat_penalty": lambda v: v > 0 and math.isfinite(v),
    "num_ctx": lambda v: v >= 1,
    "num_predict": lambda v: v >= 1,
    "seed": lambda v: True,
    "stop": lambda v: len(v) > 0,
}
_UNSUPPORTED = {"TEMPLATE": "pocketlm renders prompts with the model's chat format (--chat-format picks another)",
                "ADAPTER": "LoRA adapters are not supported", "MESSAGE": "seed conversations are not supported"}


def parse_parameter(name: str, text: str):
    """A PARAMETER value checked and converted; StoreError with the bad value otherwise."""
    key = name.strip().lower()
    if key not in PARAMETERS:
        raise StoreError(f"unknown parameter {name!r}; the parameters are {', '.join(PARAMETERS)}")
    kind, what = PARAMETERS[key]
    raw = text.strip()
    if kind is str and len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            raw = json.loads(raw)  # "quoted", with JSON escapes (\n, \")
        except ValueError:
            raw = raw[1:-1]
    try:
        value = kind(raw) if kind is not int else int(raw, 10)
    except ValueError:
        raise StoreError(f"parameter {key} {text.strip()!r}: expected {what}") from None
    if not _OK[key](value):
        raise StoreError(f"parameter {key} {text.strip()!r}: expected {what}")
    return value


def set_parameter(params: dict, name: str, text: str) -> None:
    """Add PARAMETER `name` `text` to `params` (stop accumulates into a list, the others replace)."""
    key = name.strip().lower()
    value = parse_parameter(key, text)
    if key == "stop":
        params.setdefault("stop", [])
        if value not in params["stop"]:
            params["stop"].append(value)
    else:
        params[key] = value


def _values(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, value) of each instruction, with \"\"\"multi-line\"\"\" values joined."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        lineno = i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(\S+)\s*(.*)", line)
        word, rest = m.group(1).upper(), m.group(2)
        if word == "PARAMETER":
            out.append((lineno, word, rest))
            continue
        if rest.startswith('"""'):
            body = rest[3:]
            if body.endswith('"""') and len(body) >= 3:
                out.append((lineno, word, body[:-3]))
                continue
            parts = [body]
            while True:
                if i >= len(lines):
                    raise StoreError(f"Modelfile line {lineno}: {word} \"\"\" is never closed")
                nxt = lines[i]
                i += 1
                if nxt.rstrip().endswith('"""'):
                    parts.append(nxt.rstrip()[:-3])
                    break
                parts.append(nxt)
            out.append((lineno, word, "\n".join(parts).strip("\n")))
        else:
            out.append((lineno, word, rest.strip()))
    return out


def parse(text: str) -> dict:
    """A Modelfile's text -> {"from", "system", "parameters", "license"}; StoreError (with the line) if invalid."""
    result: dict = {"from": None, "system": None, "parameters": {}, "license": None}
    for lineno, word, value in _values(text):
        if word in _UNSUPPORTED:
            raise StoreError(f"Modelfile line {lineno}: {word} is not supported: {_UNSUPPORTED[word]}")
        if word == "FROM":
            if result["from"] is not None:
                raise StoreError(f"Modelfile line {lineno}: a second FROM ({value!r}); one model per Modelfile")
            if not value:
                raise StoreError(f"Modelfile line {lineno}: FROM needs a model (store name, folder or .gguf)")
            result["from"] = value
        elif word == "SYSTEM":
            result["system"] = value
        elif word == "LICENSE":
            result["license"] = value if result["license"] is None else result["license"] + "\n\n" + value
        elif word == "PARAMETER":
            m = re.match(r"(\S+)\s+(.+)", value)
            if not m:
                raise StoreError(f"Modelfile line {lineno}: PARAMETER needs a name and a value, got {value!r}")
            try:
                set_parameter(result["parameters"], m.group(1), m.group(2))
            except StoreError as e:
                raise StoreError(f"Modelfile line {lineno}: {e}") from None
        else:
            raise StoreError(f"Modelfile line {lineno}: unknown instruction {word!r}; the instructions are FROM, "
                             "SYSTEM, PARAMETER and LICENSE")
    if result["from"] is None:
        raise StoreError("the Modelfile has no FROM line (FROM phi3:mini, FROM ./folder or FROM ./model.gguf)")
    return result


def _quote(text: str) -> str:
    if '"""' in text:
        raise StoreError(f"a Modelfile value cannot contain three double quotes: {text[:80]!r}")
    return f'"""{text}"""'


def render(modelfile: dict, *, from_line: str | None = None) -> str:
    """The Modelfile text of `modelfile` (what `pocketlm show --modelfile` prints); `parse` reads it back."""
    lines = []
    src = from_line or modelfile.get("from")
    if src:
        lines.append(f"FROM {src}")
    if modelfile.get("system") is not None:
        lines.append(f"SYSTEM {_quote(modelfile['system'])}")
    for key, value in (modelfile.get("parameters") or {}).items():
        for v in (value if isinstance(value, list) else [value]):
            lines.append(f"PARAMETER {key} {json.dumps(v) if key == 'stop' else v}")
    if modelfile.get("license"):
        lines.append(f"LICENSE {_quote(modelfile['license'])}")
    return "\n".join(lines) + "\n"
