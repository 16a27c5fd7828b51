"""Token data on disk: a flat memmap of token ids per split plus a JSON header that vouches for it.

`pack` tokenizes documents (each followed by the end-of-text token) and splits them into train and
validation by whole documents, never inside one. Each split is `{split}.bin` (uint16 when the
vocabulary fits, else uint32) and `{split}.json`: vocabulary size, dtype, token count, document
offsets, the sha256 of the token file and the sources. `TokenData.open` checks all of it, so a
truncated, swapped or re-typed file is a one-line error instead of garbage batches.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memlm.atomic import atomic_write, ensure_dir, write_json_atomic
from memlm.data.recall import check_share, recall_documents
from memlm.errors import MemlmError
from memlm.tokenizer import Tokenizer

FORMAT = "memlm-tokens-v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(
    tokenizer_dir: str | Path,
    documents: list[str],
    sources: list[str],
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    recall_share: float = 0.0,
) -> dict[str, dict]:
    """Tokenize and write both splits; return their headers. `recall_share` of the training split's
    text (by characters) is made of recall documents (memlm/data/recall.py), built from its own
    documents with `seed`; validation is left as the corpus has it."""
    if not 0 < val_fraction < 1:
        raise MemlmError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    check_share(recall_share)
    if len(documents) < 2:
        raise MemlmError("packing needs at least two documents (one per split)")
    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    backend, eos_id = tokenizer.backend, tokenizer.eos_token_id
    if eos_id is None:  # it separates documents: packing without one would run them together
        raise MemlmError(f"{tokenizer_dir}: the tokenizer names no end-of-text token (tokenizer_config.json)")
    vocab_size = backend.get_vocab_size()
    dtype = token_dtype(vocab_size)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    split_docs = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    if recall_share > 0:
        train_text = [documents[i] for i in split_docs["train"]]
        corpus_chars = sum(len(d) for d in train_text)
        recall = recall_documents(train_text, round(corpus_chars * recall_share / (1 - recall_share)), seed)
        # after the corpus's documents, shuffled in among the training split's
        split_docs["train"] += range(len(documents), len(documents) + len(recall))
        random.Random(seed + 1).shuffle(split_docs["train"])
        documents = documents + recall
    encoded = backend.encode_batch(documents, add_special_tokens=False)
    out = ensure_dir(out_dir)
    headers = {}
    for split in SPLITS:
        ids, offsets = [], [0]
        for i in split_docs[split]:
            ids += encoded[i].ids + [eos_id]
            offsets.append(len(ids))
        array = np.asarray(ids, dtype=dtype)
        atomic_write(out / f"{split}.bin", lambda p, a=array: a.tofile(p))
        header = {
            "format": FORMAT,
            "split": split,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "dtype": dtype.name,
            "tokens": int(array.size),
            "bytes_of_text": sum(len(documents[i].encode()) for i in split_docs[split]),
            "documents": len(split_docs[split]),
            "document_offsets": offsets,
            "document_indices": split_docs[split],
            "sha256": sha256_file(out / f"{split}.bin"),
            "sources": sources,
            "tokenizer_sha256": sha256_file(Path(tokenizer_dir) / "tokenizer.json"),
            "seed": seed,
            "recall_share": recall_share if split == "train" else 0.0,
        }
        write_json_atomic(out / f"{split}.json", header)
        headers[split] = header
    # The tokenizer travels with its data: evaluation needs it for bits per byte.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        source = Path(tokenizer_dir) / name
        if source.is_file():
            content = source.read_bytes()
            atomic_write(out / name, lambda p, c=content: Path(p).write_bytes(c))
    return headers


@dataclass
class TokenData:
    """One verified split: token ids as a read-only memmap, and its header."""

    tokens: np.ndarray
    header: dict

    @classmethod
    def open(cls, folder: str | Path, split: str = "train", vocab_size: int | None = None) -> TokenData:
        folder = Path(folder)
        header_path, bin_path = folder / f"{split}.json", folder / f"{split}.bin"
        if not header_path.is_file() or not bin_path.is_file():
            raise MemlmError(f"{folder} has no {split}.json / {split}.bin (make them with `memlm data pack`)")
        try:
            header = json.loads(header_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MemlmError(f"cannot read {header_path}: {e}") from None
        if header.get("format") != FORMAT:
            raise MemlmError(f"{header_path} is not a memlm token header (format {header.get('format')!r})")
        dtype = np.dtype(header["dtype"])
        if dtype != token_dtype(header["vocab_size"]):
            raise MemlmError(f"{header_path}: dtype {dtype.name} does not fit vocabulary {header['vocab_size']}")
        size = bin_path.stat().st_size
        if size != header["tokens"] * dtype.itemsize:
            raise MemlmError(
                f"{bin_path} has {size} bytes; the header says {header['tokens']} {dtype.name} tokens "
                f"({header['tokens'] * dtype.itemsize} bytes): truncated or wrong dtype"
            )
        if sha256_file(bin_path) != header["sha256"]:
            raise MemlmError(f"{bin_path} does not match the sha256 in {header_path.name}: the file was changed")
        if vocab_size is not None and vocab_size != header["vocab_size"]:
            raise MemlmError(f"{folder} was tokenized with {header['vocab_size']} tokens; the model has {vocab_size}")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        if tokens.size and int(tokens.max()) >= header["vocab_size"]:
            raise MemlmError(f"{bin_path} has token ids outside its vocabulary of {header['vocab_size']}")
        return cls(tokens, header)

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token (end-of-text tokens count as tokens, not text)."""
        return self.header["bytes_of_text"] / max(1, len(self))

    def windows(self, starts: list[int], length: int) -> torch.Tensor:
        """[len(starts), length] token ids (int64) starting at `starts`."""
        rows = [np.asarray(self.tokens[s : s + length], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def random_windows(self, batch: int, length: int, seed: int, step: int, micro: int = 0) -> torch.Tensor:
        """A reproducible batch of windows from (seed, step, micro): same data for every variant."""
        if len(self) < length + 1:
            raise MemlmError(f"{len(self)} tokens cannot fill a window of {length + 1}")
        rng = random.Random(seed * 1_000_003 + step * 101 + micro)
        return self.windows([rng.randrange(len(self) - length) for _ in range(batch)], length)

    def eval_windows(self, length: int, limit: int | None = None) -> torch.Tensor:
        """Consecutive non-overlapping windows covering the split (held-out evaluation)."""
        n = (len(self) - 1) // length
        if limit is not None:
            n = min(n, limit)
        if n < 1:
            raise MemlmError(f"the {self.header['split']} split ({len(self)} tokens) is shorter than one window")
        return self.windows([i * length for i in range(n)], length + 1)
