"""The decode benchmark's helpers (the benchmark itself is run by hand: `memlm bench decode`)."""

import json
import math
import os
import time
from io import StringIO

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_memlm
from memlm import kernels
from memlm.atomic import write_json_atomic
from memlm.bench import decode
from memlm.bench.decode import (
    PROMPTS,
    SAMPLE_TEXT,
    CpuWatch,
    batch_prompts,
    build_result,
    common_prefix,
    decode_ratios,
    greedy_agreement,
    perplexity,
    print_report,
)


def _rows():
    def row(engine, batch, decode_tok_s):
        dtype = "int8" if engine == "memlm" else "float32"
        return {
            "engine": engine,
            "batch": batch,
            "dtype": dtype,
            "prefill_tok_s": 100.0,
            "decode_tok_s": decode_tok_s,
            "peak_rss_mb": 500.0,
            "runtime_rss_mb": 200.0,
            "_outputs": [[1, 2]] * batch,
        }

    return [row("memlm", 1, 60.0), row("memlm", 8, 200.0), row("hf", 1, 20.0), row("hf", 8, 80.0)]


def _rows_with_llama_cpp():
    q4 = [{**r, "dtype": "q4_1", "decode_tok_s": 2 * r["decode_tok_s"]} for r in _rows() if r["engine"] == "memlm"]
    llama = [{**r, "engine": "llama.cpp", "dtype": "gguf file", "decode_tok_s": 100.0} for r in _rows()[2:]]
    llama[0]["_outputs"] = [[1, 3]]  # differs from hf's [1, 2] after one token
    return _rows() + q4 + llama


def test_perplexity_is_finite_and_matches_one_forward():
    model = tiny_memlm()
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    ppl = perplexity(model, ids, window=64)
    assert math.isfinite(ppl) and ppl > 1

    # One window covering everything == exp(cross-entropy of a single causal forward).
    with torch.no_grad():
        x = torch.tensor(ids[:50])[None]
        logits = model.logits(model(model.embed(x), torch.arange(50)[None]))
        expected = math.exp(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())
    assert perplexity(model, ids[:50], window=256) == pytest.approx(expected, rel=1e-5)


def test_incremental_perplexity_equals_one_forward():
    """Token-by-token through the KV cache scores the same as the cache-less forward."""
    model = tiny_memlm()
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    assert perplexity(model, ids, window=40, incremental=True) == pytest.approx(
        perplexity(model, ids, window=40), rel=1e-4
    )


def test_perplexity_windows_are_independent():
    """A trailing window of one token predicts nothing and must not count."""
    model = tiny_memlm()
    ids = torch.randint(0, 128, (65,), generator=torch.Generator().manual_seed(1)).tolist()
    assert perplexity(model, ids, window=64) == pytest.approx(perplexity(model, ids[:64], window=64))
    with pytest.raises(ValueError):
        perplexity(model, ids[:1])


def test_decode_ratios_and_result_shape():
    rows = _rows()
    assert decode_ratios(rows) == {"int8/hf": {"1": 3.0, "8": 2.5}}
    several = decode_ratios(_rows_with_llama_cpp())
    assert several["q4_1/hf"] == {"1": 6.0, "8": 5.0} and several["q4_1/llama.cpp"] == {"1": 1.2, "8": 4.0}
    assert several["int8/llama.cpp"] == {"1": 0.6, "8": 2.0}
    checks = decode._cross_check(_rows_with_llama_cpp(), 2)
    assert checks[("llama.cpp", 1)] == (0.0, 0.5, 0.0) and checks[("memlm q4_1", 8)] == (1.0, 1.0, 1.0)
    against_llama = decode._cross_check(_rows_with_llama_cpp(), 2, "llama.cpp", first=1)
    assert against_llama[("memlm q4_1", 1)] == (0.0, 0.5, 1.0) and ("hf", 1) in against_llama
    both = build_result(_rows_with_llama_cpp(), 2, 2, "m", None)["agreement"]
    assert both["llama.cpp"]["memlm q4_1, batch 1"] == {"identical": 0.0, "prefix": 0.5, "first_8": 0.0}
    assert both["hf"]["llama.cpp, batch 8"]["identical"] == 1.0
    result = build_result(rows, threads=2, new_tokens=64, model="m", quality={"ppl_delta": 0.1})
    assert list(result) == ["rows", "ratio_decode", "agreement", "threads", "new_tokens", "model", "quality"]
    assert all(
        set(r) == {"engine", "batch", "dtype", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "runtime_rss_mb"}
        for r in result["rows"]
    )
    assert result["ratio_decode"] == {"int8/hf": {"1": 3.0, "8": 2.5}}
    json.dumps(result)  # serialisable as is
    assert build_result(rows[:1], 2, 64, "m", None)["ratio_decode"] == {}  # no hf row: no ratio


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "decode.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):  # not serialisable: the old file stays, no temporary is left
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["decode.json"]


def test_prompt_cycling_and_agreement():
    assert batch_prompts(["a", "b", "c"], 2) == ["a", "b"]
    assert batch_prompts(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert len(batch_prompts(PROMPTS, 8)) == 8 and len(set(PROMPTS)) == len(PROMPTS)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([1], [1, 2]) == 1
    identical, prefix = greedy_agreement([[1, 2, 3, 4], [1, 9, 9, 9]], [[1, 2, 3, 4], [1, 2, 3, 4]], 4)
    assert identical == 0.5 and prefix == pytest.approx((4 + 1) / 8)


def test_report_prints():
    from rich.console import Console

    console = Console(file=StringIO(), width=120)
    quality = {
        "int8": {
            "ppl_float32": 10.0,
            "ppl_int8": 10.5,
            "ppl_delta": 0.5,
            "greedy_identical_frac": 0.75,
            "greedy_prefix_frac": 0.9,
        }
    }
    result = build_result(_rows(), 2, 64, "m", quality)
    print_report(result, console)
    out = console.file.getvalue()
    assert "memlm" in out and "3.00x" in out and "10.500" in out


def test_sample_text_is_long_enough():
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    assert len(text) > 3000 and text.isascii()


def test_cpu_watch_sees_other_processes_not_this_one():
    import subprocess
    import sys

    watch = CpuWatch()
    # A spinning grandchild, orphaned at once: not a child of this process, so it counts as other.
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{spin}" >/dev/null 2>&1 &'], check=True)
    t = time.time()
    while time.time() - t < 0.8:  # this process spins too, and must not be reported
        pass
    busy = watch.busy(threshold=1.0)
    assert not any(f"pid {os.getpid()}," in b for b in busy)
    assert any(b.startswith("python") for b in busy), busy


def test_bad_arguments_are_user_errors():
    from memlm.bench.decode import run_decode_bench
    from memlm.errors import MemlmError

    for kwargs in (
        {"dtype": "int4"},
        {"dtype": "q4_1,int4"},
        {"new_tokens": 1},
        {"batch_sizes": (0,)},
        {"threads": 0},
        {"against": ("vllm",)},
        {"against": ("llama.cpp",), "model": "some/folder"},  # not GGUF (or no llama-cpp-python)
        {"prompt_tokens": 0},
    ):
        with pytest.raises(MemlmError):
            run_decode_bench(**kwargs)


def test_long_prompts_have_the_asked_length_and_differ_by_row():
    from conftest import byte_tokenizer
    from memlm.bench.decode import PROMPTS, bench_prompts

    tok = byte_tokenizer()
    rows = bench_prompts(tok, 3, 5000)  # longer than sample.txt: the text is repeated
    assert [len(r) for r in rows] == [5000] * 3 and len({tuple(r) for r in rows}) == 3
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    assert rows[0][:50] == tok.encode(text, add_special_tokens=False)[:50]
    assert bench_prompts(tok, 2) == [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
                                     for p in PROMPTS[:2]]  # fmt: skip


def test_llama_cpp_reference_needs_a_gguf_file(tmp_path):
    from memlm.bench.llama_cpp import gguf_file_of
    from memlm.errors import MemlmError

    assert gguf_file_of("smollm2-135m-instruct").suffix == ".gguf"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    assert gguf_file_of(str(model)) == model
    with pytest.raises(MemlmError, match="needs a GGUF model"):
        gguf_file_of(str(tmp_path))


def test_plot_has_a_bar_per_engine_and_dtype(tmp_path):
    from memlm.bench.decode import plot_result

    result = build_result(_rows_with_llama_cpp(), 2, 64, "m", None)
    plot_result(result, str(tmp_path / "decode.png"))
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.png"]  # written atomically


def test_report_helper_writes_json_and_plot_atomically_and_says_where(tmp_path):
    from rich.console import Console

    from memlm.bench.report import print_table, pyplot, save_figure, write_outputs

    console = Console(file=StringIO(), width=120)
    print_table(console, "the title", ["name", "tok/s"], [["memlm", "12.5"]], left=("name",))

    def plot(result, path):
        fig, ax = pyplot().subplots()
        ax.bar([0], [result["x"]])
        save_figure(fig, path)

    json_path, png_path = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    write_outputs({"x": 1}, console, str(json_path), str(png_path), plot)
    out = console.file.getvalue()
    assert "the title" in out and "memlm" in out and "12.5" in out
    assert f"wrote {json_path}" in out and f"wrote {png_path}" in out
    assert json.loads(json_path.read_text()) == {"x": 1} and json_path.read_text().endswith("}\n")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["r.json", "r.png"]  # no temporaries left
    write_outputs({"x": 1}, None)  # nothing asked for: nothing written, nothing said
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["r.json", "r.png"]


def test_sizes_builds_a_loadable_random_model_of_a_shape_and_merges_ratios(tmp_path, monkeypatch):
    """bench/sizes.sh's pieces: a random-weight HF folder in a shape's layout (here a tiny one
    beside the real ones) loads as that shape with the embedded tokenizer; merge pairs memlm's
    rows with llama.cpp's at the same batch."""
    from memlm.bench import sizes
    from memlm.formats.loading import load_model

    tiny = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 10000.0}  # fmt: skip
    monkeypatch.setitem(sizes.SHAPES, "tiny", tiny)
    folder = sizes.random_hf_folder("tiny", tmp_path / "hf")
    loaded = load_model(str(folder))
    cfg = loaded.model.config
    assert (cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.qkv_bias) == ("qwen2", 64, 2, 2, True)
    assert loaded.tokenizer.encode("hello") == load_model("smollm2-135m-instruct").tokenizer.encode("hello")

    def row(engine, batch, tok_s, rss):
        return {"engine": engine, "batch": batch, "dtype": "auto" if engine == "memlm" else "gguf file",
                "prefill_tok_s": 2 * tok_s, "decode_tok_s": tok_s, "peak_rss_mb": rss}  # fmt: skip

    rows = [row("memlm", 1, 30.0, 600), row("llama.cpp", 1, 20.0, 500), row("memlm", 8, 90.0, 700)]
    result = {"model": "/x/tiny-Q4_0.gguf", "prompt_tokens": 512, "rows": rows}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    merged = sizes.merge([str(path)])["rows"]
    assert [(r["file"], r["batch"], r["decode_ratio"], r["rss_ratio"]) for r in merged] == [
        ("tiny-Q4_0", 1, 1.5, 1.2),
        ("tiny-Q4_0", 8, None, None),
    ]
    sizes.plot_result({"rows": merged}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_timed_memlm_runs_compute_their_prefill(monkeypatch):
    """bench decode repeats the same prompts: memlm's engine there has prefix caching off, or
    every timed prefill after the first would be a cache hit (as it was on 2026-12-06)."""
    from memlm.bench import decode

    seen = {}

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(decode.memlm, "load", load)
    with pytest.raises(Loaded):
        decode._measure("memlm", "smollm2-135m-instruct", "q4_1", 1, 4, 1, 1)
    assert seen["kv_cache"].prefix_caching is False


@pytest.mark.skipif(kernels.native() is None, reason="native kernels unavailable")
def test_kernel_bench_times_every_cell_for_every_build(tmp_path):
    from memlm.bench import kernels as kernel_bench

    path = str(kernels.library_path(kernels.best_variant()))
    out = tmp_path / "k.json"
    kernel_bench.main(["--shape", "64x256", "--formats", "q4_0,q4_k", "--rows", "1,3", "--repeats", "2",
                       "--against", path, "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["shape"] == [64, 256]
    cells = {(c["format"], c["activations"], c["rows"]) for c in result["cells"]}
    assert cells == {(f, a, r) for f in ("q4_0", "q4_k") for a in ("q8_0", "float32") for r in (1, 3)}
    for c in result["cells"]:
        assert [b["build"] for b in c["builds"]] == ["this", kernels.library_path(kernels.best_variant()).stem]
        assert all(b["ms"] > 0 and b["gb_s"] > 0 for b in c["builds"])
    with pytest.raises(SystemExit, match="unknown format"):
        kernel_bench.main(["--formats", "q4_0,q9_9"])


def test_decode_time_is_read_inside_each_run_and_the_best_of_each_part_counts():
    """best_times keeps the best prefill and the best decode across runs (each measured inside its
    run, never a full run minus a prefill-only one) and the last run's outputs, after a short warm-up."""
    from memlm.bench.llama_cpp_runner import Timed, best_times

    calls, parts = [], iter([(3.0, 2.0), (1.0, 5.0), (2.0, 4.0)])

    def run(n):
        calls.append(n)
        if n != 32:
            return Timed("warm-up", 9.0, 9.0)
        prefill, decode_s = next(parts)
        return Timed(f"run {len(calls)}", prefill, decode_s)

    assert best_times(run, 32, 3) == Timed("run 4", 1.0, 2.0)
    assert calls == [4, 32, 32, 32]


def test_completions_carry_time_to_first_token_and_decode_time():
    import memlm
    from conftest import byte_tokenizer
    from memlm.generation.engine import Engine

    engine = Engine(tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer(), name="tiny")
    for n in (1, 5):
        done = engine.generate(["ab", "a longer prompt"], memlm.SamplingParams(max_new_tokens=n, min_new_tokens=n))
        assert all(c.ttft_s > 0 and (c.decode_s == 0 if n == 1 else c.decode_s > 0) for c in done)
    a, b = (engine.generate("ab", memlm.SamplingParams(max_new_tokens=3)) for _ in range(2))
    assert a == b  # timings do not take part in equality


def test_the_transformers_clock_notes_the_prompt_then_the_first_and_last_new_tokens():
    clock = decode.TokenClock()
    for _ in range(4):  # the prompt, then three new tokens
        clock.put(torch.zeros(1))
        time.sleep(0.001)
    clock.end()
    assert clock.start < clock.first < clock.last
