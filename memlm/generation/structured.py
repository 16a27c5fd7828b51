"""Structured output: JSON that parses and validates, enforced while decoding.

A request's `response_format` becomes a grammar; before each sampling step the grammar says which
tokens may come next (a mask over the vocabulary) and after it the chosen token advances the
grammar. The grammar engine is llguidance: chosen over xgrammar by measurement on SmolLM2's
49152-token vocabulary (memlm/bench/structured_choice.py): both compute a mask in microseconds (noise
beside a ~25 ms decode step), llguidance compiles a schema in 0.8 ms against 4.9 ms, and it has no
dependencies while xgrammar pulls in triton and transformers.

Besides JSON, a response format may carry a whole Lark grammar in llguidance's dialect,
`{"type": "grammar", "grammar": "start: ..."}`: tool calls use it (memlm.generation.tool_calls).
"""

from __future__ import annotations

import json

import torch

from memlm.errors import InvalidRequestError

# Compact, readable JSON (what json.dumps writes). Flexible whitespace would let a model pad forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_of(response_format: dict) -> dict | None:
    """The JSON schema a response_format asks for (None: free text). Raises on a malformed one."""
    kind = response_format.get("type")
    if kind == "grammar":
        raise InvalidRequestError("response_format.type 'grammar' carries a Lark grammar, not a JSON schema")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequestError("response_format.json_schema must be an object with a 'schema' object")
        return spec.get("schema") or {"type": "object"}
    raise InvalidRequestError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")


class StructuredOutput:
    """Compiles response formats for one tokenizer (built once per engine: ~0.3 s)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance  # lazy: its native library loads only for a request with a response_format

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids)
        )

    def constraint(self, response_format: dict) -> Grammar | None:
        Matcher = self._llg.LLMatcher
        if response_format.get("type") == "grammar":
            what = "invalid grammar (a tool's JSON schema?)"
            try:
                grammar = Matcher.grammar_from_lark(response_format["grammar"])
            except (ValueError, TypeError, KeyError) as e:
                raise InvalidRequestError(f"{what}: {e}") from None
        else:
            schema = json_schema_of(response_format)
            if schema is None:
                return None
            what = "invalid JSON schema"
            try:
                grammar = Matcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
            except (ValueError, TypeError) as e:
                raise InvalidRequestError(f"{what}: {e}") from None
        is_error, messages = Matcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidRequestError(f"{what}: {messages[0]}")
        matcher = Matcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{what}: {matcher.get_error()}")
        return Grammar(matcher, self.vocab_size)


class Grammar:
    """One request's position in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def fill_mask(self, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into a row of an int32 bitmask (bit i of word w: token 32 w + i)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the request ends here."""
        return self.matcher.is_stopped()


def allowed_tokens(grammars: list[Grammar], vocab_size: int) -> torch.Tensor:
    """[len(grammars), vocab_size] bool: the tokens each grammar allows next."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(grammars), words, dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        grammar.fill_mask(bitmask[row])
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]
