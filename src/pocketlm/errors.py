"""Typed errors for everything that comes from a user or a file.

Each error carries the offending value in its message. `assert` is kept for internal invariants only.
"""

from __future__ import annotations


class PocketLMError(Exception):
    """Base class of every error pocketlm raises on bad input."""


class ConfigError(PocketLMError, ValueError):
    """A model configuration (preset name, config.json, argument) is invalid."""


class WeightFormatError(PocketLMError, ValueError):
    """A weight file (safetensors, GGUF, checkpoint folder) is missing, corrupt or does not match the config."""


class TokenizerError(PocketLMError, ValueError):
    """A tokenizer file is missing or corrupt, or an id is outside the vocabulary."""


class ChatFormatError(PocketLMError, ValueError):
    """Chat messages are malformed (unknown role, non-string content, empty conversation)."""


class GenerationError(PocketLMError, ValueError):
    """Sampling settings are out of range or a prompt does not fit the context window."""


class StaleCacheError(PocketLMError, RuntimeError):
    """A KV cache was built with a different LongRoPE factor set than the sequence now needs.

    Keys cached under the short factors are wrong once the sequence grows past
    `original_max_position_embeddings`; the caller must reset the cache and prefill the whole sequence again.
    """


class StoreError(PocketLMError, RuntimeError):
    """The model store (`pocketlm pull/list/show/rm/cp/import/create`) cannot do what was asked: a download
    failed or did not verify, the disk is too small, the hub cannot be reached, a Modelfile is invalid."""


class ModelNotFoundError(StoreError, LookupError):
    """A model name is not in the store (the message names the command that fetches it) or not a known tag."""


class SandboxUnavailable(PocketLMError, RuntimeError):
    """Generated code cannot run isolated here (no working bubblewrap) and running it unisolated was not allowed."""


class ImageError(PocketLMError, ValueError):
    """An image input (file, data URL, bytes) is unreadable, truncated, empty, too large, or not an image."""
