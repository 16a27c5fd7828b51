"""Byte-level BPE tokenizers trained from a corpus with the `tokenizers` library.

The output folder is one memlm (and transformers) load as a tokenizer: `tokenizer.json` plus a
`tokenizer_config.json` naming the end-of-text token, which separates documents in packed data.
"""

from __future__ import annotations

import json
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


def load_backend(folder: str | Path) -> tuple[Backend, int]:
    """A trained tokenizer folder -> (backend, end-of-text id)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise MemlmError(f"{folder} has no tokenizer.json (make one with `memlm data tokenizer`)")
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise MemlmError(f"cannot read {path}: {e}") from None
    config_path = Path(folder) / "tokenizer_config.json"
    eos = json.loads(config_path.read_text()).get("eos_token", END_OF_TEXT) if config_path.is_file() else END_OF_TEXT
    eos_id = backend.token_to_id(eos)
    if eos_id is None:
        raise MemlmError(f"{folder}: the tokenizer has no end-of-text token {eos!r}")
    return backend, eos_id
