"""GGUF loading: a tiny Llama written with the `gguf` package in F32/F16/Q8_0/Q4_1, read back."""

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, hf_tiny
from memlm.errors import ModelFormatError
from memlm.formats.gguf_file import read_gguf
from memlm.formats.weights import build_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Which tensors get which storage type: covers every type the issue asks for.
STORAGE = {
    "attn_q": Q.F32,
    "attn_k": Q.F16,
    "attn_v": Q.Q8_0,
    "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q8_0,
    "ffn_up": Q.Q4_1,
    "ffn_down": Q.F16,
    "token_embd": Q.Q8_0,
    "output": Q.Q4_1,
}
HF_TO_GGUF = {
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script: Q/K rows reordered for interleaved RoPE."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"


def add_shape_and_byte_tokenizer(w, cfg, rope_theta: float = 10000.0) -> None:
    """The metadata every tiny test GGUF carries: the transformer's shape and the byte tokenizer."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope_theta)
    tok = byte_tokenizer()
    vocab = sorted(tok.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<eos>" else 1 for t, _ in vocab])
    w.add_token_merges([])
    w.add_eos_token_id(256)


def write_tiny_gguf(path, hf_model, chat_template="{{ messages[0]['content'] }}"):
    """Write `hf_model` as llama.cpp would; return {gguf name: (stored array, type)}."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    add_shape_and_byte_tokenizer(w, cfg)
    w.add_vocab_size(cfg.vocab_size)
    w.add_chat_template(chat_template)
    stored = {}
    for hf_name, tensor in hf_model.state_dict().items():
        name = _gguf_name(hf_name)
        array = tensor.numpy().astype(np.float32)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            array = _permute(array, heads)
        kind = Q.F32 if array.ndim == 1 else STORAGE[name.split(".")[-2]]
        if kind == Q.F16:
            data = array.astype(np.float16)
        else:
            data = array if kind == Q.F32 else gguf.quants.quantize(array, kind)
        w.add_tensor(name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        stored[name] = (data, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    hf = hf_tiny("llama", vocab_size=257, hidden_size=64, intermediate_size=128, head_dim=16, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return hf, path, write_tiny_gguf(path, hf)


def test_every_tensor_equals_the_gguf_reference_dequantization(tiny_gguf):
    hf, path, stored = tiny_gguf
    config, weights, _ = read_gguf(path)
    original = hf.state_dict()
    for hf_name, ours in weights.items():
        data, kind = stored[_gguf_name(hf_name)]
        reference = gguf.quants.dequantize(data, kind).astype(np.float32).reshape(tuple(ours.shape))
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # memlm undid llama.cpp's permutation; redo it to compare with what the file holds.
            heads = config.num_heads if "q_proj" in hf_name else config.num_kv_heads
            ours = torch.from_numpy(_permute(ours.numpy(), heads))
        np.testing.assert_array_equal(ours.numpy(), reference, err_msg=hf_name)
    # F32 tensors round-trip exactly, permutation included.
    torch.testing.assert_close(
        weights["model.layers.0.self_attn.q_proj.weight"],
        original["model.layers.0.self_attn.q_proj.weight"],
        rtol=0,
        atol=0,
    )
    # Quantized ones are close to the original (the quantization error of each type).
    torch.testing.assert_close(
        weights["model.layers.1.mlp.up_proj.weight"], original["model.layers.1.mlp.up_proj.weight"], atol=0.05, rtol=0
    )


def test_gguf_model_runs_and_matches_its_dequantized_weights(tiny_gguf):
    hf, path, _ = tiny_gguf
    config, weights, tokenizer = read_gguf(path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.eos_token_ids == (256,) and not config.tie_word_embeddings
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
    ours = build_model(config, dict(weights))
    hf.load_state_dict(weights)  # transformers with exactly the dequantized weights
    ids = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        expected = hf(ids).logits
    got = ours.logits(ours(ours.embed(ids), torch.arange(20)[None]))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path, tiny_gguf):
    _, path, _ = tiny_gguf
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFormatError, match="not a readable GGUF"):
        read_gguf(garbage)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelFormatError):
        read_gguf(truncated)


def test_fast_header_equals_the_gguf_readers(tiny_gguf):
    """gguf_header.py (what loading uses) reads the same fields and tensors as the gguf package."""
    from memlm.formats.gguf_header import read_header

    _, path, _ = tiny_gguf
    fields, tensors = read_header(path)
    reader = gguf.GGUFReader(str(path))
    expected = {key: field.contents() for key, field in reader.fields.items()}
    assert fields.keys() == expected.keys()
    for key, value in expected.items():
        assert fields[key] == (value.tolist() if isinstance(value, np.ndarray) else value), key
    assert len(tensors) == len(reader.tensors)
    for ours, theirs in zip(tensors, reader.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.shape) == (theirs.name, theirs.tensor_type, tuple(theirs.shape))
        assert (ours.data_offset, ours.n_bytes) == (theirs.data_offset, theirs.n_bytes)
        assert ours.data.dtype == theirs.data.dtype and np.array_equal(ours.data, theirs.data)
