"""Text to token ids for the server, refusing at once a text that cannot fit the context.

Tokenizing costs about a second per megabyte of CPU. No token is longer than the vocabulary's
longest, so a text of B bytes has at least B / longest tokens: past context x longest bytes it is
refused without tokenizing (a 7.6 MB prompt took 8 s to tokenize only to be refused)."""

from __future__ import annotations

from memlm.errors import InvalidRequestError


class PromptEncoder:
    def __init__(self, tokenizer, context: int):
        self.tokenizer, self.context = tokenizer, context
        self.longest = max((len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)), default=1) or 1

    def encode(self, text: str, add_special_tokens: bool = True, what: str = "the prompt") -> list[int]:
        size = len(text.encode("utf-8"))
        if size > self.context * self.longest:
            raise InvalidRequestError(f"{what} has at least {size // self.longest} tokens ({size} bytes) "
                                      f"but the model's context is {self.context} tokens")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
