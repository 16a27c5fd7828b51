"""Incremental detokenization that never emits half a UTF-8 character, and stop-string matching.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix
yields U+FFFD. The detokenizer decodes a short window of recent tokens and only releases text
once the window decodes cleanly, the technique used by vLLM and text-generation-inference.
"""

from __future__ import annotations

import bisect

from memlm.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the context window re-decoded each step
        self.read_offset = 0  # tokens before this have been released as text

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.tokens.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is left at the end of generation, complete or not."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = decode(self.tokens[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith(_REPLACEMENT)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full_text[len(prefix_text) :]
        return ""


def token_at_char(text_ends: list[int], char: int) -> int:
    """Index of the token whose text covers character `char`, given len(text) after each token."""
    return bisect.bisect_right(text_ends, char)


class StopMatcher:
    """Finds stop strings in growing text and says how much text is safe to stream.

    Text that might be the start of a stop string is held back, so a stream never shows a
    stop string, not even its first characters.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """Earliest stop string that ends in text[new_from:] -> (its start, the string)."""
        if not self.stops:
            return None
        window_start = max(0, new_from - self.longest + 1)
        hits = [(i, s) for s in self.stops if (i := text.find(s, window_start)) != -1]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that cannot become part of a stop string."""
        for keep in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - keep
        return len(text)
