"""Where latent memory may be inserted: after a token that ends in a delimiter ("," "." "\\n").

Detection is by token id (a set precomputed once per tokenizer), never by re-decoding text. A
"." or "," between two digits is part of a number ("3.14", "1,000"), not a delimiter. The token
after the delimiter is not known when the delimiter is fed, so the engine decides one step later:
it peeks at the token sampled next, and if that token starts with a digit while the delimiter
followed one, no insertion happens. Otherwise the peeked token is discarded and the latents go in
right after the delimiter, so what follows is generated with the memory in context.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DELIMITERS = (",", ".", "\n")


@dataclass(frozen=True, slots=True)
class DelimiterSet:
    ids: frozenset[int]  # tokens whose text ends in a delimiter
    digit_then_separator: frozenset[int]  # tokens ending "<digit>." or "<digit>,": "3." may be half of "3.14"
    bare_separator: frozenset[int]  # tokens that are only "." or ",", with maybe spaces before
    ends_in_digit: frozenset[int]
    starts_with_digit: frozenset[int]

    @classmethod
    def for_tokenizer(cls, tokenizer, delimiters=DEFAULT_DELIMITERS) -> DelimiterSet:
        sets = {name: set() for name in cls.__slots__}
        for token_id in range(tokenizer.vocab_size):
            text = tokenizer.decode([token_id], skip_special_tokens=True)
            if not text:
                continue
            if text.endswith(tuple(delimiters)):
                sets["ids"].add(token_id)
                if text[-1] in ".,":
                    if text.strip() in (".", ","):
                        sets["bare_separator"].add(token_id)
                    elif len(text) > 1 and text[-2].isdigit():
                        sets["digit_then_separator"].add(token_id)
            if text[-1].isdigit():
                sets["ends_in_digit"].add(token_id)
            if text[0].isdigit():
                sets["starts_with_digit"].add(token_id)
        return cls(**{name: frozenset(values) for name, values in sets.items()})

    def is_insertion_point(self, previous: int | None, token: int, following: int) -> bool:
        """May latents go after `token`? `previous` came before it, `following` was sampled after it."""
        if token not in self.ids:
            return False
        if following in self.starts_with_digit:
            if token in self.digit_then_separator:
                return False  # "3." then "14"
            if token in self.bare_separator and previous in self.ends_in_digit:
                return False  # "3" "." "14"
        return True

    def in_text(self, ids: list[int]) -> list[int]:
        """Indices i such that latents may follow ids[i] (the last token counts when it is a delimiter)."""
        points = []
        for i, token in enumerate(ids):
            previous = ids[i - 1] if i > 0 else None
            following = ids[i + 1] if i + 1 < len(ids) else -1
            if self.is_insertion_point(previous, token, following):
                points.append(i)
        return points
