"""Adapters in PEFT's format: an adapter made by `peft` gives the same logits in memlm as in
transformers + peft, and one saved by memlm loads in peft with the same logits."""

import json

import peft
import pytest
import torch

from conftest import byte_tokenizer, hf_tiny, memlm_twin
from memlm.adapters.lora import add_lora, lora_layers, save_adapter
from memlm.errors import MemlmError, ModelFormatError
from memlm.formats.loading import load_model, save_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(tmp_path, arch="llama"):
    """A tiny transformers model and the same weights saved as a folder memlm and transformers read."""
    hf = hf_tiny(arch, vocab_size=257)
    folder = save_model(tmp_path / "base", memlm_twin(hf), byte_tokenizer())
    return hf, folder


def _memlm_logits(model, ids):
    with torch.no_grad():
        return model.logits(model.forward_tokens(ids, torch.arange(ids.shape[1])[None].expand_as(ids)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_adapter_loads_in_memlm_with_equal_logits(tmp_path, arch, rslora):
    hf, folder = _base(tmp_path, arch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=rslora, lora_dropout=0.0)
    adapted = peft.get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero: give the adapter something to say
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    adapted.eval()
    adapted.save_pretrained(tmp_path / "peft")
    settings = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(folder)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(settings))

    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        expected = adapted(ids).logits
    loaded = load_model(str(tmp_path / "peft"))
    assert "LoRA adapter" in loaded.source
    torch.testing.assert_close(_memlm_logits(loaded.model, ids), expected, atol=2e-5, rtol=1e-4)


def test_a_memlm_adapter_loads_in_peft_with_equal_logits(tmp_path):
    hf, folder = _base(tmp_path)
    model = load_model(str(folder)).model
    add_lora(model, rank=4, alpha=8)
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_b.normal_(std=0.05)
    save_adapter(tmp_path / "ours", model, {"base_model": str(folder), "task": "test"}, dtype=torch.float32)
    ids = torch.randint(0, 257, (2, 9))
    expected = _memlm_logits(model, ids)
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_memlm_logits(load_model(str(tmp_path / "ours")).model, ids), expected,
                               atol=2e-5, rtol=1e-4)


def test_other_peft_methods_and_options_are_clear_errors(tmp_path):
    _, folder = _base(tmp_path)
    adapter = tmp_path / "ia3"
    adapter.mkdir()
    ia3 = {"peft_type": "IA3", "base_model_name_or_path": str(folder)}
    (adapter / "adapter_config.json").write_text(json.dumps(ia3))
    with pytest.raises(ModelFormatError, match="'IA3' is not supported"):
        load_model(str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "base_model_name_or_path": str(folder)}))
    with pytest.raises(ModelFormatError, match="use_dora"):
        load_model(str(adapter))


def test_an_adapter_on_an_adapter_merges_both(tmp_path):
    """`memlm train sft --model ADAPTER` fine-tunes a fine-tuned model further: its adapter names the
    first adapter as its base, and loading it merges both (the logits of the two applied in turn)."""
    _, folder = _base(tmp_path)

    def adapter_on(base: str, out, seed: int):
        model = load_model(base).model
        add_lora(model, rank=4, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_b.normal_(std=0.05)
        save_adapter(out, model, {"base_model": base}, dtype=torch.float32)
        return model

    adapter_on(str(folder), tmp_path / "first", 3)
    second = adapter_on(str(tmp_path / "first"), tmp_path / "second", 4)  # adapter 2 on top of merged adapter 1
    ids = torch.randint(0, 257, (2, 9))
    loaded = load_model(str(tmp_path / "second"))
    assert loaded.source.count("LoRA adapter") == 2
    torch.testing.assert_close(_memlm_logits(loaded.model, ids), _memlm_logits(second, ids), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(_memlm_logits(load_model(str(tmp_path / "first")).model, ids), _memlm_logits(second, ids))
    with pytest.raises(ModelFormatError, match="stacked adapters load in float32"):
        load_model(str(tmp_path / "second"), "q4_1")
    with pytest.raises(MemlmError, match="needs a quantized dtype"):  # the same checks as any other model
        load_model(str(tmp_path / "second"), "float32:q8_0")
