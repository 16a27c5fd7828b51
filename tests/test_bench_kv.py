"""`memlm bench kv` on a tiny model: every (policy, budget) row, budgets held, JSON and PNG written."""

import json

import pytest

from conftest import byte_tokenizer, tiny_memlm
from memlm.bench.kv import build_probes, run_kv_bench
from memlm.cache.importance import ImportancePredictor, save_predictor
from memlm.errors import MemlmError
from memlm.formats.loading import save_model


@pytest.fixture
def tiny_model_and_predictor(tmp_path):
    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=1024)
    folder = save_model(tmp_path / "tiny", model, byte_tokenizer())
    save_predictor(tmp_path / "predictor", ImportancePredictor(64), {"base_model": str(folder)})
    return str(folder), str(tmp_path / "predictor")


def test_probes_end_with_the_code_stated_at_the_start():
    tokenizer = byte_tokenizer()
    for prompt, continuation, n in build_probes(tokenizer, 3, filler_tokens=50):
        text = tokenizer.decode(continuation)
        code = text[-n:].strip()
        assert code.isdigit() and len(code) == 4
        assert text.startswith("The code for ") and f" is {code}.\n" in text[:30]
        assert "<assistant>" in tokenizer.decode(prompt)


def test_bench_kv_rows_budgets_json_and_plot(tiny_model_and_predictor, tmp_path):
    model, predictor = tiny_model_and_predictor
    budgets = [184, 200]
    report = run_kv_bench(
        model,
        "chain_sum_short",
        budgets,
        ["full", "window", "h2o", "learned"],
        n=3,
        predictor=predictor,
        json_path=str(tmp_path / "kv.json"),
        plot_path=str(tmp_path / "kv.png"),
        batch_size=2,
        max_new_tokens=40,
        probe_n=2,
        probe_filler=120,
        window=4,
        ratio=0.25,
        rescore=0.5,  # the engine then tracks attention for the learned rows too
    )
    saved = json.loads((tmp_path / "kv.json").read_text())
    assert (saved["learned_window"], saved["learned_ratio"], saved["learned_rescore"]) == (4, 0.25, 0.5)
    cost = saved["learned_cost"]  # the predictor's and eviction's share of a decode step, batch 1 and 8
    assert [c["batch"] for c in cost] == [1, 8]
    for c in cost:
        assert c["steps"] > 0 and c["step_ms"] > 0
        assert 0 < c["predictor_frac"] < 1 and 0 < c["eviction_frac"] < 1
        assert c["overhead_frac"] == pytest.approx(c["predictor_frac"] + c["eviction_frac"], abs=2e-4)
    assert saved == json.loads(json.dumps(report))
    rows = saved["rows"]
    assert [(r["policy"], r["budget"]) for r in rows] == [
        (p, b) for p in ("full", "window", "h2o", "learned") for b in budgets
    ]
    for r in rows:
        assert set(r) >= {"policy", "budget", "accuracy", "peak_kv_bytes", "decode_tok_s", "probe_accuracy"}
        assert 0 <= r["accuracy"] <= 1 and r["decode_tok_s"] > 0
        if r["policy"] != "full":
            assert r["peak_kv_tokens"] <= r["budget"] + 1
    full = rows[0]
    assert full["peak_kv_tokens"] > 200  # traces are longer than the budgets: eviction really ran
    assert (tmp_path / "kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_kv_evict_prompt_runs_budgets_below_the_prompt(tiny_model_and_predictor):
    """A budget the prompt does not fit under: skipped when the prompt is kept (DynTS), run and held
    with --evict-prompt, and the report says which."""
    model, predictor = tiny_model_and_predictor
    common = dict(n=2, predictor=predictor, batch_size=2, max_new_tokens=24, probe_n=0, window=4)
    kept = run_kv_bench(model, "chain_sum_short", [96], ["learned"], **common)
    assert kept["learned_evict_prompt"] == {"learned": False} and "never evicted" in kept["rows"][0]["skipped"]
    evicting = run_kv_bench(model, "chain_sum_short", [96], ["learned"], evict_prompt=True, **common)
    (row,) = evicting["rows"]
    assert evicting["learned_evict_prompt"] == {"learned": True} and "skipped" not in row
    assert row["peak_kv_tokens"] > 96  # the prompt was written whole, then trimmed
    assert row["generated_tokens"] > 0


def test_bench_kv_refuses_learned_without_a_predictor(tiny_model_and_predictor):
    model, _ = tiny_model_and_predictor
    with pytest.raises(MemlmError, match="needs --predictor"):
        run_kv_bench(model, "chain_sum_short", [64], ["learned"], n=1)
    with pytest.raises(MemlmError, match="--split must be val or test"):
        run_kv_bench(model, "chain_sum_short", [64], ["window"], n=1, split="train")
    with pytest.raises(MemlmError, match="unknown KV policy 'lru'"):
        run_kv_bench(model, "chain_sum_short", [64], ["lru"], n=1)
    predictor = tiny_model_and_predictor[1]
    with pytest.raises(MemlmError, match="ratio must be in"):
        run_kv_bench(model, "chain_sum_short", [64], ["learned"], n=1, predictor=predictor, ratio=0)
    with pytest.raises(MemlmError, match="larger than the window"):
        run_kv_bench(model, "chain_sum_short", [64], ["learned"], n=1, predictor=predictor, window=64)


def test_bench_kv_compares_predictors_side_by_side(tiny_model_and_predictor, tmp_path):
    """Several predictor folders: one learned row each, named by its label (+ ":prompt" where it may
    evict prompt tokens: a folder given as DIR:evict-prompt, never one merely trained on prompt
    tokens; or its folder where two share a name), each row under its budget, the report mapping
    names to folders."""
    model, answer = tiny_model_and_predictor
    future, scored, other = tmp_path / "future", tmp_path / "scored", tmp_path / "other"
    save_predictor(future, ImportancePredictor(64), {"base_model": model, "label": "future_decay"})
    save_predictor(scored, ImportancePredictor(64), {"base_model": model, "label": "future_decay", "prompt": True})
    save_predictor(other, ImportancePredictor(64), {"base_model": model, "label": "future_decay"})
    report = run_kv_bench(
        model,
        "chain_sum_short",
        [184],
        ["learned"],
        n=2,
        predictor=f"{answer}, {future},{scored}:evict-prompt,{other}",
        batch_size=2,
        max_new_tokens=40,
        probe_n=0,
        split="val",
    )
    assert report["split"] == "val"
    assert report["predictors"] == {
        "learned:answer": answer,
        "learned:future_decay": str(future),
        "learned:future_decay:prompt": str(scored),
        "learned:other": str(other),
    }
    assert report["learned_evict_prompt"] == {name: name.endswith(":prompt") for name in report["predictors"]}
    assert [r["policy"] for r in report["rows"]] == list(report["predictors"])
    assert all(r["peak_kv_tokens"] <= 185 for r in report["rows"])


def test_bench_kv_puts_whole_number_rows_beside_the_others(tiny_model_and_predictor):
    """--spans both: a `+spans` row beside each scored policy (h2o, tova, learned), none for the
    others; --spans on: only the span rows; --spans tova: a span row for tova only; bad modes are refused."""
    model, predictor = tiny_model_and_predictor
    report = run_kv_bench(
        model,
        "chain_sum_short",
        [184],
        ["window", "tova", "learned"],
        n=2,
        predictor=predictor,
        batch_size=2,
        max_new_tokens=40,
        probe_n=0,
        spans="both",
    )
    assert [r["policy"] for r in report["rows"]] == ["window", "tova", "tova+spans", "learned", "learned+spans"]
    assert report["spans"] == "both"
    assert all(r["peak_kv_tokens"] <= 185 for r in report["rows"])
    kw = {"n": 1, "predictor": predictor, "max_new_tokens": 8, "probe_n": 0}
    report = run_kv_bench(model, "chain_sum_short", [184], ["h2o", "learned"], spans="on", **kw)
    assert [r["policy"] for r in report["rows"]] == ["h2o+spans", "learned+spans"]
    report = run_kv_bench(model, "chain_sum_short", [184], ["h2o", "tova", "learned"], spans="tova", **kw)
    assert [r["policy"] for r in report["rows"]] == ["h2o", "tova", "tova+spans", "learned"]
    lines = {"spans": "learned", "span_unit": "lines"}
    report = run_kv_bench(model, "chain_sum_short", [184], ["tova", "learned"], **lines, **kw)
    assert [r["policy"] for r in report["rows"]] == ["tova", "learned", "learned+lines"]
    assert report["span_unit"] == "lines"
    for bad in ("yes", "tova,sinks"):
        with pytest.raises(MemlmError, match="--spans must be one of"):
            run_kv_bench(model, "chain_sum_short", [184], ["h2o"], spans=bad, **kw)
    with pytest.raises(MemlmError, match="--span-unit must be one of numbers, lines"):
        run_kv_bench(model, "chain_sum_short", [184], ["h2o"], spans="on", span_unit="words", **kw)


def test_bench_kv_oracle_snapkv_rkv_and_threshold_rows(tiny_model_and_predictor, tmp_path):
    """A task that knows its answers' key lines gets an oracle row; snapkv and rkv rows beside it;
    the learned policy in threshold mode; every row under its budget, the report naming tau."""
    model, predictor = tiny_model_and_predictor
    report = run_kv_bench(
        model,
        "pair_search",
        [140],
        ["full", "oracle", "snapkv", "rkv", "learned"],
        n=2,
        predictor=predictor,
        batch_size=2,
        max_new_tokens=60,
        probe_n=1,
        probe_filler=40,
        threshold=0.5,
        split="val",
    )
    assert report["learned_threshold"] == 0.5
    rows = {r["policy"]: r for r in report["rows"]}
    assert set(rows) == {"full", "oracle", "snapkv", "rkv", "learned"}
    assert rows["full"]["peak_kv_tokens"] > 140  # eviction really ran
    for name in ("oracle", "snapkv", "rkv", "learned"):
        assert "skipped" not in rows[name] and rows[name]["peak_kv_tokens"] <= 141
    assert rows["oracle"]["probe_accuracy"] is None  # the probe has no key lines to give an oracle
    with pytest.raises(MemlmError, match="oracle policy needs a task"):
        run_kv_bench(model, "chain_sum_short", [64], ["oracle"], n=1)


def test_runs_split_by_policy_merge_into_one_report_of_the_same_problems(tmp_path):
    from memlm.bench.kv_merge import main, merge_reports

    base = {"model": "m", "task": "pair_search", "n": 64, "split": "test", "dtype": "q4_1", "max_new_tokens": 560,
            "probe_n": 0, "learned_ratio": None, "learned_cost": None, "mean_full_trace_tokens": None}  # fmt: skip
    row = {"probe_accuracy": None, "peak_kv_bytes": 1024, "decode_tok_s": 10.0}
    a = base | {"mean_full_trace_tokens": 540.0, "rows": [{"policy": "full", "budget": 108, "accuracy": 1.0} | row]}
    b = base | {"learned_ratio": 0.5, "learned_cost": [{"batch": 1}], "rows": [
        {"policy": "tova", "budget": 108, "accuracy": 0.25} | row, {"policy": "learned:answer", "budget": 108,
        "accuracy": 0.5} | row]}  # fmt: skip
    merged = merge_reports([a, b])
    assert [r["policy"] for r in merged["rows"]] == ["full", "tova", "learned:answer"]
    assert merged["learned_ratio"] == 0.5 and merged["learned_cost"] == [{"batch": 1}]
    assert merged["mean_full_trace_tokens"] == 540.0
    assert [run["policies"] for run in merged["runs"]] == [["full"], ["tova", "learned:answer"]]
    assert [run["learned_cost"] for run in merged["runs"]] == [None, [{"batch": 1}]]
    with pytest.raises(ValueError, match="n"):
        merge_reports([a, b | {"n": 32}])
    with pytest.raises(ValueError, match="more than one run"):
        merge_reports([a, a])
    paths = []
    for name, report in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    main([*paths, "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == merged["rows"]
    main([paths[0], paths[1] + ":learned:answer", "--json", str(tmp_path / "m.json")])  # only that policy of b
    assert [r["policy"] for r in json.loads((tmp_path / "m.json").read_text())["rows"]] == ["full", "learned:answer"]
    with pytest.raises(SystemExit, match="has no 'h2o' rows"):
        main([paths[0], paths[1] + ":h2o", "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="error: the runs differ"):
        (tmp_path / "c.json").write_text(json.dumps(b | {"task": "long_mult"}))
        main([paths[0], str(tmp_path / "c.json"), "--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_kv_cost_measures_each_span_unit_at_each_batch_without_accuracy_cells(tiny_model_and_predictor, tmp_path):
    from memlm.bench.kv_cost import main, measure

    model, predictor = tiny_model_and_predictor
    report = measure(model, "chain_sum_short", predictor, 184, ["tokens", "lines"], n=2, batches=(1, 2),
                     max_new_tokens=60)  # fmt: skip
    assert list(report["cost"]) == ["tokens", "lines"]
    for cells in report["cost"].values():
        assert [c["batch"] for c in cells] == [1, 2]
        for c in cells:
            assert c["steps"] > 0 and 0 < c["predictor_frac"] < 1 and 0 <= c["eviction_frac"] < 1
            assert c["overhead_frac"] == pytest.approx(c["predictor_frac"] + c["eviction_frac"], abs=1e-3)
    with pytest.raises(SystemExit, match="--units are tokens, numbers, lines"):
        main(["--model", model, "--task", "chain_sum_short", "--predictor", predictor, "--budget", "184",
              "--units", "words", "--json", str(tmp_path / "c.json")])  # fmt: skip
    assert not (tmp_path / "c.json").exists()
