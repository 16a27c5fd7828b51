"""`memlm data tokenizer` and `memlm data pack`: training data for models trained from scratch."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from memlm.cli.options import check_out
from memlm.data.bpe import train_tokenizer
from memlm.data.corpus import DEFAULT_CORPUS, read_corpus
from memlm.errors import MemlmError

data_app = typer.Typer(no_args_is_help=True, help="Training data: BPE tokenizers and packed token files.")

CorpusOpt = Annotated[
    list[str] | None,
    typer.Option("--corpus", help="Corpus file or name (gensim:enwiki, gensim:lee); repeatable. Default: both."),
]


def _corpus(corpus: list[str] | None):
    return read_corpus(list(corpus or DEFAULT_CORPUS))


@data_app.command("tokenizer")
def data_tokenizer(
    corpus: CorpusOpt = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (bytes + merges + end-of-text).")] = 4096,
    out: Annotated[str, typer.Option("--out", help="Output folder (tokenizer.json).")] = "",
):
    """Train a byte-level BPE tokenizer on a corpus."""
    check_out(out)
    documents, files = _corpus(corpus)
    backend = train_tokenizer(documents, vocab_size, out)
    print(
        json.dumps({"out": out, "vocab_size": backend.get_vocab_size(), "documents": len(documents), "sources": files})
    )


@data_app.command("pack")
def data_pack(
    tokenizer: Annotated[str, typer.Option(help="Tokenizer folder (from `memlm data tokenizer`).")] = "",
    corpus: CorpusOpt = None,
    out: Annotated[str, typer.Option("--out", help="Output folder (train/val .bin + .json).")] = "",
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the document split (and of recall documents).")] = 0,
    recall_share: Annotated[
        float,
        typer.Option(
            help="Share of the training text made of recall documents: made-up facts restated after "
            "stretches of the corpus (for memories that must carry the past; validation stays plain)."
        ),
    ] = 0.0,
):
    """Tokenize a corpus into uint16/uint32 memmaps with a verifying header, split by document."""
    from memlm.data.packed import pack  # lazy: torch
    from memlm.data.recall import check_share

    if not tokenizer:
        raise MemlmError("--tokenizer is required")
    check_share(recall_share)
    check_out(out)
    documents, files = _corpus(corpus)
    headers = pack(tokenizer, documents, files, out, val_fraction, seed, recall_share)
    summary = {s: {k: h[k] for k in ("tokens", "documents", "dtype", "vocab_size")} for s, h in headers.items()}
    print(json.dumps({"out": out, **summary}))
