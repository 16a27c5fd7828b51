"""GGUF's SentencePiece tokenizer (`tokenizer.ggml.model = llama`) against SentencePiece itself.

A small BPE SentencePiece model is trained here, offline, on a multilingual text (English, Chinese,
emoji, code, runs of spaces), with byte fallback, a user-defined and a control piece; its pieces,
scores and types are written into GGUF fields as llama.cpp's converter writes them, and memlm's
tokenizer built from those fields must encode every sample as SentencePiece does and decode back.
"""

from __future__ import annotations

import io

import pytest

from memlm.bench.decode import SAMPLE_TEXT
from memlm.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece", reason="the reference tokenizer needs the sentencepiece package")

EXTRA = [
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "机器学习和自然语言处理",
    "🙂 emoji 🚀 rocket 🎉",
    "def f(x):\n    return x * 2  # code",
    "    leading spaces",
    "tabs\tand  double  spaces",
]
SAMPLES = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "你好，世界！机器学习",
    "emoji 🙂🚀 and unseen characters Ω ∮ 龘",
    "def f(x):\n    return x  # comment\n",
    "trailing  ",
    "x\ty\n\nz",
    "1234567 + 89 = 1234656",
    "",
    SAMPLE_TEXT.read_text(encoding="utf-8")[:1500],
]


@pytest.fixture(scope="module")
def reference():
    """(SentencePiece processor, GGUF tokenizer fields) of a freshly trained model."""
    lines = SAMPLE_TEXT.read_text(encoding="utf-8")[:20000].splitlines() + EXTRA * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=["<tool>"], control_symbols=["<ctrl>"], character_coverage=0.9995, minloglevel=2,
        allow_whitespace_only_pieces=True,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    def kind(i: int) -> int:  # gguf.TokenType, as llama.cpp's converter assigns them
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if pieces[i] == "<tool>" else 1

    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [kind(i) for i in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    return sp, fields


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_encodes_as_sentencepiece_and_decodes_back(reference, text):
    sp, fields = reference
    tok = Tokenizer.from_gguf(fields)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text
    if text:  # token by token (the server's logprobs): the space prefix shows, bytes join into characters
        assert b"".join(tok.token_bytes(i) for i in ids).decode() == " " + text


def test_bos_space_prefix_and_special_pieces(reference):
    sp, fields = reference
    tok = Tokenizer.from_gguf(fields)
    assert tok.encode("Hi") == [sp.bos_id(), *sp.encode("Hi")]  # llama files add BOS unless told not to
    assert Tokenizer.from_gguf({**fields, "tokenizer.ggml.add_bos_token": False}).encode("Hi") == sp.encode("Hi")
    ctrl, tool = sp.piece_to_id("<ctrl>"), sp.piece_to_id("<tool>")
    # Control and user-defined pieces are cut out of the text, and the text after them gets the
    # space prefix again (llama.cpp's rule; SentencePiece itself prefixes only the start).
    ids = tok.encode("a<ctrl>b", add_special_tokens=False)
    assert ids == [*sp.encode("a"), ctrl, *sp.encode("b")]
    assert tok.encode("a<tool>b", add_special_tokens=False) == [*sp.encode("a"), tool, *sp.encode("b")]
    assert tok.decode(ids) == "a b" and tok.decode(ids, skip_special_tokens=False) == "a<ctrl> b"
    # A file that asks for no space prefix (Gemma's): spaces are only where the text has them.
    bare = Tokenizer.from_gguf({**fields, "tokenizer.ggml.add_space_prefix": False})
    assert bare.encode(" hello world", add_special_tokens=False) == tok.encode("hello world", add_special_tokens=False)
    assert bare.decode(bare.encode("hello world", add_special_tokens=False)) == "hello world"
    byte_piece = sp.piece_to_id("<0xE9>")
    assert tok.token_bytes(byte_piece) == b"\xe9"


def test_bad_sentencepiece_fields_are_clear_errors(reference):
    from memlm.errors import ModelFormatError

    _, fields = reference
    with pytest.raises(ModelFormatError, match="differ in length"):
        Tokenizer.from_gguf({**fields, "tokenizer.ggml.scores": [0.0]})
    with pytest.raises(ModelFormatError, match="not supported"):
        Tokenizer.from_gguf({**fields, "tokenizer.ggml.model": "bert"})


def test_the_backend_is_built_once_and_read_back(reference, tmp_path, monkeypatch):
    import memlm.tokenizer_spm as tokenizer_spm

    _, fields = reference
    monkeypatch.setenv("MEMLM_HOME", str(tmp_path))
    first = Tokenizer.from_gguf(fields)
    assert len(list((tmp_path / "tokenizers").glob("spm-*.json"))) == 1
    monkeypatch.setattr(tokenizer_spm, "spm_backend", lambda *a: pytest.fail("rebuilt instead of read back"))
    second = Tokenizer.from_gguf(fields)
    text = "你好 world  🙂 x"
    assert second.encode(text) == first.encode(text) and second.decode(second.encode(text)) == text
    assert second.encode("a<tool>b<ctrl>") == first.encode("a<tool>b<ctrl>")
    other = {**fields, "tokenizer.ggml.add_space_prefix": False}  # another vocabulary: another entry
    monkeypatch.undo()
    monkeypatch.setenv("MEMLM_HOME", str(tmp_path))
    Tokenizer.from_gguf(other)
    assert len(list((tmp_path / "tokenizers").glob("spm-*.json"))) == 2


def test_saved_and_reloaded_from_a_folder_it_stays_the_same(reference, tmp_path):
    _, fields = reference
    tok = Tokenizer.from_gguf(fields)
    tok.save(tmp_path)
    back = Tokenizer.from_folder(tmp_path)
    text = "naïve café 你好 🙂\n  x"
    assert back.encode(text) == tok.encode(text) and back.decode(back.encode(text)) == text
    assert back.sentencepiece and [back.token_bytes(i) for i in back.encode(text)] == [
        tok.token_bytes(i) for i in tok.encode(text)
    ]
