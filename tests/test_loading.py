"""Finding, converting and caching models; clear errors for bad paths and files."""

import json

import pytest
import torch
from test_gguf import write_tiny_gguf

from conftest import hf_tiny
from memlm.errors import ModelFormatError, ModelNotFoundError
from memlm.formats import loading
from memlm.formats.loading import EmbeddedModel, load_model, resolve


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """Register a tiny GGUF as an 'embedded' model and point MEMLM_HOME at a fresh folder."""
    hf = hf_tiny("llama", vocab_size=257, tie_word_embeddings=False)
    path = tmp_path / "pkg" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, hf)
    monkeypatch.setattr(EmbeddedModel, "path", lambda self: path)
    monkeypatch.setitem(loading.EMBEDDED, "tiny-test", EmbeddedModel("none", "none==0", "tiny.gguf"))
    monkeypatch.setenv("MEMLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def test_first_load_converts_once_into_the_cache(fake_embedded, monkeypatch):
    first = load_model("tiny-test")
    target = fake_embedded / "tiny-test"
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "memlm_source.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in fake_embedded.iterdir()] == ["tiny-test"]  # no temporary leftovers
    # The second load reads the cache: the GGUF reader must not run again.
    monkeypatch.setattr(loading, "read_gguf", lambda path: pytest.fail("converted twice"))
    second = load_model("tiny-test")
    ids = torch.arange(10)[None]
    for m in (first, second):
        assert m.tokenizer.eos_token_id == 256
    torch.testing.assert_close(
        first.model.logits(first.model(first.model.embed(ids), ids)),
        second.model.logits(second.model(second.model.embed(ids), ids)),
    )
    assert "converted once" in second.source


def test_a_failed_conversion_leaves_nothing_behind(fake_embedded, monkeypatch):
    def crash(folder, *args):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(loading, "write_hf_folder", crash)
    with pytest.raises(OSError):
        load_model("tiny-test")
    assert list(fake_embedded.iterdir()) == []


def test_hf_folder_loads_and_bad_folders_fail_clearly(tmp_path, embedded_folder):
    hf = hf_tiny("qwen2")
    folder = tmp_path / "qwen"
    hf.save_pretrained(folder)
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        load_model(str(folder))
    (folder / "tokenizer.json").write_bytes((embedded_folder / "tokenizer.json").read_bytes())
    m = load_model(str(folder))
    assert m.model.config.arch == "qwen2" and m.model.config.qkv_bias
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            m.model.logits(m.model(m.model.embed(ids), torch.arange(9)[None])), hf(ids).logits, atol=2e-5, rtol=1e-4
        )
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFormatError, match="cannot read"):
        load_model(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ModelFormatError, match="unsupported model_type"):
        load_model(str(folder))


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve("no-such-model")
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ModelNotFoundError, match="expected a .gguf"):
        resolve(str(text))


def test_int8_decodes_in_int8_and_prefills_in_float32(fake_embedded):
    from memlm.cache.kv_cache import KVCache

    fp32, int8 = load_model("tiny-test"), load_model("tiny-test", dtype="int8")
    ids = torch.randint(0, 257, (1, 16))
    positions = torch.arange(16)[None]
    outputs = {}
    for name, m in (("fp32", fp32.model), ("int8", int8.model)):
        cache = KVCache.for_model(m.config, 1, capacity=17)
        prefill = m.logits(m(m.embed(ids), positions, cache))
        step = m.logits(m(m.embed(torch.tensor([[7]])), torch.tensor([[16]]), cache))
        outputs[name] = prefill, step
    # A multi-token chunk runs the fp32 weights: the prompt's logits and cache are exact.
    assert torch.equal(outputs["fp32"][0], outputs["int8"][0])
    # A single-token step runs int8: close to fp32, but really quantized.
    a, b = outputs["fp32"][1], outputs["int8"][1]
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert int8.num_parameters == fp32.num_parameters


def test_building_a_model_can_consume_its_weights_and_gives_the_same_model(tmp_path):
    """`consume=True` (what load_model does, so fused q/k/v and gate/up matrices never sit beside
    their parts) empties the weights dict as it goes; the model is the one built without it, and
    without it the caller's dict is left whole."""
    from memlm.formats.gguf_file import read_gguf
    from memlm.formats.weights import build_model

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf_tiny("llama", vocab_size=257, tie_word_embeddings=False))
    config, kept, _ = read_gguf(path, keep_quantized=True)
    _, consumed, _ = read_gguf(path, keep_quantized=True)
    names = set(kept)
    a, b = build_model(config, kept), build_model(config, consumed, consume=True)
    assert set(kept) == names and not consumed
    ids = torch.randint(0, 257, (1, 7))
    with torch.no_grad():
        want = a.logits(a(a.embed(ids), torch.arange(7)[None]))
        got = b.logits(b(b.embed(ids), torch.arange(7)[None]))
    assert torch.equal(want, got)
