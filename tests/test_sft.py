"""Reasoning tasks, LoRA adapters, saving models, and supervised fine-tuning end to end (tiny model)."""

import json

import pytest
import torch

from conftest import byte_tokenizer, hf_tiny, memlm_twin, tiny_memlm
from memlm.adapters.lora import (
    add_lora,
    apply_adapter,
    lora_disabled,
    lora_layers,
    merge_lora,
    save_adapter,
)
from memlm.data.tasks import extract_answer, get_task, split_reasoning
from memlm.errors import InvalidRequestError, MemlmError, ModelFormatError
from memlm.formats.loading import load_model, save_model
from memlm.formats.weights import unfuse_state_dict
from memlm.train.sft import IGNORE, SFTConfig, collate, encode_examples, parse_task_mix, run_sft


@pytest.fixture
def tiny_folder(tmp_path):
    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,))
    return save_model(tmp_path / "tiny", model, byte_tokenizer()), model


def _logits(model, ids):
    return model.logits(model(model.embed(ids), torch.arange(ids.shape[1])[None].expand_as(ids)))


# ---- tasks -------------------------------------------------------------------------------------


def test_worked_chain_sum_solutions_add_up_and_score():
    task = get_task("chain_sum")
    problems = task.problems(50, "train")
    for p in problems:
        solution = task.solution(p)  # raises if the running sums miss the generator's answer
        lines = solution.splitlines()
        assert lines[-1] == f"Answer: {p.answer}"
        assert len(lines) == p.entry["metadata"]["num_terms"]  # one line per operation, then the answer
        assert task.score(solution, p) == 1.0
    p = problems[0]
    assert task.score(f"Answer: {int(p.answer) + 1}", p) == 0.0
    assert task.score("no answer line", p) == 0.0
    assert extract_answer("x\nAnswer:  -12 \nmore") == "-12"
    assert split_reasoning("a = 1\nAnswer: 1") == ("a = 1\n", "Answer: 1")


def test_splits_do_not_overlap_and_are_reproducible():
    task = get_task("chain_sum")
    train = {p.question for p in task.problems(300, "train")}
    test = [p.question for p in task.problems(100, "test")]
    assert not train & set(test)
    assert test == [p.question for p in task.problems(100, "test")]
    with pytest.raises(InvalidRequestError, match="unknown task"):
        get_task("chess")
    with pytest.raises(InvalidRequestError, match="unknown split"):
        task.problems(3, "dev")


def test_long_multiplication_is_worked_as_taught_and_scores():
    task = get_task("long_mult")
    entry = {"metadata": {"expression": "4786 * 718"}, "answer": "3436348"}
    assert task.worked(entry) == [
        "4786 * 8: 6*8=48 c4, 8*8=64+4=68 c6, 7*8=56+6=62 c6, 4*8=32+6=38 -> 38288",
        "4786 * 1: 6*1=6 c0, 8*1=8 c0, 7*1=7 c0, 4*1=4 -> 4786, shifted 47860",
        "4786 * 7: 6*7=42 c4, 8*7=56+4=60 c6, 7*7=49+6=55 c5, 4*7=28+5=33 -> 33502, shifted 3350200",
        "38288 + 47860: 8+0=8, 8+6=14 c1, 2+8+1=11 c1, 8+7+1=16 c1, 3+4+1=8 -> 86148",
        "86148 + 3350200: 8+0=8, 4+0=4, 1+2=3, 6+0=6, 8+5=13 c1, 0+3+1=4, 0+3=3 -> 3436348",
    ]
    with pytest.raises(AssertionError, match="gives"):  # the worked solution checks itself
        task.worked({"metadata": {"expression": "4786 * 718"}, "answer": "3436349"})
    problems = task.problems(40, "train") + task.problems(40, "val")
    for p in problems:  # every worked solution reaches the generator's answer and scores 1
        assert task.score(task.solution(p), p) == 1.0
    assert task.score(f"Answer: {int(problems[0].answer) + 10}", problems[0]) == 0.0
    splits = [{p.question for p in task.problems(300, split)} for split in ("train", "val", "test")]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    for p in problems:  # the fixed shape: a 4-digit by a 3-digit factor without zero digits
        left, right = p.entry["metadata"]["expression"].split(" * ")
        assert len(left) == 4 and len(right) == 3 and "0" not in right


@pytest.mark.embedded
def test_long_multiplication_has_the_published_shape_and_fits_its_budget():
    """Short question, long thinking (DynTS's regime): prompt at most 20% of the trace, thinking
    over 300 tokens on average, and the task's generation budget fits every worked solution."""
    from memlm.formats.loading import resolve
    from memlm.tokenizer import Tokenizer

    task = get_task("long_mult")
    tokenizer = Tokenizer.from_folder(resolve("smollm2-135m-instruct")[1])
    problems = task.problems(100, "test")
    traces = [len(tokenizer.encode(task.solution(p), add_special_tokens=False)) for p in problems]
    prompts = [len(tokenizer.encode(tokenizer.apply_chat_template(task.messages(p)))) for p in problems]
    assert sum(traces) / len(traces) > 300 and max(traces) < task.max_new_tokens
    assert max(p / (p + t) for p, t in zip(prompts, traces, strict=True)) <= 0.2


# ---- saving models and LoRA --------------------------------------------------------------------


def test_unfuse_inverts_fuse_against_transformers_names():
    for arch in ("llama", "qwen2", "qwen3"):
        hf = hf_tiny(arch)
        ours = unfuse_state_dict(memlm_twin(hf))
        theirs = {
            k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not hf.config.tie_word_embeddings
        }
        assert set(ours) == set(theirs)
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), name


def test_saved_model_loads_back_identically(tiny_folder):
    folder, model = tiny_folder
    ids = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(_logits(load_model(str(folder)).model, ids), _logits(model, ids))
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_lora_starts_as_identity_shares_base_weights_and_merges_exactly():
    model = tiny_memlm()
    ids = torch.randint(0, 128, (2, 7))
    before = _logits(model, ids)
    base_weight = model.layers[0].self_attn.qkv_proj.weight
    names = add_lora(model, rank=4, alpha=8)
    assert len(names) == 4 * model.config.num_layers
    layer = model.layers[0].self_attn.qkv_proj
    assert layer.weight.data_ptr() == base_weight.data_ptr()  # the base weight is shared, not copied
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{part}" for name, _ in lora_layers(model) for part in "ab"
    }
    torch.testing.assert_close(_logits(model, ids), before)  # B = 0: nothing changes yet
    with torch.no_grad():
        for _, lora in lora_layers(model):
            lora.lora_b.normal_(std=0.05)
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, before)
    with lora_disabled(model):
        torch.testing.assert_close(_logits(model, ids), before)
    merge_lora(model)
    assert not list(lora_layers(model))
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)


def _randomly_adapted(folder):
    """The model of `folder` with a rank-4 adapter on every projection, B away from zero."""
    model = load_model(str(folder)).model
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for _, lora in lora_layers(model):
            lora.lora_b.normal_(std=0.05)
    return model


def test_adapter_folder_loads_as_a_model_and_rejects_mismatches(tiny_folder, tmp_path):
    folder, base = tiny_folder
    model = _randomly_adapted(folder)
    config = {
        "base_model": str(folder),
        "rank": 4,
        "alpha": 8,
        "targets": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    }
    save_adapter(tmp_path / "adapter", model, config, dtype=torch.float32)
    ids = torch.randint(0, 257, (2, 9))
    loaded = load_model(str(tmp_path / "adapter"))
    assert "LoRA adapter" in loaded.source
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)

    wrong = tiny_memlm(vocab_size=257, intermediate_size=48, eos_token_ids=(256,))
    with pytest.raises(ModelFormatError, match="shape"):
        apply_adapter(wrong, tmp_path / "adapter")
    bad = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert bad["peft_type"] == "LORA" and bad["r"] == 4  # written in PEFT's format
    del bad["r"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelFormatError, match="lacks 'r'"):
        load_model(str(tmp_path / "adapter"))


def test_adapter_folders_of_the_earlier_format_still_load(tiny_folder, tmp_path):
    from safetensors.torch import save_file

    from memlm.adapters.lora import lora_state_dict

    folder, _ = tiny_folder
    model = _randomly_adapted(folder)
    old = tmp_path / "old"
    old.mkdir()
    save_file(lora_state_dict(model), str(old / "adapter.safetensors"))
    config = {"base_model": str(folder), "rank": 4, "alpha": 8, "targets": ["qkv_proj", "o_proj", "gate_up_proj",
                                                                              "down_proj"]}
    (old / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 257, (1, 7))
    torch.testing.assert_close(_logits(load_model(str(old)).model, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


# ---- SFT ---------------------------------------------------------------------------------------


def test_sft_examples_train_only_on_the_solution():
    tokenizer, task = byte_tokenizer(), get_task("chain_sum_short")
    problem = task.problems(1, "train")[0]
    ((ids, labels),) = encode_examples(tokenizer, task, [problem])
    prompt = tokenizer.encode(tokenizer.apply_chat_template(task.messages(problem)))
    answer = tokenizer.encode(task.solution(problem)) + [256]
    assert ids == prompt + answer
    assert labels[: len(prompt) - 1] == [IGNORE] * (len(prompt) - 1)
    assert labels[len(prompt) - 1 : -1] == answer  # label at i is the token at i + 1
    batch = collate([(ids, labels), (ids[:5], labels[:5])])
    assert batch["positions"][1, 5:].eq(-1).all() and batch["labels"][1, 5:].eq(IGNORE).all()


def test_answer_weight_weighs_the_answer_line_in_the_loss():
    from memlm.train.sft import TokenLM, sft_loss

    tokenizer, task = byte_tokenizer(), get_task("chain_sum_short")
    problems = task.problems(2, "train")
    plain = encode_examples(tokenizer, task, problems)
    weighted = encode_examples(tokenizer, task, problems, answer_weight=5.0)
    for (ids, labels), (ids_w, labels_w, weights) in zip(plain, weighted, strict=True):
        assert ids == ids_w and labels == labels_w and len(weights) == len(labels)
        heavy = [i for i, w in enumerate(weights) if w == 5.0]
        # the heavy labels are exactly the tokens of the solution from "Answer:" on, and the end token
        assert tokenizer.decode([labels[i] for i in heavy[:-1]]).startswith("Answer:")
        assert labels[heavy[-1]] == 256 and heavy == list(range(heavy[0], heavy[-1] + 1))
    model = tiny_memlm(vocab_size=257)
    batch = collate(weighted)
    with torch.no_grad():
        loss = sft_loss(TokenLM(model), batch)
        labels = batch["labels"]
        logits = TokenLM(model)(batch["ids"], batch["positions"], labels)
        each = torch.nn.functional.cross_entropy(logits.float(), labels[labels != IGNORE], reduction="none")
        w = batch["weights"][labels != IGNORE]
        assert float(w.max()) == 5.0 and float(w.min()) == 1.0
        torch.testing.assert_close(loss, (each * w).sum() / w.sum())
        assert "weights" not in collate(plain)  # plain SFT: the unweighted mean, as before
        torch.testing.assert_close(sft_loss(TokenLM(model), collate(plain)), each.mean())


def test_sft_end_to_end_saves_an_adapter_that_loads_and_learns(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    out = tmp_path / "sft"
    cfg = SFTConfig.of(
        str(folder),
        "chain_sum_short",
        str(out),
        steps=12,
        batch_size=4,
        lr=3e-3,
        lora_rank=4,
        n_train=32,
        n_eval=2,
        n_val_loss=4,
        warmup_steps=2,
        save_every=6,
        progress=False,
    )
    report = run_sft(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # Held-out loss on validation problems: before the first step, then at checkpoints.
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [12]  # checkpoints that are log rows
    assert report["val_loss"] == rows[-1]["val_loss"] < report["val_loss_start"]
    assert json.loads((out / "eval.json").read_text())["eval"]["n"] == 2
    assert report["trainable_parameters"] < sum(p.numel() for p in tiny_memlm().parameters())
    assert load_model(str(out / "adapter")).num_parameters == load_model(str(folder)).num_parameters
    with pytest.raises(MemlmError, match="rank"):
        run_sft(SFTConfig.of(str(folder), "chain_sum_short", str(out), lora_rank=-1))


def test_sft_task_mix_shares_the_pool_and_evaluates_every_task(tiny_folder, tmp_path, monkeypatch):
    assert parse_task_mix("long_mult:3, chain_sum:1") == [("long_mult", 0.75), ("chain_sum", 0.25)]
    assert parse_task_mix("chain_sum") == [("chain_sum", 1.0)]
    for bad, message in (("chain_sum:0", "weight > 0"), ("chain_sum:x", "weight > 0"), ("chess", "unknown task")):
        with pytest.raises((MemlmError, InvalidRequestError), match=message):
            parse_task_mix(bad)
    with pytest.raises(MemlmError, match="twice"):
        parse_task_mix("chain_sum,chain_sum:2")

    import memlm.train.sft as sft

    drawn = {}
    encode = sft.encode_examples

    def counting(tokenizer, task, problems, *options):
        drawn[task.name] = len(problems)
        return encode(tokenizer, task, problems, *options)

    monkeypatch.setattr(sft, "encode_examples", counting)
    folder, _ = tiny_folder
    cfg = SFTConfig.of(
        str(folder), "chain_sum_short:3,chain_sum:1", str(tmp_path / "mix"), steps=2, batch_size=2,
        lora_rank=2, n_train=40, n_eval=1, n_val_loss=0, warmup_steps=1, progress=False,
    )
    report = run_sft(cfg)
    assert drawn == {"chain_sum_short": 30, "chain_sum": 10}
    assert [e["task"] for e in report["evals"]] == ["chain_sum_short", "chain_sum"]
    assert report["eval"] == report["evals"][0] and report["task"] == "chain_sum_short:3,chain_sum:1"
