"""Tokenizer + chat template, read from a Hugging Face folder or from a GGUF file's metadata.

The heavy lifting (BPE, byte-level pre-tokenization) is the `tokenizers` library; this module
only builds it from the GGUF vocabulary when needed, renders chat templates, and knows the
special tokens.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from memlm.errors import InvalidRequestError, ModelFormatError

# GGUF token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Gemma's chat template (Google's, for text messages), for Gemma GGUF files that carry none: llama.cpp
# likewise falls back to a built-in Gemma format when the vocabulary has <start_of_turn>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class Tokenizer:
    def __init__(
        self,
        backend: Backend,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self._template = None
        self.sentencepiece = False  # pieces spell spaces as U+2581 and bytes as <0xXX>

    # ---- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{folder} has no tokenizer.json")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad JSON
            raise ModelFormatError(f"cannot read {path}: {e}") from None
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():  # transformers >= 4.50 stores it separately
            template = (folder / "chat_template.jinja").read_text()
        tokenizer = cls(
            backend,
            chat_template=template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )
        # A byte-fallback BPE is a SentencePiece vocabulary (ours from a GGUF, or Llama 2's / Gemma's).
        tokenizer.sentencepiece = bool(getattr(backend.model, "byte_fallback", False))
        return tokenizer

    @classmethod
    def from_gguf(cls, fields: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (`tokenizer.ggml.*`), given as a plain dict of field values."""
        kind = fields.get("tokenizer.ggml.model")
        pre = fields.get("tokenizer.ggml.pre", "default")
        if kind == "llama":
            return cls._from_gguf_sentencepiece(fields)
        if kind != "gpt2":
            raise ModelFormatError(
                f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2', SentencePiece 'llama')"
            )
        if pre not in ("default", "gpt2", "smollm"):
            raise ModelFormatError(f"GGUF pre-tokenizer {pre!r} is not supported (gpt2, smollm)")
        tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ModelFormatError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":  # llama.cpp's smollm pre-type: every digit is its own word
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        typed = list(zip(tokens, types, strict=True))
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])

        def token(key: str) -> str | None:
            idx = fields.get(key)
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        return cls(
            backend,
            chat_template=fields.get("tokenizer.chat_template"),
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def _from_gguf_sentencepiece(cls, fields: dict[str, Any]) -> Tokenizer:
        """A SentencePiece vocabulary (pieces, scores, types): see memlm/tokenizer_spm.py."""
        from memlm.tokenizer_spm import cached_spm_backend  # lazy: only SentencePiece files need it

        tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ModelFormatError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(scores) != len(tokens) or len(types) != len(tokens):
            raise ModelFormatError("GGUF tokenizer: tokens, scores and token types differ in length")
        add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        scores, types = [float(x) for x in scores], [int(t) for t in types]
        backend = cached_spm_backend(tokens, scores, types, add_space_prefix)

        def token(key: str) -> str | None:
            idx = fields.get(key)
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        template = fields.get("tokenizer.chat_template")
        if not template and "<start_of_turn>" in tokens and "gemma" in str(fields.get("general.architecture")):
            template = GEMMA_CHAT_TEMPLATE
        tokenizer = cls(
            backend,
            chat_template=template,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", True)),
        )
        tokenizer.sentencepiece = True
        return tokenizer

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (a layout transformers also reads)."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # ---- encoding and decoding ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        # A chat template that writes the BOS itself (Gemma's) must not get a second one.
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def digit_token_mask(self) -> list[bool]:
        """Per token id: is the token made of ASCII digits only (a piece of a number, no leading space)?
        Byte-level and sentencepiece vocabularies both spell digits as themselves."""
        mask = [False] * self.vocab_size
        for piece, token_id in self.backend.get_vocab(with_added_tokens=False).items():
            if token_id < len(mask) and piece.isascii() and piece.isdigit():
                mask[token_id] = True
        return mask

    def newline_token_mask(self) -> list[bool]:
        """Per token id: does the token's text hold a newline (it ends a line)?"""
        return [b"\n" in self.token_bytes(token_id) for token_id in range(self.vocab_size)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a byte-level token may hold part of a UTF-8 character)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self.sentencepiece and token_id not in self.backend.get_added_tokens_decoder():
            from memlm.tokenizer_spm import piece_bytes  # lazy: as _from_gguf_sentencepiece

            return piece_bytes(piece)
        if _is_byte_level(self.backend) and token_id not in self.backend.get_added_tokens_decoder():
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.backend.decode([token_id], skip_special_tokens=False).encode()

    # ---- chat -------------------------------------------------------------------------------------

    @property
    def template_renders_tools(self) -> bool:
        """Does the chat template render a `tools` list itself (Qwen's, Llama 3's, ...)?"""
        return bool(self.chat_template) and "tools" in self.chat_template and "tool_calls" in self.chat_template

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """Render a chat. `tools` (OpenAI's tool specs) go to a template that renders them
        (`template_renders_tools`); messages may carry `tool_calls` and `tool_call_id` for it."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; pass a plain prompt (--no-chat)")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError("chat messages must be dicts with 'role' and 'content'")
        if self._template is None or self._template[0] != self.chat_template:  # compiled once per source
            self._template = (self.chat_template, _compile_template(self.chat_template))
        extra = {"tools": tools} if tools else {}
        return self._template[1].render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **extra,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _token_content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _compile_template(source: str):
    """Compile a chat template the way transformers does (sandboxed, trimmed blocks)."""

    def raise_exception(message: str):
        raise InvalidRequestError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ModelFormatError(f"the model's chat template does not compile: {e}") from None


def _is_byte_level(backend) -> bool:
    return isinstance(backend.decoder, decoders.ByteLevel)


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table
