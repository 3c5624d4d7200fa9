"""`pocketlm chat`: the interactive chat people know from `ollama run`.

    >>> Hello                          one line is one message
    >>> \"\"\"                           \"\"\" starts a multi-line message; a line ending with \"\"\" ends it
    ... two lines\"\"\"
    /set system TEXT                   the system message (TEXT may be \"\"\"multi-line\"\"\")
    /set parameter NAME VALUE          temperature, top_p, top_k, min_p, repeat_penalty, num_ctx, num_predict,
                                       seed, stop (stop takes one or more quoted strings)
    /show info|parameters|system|modelfile|license
    /save NAME, /load NAME             the conversation, system message and parameters, in
                                       $POCKETLM_HOME/conversations/NAME.json
    /clear (or /reset)                 forget the conversation (the system message stays)
    /bye (or /exit, /quit, Ctrl-D)     leave
    Ctrl-C                             stops the reply being written (the chat goes on); at the prompt, clears the line

Line editing and history (arrow keys, Ctrl-R) come from readline when stdin is a terminal; the history is kept in
$POCKETLM_HOME/chat_history. With stdin not a terminal (a pipe), lines are read as they come, without prompts.
The stopped reply of Ctrl-C is not kept: the conversation stays as it was before that message.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import sys
from pathlib import Path

from pocketlm.errors import PocketLMError, StoreError

# Modelfile parameter name -> generation keyword
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repeat_penalty": "repetition_penalty", "seed": "seed", "num_predict": "max_tokens",
                 "stop": "stop"}


def _repeat_penalty(args, model) -> float | None:
    """--repetition-penalty, else the one the model file declares (shown by /show parameters), else None (off)."""
    if args.repetition_penalty is not None:
        return args.repetition_penalty
    return getattr(model, "declared_repetition_penalty", None)


_SAVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HELP = """Available commands:
  /set system TEXT            set the system message (\"\"\"...\"\"\" for several lines)
  /set parameter NAME VALUE   set a parameter (temperature, top_p, top_k, min_p, repeat_penalty, num_ctx,
                              num_predict, seed, stop)
  /show info|parameters|system|modelfile|license
  /save NAME                  save this conversation
  /load NAME                  load a saved conversation
  /clear                      clear the conversation
  /image PATH                 attach an image to the next message (vision models)
  /bye                        exit
  /?, /help                   this help
Use \"\"\" to begin a multi-line message; Ctrl-C stops a reply."""


class ChatREPL:
    """One interactive chat over a loaded model; `run()` until /bye or end of input."""

    def __init__(self, model, tokenizer, args, *, stdin=None, stdout=None, stderr=None):
        from pocketlm.store.store import home
        self.model, self.tok, self.args = model, tokenizer, args
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.interactive = self.stdin.isatty()
        self.home = home()
        self.system: str | None = args.system
        self.messages: list[dict] = []
        self.images: list = []  # vision models: the conversation's images, <|image_1|> ..
        self.pending_images: list = []  # /image: attached to the next message
        self.params: dict = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                             "min_p": args.min_p, "repeat_penalty": _repeat_penalty(args, model), "seed": args.seed,
                             "num_predict": args.max_tokens, "stop": list(args.stop)}
        if getattr(args, "num_ctx", None):
            self.params["num_ctx"] = args.num_ctx
        self.name = getattr(args, "store_name", None) or args.model
        self._readline = None

    # ---- input ----------------------------------------------------------------------------------------------
    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # no readline on this platform: plain input() still works
            return
        self._readline = readline
        self.history = self.home / "chat_history"
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            readline.read_history_file(self.history)
        except OSError:
            pass
        readline.set_history_length(1000)

    def _save_history(self) -> None:
        if self._readline is not None:
            try:
                self._readline.write_history_file(self.history)
            except OSError:
                pass

    def _line(self, prompt: str) -> str | None:
        """One line without its newline; None at end of input."""
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def read_entry(self) -> str | None:
        """One message or command; \"\"\" ... \"\"\" spans lines. None at end of input."""
        line = self._line(">>> ")
        if line is None:
            return None
        if line.count('"""') != 1:
            return line.replace('"""', "") if line.strip().startswith('"""') else line
        parts = [line]
        while True:
            nxt = self._line("... ")
            if nxt is None:
                break
            parts.append(nxt)
            if '"""' in nxt:
                break
        return "\n".join(parts).replace('"""', "")

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.interactive:
            self._setup_readline()
            # Ctrl-C must stop a reply even when we were started with SIGINT ignored (a shell's background job,
            # nohup): Python then installs no KeyboardInterrupt handler of its own
            signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"pocketlm chat: {self.name} ({self._chat_format()}); /? for help, /bye to exit", file=self.err)
        try:
            while True:
                try:
                    entry = self.read_entry()
                except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in ollama
                    print("\nUse Ctrl + d or /bye to exit.", file=self.err)
                    continue
                if entry is None:
                    break
                text = entry.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if self.command(text) == "exit":
                        break
                    continue
                self.reply(entry.strip("\n"))
        finally:
            self._save_history()
        return 0

    def _chat_format(self) -> str:
        return self.args.chat_format or self.model.config.chat_format

    def _conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _sampling(self) -> dict:
        return {SAMPLING_KEYS[k]: (list(v) if k == "stop" else v) for k, v in self.params.items()
                if k in SAMPLING_KEYS}

    def _fit(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
        """With num_ctx set: drop the oldest exchanges until the prompt and the reply fit in num_ctx tokens."""
        num_ctx = self.params.get("num_ctx")
        if not num_ctx:
            return messages, max_tokens
        from pocketlm.engine.generate import encode_prompt
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        while True:
            n = len(encode_prompt(self.tok, head + body, chat_format=self._chat_format())[0])
            if n + max_tokens <= num_ctx or len(body) <= 1:
                break
            body = body[2:] if len(body) > 2 else body[-1:]
        room = num_ctx - n
        if room < 1:
            raise PocketLMError(f"the message takes {n} tokens but num_ctx is {num_ctx}; shorten it or "
                                "/set parameter num_ctx to more")
        return head + body, min(max_tokens, room)

    def reply(self, text: str) -> None:
        """Answer one user message, streaming; Ctrl-C stops it and leaves the conversation as it was."""
        from pocketlm.engine.generate import GenerationResult, stream_events
        sampling = self._sampling()
        stream = stream_events
        if self.images or self.pending_images:  # vision: the new images are named in front of this message
            from functools import partial
            from pocketlm import vision
            text = "".join(f"<|image_{len(self.images) + k}|>\n" for k in range(1, len(self.pending_images) + 1)) + text
            stream = partial(vision.stream_events, images=self.images + self.pending_images)
        try:
            prompt, sampling["max_tokens"] = self._fit(self._conversation() + [{"role": "user", "content": text}],
                                                       sampling["max_tokens"])
        except PocketLMError as e:
            print(f"error: {e}", file=self.err)
            return
        result = None
        try:
            for event in stream(self.model, self.tok, prompt, chat_format=self._chat_format(), **sampling):
                if isinstance(event, GenerationResult):
                    result = event
                else:
                    self.out.write(event)
                    self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n")
            self.out.flush()
            print("(reply stopped)", file=self.err)
            return
        except PocketLMError as e:
            print(f"\nerror: {e}", file=self.err)
            return
        self.out.write("\n\n" if self.interactive else "\n")
        self.out.flush()
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        self.images, self.pending_images = self.images + self.pending_images, []
        print(f"[{result.completion_tokens} tokens at {result.decode_tokens_per_s:.1f} tokens/s; prompt "
              f"{result.prompt_tokens} tokens at {result.prompt_tokens_per_s:.1f} tokens/s]", file=self.err)

    # ---- commands -------------------------------------------------------------------------------------------
    def command(self, text: str) -> str | None:
        """Run one /command; returns "exit" for /bye."""
        word, _, rest = text.partition(" ")
        word = word.lower()
        rest = rest.strip()
        try:
            if word in ("/bye", "/exit", "/quit"):
                return "exit"
            if word in ("/?", "/help"):
                print(HELP, file=self.err)
            elif word in ("/clear", "/reset"):
                self.messages, self.images, self.pending_images = [], [], []
                print("Cleared session context (conversation cleared).", file=self.err)
            elif word == "/set":
                self._set(rest)
            elif word == "/show":
                self._show(rest)
            elif word == "/save":
                self._save(rest)
            elif word == "/load":
                self._load(rest)
            elif word == "/image":
                from pocketlm import vision
                self.pending_images.append(vision.attach_image(self.model, rest, file=self.err))
            else:
                print(f"Unknown command {word!r}. Type /? for help", file=self.err)
        except PocketLMError as e:
            print(f"error: {e}", file=self.err)
        return None

    def _set(self, rest: str) -> None:
        from pocketlm.store.modelfile import parse_parameter
        what, _, value = rest.partition(" ")
        if what == "system":
            self.system = value.strip() or None
            print("Set system message." if self.system else "Cleared system message.", file=self.err)
        elif what == "parameter":
            name, _, raw = value.strip().partition(" ")
            name = name.lower()
            if not raw.strip():
                raise StoreError("usage: /set parameter NAME VALUE")
            if name == "stop":
                try:
                    words = shlex.split(raw)
                except ValueError as e:
                    raise StoreError(f"stop {raw!r}: {e}") from None
                self.params["stop"] = [parse_parameter("stop", json.dumps(w)) for w in words]
            else:
                self.params[name] = parse_parameter(name, raw)
            print(f"Set parameter '{name}' to '{raw.strip()}'", file=self.err)
        else:
            raise StoreError("usage: /set system TEXT, or /set parameter NAME VALUE")

    def _modelfile(self) -> dict:
        params = {k: v for k, v in self.params.items() if v is not None and v != []}
        return {"system": self.system, "parameters": params}

    def _show(self, rest: str) -> None:
        from pocketlm.store.modelfile import render
        what = rest.lower()
        if what == "info":
            c = self.model.config
            print(f"  model         {self.name}\n  parameters    {c.num_parameters() / 1e9:.2f}B\n"
                  f"  layers        {c.num_hidden_layers}\n  context       {c.max_position_embeddings}\n"
                  f"  chat format   {self._chat_format()}", file=self.err)
        elif what == "parameters":
            for k, v in self.params.items():
                if v is not None and v != []:
                    print(f"  {k:16s} {json.dumps(v) if k == 'stop' else v}", file=self.err)
        elif what == "system":
            print(self.system or "No system message was specified.", file=self.err)
        elif what == "modelfile":
            print(render(self._modelfile(), from_line=str(self.name)), end="", file=self.err)
        elif what == "license":
            print(self._license() or "No license was specified for this model.", file=self.err)
        else:
            raise StoreError("usage: /show info|parameters|system|modelfile|license")

    def _license(self) -> str | None:
        from pocketlm.store.describe import licence_of
        name = getattr(self.args, "store_name", None)
        if name:
            from pocketlm.store.store import Store
            entry = Store().find(name)
            if entry is not None and entry.modelfile.get("license"):
                return entry.modelfile["license"]
        weights = Path(self.args.model)
        if weights.exists():
            return licence_of(weights if weights.is_dir() else weights.parent, weights)
        return None

    def _conversation_path(self, name: str) -> Path:
        if not _SAVE_NAME.fullmatch(name):
            raise StoreError(f"conversation name {name!r}: use letters, digits and . _ - (e.g. /save trip-plan)")
        return self.home / "conversations" / f"{name}.json"

    def _save(self, name: str) -> None:
        path = self._conversation_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": str(self.name), "system": self.system, "parameters": self.params,
                "messages": self.messages}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)
        print(f"Saved conversation as '{name}' ({len(self.messages)} messages, {path}).", file=self.err)

    def _load(self, name: str) -> None:
        path = self._conversation_path(name)
        if not path.is_file():
            saved = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
            raise StoreError(f"no saved conversation {name!r}" + (f"; saved: {', '.join(saved)}" if saved else ""))
        from pocketlm.store.modelfile import parse_parameter
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = data["messages"]
            valid = isinstance(messages, list) and all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in messages) and isinstance(data.get("system"), (str, type(None)))
            params = {}
            for k, v in (data.get("parameters") or {}).items():
                if v is None:
                    params[k] = None
                elif k == "stop":
                    params[k] = [parse_parameter("stop", json.dumps(w)) for w in v]
                else:
                    params[k] = parse_parameter(k, str(v))
        except (ValueError, KeyError, TypeError, AttributeError, StoreError):
            valid = False
        if not valid:
            raise StoreError(f"{path}: not a saved pocketlm conversation")
        self.messages = messages
        self.system = data.get("system")
        self.params.update(params)
        if data.get("model") != str(self.name):
            print(f"(saved with model {data.get('model')}; continuing with {self.name})", file=self.err)
        print(f"Loaded conversation '{name}' ({len(messages)} messages).", file=self.err)
