"""pocketlm: the Phi-3 system end to end — model, tokenizer, chat, local inference, and the recipe around them.

Public API (stable names):
- `pocketlm.load(path_or_preset=None, *, dtype=None, device="cpu")` -> the model (a torch.nn.Module); with no
  argument, the embedded default model (`pocketlm.default_model_path()`)
- `pocketlm.Tokenizer.from_pretrained(path)` / `pocketlm.Tokenizer.default()`
- `pocketlm.chat.render(messages, tokenizer, *, add_generation_prompt=True)`
- `pocketlm.generate(model, tokenizer, prompt_or_messages, **sampling)` and `pocketlm.stream(...)`
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "default_model_path", "Tokenizer", "generate", "stream", "chat", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `import pocketlm` (and `pocketlm.config`) stays cheap.
    if name in ("load", "default_model_path"):
        from pocketlm import api
        return getattr(api, name)
    if name == "Tokenizer":
        from pocketlm.tokenizer import Tokenizer
        return Tokenizer
    if name in ("generate", "stream"):
        from pocketlm.engine import generate as _generate
        return getattr(_generate, name)
    if name == "chat":
        import importlib
        return importlib.import_module("pocketlm.chat")
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
