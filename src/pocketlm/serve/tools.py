"""Tool calls (OpenAI `tools` / `tool_choice` / `parallel_tool_calls`, Ollama `tools`) for models without tool
tokens: the prompt format, the grammar that makes every call well-formed, and the parser that turns a reply into
`tool_calls`.

Phi-3 (and ChatML SmolLM2) have no tool tokens and no tool template, so pocketlm uses one plain-text format, close
to the Hermes/Qwen `<tool_call>` format that many small models have seen:

- The tools go into the system prompt (appended to the first system message, or a new one; the Phi-3 formats that
  drop system messages get it at the start of the first user message instead) -- TOOLS_HEADER below, then one
  JSON object a line `{"name":...,"description":...,"parameters":{...}}` between `<tools>` and `</tools>`, then
  how to call, plus one sentence for `tool_choice` "required" / a named function / "none".
- A call is the text block `<tool_call>\\n{"name":"NAME","arguments":{...}}\\n</tool_call>`; parallel calls are
  such blocks separated by "\\n". The reply is either text or only calls.
- An assistant message with `tool_calls` is rendered as its content (if any) followed by its calls in that block
  form; `tool` messages (a run of them is one turn) become a user turn of blocks
  `<tool_response>\\n{"name":"NAME","content":"..."}\\n</tool_response>`.
- Injection safety. The reply is parsed only by where the grammar put it: a reply is a call list exactly when it
  *starts* with `<tool_call>` (the grammar's text branch cannot start so, and a reply that does is forced through
  the whole call, with arguments that match the function's schema); the arguments end where their JSON value
  ends (a JSON-aware scan, so a string argument holding `</tool_call>` stays an argument). Text that contains the
  delimiters elsewhere (a user quoting them, a reply that mentions them) is returned as text, never as a call.
  Message history is never parsed for calls either: calls come in only as structured `tool_calls`. Everything
  this module writes into the prompt as JSON (tool list, past calls, tool results) has `<` and `>` escaped as
  `\\u003c` / `\\u003e`, so no tool description, argument or tool result can close or open a block; user and
  assistant text is rendered as it is (as ordinary text, never as control tokens; see chat.py).

Constraint (grammar.py's llguidance machinery, one Lark grammar per request): tool_choice "auto" = text or calls,
"required" = one or more calls, {"type": "function", ...} = calls of that function only, "none" = text only;
`parallel_tool_calls: false` allows one call, else up to MAX_CALLS. Arguments are generated under the function's
`parameters` schema with grammar.py's rules (compact JSON, closed objects, bounded integers); closing mode (a weak
model steered to finish within max_tokens) applies inside calls only, never to text.

Checkpoint templates: pocketlm renders only the chat formats of chat.py (chat.FORMAT_NAMES: the Phi-3 and Phi-3.5
ones, ChatML), recognised by exact template comparison and never by running Jinja; none of them has tool blocks
(Phi-3.5-mini's template has none), and the first Phi with `<|tool|>` / `<|tool_call|>` tokens, Phi-4-mini, has a
200k vocabulary and template that pocketlm does not load. So the text format above is used for every model; a
format with tool control tokens would slot in where `render_tool_messages` and `tool_grammar` are.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pocketlm.chat import _content_text
from pocketlm.errors import ChatFormatError
from pocketlm.serve import grammar
from pocketlm.serve.errors import bad_request

CALL_OPEN = "<tool_call>"  # a reply that starts with this is a list of calls
CALL_HEAD = CALL_OPEN + "\n"
CALL_TAIL = "\n</tool_call>"
CALL_SEP = "\n"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>\n", "\n</tool_response>"
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
MAX_CALLS = 8  # calls in one reply with parallel_tool_calls
SYSTEM_DROPPING_FORMATS = ("phi3-mini-2024-04", "phi3-medium")  # these templates drop system messages

TOOLS_HEADER = ("# Tools\n\nYou can call functions to help answer the user. The functions, one JSON object a line, "
                "with the JSON Schema of their arguments:\n<tools>\n")
TOOLS_FOOTER = ("\n</tools>\n\nTo call functions, reply with one block per call and nothing else:\n"
                "<tool_call>\n{\"name\":\"<function name>\",\"arguments\":<the arguments as a JSON object>}\n"
                "</tool_call>\nThe results come back in <tool_response> blocks. When no function is needed, "
                "reply to the user in plain text.")
CHOICE_LINE = {"required": "\nCall at least one function now.",
               "none": "\nDo not call functions now: reply in plain text."}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict  # a JSON Schema of type object


@dataclass(frozen=True)
class ToolSpec:
    """A request's validated tools and how they may be used."""

    tools: tuple[Tool, ...]
    choice: str  # "none" | "auto" | "required" | "function" (then `forced` names it)
    forced: str | None
    parallel: bool

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none"

    @property
    def calls_only(self) -> bool:
        return self.choice in ("required", "function")

    def response_format(self) -> dict:
        """The GenRequest.response_format that makes the engine enforce tool_grammar (grammar.constraint_for)."""
        return {"type": "tools", "schema": tool_grammar(self), "calls_only": self.calls_only}


def _safe_json(obj) -> str:
    """Compact JSON with `<` and `>` escaped: text that can never contain a block delimiter."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


# ---- request validation ---------------------------------------------------------------------------------------


def _type_name(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null", int: "integer",
            float: "number"}.get(type(x), type(x).__name__)


def _parameters(params, where: str) -> dict:
    if params is None:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad_request(f"'{where}' must be a JSON Schema object, got {_type_name(params)} {params!r:.60}", where)
    t = params.get("type", "object")
    if t != "object":
        raise bad_request(f"'{where}' must be a JSON Schema of type 'object' (the arguments are a JSON object), "
                          f"got type {t!r:.60}", where)
    params = dict(params, type="object")
    try:
        grammar.check_schema(params)
    except grammar.SchemaError as e:
        raise bad_request(f"unsupported JSON schema in '{where}': {e}", where) from None
    return params


def parse_tools(body: dict) -> ToolSpec | None:
    """Validate `tools`, `tool_choice` and `parallel_tool_calls` (400 naming the field); None without tools."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request(f"'parallel_tool_calls' must be a boolean, got {_type_name(parallel)} {parallel!r:.60}",
                          "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request(f"'tools' must be a list of function tools, got {_type_name(tools)}", "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' may hold at most {MAX_TOOLS} functions, got {len(tools)}", "tools")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise bad_request(f"'{where}' must be an object {{\"type\": \"function\", \"function\": {{...}}}}, got "
                              f"{_type_name(t)} {t!r:.60}", where)
        if t.get("type") != "function":
            raise bad_request(f"'{where}.type' must be 'function' (the only tool type supported), got "
                              f"{t.get('type')!r:.40}", f"{where}.type")
        f = t.get("function")
        if not isinstance(f, dict):
            raise bad_request(f"'{where}.function' must be an object with a 'name', got {_type_name(f)}",
                              f"{where}.function")
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise bad_request(f"'{where}.function.name' must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-', "
                              f"got {name!r:.80}", f"{where}.function.name")
        if any(x.name == name for x in out):
            raise bad_request(f"'{where}.function.name': the function name {name!r} is given twice",
                              f"{where}.function.name")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad_request(f"'{where}.function.description' must be a string, got {_type_name(desc)}",
                              f"{where}.function.description")
        strict = f.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(f"'{where}.function.strict' must be a boolean, got {_type_name(strict)}",
                              f"{where}.function.strict")
        out.append(Tool(name, desc, _parameters(f.get("parameters"), f"{where}.function.parameters")))
    forced = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                              f"\"function\": {{\"name\": ...}}}}, got {choice!r:.80}", "tool_choice")
        if not any(t.name == name for t in out):
            raise bad_request(f"'tool_choice' names the function {name!r:.80}, which is not in 'tools' "
                              f"({', '.join(t.name for t in out)[:200]})", "tool_choice")
        choice, forced = "function", name
    elif choice not in ("none", "auto", "required"):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                          f"\"function\": {{\"name\": ...}}}}, got {choice!r:.80}", "tool_choice")
    return ToolSpec(tuple(out), choice, forced, True if parallel is None else parallel)


# ---- the grammar ----------------------------------------------------------------------------------------------


def _lark_literal(s: str) -> str:
    return json.dumps(s)  # a JSON string is a Lark string literal (the same escapes)


def tool_grammar(spec: ToolSpec) -> str:
    """The llguidance grammar of a reply under `spec`: text that does not start with `<tool_call>`, and/or calls."""
    tools = [t for t in spec.tools if spec.choice != "function" or t.name == spec.forced]
    lines = ["%llguidance {}"]
    if spec.choice == "none":
        lines.append("start: TEXT")
    elif spec.calls_only:
        lines.append("start: calls")
    else:
        lines.append("start: TEXT | calls")
    lines.append(f"TEXT: /(?s:.*)/ & ~/(?s:{re.escape(CALL_OPEN)}.*)/")
    more = f" ({_lark_literal(CALL_SEP)} call){{0,{MAX_CALLS - 1}}}" if spec.parallel else ""
    lines.append(f"calls: call{more}")
    lines.append(f"call: {_lark_literal(CALL_HEAD)} fn {_lark_literal(CALL_TAIL)}")
    lines.append("fn: " + " | ".join(f"f{i}" for i in range(len(tools))))
    for i, t in enumerate(tools):
        schema = dict(grammar.close_objects(t.parameters), **{"x-guidance": grammar.JSON_OPTIONS})
        head = '{"name":' + json.dumps(t.name) + ',"arguments":'
        lines.append(f'f{i}: {_lark_literal(head)} a{i} "}}"')
        lines.append(f"a{i}: %json {json.dumps(schema)}")
    lark = "\n".join(lines) + "\n"

    def build():
        import llguidance
        try:
            compiled = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise grammar.SchemaError(f"tools: {e}") from None
        return grammar._validated(compiled, "tools")

    return grammar._cached(("tools", lark), build)


class ToolCallConstraint(grammar.JsonConstraint):
    """grammar.JsonConstraint for a tool grammar: closing mode only once the reply is a call (text is never cut
    short by it), always for tool_choice required / a named function."""

    def __init__(self, response_format: dict, table, stop_ids, budget: int | None = None):
        super().__init__(response_format["schema"], table, stop_ids, budget=budget)
        self._head = b""
        self._in_call = bool(response_format.get("calls_only"))

    @property
    def closing(self) -> bool:
        return self._in_call and super().closing

    def advance(self, token_id: int) -> None:
        super().advance(token_id)
        if not self._in_call and len(self._head) < len(CALL_OPEN) and token_id < self.table.n_vocab:
            self._head += self.table.tokens[token_id]
            self._in_call = self._head.startswith(CALL_OPEN.encode())


# ---- rendering the conversation -------------------------------------------------------------------------------


def tools_prompt(spec: ToolSpec) -> str:
    """The system-prompt text that lists `spec`'s tools and the call format."""
    lines = [_safe_json({"name": t.name, **({"description": t.description} if t.description else {}),
                         "parameters": t.parameters}) for t in spec.tools]
    tail = CHOICE_LINE.get(spec.choice, "")
    if spec.choice == "function":
        tail = f"\nCall the function {spec.forced} now."
    return TOOLS_HEADER + "\n".join(lines) + TOOLS_FOOTER + tail


def _call_block(call, i: int, j: int) -> tuple[str, str, str]:
    """One `tool_calls` entry of messages[i] -> (id, name, rendered block); ChatFormatError names the bad part."""
    where = f"messages[{i}].tool_calls[{j}]"
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ChatFormatError(f"{where} must be an object {{'id', 'type': 'function', 'function': {{'name', "
                              f"'arguments'}}}}, got {call!r:.80}")
    if call.get("type", "function") != "function":
        raise ChatFormatError(f"{where}.type must be 'function', got {call.get('type')!r:.40}")
    f = call["function"]
    name, args, cid = f.get("name"), f.get("arguments"), call.get("id")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}.function.name must be a non-empty string, got {name!r:.80}")
    if cid is not None and not isinstance(cid, str):
        raise ChatFormatError(f"{where}.id must be a string, got {cid!r:.80}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ChatFormatError(f"{where}.function.arguments is not JSON: {args!r:.80}") from None
    if not isinstance(args, dict):
        raise ChatFormatError(f"{where}.function.arguments must be a JSON object (or its JSON text), got "
                              f"{args!r:.80}")
    return cid or "", name, CALL_HEAD + _safe_json({"name": name, "arguments": args}) + CALL_TAIL


def render_tool_messages(messages, spec: ToolSpec | None, chat_format: str | None):
    """OpenAI messages with `tool_calls` and `tool` roles, plus the tool list -> plain system/user/assistant
    messages for chat.render (the format in the module docstring). Anything it does not handle (non-dict
    messages, unknown roles) is passed on for chat.parse_messages to report."""
    if not isinstance(messages, list):
        return messages
    touched = spec is not None or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                      for m in messages)
    if not touched:
        return messages
    out: list = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant messages
    last_calls: list[str] = []  # the names of the latest assistant message's calls, in order
    tool_turn = None  # index in `out` of the user turn that collects a run of tool messages
    answered = 0  # tool messages in the current run
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            tool_turn = None
            continue
        role = m.get("role")
        if role == "tool":
            cid, name = m.get("tool_call_id"), m.get("name")
            if cid is not None and not isinstance(cid, str):
                raise ChatFormatError(f"messages[{i}].tool_call_id must be a string, got {cid!r:.80}")
            if cid is not None and cid in names:
                name = names[cid]
            elif cid is not None and cid != "":
                raise ChatFormatError(f"messages[{i}] (role 'tool') answers tool_call_id {cid!r:.80}, which no "
                                      "earlier assistant message's tool_calls has")
            elif not isinstance(name, str):
                if answered < len(last_calls):
                    name = last_calls[answered]  # Ollama: the n-th result answers the n-th call
                else:
                    raise ChatFormatError(f"messages[{i}] (role 'tool') needs a 'tool_call_id' naming the call "
                                          "it answers (Ollama: 'tool_name'), or an earlier assistant message "
                                          "with tool_calls")
            content = _content_text(m.get("content") if m.get("content") is not None else "", i)
            block = RESULT_OPEN + _safe_json({"name": name, "content": content}) + RESULT_CLOSE
            answered += 1
            if tool_turn is None:
                out.append({"role": "user", "content": block})
                tool_turn = len(out) - 1
            else:
                out[tool_turn] = {"role": "user", "content": out[tool_turn]["content"] + "\n" + block}
            continue
        tool_turn, answered = None, 0
        calls = m.get("tool_calls")
        if role == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise ChatFormatError(f"messages[{i}].tool_calls must be a list, got {calls!r:.80}")
            content = m.get("content")
            text = _content_text(content, i) if content is not None else ""
            blocks, last_calls = [], []
            for j, call in enumerate(calls):
                cid, name, block = _call_block(call, i, j)
                if cid:
                    names[cid] = name
                last_calls.append(name)
                blocks.append(block)
            sep = "\n" if text and blocks else ""
            out.append({"role": "assistant", "content": text + sep + CALL_SEP.join(blocks)})
            continue
        out.append(m)
    if spec is not None:
        out = _with_tools_prompt(out, tools_prompt(spec), chat_format)
    return out


def _with_tools_prompt(messages: list, text: str, chat_format: str | None) -> list:
    first = messages[0] if messages else None
    if chat_format in SYSTEM_DROPPING_FORMATS:  # the template drops system messages: the first user turn holds it
        for k, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                content = _content_text(m.get("content"), k)
                return messages[:k] + [dict(m, content=text + "\n\n" + content)] + messages[k + 1:]
        return messages
    if isinstance(first, dict) and first.get("role") == "system":
        content = _content_text(first.get("content"), 0)
        return [dict(first, content=(content + "\n\n" if content else "") + text)] + messages[1:]
    return [{"role": "system", "content": text}] + messages


# ---- parsing the reply ----------------------------------------------------------------------------------------

_HEAD_RE = re.compile(r"(?:\n)?" + re.escape(CALL_HEAD) + r'\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')
_HEAD_MAX = len(CALL_SEP + CALL_HEAD) + 64 + len('{"name":"","arguments":')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolReply:
    """One choice's reply text -> content and tool calls, fed piece by piece (streaming) or whole.

    `push(text)` returns the OpenAI delta for what can be told so far ({"content": ...} and/or {"tool_calls":
    [...]}, possibly empty): text is held back only while it could still be the start of `<tool_call>`.
    `calls` lists the calls seen ({"id", "name", "arguments", "complete"}).
    """

    def __init__(self, spec: ToolSpec | None):
        self.state = "undecided" if spec is not None and spec.calls_possible else "text"
        self.buf = ""
        self.text: list[str] = []
        self.calls: list[dict] = []
        self._depth, self._in_str, self._esc, self._started = 0, False, False, False

    def push(self, piece: str) -> dict:
        self.text.append(piece)
        self.buf += piece
        content: list[str] = []
        entries: list[dict] = []
        while self.buf:
            if self.state == "text":
                content.append(self.buf)
                self.buf = ""
            elif self.state == "undecided":
                if self.buf.startswith(CALL_OPEN):
                    self.state = "head"
                elif CALL_OPEN.startswith(self.buf):
                    break
                else:
                    self.state = "text"
            elif self.state == "head":
                m = _HEAD_RE.match(self.buf)
                if m is None:
                    if len(self.buf) >= _HEAD_MAX or not self._head_possible():
                        self._break()
                    break
                call = {"id": new_call_id(), "name": m.group(1), "arguments": "", "complete": False}
                self.calls.append(call)
                entries.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                "function": {"name": call["name"], "arguments": ""}})
                self.buf = self.buf[m.end():]
                self.state, self._depth, self._in_str, self._esc, self._started = "args", 0, False, False, False
            elif self.state == "args":
                end = self._scan(self.buf)
                chunk = self.buf if end is None else self.buf[:end]
                self.calls[-1]["arguments"] += chunk
                self._add_args(entries, chunk)
                self.buf = "" if end is None else self.buf[end:]
                if end is not None:
                    self.state = "tail"
            elif self.state == "tail":
                tail = "}" + CALL_TAIL
                if self.buf.startswith(tail):
                    self.calls[-1]["complete"] = True
                    self.buf = self.buf[len(tail):]
                    self.state = "head"
                elif tail.startswith(self.buf):
                    break
                else:
                    self._break()
            else:  # broken: the grammar was not followed (no constraint); keep the text
                break
        delta: dict = {}
        if content:
            delta["content"] = "".join(content)
        if entries:
            delta["tool_calls"] = entries
        return delta

    def _head_possible(self) -> bool:
        """Whether the buffered text can still grow into a call head (`_HEAD_RE`)."""
        for w in (CALL_SEP + CALL_HEAD + '{"name":"', CALL_HEAD + '{"name":"'):
            if w.startswith(self.buf):
                return True
            if self.buf.startswith(w):
                rest = self.buf[len(w):]
                name = re.match(r"[A-Za-z0-9_-]*", rest).group()
                return '","arguments":'.startswith(rest[len(name):])
        return False

    def _break(self) -> None:
        self.state = "broken"

    def _add_args(self, entries: list[dict], chunk: str) -> None:
        """Add an arguments piece of the latest call to the delta's entries (OpenAI: {"index", "function":
        {"arguments"}} after the entry that opened the call)."""
        if not chunk:
            return
        index = len(self.calls) - 1
        if entries and entries[-1]["index"] == index:
            entries[-1]["function"]["arguments"] += chunk
        else:
            entries.append({"index": index, "function": {"arguments": chunk}})

    def _scan(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in `text` (index after it), continuing the scan state; None if
        it does not end in `text`."""
        for k, ch in enumerate(text):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
                self._started = True
            elif ch in "}]":
                self._depth -= 1
            if self._started and self._depth == 0 and not self._in_str:
                return k + 1
        return None

    @property
    def complete_calls(self) -> list[dict]:
        return [c for c in self.calls if c["complete"]]

    def is_call_reply(self) -> bool:
        """The whole reply parsed as one or more complete calls."""
        return bool(self.calls) and self.state == "head" and not self.buf and all(c["complete"] for c in self.calls)

    def finish(self) -> dict:
        """At the end of the reply: the delta of text still held back (a reply such as "<tool" that stopped)."""
        if self.state == "undecided" and self.buf:
            self.state = "text"
            text, self.buf = self.buf, ""
            return {"content": text}
        return {}

    def message(self, finish_reason: str | None) -> tuple[dict, str | None]:
        """The OpenAI chat message of the whole reply and its finish_reason ("tool_calls" for calls)."""
        self.finish()
        if self.is_call_reply():
            calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"],
                                                                      "arguments": c["arguments"]}}
                     for c in self.calls]
            return ({"role": "assistant", "content": None, "tool_calls": calls},
                    "tool_calls" if finish_reason == "stop" else finish_reason)
        return {"role": "assistant", "content": "".join(self.text)}, finish_reason

    def stream_finish_reason(self, finish_reason: str | None) -> str | None:
        if finish_reason == "stop" and self.is_call_reply():
            return "tool_calls"
        return finish_reason


def parse_reply(spec: ToolSpec | None, text: str, finish_reason: str | None = "stop") -> tuple[dict, str | None]:
    """A whole reply -> (OpenAI message, finish_reason)."""
    r = ToolReply(spec)
    r.push(text)
    return r.message(finish_reason)
