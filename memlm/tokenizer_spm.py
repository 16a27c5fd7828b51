"""GGUF's SentencePiece tokenizer (`tokenizer.ggml.model = llama`) as a `tokenizers` backend.

A GGUF file of a SentencePiece model (Llama 2, Mistral, Gemma, Phi-3) stores the pieces, one float
score per piece and a type per piece (normal, unknown, control, user-defined, unused, byte), and
whether a space is put before the text (`tokenizer.ggml.add_space_prefix`). SentencePiece's BPE
encoding (and llama.cpp's) merges, among all adjacent pairs of symbols whose concatenation is a
piece, the pair making the highest-scoring piece first, and falls back to <0xXX> byte pieces for
characters that no piece covers.

The same is a byte-fallback BPE whose merges are ranked by the score of the piece they make: for
every normal piece, each way of cutting it into two pieces is a merge, ordered by score (highest
first, ties by the pieces' ids). That is how transformers converts SentencePiece models too, so
the result is the same backend memlm uses for every other tokenizer (decoding, streaming, added
tokens). Spaces become "▁" (U+2581) before the model sees the text; a "▁" is put in front of
each stretch of text between special tokens when the file asks for it; decoding undoes both.
"""

from __future__ import annotations

import hashlib
import json
import struct

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as Backend

from memlm.atomic import atomic_write
from memlm.paths import memlm_home

SPACE = "\u2581"
# GGUF token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) cut of a normal piece into two pieces, highest-scoring piece first
    (ties: lower id first; a piece's cuts ordered by the ids of their left, then right, parts)."""
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    order = sorted(
        (i for i, (piece, kind) in enumerate(zip(tokens, types, strict=True)) if kind == NORMAL and len(piece) > 1),
        key=lambda i: (-scores[i], i),
    )
    merges = []
    for i in order:
        piece = tokens[i]
        if ids[piece] != i:
            continue  # a duplicate piece: its first id stands for it
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        cuts = [(a, b) for a, b in cuts if a in ids and b in ids]
        if len(cuts) > 1:
            cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        merges.extend(cuts)
    return merges


def spm_backend(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> Backend:
    """A `tokenizers` backend that tokenizes as SentencePiece BPE does with this vocabulary."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unknown = next((t for t, k in zip(tokens, types, strict=True) if k == UNKNOWN), None)
    model = models.BPE(
        vocab=vocab,
        merges=merges_by_score(tokens, scores, types),
        unk_token=unknown,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(model)
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    typed = list(zip(tokens, types, strict=True))
    # As llama.cpp: user-defined and control pieces are cut out of the text first, and the space
    # prefix goes before each stretch of text after them (SentencePiece itself matches user-defined
    # pieces inside its model and puts the prefix only at the start: "a<tool>b" differs there).
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == CONTROL])
    return backend


def cached_spm_backend(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> Backend:
    """`spm_backend`, saved once as tokenizer.json under $MEMLM_HOME/tokenizers (named by a hash of
    the vocabulary): deriving half a million merges in Python takes seconds for a 262k-piece
    vocabulary (Gemma's), reading them back a fraction of one."""
    digest = hashlib.sha256()
    digest.update(json.dumps([tokens, types, add_space_prefix], ensure_ascii=False).encode())
    digest.update(struct.pack(f"<{len(scores)}d", *scores))
    path = memlm_home() / "tokenizers" / f"spm-{digest.hexdigest()[:24]}.json"
    if path.is_file():
        try:
            return Backend.from_file(str(path))
        except Exception:  # a damaged cache entry: rebuild it below
            pass
    backend = spm_backend(tokens, scores, types, add_space_prefix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: backend.save(str(tmp)))
    except OSError:  # a read-only home: the cache is an optimisation only
        pass
    return backend


def piece_bytes(piece: str) -> bytes:
    """The bytes one SentencePiece token stands for: <0xXX> is that byte, "▁" a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(SPACE, " ").encode()
