"""The Phi-3 chat formats in plain Python: messages -> token ids, with no template engine.

Each format below reproduces one official Jinja chat template (phi3-spec.md §5.2) token for token. Message text
goes through `Tokenizer.encode_parts` as ordinary text and the control tokens are inserted by id, so a user who
types "<|end|>\\n<|assistant|>" gets ordinary pieces, never control ids (RELIABILITY.md §2; nanochat's
`render_conversation`). Templates found in model files are never rendered: `format_for_template` only
recognises the known ones by exact comparison.

Formats (phi3-spec.md §5.2):
- "phi3-mini-2024-04" (a): `<s>`, system messages dropped, `<|assistant|>\\n` after every user turn whatever
  `add_generation_prompt` says, assistant turns are bare content + `<|end|>\\n`.
- "phi3-medium" (b): (a) without `<s>`.
- "phi3-mini-2024-07" (d, the default): every role rendered as `<|role|>\\n content <|end|>\\n`; then
  `<|assistant|>\\n` if add_generation_prompt, else the eos token.
- "phi3.5" (e): (d), but system messages with empty content are skipped.

Also "chatml" (`<|im_start|>role\ncontent<|im_end|>\n`, then `<|im_start|>assistant\n`), for the
llama-architecture GGUF models whose template is ChatML (SmolLM2 and many others); it stops at `<|im_end|>`.
No default system message is added (some ChatML templates add their own; pass `--system`).

Stop tokens: `<|end|>` 32007, `<|endoftext|>` 32000 and `<|assistant|>` 32001 (phi3-spec §5.1,
generation_config.json `eos_token_id`; RELIABILITY.md §5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pocketlm.errors import ChatFormatError
from pocketlm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
DEFAULT_FORMAT = "phi3-mini-2024-07"

# The official templates, verbatim from phi3-spec.md §5.2 (Jinja escapes '\n' as written there).
TEMPLATE_PHI3_MINI_2024_04 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\\n' + "
    "message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\\n'}}{% endif %}{% endfor %}")
TEMPLATE_PHI3_MEDIUM = TEMPLATE_PHI3_MINI_2024_04.removeprefix("{{ bos_token }}")
TEMPLATE_PHI3_MINI_2024_07 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
    "{% endif %}")
TEMPLATE_PHI3_5 = TEMPLATE_PHI3_MINI_2024_07.replace(
    "{% if message['role'] == 'system' %}", "{% if message['role'] == 'system' and message['content'] %}")
# microsoft/Phi-3-small-8k-instruct tokenizer_config.json
TEMPLATE_PHI3_SMALL = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
    "{% endif %}")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class _Ids:
    """The control ids a format inserts, looked up by content in the tokenizer."""

    system: int
    user: int
    assistant: int
    end: int
    bos: int | None
    eos: int | None

    def role(self, role: str) -> int:
        return getattr(self, role)


Parts = list[str | int]


def _phi3_mini_2024_04(messages: Sequence[Message], ids: _Ids, add_generation_prompt: bool, bos: bool = True) -> Parts:
    parts: Parts = [_need(ids.bos, "bos")] if bos else []
    for m in messages:  # system messages are dropped; add_generation_prompt is ignored by this template
        if m.role == "user":
            parts += [ids.user, "\n" + m.content, ids.end, "\n", ids.assistant, "\n"]
        elif m.role == "assistant":
            parts += [m.content, ids.end, "\n"]
    return parts


def _phi3_medium(messages: Sequence[Message], ids: _Ids, add_generation_prompt: bool) -> Parts:
    return _phi3_mini_2024_04(messages, ids, add_generation_prompt, bos=False)


def _phi3_mini_2024_07(messages: Sequence[Message], ids: _Ids, add_generation_prompt: bool,
                       skip_empty_system: bool = False) -> Parts:
    parts: Parts = []
    for m in messages:
        if m.role == "system" and skip_empty_system and not m.content:
            continue
        parts += [ids.role(m.role), "\n" + m.content, ids.end, "\n"]
    parts += [ids.assistant, "\n"] if add_generation_prompt else [_need(ids.eos, "eos")]
    return parts


def _phi3_5(messages: Sequence[Message], ids: _Ids, add_generation_prompt: bool) -> Parts:
    return _phi3_mini_2024_07(messages, ids, add_generation_prompt, skip_empty_system=True)


def _phi3_small(messages: Sequence[Message], ids: _Ids, add_generation_prompt: bool) -> Parts:
    """Phi-3-small (tokenizer_config.json of microsoft/Phi-3-small-*-instruct): `{{ bos_token }}` (<|endoftext|>),
    then every message as `<|role|>\\n content <|end|>\\n` whatever its role, then `<|assistant|>\\n` or eos."""
    parts: Parts = [_need(ids.bos, "bos")]
    for m in messages:
        parts += [ids.role(m.role), "\n" + m.content, ids.end, "\n"]
    parts += [ids.assistant, "\n"] if add_generation_prompt else [_need(ids.eos, "eos")]
    return parts


FORMATS: dict[str, Callable[[Sequence[Message], _Ids, bool], Parts]] = {
    "phi3-mini-2024-04": _phi3_mini_2024_04,
    "phi3-medium": _phi3_medium,
    "phi3-mini-2024-07": _phi3_mini_2024_07,
    "phi3.5": _phi3_5,
    "phi3-small": _phi3_small,
}
TEMPLATES: dict[str, str] = {
    "phi3-mini-2024-04": TEMPLATE_PHI3_MINI_2024_04,
    "phi3-medium": TEMPLATE_PHI3_MEDIUM,
    "phi3-mini-2024-07": TEMPLATE_PHI3_MINI_2024_07,
    "phi3.5": TEMPLATE_PHI3_5,
    "phi3-small": TEMPLATE_PHI3_SMALL,
}


CHATML = "chatml"
FORMAT_NAMES = (*FORMATS, CHATML)
# The plain ChatML template, exactly what `_chatml` renders (no default system message): written into the GGUF
# files and tokenizer_config.json of ChatML models pocketlm writes (`pocketlm distill`'s students, converted
# SmolLM2), recognised by `format_for_template`.
TEMPLATE_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def _chatml(messages: Sequence[Message], tokenizer: Tokenizer, add_generation_prompt: bool) -> Parts:
    start, end = (tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    if start is None or end is None or not {start, end} <= set(tokenizer.special_ids):
        raise ChatFormatError(f"tokenizer {tokenizer.source!r} has no <|im_start|>/<|im_end|> control tokens "
                              "for ChatML")
    parts: Parts = []
    for m in messages:
        parts += [start, f"{m.role}\n{m.content}", end, "\n"]
    if add_generation_prompt:
        parts += [start, "assistant\n"]
    return parts


def template_text(name: str) -> str:
    """The Jinja chat template of a format as tokenizer_config.json and GGUF files carry it (real newlines)."""
    if name == CHATML:
        return TEMPLATE_CHATML.replace("\\n", "\n")
    if name not in TEMPLATES:
        raise ChatFormatError(f"{name!r} is not a chat format; choose from {sorted(FORMAT_NAMES)}")
    return TEMPLATES[name].replace("\\n", "\n")


def format_for_template(template: str | None) -> str | None:
    """The format name whose official template equals `template`, else None. Never renders anything.

    The comparison is exact after removing trailing whitespace. Each template is known in two spellings that
    Jinja renders the same: with the two-character escape `\\n` inside string literals (as in phi3-spec §5.2)
    and with a raw newline there (what a tokenizer_config.json or GGUF `tokenizer.chat_template` decodes to).
    """
    if not isinstance(template, str):
        return None
    wanted = template.rstrip()
    for name, known in (*TEMPLATES.items(), (CHATML, TEMPLATE_CHATML)):
        if wanted in (known, known.replace("\\n", "\n")):
            return name
    return None


def get_format(name: str | None) -> Callable[[Sequence[Message], _Ids, bool], Parts]:
    """The renderer of a named format (None -> DEFAULT_FORMAT); exact lookup."""
    name = DEFAULT_FORMAT if name is None else name
    if name not in FORMATS:
        raise ChatFormatError(f"{name!r} is not a chat format; choose from {sorted(FORMAT_NAMES)}")
    return FORMATS[name]


def parse_messages(messages: Any) -> list[Message]:
    """Validate OpenAI-style messages. Content is a str or a list of {"type": "text", "text": str} parts
    (joined without separator)."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"messages must be a list, got {type(messages).__name__}: {messages!r:.80}")
    if not messages:
        raise ChatFormatError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be an object, got {type(m).__name__}: {m!r:.80}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role is {role!r:.40}; expected one of {list(ROLES)}")
        out.append(Message(role, _content_text(m.get("content"), i)))
    return out


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatFormatError(f"messages[{i}].content[{j}] is not a text part "
                                      f"{{'type': 'text', 'text': str}}: {part!r:.80}")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"messages[{i}].content must be a string or a list of text parts, got "
                          f"{type(content).__name__}: {content!r:.80}")


def _control_ids(tokenizer: Tokenizer) -> _Ids:
    found = {}
    for name in ("system", "user", "assistant", "end"):
        content = f"<|{name}|>"
        i = tokenizer.token_to_id(content)
        if i is None or i not in tokenizer.special_ids:
            raise ChatFormatError(f"tokenizer {tokenizer.source!r} has no {content!r} control token; "
                                  f"not a Phi-3 chat tokenizer")
        found[name] = i
    return _Ids(bos=tokenizer.bos_id, eos=tokenizer.eos_id, **found)


def _need(i: int | None, what: str) -> int:
    if i is None:
        raise ChatFormatError(f"this chat format needs a {what} token, and the tokenizer has none")
    return i


def render_parts(messages: Any, tokenizer: Tokenizer, *, add_generation_prompt: bool = True,
                 format: str | None = None) -> Parts:
    """The rendered conversation as text parts (str) and control ids (int), before tokenization."""
    if format == CHATML:
        return _chatml(parse_messages(messages), tokenizer, bool(add_generation_prompt))
    renderer = get_format(format)
    return renderer(parse_messages(messages), _control_ids(tokenizer), bool(add_generation_prompt))


def render(messages: Any, tokenizer: Tokenizer, *, add_generation_prompt: bool = True,
           format: str | None = None) -> list[int]:
    """Render a conversation to prompt ids.

    Args:
        messages: `[{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": str}]}]`.
        tokenizer: a Phi-3 tokenizer (`Tokenizer.default()` or one loaded from the checkpoint).
        add_generation_prompt: end with `<|assistant|>\\n` (formats d and e; a and b always do after a user turn).
        format: a name from FORMATS; None means DEFAULT_FORMAT.

    Raises:
        ChatFormatError: malformed messages (the index and the bad value are in the message), unknown format,
            or a tokenizer without the Phi-3 control tokens.
    """
    return tokenizer.encode_parts(render_parts(messages, tokenizer, add_generation_prompt=add_generation_prompt,
                                               format=format))


def turn_end_id(tokenizer: Tokenizer, format: str | None = None) -> int:
    """The id that closes an assistant turn in `format`: `<|im_end|>` for ChatML, else `<|end|>` (32007), the token
    SFT and DPO train the model to emit so that generation stops."""
    content = "<|im_end|>" if format == CHATML else "<|end|>"
    i = tokenizer.token_to_id(content)
    if i is None:
        raise ChatFormatError(f"chat format {format or DEFAULT_FORMAT!r} closes a turn with {content!r}, and "
                              f"tokenizer {tokenizer.source!r} has no such token")
    return i


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: `<|end|>`, `<|endoftext|>`, `<|assistant|>` (32007, 32000, 32001); for a
    ChatML tokenizer (no `<|end|>`, has `<|im_end|>`): `<|im_end|>` and the eos token."""
    im_end = tokenizer.token_to_id("<|im_end|>")
    if tokenizer.token_to_id("<|end|>") is None and im_end is not None and im_end in tokenizer.special_ids:
        return [im_end] + ([tokenizer.eos_id] if tokenizer.eos_id not in (None, im_end) else [])
    ids = []
    for content in ("<|end|>", "<|endoftext|>", "<|assistant|>"):
        i = tokenizer.token_to_id(content)
        if i is None or i not in tokenizer.special_ids:
            raise ChatFormatError(f"tokenizer {tokenizer.source!r} has no {content!r} control token")
        ids.append(i)
    return ids
