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

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as Backend

SPACE = "\u2581"
# GGUF token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) cut of a normal piece into two pieces, highest-scoring piece first."""
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    found = []
    for i, (piece, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != NORMAL or len(piece) < 2 or ids[piece] != i:
            continue
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        found.extend((-scores[i], i, cut) for cut in cuts)
    found.sort(key=lambda entry: (entry[0], entry[1]))  # stable: cuts of one piece keep their order
    return [cut for _, _, cut in found]


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


def piece_bytes(piece: str) -> bytes:
    """The bytes one SentencePiece token stands for: <0xXX> is that byte, "▁" a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(SPACE, " ").encode()
