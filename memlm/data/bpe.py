"""Byte-level BPE tokenizers trained from a corpus with the `tokenizers` library.

The output folder is one memlm (and transformers) load as a tokenizer: `tokenizer.json` plus a
`tokenizer_config.json` naming the end-of-text token, which separates documents in packed data.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from memlm.atomic import atomic_write, ensure_dir, write_json_atomic
from memlm.errors import MemlmError

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(documents: list[str], vocab_size: int, out_dir: str | Path) -> Backend:
    """Train byte-level BPE with `vocab_size` entries (256 byte symbols + merges + end-of-text)."""
    if vocab_size < 300 or vocab_size > 1 << 20:
        raise MemlmError(f"--vocab-size must be between 300 and {1 << 20}, got {vocab_size}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown tokens
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    out = ensure_dir(out_dir)
    atomic_write(out / "tokenizer.json", lambda p: backend.save(str(p)))
    write_json_atomic(out / "tokenizer_config.json", {"eos_token": END_OF_TEXT, "add_bos_token": False})
    return backend
