"""Incremental detokenization: turn a stream of token ids into a stream of text pieces.

Decoding token by token does not work for a SentencePiece/byte-fallback vocabulary: an emoji arrives as four
byte tokens (`<0xF0><0x9F><0x98><0x80>`) and each one alone decodes to U+FFFD, and the decoder strips one
leading space at the very start of the text, so "▁world" alone decodes to "world" even in the middle of a
sentence. The fix, as in vLLM's `detokenize_incrementally` and HF's `TextStreamer`, is to decode a small window
of ids twice -- the ids already shown (prefix) and the same ids plus the new ones -- and emit the difference.
Both decodes start at the same token, so the leading-space rule and byte merging cancel out. Text whose decoded
tail is U+FFFD (an unfinished UTF-8 sequence) is held back until a later token completes it, or `flush()`.

Invariant (tested): "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids) for the ids of any text.
Known limit: a decoder that turns a whole run of byte tokens into U+FFFDs when the run is not valid UTF-8
(tokenizers' ByteFallback does) can change text already shown once an invalid byte follows valid ones; that
only happens for ids that encode no text, and the decoder then emits the new text after the common prefix
rather than repeat or retract anything.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time with `push`; get back only the newly completed text.

    Args:
        tokenizer: anything with `decode(ids, *, skip_special=...) -> str`.
        skip_special: drop the tokenizer's `special_ids` (like `decode(ids, skip_special=True)`).
    """

    MEMO_WINDOW = 4  # windows of at most this many ids are memoized (`memo`)
    MEMO_SIZE = 8192  # entries a memo holds before it is cleared (~1 MB; random text refills it, bounded)

    def __init__(self, tokenizer, *, skip_special: bool = False, memo: dict | None = None):
        self.tokenizer = tokenizer
        # memo: a dict shared by decoders of the same tokenizer (and skip rule), tuple(ids) -> text, for the short
        # windows `_advance` decodes (usually the last shown id, then it plus the new one): a pure function of
        # the ids, so a hit returns exactly what `tokenizer.decode` would (a server decodes the same pieces and
        # bigrams over and over)
        self.memo = memo
        # special ids are dropped here rather than by `decode`, so a window never starts at a skipped token
        # (the decoder would then strip the leading space of the text after it)
        self.skipped = frozenset(tokenizer.special_ids) if skip_special else frozenset()
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window: ids[prefix_offset:read_offset] are already shown
        self.read_offset = 0  # ids[read_offset:] are not shown yet

    def _decode(self, ids: list[int]) -> str:
        memo = self.memo
        if memo is None or len(ids) > self.MEMO_WINDOW:
            return self.tokenizer.decode(ids)
        key = tuple(ids)
        text = memo.get(key)
        if text is None:
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            text = memo[key] = self.tokenizer.decode(ids)
        return text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while an unfinished UTF-8 sequence is pending)."""
        if token_id in self.skipped:
            return ""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished byte sequence decodes to U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        shown = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if not final and (text.endswith(REPLACEMENT_CHAR) or len(text) <= len(shown)):
            return ""  # an unfinished UTF-8 sequence, or nothing visible yet: wait for more ids
        if not text.startswith(shown):
            # the new ids changed already-shown text (cannot happen with a plain byte/piece decoder); emit the
            # part after the common prefix rather than repeating text
            common = 0
            while common < min(len(shown), len(text)) and shown[common] == text[common]:
                common += 1
            shown = shown[:common]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(shown):]
