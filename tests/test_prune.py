"""Structured pruning: a pruned model equals the original with the pruned parts zeroed, its
folder loads in transformers with equal logits, and the measured criterion finds what is unused."""

import pytest
import torch
import transformers

from conftest import byte_tokenizer, hf_tiny, memlm_twin
from memlm.errors import MemlmError
from memlm.surgery.prune import importance, prune


def _model(arch="llama", **overrides):
    return memlm_twin(hf_tiny(arch, vocab_size=257, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, **overrides))


def _windows(n=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (length,), generator=g).tolist() for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model.logits(model.forward_tokens(ids, torch.arange(ids.shape[1])[None].expand_as(ids)))


def test_pruned_layers_equal_the_original_with_those_blocks_zeroed():
    model = _model()
    pruned, removed = prune(model, "layers", 0.5, _windows())
    assert pruned.config.num_layers == 2 and len(removed["layers"]) == 2
    with torch.no_grad():
        for i in removed["layers"]:  # a block that adds nothing is the identity
            model.layers[i].self_attn.o_proj.weight.zero_()
            model.layers[i].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 257, (2, 10))
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_ffn_channels_and_head_groups_equal_zeroing_them(arch):
    model = _model(arch)
    ids = torch.randint(0, 257, (2, 10))
    smaller, removed = prune(model, "ffn", 0.25, _windows())
    assert smaller.config.intermediate_size == 72  # 96 * 0.75, the same in every layer
    heads, removed_groups = prune(model, "heads", 0.5, _windows())
    assert (heads.config.num_heads, heads.config.num_kv_heads) == (2, 1)
    with torch.no_grad():
        zeroed = _model(arch)
        for i, channels in enumerate(removed["ffn"]):
            zeroed.layers[i].mlp.down_proj.weight[:, channels] = 0
    torch.testing.assert_close(_logits(smaller, ids), _logits(zeroed, ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        zeroed = _model(arch)
        group, d = 2, zeroed.config.head_dim
        for i, groups in enumerate(removed_groups["heads"]):
            for g in groups:
                zeroed.layers[i].self_attn.o_proj.weight[:, g * group * d : (g + 1) * group * d] = 0
    torch.testing.assert_close(_logits(heads, ids), _logits(zeroed, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["layers", "ffn", "heads"])
def test_the_pruned_folder_loads_in_transformers(method, tmp_path):
    from memlm.formats.loading import load_model, save_model

    pruned, _ = prune(_model(), method, 0.25 if method != "heads" else 0.5, _windows())
    folder = save_model(tmp_path / method, pruned, byte_tokenizer())
    ids = torch.randint(0, 257, (1, 9))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, _logits(pruned, ids), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(load_model(str(folder)).model, ids), _logits(pruned, ids))


def test_healing_lowers_the_loss_on_its_text_and_leaves_plain_weights(tmp_path):
    from memlm.adapters.lora import lora_layers
    from memlm.train.heal import heal

    source = _model()
    pruned, _ = prune(source, "layers", 0.5, _windows())
    text = _windows(n=4, length=33, seed=5)
    ids = torch.tensor(text)

    def loss():
        logits = _logits(pruned, ids[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))

    before = loss()
    original = {k: v.clone() for k, v in source.state_dict().items()}
    heal(pruned, text, steps=12, out_dir=str(tmp_path / "heal"), lr=3e-3, lora_rank=4, batch_size=4, progress=False)
    assert all(torch.equal(v, original[k]) for k, v in source.state_dict().items())  # shares nothing with it
    assert not list(lora_layers(pruned))  # merged back: a plain model of the pruned shape
    assert loss() < before


def test_block_influence_finds_a_block_that_does_nothing():
    model = _model()
    with torch.no_grad():
        model.layers[2].self_attn.o_proj.weight.zero_()
        model.layers[2].mlp.down_proj.weight.zero_()
    scores = importance(model, "layers", _windows())
    assert min(range(4), key=scores.__getitem__) == 2 and scores[2] < 1e-6
    _, removed = prune(model, "layers", 0.25, _windows())
    assert removed["layers"] == [2]
    _, random_choice = prune(model, "layers", 0.25, criterion="random", seed=1)
    assert len(random_choice["layers"]) == 1


@pytest.mark.parametrize(
    ("method", "amount", "message"),
    [("neurons", 0.25, "unknown pruning method"), ("layers", 1.5, "fraction"), ("layers", 0.01, "nothing")],
)
def test_bad_requests_are_clear_errors(method, amount, message):
    with pytest.raises(MemlmError, match=message):
        prune(_model(), method, amount, _windows())


def test_the_prune_command_writes_a_loadable_smaller_model(tmp_path, memlm_cli):
    import json
    import subprocess

    from memlm.formats.loading import load_model, save_model

    base = save_model(tmp_path / "base", _model(), byte_tokenizer())
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: memory is first-class in this runtime." for i in range(20)))
    out = tmp_path / "pruned"
    run = subprocess.run([*memlm_cli, "prune", "--model", str(base), "--method", "ffn", "--amount", "0.5",
                          "--calib", str(text), "--windows", "2", "--seq-len", "32", "--heal-steps", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["parameters_after"] < summary["parameters_before"]
    assert summary["healing"]["steps"] == 2 and summary["healing"]["final_loss"] > 0
    assert load_model(str(out)).model.config.intermediate_size == 48
    bad = subprocess.run([*memlm_cli, "prune", "--model", str(base), "--amount", "2", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("memlm: error:") and "Traceback" not in bad.stderr
