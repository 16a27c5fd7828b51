"""Training data from scratch: corpus reading, BPE training, packed token files and their checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlm.data.bpe import END_OF_TEXT, train_tokenizer
from memlm.data.corpus import read_documents, strip_wiki_markup
from memlm.data.packed import TokenData, pack, sha256_file, token_dtype
from memlm.errors import MemlmError
from memlm.tokenizer import Tokenizer

WIKI = """'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] \
societies.{{Citation needed|date=May 2016}}
<ref name="x">A reference that must go.</ref>
== History ==
The term {{lang|grc|anarchia}} comes from [[Ancient Greek|Greek]].<!-- a comment -->
[[File:Flag.svg|thumb|A [[flag]] caption]]
{| class="wikitable"
| a table || that goes
|}
* a list item stays as text
== See also ==
* [[Libertarianism]]
"""


def test_wiki_markup_becomes_prose():
    text = strip_wiki_markup(WIKI)
    assert text.splitlines()[0] == "Anarchism is a political philosophy that advocates self-governed societies."
    assert "History" in text and "The term comes from Greek." in text and "a list item stays as text" in text
    for leftover in ("[[", "]]", "{{", "}}", "<ref", "'''", "wikitable", "Flag.svg", "comment", "Libertarianism"):
        assert leftover not in text


def test_the_gensim_wikipedia_sample_reads_as_articles():
    docs = read_documents("gensim:enwiki")
    assert 100 < len(docs) < 206  # 206 pages less redirects, non-articles and stubs
    assert docs[0].startswith("Anarchism is a political philosophy")
    assert not any("[[" in d or "{{" in d for d in docs)


def corpus(tmp_path, n=60):
    lines = read_documents("gensim:lee")[:n]
    path = tmp_path / "corpus.cor"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_tokenizer_round_trips_text(tmp_path):
    _, docs = corpus(tmp_path)
    backend = train_tokenizer(docs, 400, tmp_path / "tok")
    assert backend.get_vocab_size() == 400
    tokenizer = Tokenizer.from_folder(tmp_path / "tok")
    loaded, eos = tokenizer.backend, tokenizer.eos_token_id
    assert loaded.id_to_token(eos) == END_OF_TEXT
    sample = "Hundreds of people were évacués — 42 homes!"
    assert loaded.decode(loaded.encode(sample).ids) == sample  # byte-level: nothing is unknown


def test_pack_splits_by_document_and_verifies(tmp_path):
    _, docs = corpus(tmp_path)
    train_tokenizer(docs, 400, tmp_path / "tok")
    headers = pack(tmp_path / "tok", docs, ["lee"], tmp_path / "data", val_fraction=0.1, seed=3)
    train, val = headers["train"], headers["val"]
    assert train["dtype"] == "uint16" and train["documents"] + val["documents"] == len(docs)
    assert not set(train["document_indices"]) & set(val["document_indices"])
    data = TokenData.open(tmp_path / "data", "train", vocab_size=400)
    tokenizer = Tokenizer.from_folder(tmp_path / "tok")
    backend, eos = tokenizer.backend, tokenizer.eos_token_id
    # Each document's tokens sit whole between its offsets, closed by end-of-text: never split.
    offsets = train["document_offsets"]
    for k, doc_index in enumerate(train["document_indices"][:5]):
        ids = data.tokens[offsets[k] : offsets[k + 1]].tolist()
        assert ids[-1] == eos and backend.decode(ids[:-1]) == docs[doc_index]
    assert data.header["sha256"] == sha256_file(tmp_path / "data" / "train.bin")
    assert data.random_windows(4, 33, seed=0, step=7).tolist() == data.random_windows(4, 33, seed=0, step=7).tolist()


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


@pytest.fixture()
def packed(tmp_path):
    _, docs = corpus(tmp_path)
    train_tokenizer(docs, 400, tmp_path / "tok")
    pack(tmp_path / "tok", docs, ["lee"], tmp_path / "data")
    return tmp_path / "data"


def test_a_truncated_file_is_a_clear_error(packed):
    path = packed / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(MemlmError, match="truncated or wrong dtype"):
        TokenData.open(packed, "train")


def test_a_changed_file_fails_its_sha256(packed):
    path = packed / "train.bin"
    content = bytearray(path.read_bytes())
    content[10] ^= 1
    path.write_bytes(bytes(content))
    with pytest.raises(MemlmError, match="sha256"):
        TokenData.open(packed, "train")


def test_a_wrong_dtype_header_is_a_clear_error(packed):
    header = json.loads((packed / "train.json").read_text())
    header["dtype"] = "uint32"
    (packed / "train.json").write_text(json.dumps(header))
    with pytest.raises(MemlmError, match="does not fit"):
        TokenData.open(packed, "train")


def test_a_vocabulary_mismatch_is_a_clear_error(packed):
    with pytest.raises(MemlmError, match="tokenized with 400"):
        TokenData.open(packed, "train", vocab_size=512)


def test_data_commands_end_to_end(tmp_path, memlm_cli):
    import subprocess

    path, _ = corpus(tmp_path, 40)
    run = lambda *a: subprocess.run([*memlm_cli, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    made = run("data", "tokenizer", "--corpus", str(path), "--vocab-size", "350", "--out", str(tmp_path / "tok"))
    assert made.returncode == 0, made.stderr
    packed = run(
        "data", "pack", "--tokenizer", str(tmp_path / "tok"), "--corpus", str(path), "--out", str(tmp_path / "d")
    )
    assert packed.returncode == 0, packed.stderr
    summary = json.loads(packed.stdout)
    assert summary["train"]["tokens"] > 0 and summary["val"]["documents"] == 2
    bad = run(
        "data", "pack", "--tokenizer", str(tmp_path / "tok"), "--corpus", "/no/such.txt", "--out", str(tmp_path / "e")
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "corpus file not found" in bad.stderr


def test_recall_documents_restate_every_fact_after_filler():
    import re

    from memlm.bench.lcm_reach import NAMES
    from memlm.data.recall import ADJECTIVES, ANIMALS, recall_documents

    filler = [" ".join(f"word{i}_{j}" for j in range(800)) for i in range(5)]
    docs = recall_documents(filler, 50_000, seed=1)
    assert docs == recall_documents(filler, 50_000, seed=1) and docs != recall_documents(filler, 50_000, seed=2)
    assert 50_000 <= sum(map(len, docs)) < 50_000 + max(map(len, docs))
    pattern = (
        r"(?:The secret code of the|The|Members of the) (\w+ \w+) "
        r"(?:vault is|locker opens with the number|club use the password) (\d{4})\."
    )
    for doc in docs:
        facts = re.findall(pattern, doc)
        assert facts and len(facts) % 2 == 0  # each stated, then restated with the same code
        assert sorted(facts[: len(facts) // 2]) == sorted(facts[len(facts) // 2 :])
        assert "word" in doc and doc.endswith(".")
    probe_words = {w for name in NAMES for w in name.split()}
    assert not probe_words & (set(ADJECTIVES) | set(ANIMALS))  # the probe's names are never trained on


def test_pack_mixes_recall_documents_into_the_training_split_only(tmp_path):
    _, docs = corpus(tmp_path)
    train_tokenizer(docs, 400, tmp_path / "tok")
    plain = pack(tmp_path / "tok", docs, ["lee"], tmp_path / "plain", val_fraction=0.1, seed=3)
    mixed = pack(tmp_path / "tok", docs, ["lee"], tmp_path / "mixed", val_fraction=0.1, seed=3, recall_share=0.3)
    assert mixed["val"]["sha256"] == plain["val"]["sha256"]  # validation untouched
    assert mixed["train"]["recall_share"] == 0.3 and mixed["val"]["recall_share"] == 0.0
    added = mixed["train"]["bytes_of_text"] - plain["train"]["bytes_of_text"]
    assert 0.28 < added / mixed["train"]["bytes_of_text"] < 0.4
    assert mixed["train"]["documents"] > plain["train"]["documents"]
    with pytest.raises(MemlmError, match="--recall-share"):
        pack(tmp_path / "tok", docs, ["lee"], tmp_path / "bad", recall_share=1.0)
