"""LCM training stages, the transformer baseline, `memlm eval lcm`, safety planting and CLI errors.

Tiny models on a tiny packed corpus: each training runs a few steps (seconds)."""

from __future__ import annotations

import json
import pickle
import subprocess
from dataclasses import replace

import pytest
import torch

from memlm.data.bpe import train_tokenizer
from memlm.data.corpus import read_documents
from memlm.data.packed import pack
from memlm.errors import MemlmError
from memlm.lcm.checkpoint import load_lcm
from memlm.train.lcm import LCMTrainConfig, run_lcm_stage

SHAPE = dict(hidden_size=32, num_heads=2, encoder_layers=1, decoder_layers=2, z_dim=16, codes=8)
SHORT = dict(batch_size=4, seq_len=32, save_every=2, log_every=1, eval_windows=2, restart_every=2, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    docs = read_documents("gensim:lee")[:80]
    train_tokenizer(docs, 320, root / "tok")
    pack(root / "tok", docs, ["gensim:lee"], root / "data", val_fraction=0.1)
    return root / "data"


@pytest.fixture(scope="module")
def stages(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    reports = {}
    init = None
    for stage, steps in ((1, 4), (2, 4), (3, 2)):
        cfg = LCMTrainConfig.of(
            str(data), str(root / f"s{stage}"), stage, init=init, steps=steps, intermediate_size=48, **SHAPE, **SHORT
        )
        reports[stage] = run_lcm_stage(cfg)
        init = str(root / f"s{stage}" / "model")
    return root, reports


def _state(folder, prefix):
    return {k: v.clone() for k, v in load_lcm(folder).state_dict().items() if k.startswith(prefix)}


def test_three_stages_train_what_each_stage_should(stages):
    root, reports = stages
    assert [reports[s]["total_steps"] for s in (1, 2, 3)] == [4, 8, 10]  # stage 2 continues the data order
    s1, s2, s3 = (root / f"s{s}" / "model" for s in (1, 2, 3))
    decoder = [_state(f, "decoder.") for f in (s1, s2, s3)]
    encoder = [_state(f, "encoder.") for f in (s1, s2, s3)]
    assert all(torch.equal(decoder[0][k], decoder[1][k]) for k in decoder[0])  # stage 2: decoder frozen
    assert any(not torch.equal(decoder[1][k], decoder[2][k]) for k in decoder[1])  # stage 3: it learns
    assert any(not torch.equal(encoder[0][k], encoder[1][k]) for k in encoder[0])  # stage 2 trains the encoder
    rows = [json.loads(line) for line in (root / "s2" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "vq", "contrastive", "orthogonality", "spread", "loop_steps", "route_entropy"} <= set(rows[0])
    assert {"val_bpb", "dead_codes_restarted"} <= set(rows[-1])
    assert 0 < rows[-1]["val_bpb"] < 20 and 1 <= rows[-1]["loop_steps"] <= 3


def test_the_loop_is_calibrated_so_that_it_stops(stages):
    """After stages 2 and 3 the convergence threshold is set from held-out text so that half the
    tokens stop after one step; the model is saved with it and the report says what the loop did."""
    root, reports = stages
    for stage in (2, 3):
        memory = reports[stage]["memory"]
        threshold = memory["converge_threshold"]
        assert load_lcm(root / f"s{stage}" / "model").config.converge_threshold == pytest.approx(threshold)
        steps = memory["loop_steps"]
        total = sum(steps.values())
        assert 0.3 <= steps["1"] / total <= 0.7 and steps["1"] < total  # it fires, and not for all
        assert set(memory["code_usage"]) == {"hyperbolic", "sparse", "lowrank", "manifold", "binding", "contrastive"}
        assert memory["val_bpb"] > 0 and memory["val_bpb_loop_to_limit"] > 0


def test_stage_1_leaves_the_memory_untouched(stages, data):
    root, _ = stages
    fresh = _state(root / "s1" / "model", "memory.")
    torch.manual_seed(0)  # the trainer seeds its initialisation with cfg.seed = 0
    from memlm.lcm.config import LCMConfig
    from memlm.lcm.model import LCMModel

    header = json.loads((data / "train.json").read_text())
    init = LCMModel(
        LCMConfig(vocab_size=header["vocab_size"], intermediate_size=48, eos_token_ids=(header["eos_id"],), **SHAPE)
    )
    assert all(torch.equal(init.state_dict()[k], fresh[k]) for k in fresh)


def test_a_trained_lcm_generates_through_the_engine(stages):
    import memlm

    root, _ = stages
    engine = memlm.load(str(root / "s3" / "model"))
    out = engine.generate("The fire", memlm.SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and len(out.memory_trace) == 5


@pytest.mark.parametrize("memory", ["continuous", "single"])
def test_retrained_variants_share_the_stage_1_decoder(stages, data, tmp_path, memory):
    root, _ = stages
    cfg = LCMTrainConfig.of(
        str(data), str(tmp_path / memory), 2, init=str(root / "s1" / "model"), steps=3, memory=memory, **SHORT
    )
    report = run_lcm_stage(cfg)  # restarts are due at step 2: a memory without grids must go past them
    variant = load_lcm(tmp_path / memory / "model")
    assert variant.config.memory == memory and report["total_steps"] == 7
    decoder = _state(root / "s1" / "model", "decoder.")
    assert all(torch.equal(decoder[k], variant.state_dict()[k]) for k in decoder)


def test_an_moe_decoder_trains_with_the_balancing_loss_and_generates(data, tmp_path):
    import json

    import memlm
    from memlm.models.moe import MoEBlock

    out = tmp_path / "moe"
    cfg = LCMTrainConfig.of(str(data), str(out), 1, steps=3, intermediate_size=24, decoder_experts=4,
                         decoder_experts_per_token=2, **SHAPE, **SHORT)
    run_lcm_stage(cfg)
    logged = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    balance = [row["expert_balance"] for row in logged if "expert_balance" in row]
    assert balance and all(b >= 0.99 for b in balance)  # 1 is an even load; the loss is k times this
    engine = memlm.load(str(out / "model"))
    assert sum(isinstance(m, MoEBlock) for m in engine.model.decoder.modules()) == 2
    assert engine.model.config.decoder_experts == 4
    generated = engine.generate("The fire", memlm.SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(generated.token_ids) == 4


def test_stage_2_needs_a_stage_1_model(data, tmp_path):
    with pytest.raises(MemlmError, match="needs --init"):
        run_lcm_stage(LCMTrainConfig.of(str(data), str(tmp_path / "x"), 2, **SHORT))
    alone = LCMTrainConfig.of(
        str(data), str(tmp_path / "dec"), 1, steps=1, memory="none", intermediate_size=48, **SHAPE, **SHORT
    )
    run_lcm_stage(alone)
    with pytest.raises(MemlmError, match="decoder-only"):
        run_lcm_stage(
            LCMTrainConfig.of(str(data), str(tmp_path / "y"), 2, init=str(tmp_path / "dec" / "model"), **SHORT)
        )


class _Exploit:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('/tmp/memlm-pwned').write_text('x')",))


def test_resume_refuses_a_checkpoint_that_would_run_code(data, tmp_path):
    out = tmp_path / "run"
    (out / "train").mkdir(parents=True)
    (out / "train" / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1, "model": _Exploit()}))
    cfg = LCMTrainConfig.of(str(data), str(out), 1, steps=2, resume=True, intermediate_size=48, **SHAPE, **SHORT)
    with pytest.raises(MemlmError, match="cannot read"):
        run_lcm_stage(cfg)
    from pathlib import Path

    assert not Path("/tmp/memlm-pwned").exists()


def test_transformer_baseline_and_eval_lcm_end_to_end(stages, data, tmp_path, memlm_cli):
    from memlm.formats.loading import load_model
    from memlm.train.pretrain import LMTrainConfig, run_pretrain

    root, _ = stages
    lm = LMTrainConfig.of(
        str(data),
        str(tmp_path / "lm"),
        steps=2,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=48,
        batch_size=4,
        seq_len=32,
        save_every=2,
        progress=False,
        eval_windows=2,
    )
    report = run_pretrain(lm)
    assert report["total_steps"] == 2 and load_model(str(tmp_path / "lm" / "model")).model.config.num_layers == 2
    args = [
        "eval",
        "lcm",
        "--model",
        str(root / "s3" / "model"),
        "--model",
        str(root / "s2" / "model"),
        "--transformer",
        str(tmp_path / "lm" / "model"),
        "--variant",
        f"stage1={root / 's1' / 'model'}",
        "--data",
        str(data),
        "--windows",
        "2",
        "--seq-len",
        "32",
        "--stream-len",
        "40",
        "--contexts",
        "32,64",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    ]
    result = subprocess.run([*memlm_cli, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["main"]["lcm"]["per_seed"]) == 2 and r["main"]["lcm"]["std"] >= 0
    assert {
        "full",
        "z_zeroed",
        "z_shuffled",
        "loop_steps_1",
        *(f"without_{g}" for g in ("hyperbolic", "sparse", "lowrank", "manifold", "binding", "contrastive")),
    } <= set(r["ablations"])
    assert set(r["reencode"]["bfloat16"]) == {"never", "256", "64"}
    assert r["reencode"]["float32"]["never"]["max_logit_drift"] < 1e-3
    cost = r["decode_cost"]
    assert len(cost["lcm_ms"]) == 2 and cost["lcm_bytes"][0] == cost["lcm_bytes"][1]  # constant state
    assert cost["transformer_bytes"][1] == 2 * cost["transformer_bytes"][0]  # the KV cache grows
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_eval_lcm_reach_end_to_end(data, tmp_path, memlm_cli):
    """Bounded models (W = 48) trained a few steps; `memlm eval lcm-reach` scores them by position and
    on the retrieval probe. Checked against what must hold whatever the training: the bounded decoder
    alone and the same weights unbounded agree before the first cut and differ after it; the bounded
    decoder alone carries exactly nothing from the far fact, while the LCM's encoder reads it."""
    from memlm.lcm.checkpoint import save_lcm

    train = dict(SHORT, seq_len=64, eval_windows=1)

    def stage(name, stage, **options):
        run_lcm_stage(LCMTrainConfig.of(str(data), str(tmp_path / name), stage, **train, **options))
        return tmp_path / name / "model"

    stage1 = stage("s1", 1, steps=2, intermediate_size=48, decoder_window=48, **SHAPE)
    lcm = stage("s2", 2, steps=2, init=str(stage1))
    decoder = stage("dec", 1, steps=2, intermediate_size=48, decoder_window=48, memory="none", **SHAPE)
    twin = load_lcm(decoder)  # the bounded decoder's weights, uncut
    twin.config = replace(twin.config, decoder_window=0)
    save_lcm(tmp_path / "unbounded", twin, str(data), {"total_steps": 2})
    args = ["eval", "lcm-reach", "--data", str(data), "--lcm", str(lcm), "--decoder", str(decoder)]
    args += ["--unbounded", str(tmp_path / "unbounded"), "--windows", "2", "--seq-len", "256", "--probes", "4"]
    args += ["--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    result = subprocess.run([*memlm_cli, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["setup"]["buckets"] == ["0-48", "48-192", "192-256", "cut+0-8", "cut+8-48"]
    cut, uncut = (r["models"][k]["runs"][0]["bpb"] for k in ("decoder", "unbounded"))
    assert cut[0] == pytest.approx(uncut[0], abs=1e-6) and cut[2] != pytest.approx(uncut[2], abs=1e-4)
    assert r["models"]["decoder"]["runs"][0]["probe"]["far"]["carried_bits"] == pytest.approx(0, abs=1e-5)
    lcm_run = r["models"]["lcm"]["runs"][0]
    assert lcm_run["probe"]["far"]["carried_bits"] != pytest.approx(0, abs=1e-7)
    assert lcm_run["bpb_z_zero"] != lcm_run["bpb"] and sum(lcm_run["memory"]["loop_steps"].values()) > 0
    assert {"far_gain_over_bounded_decoder", "zeroing_z_costs_far"} <= set(r["goals"])
    assert (tmp_path / "r.png").stat().st_size > 0
    wrong = subprocess.run([*memlm_cli, "eval", "lcm-reach", "--data", str(data), "--lcm", str(stage1), "--decoder",
                            str(tmp_path / "unbounded")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert wrong.returncode == 2 and "decoder_window 48" in wrong.stderr and "Traceback" not in wrong.stderr


def test_stage_3_ships_the_default_safety_grids_and_they_halt_what_was_planted(stages):
    import memlm
    from memlm.lcm.default_safety import ALLOWED, DANGER, FORBIDDEN

    root, reports = stages
    planted = reports[3]["memory"]["safety"]
    assert [planted[k] for k in ("rate", "danger", "forbidden", "allowed")] == [0.01, 12, 10, 10]
    assert (len(DANGER), len(FORBIDDEN), len(ALLOWED)) == (12, 10, 10)
    safety = load_lcm(root / "s3" / "model").memory.safety
    assert safety.danger_codes.shape[0] == 12 and safety.value_anchors.shape[0] == 20
    assert bool((safety.danger_radius > 0).all())
    engine = memlm.load(str(root / "s3" / "model"))
    out = engine.generate(DANGER[0], memlm.SamplingParams(max_new_tokens=4))
    assert out.finish_reason == "halted" and out.token_ids == []  # its own z is the code: distance 0


def test_calibrated_radii_let_the_asked_share_of_ordinary_prompts_inside():
    from memlm.lcm.default_safety import calibrated_radii, closest_approach

    torch.manual_seed(0)
    ordinary, fresh = torch.randn(4000, 16, 8), torch.randn(4000, 16, 8)  # windows of 16 points
    codes = torch.randn(4, 8) * 0.5
    for rate in (0.02, 0.2):
        radii = calibrated_radii(codes, ordinary, rate)
        inside = (closest_approach(codes, fresh) <= radii[:, None]).any(0).float().mean()
        assert rate / 2 < float(inside) <= rate * 1.2  # per code rate / 4: the union is at most the rate


def test_eval_lcm_safety_end_to_end(stages, data, tmp_path, memlm_cli):
    import shutil

    root, _ = stages
    model = tmp_path / "m"
    shutil.copytree(root / "s3" / "model", model)
    args = ["eval", "lcm-safety", "--model", str(model), "--data", str(data), "--json", str(tmp_path / "s.json")]
    result = subprocess.run([*memlm_cli, *args, "--plot", str(tmp_path / "s.png")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    r = json.loads((tmp_path / "s.json").read_text())
    assert r["setup"]["prompts"] == {"harmful": 80, "borderline": 60, "benign": 80}
    sweep = r["sweep"]  # larger radii halt at least what smaller ones did
    for cls in ("harmful", "borderline", "benign"):
        assert all(a["halt"][cls] <= b["halt"][cls] for a, b in zip(sweep, sweep[1:], strict=False))
    assert all(a["heldout_false_halts"] <= b["heldout_false_halts"] for a, b in zip(sweep, sweep[1:], strict=False))
    assert 0 <= r["separation"]["auroc_harmful_vs_benign"] <= 1 and r["cost"]["ms_on"] > 0
    assert r["default"]["rate"] == 0.01 and set(r["goals"]) == {"harmful_halted", "benign_false_halts", "met"}
    none = subprocess.run([*memlm_cli, "lcm", "defaults", "--model", str(model)], capture_output=True, text=True)
    assert none.returncode == 2 and "--data is required" in none.stderr


def test_planted_danger_halts_the_cli(stages, tmp_path, memlm_cli):
    import shutil

    root, _ = stages
    model = tmp_path / "m"
    shutil.copytree(root / "s3" / "model", model)
    (tmp_path / "danger.txt").write_text("The fire spread quickly\n")
    run = lambda *a: subprocess.run([*memlm_cli, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    planted = run("lcm", "danger", "add", "--model", str(model), "--texts", str(tmp_path / "danger.txt"), "--clear")
    assert planted.returncode == 0 and json.loads(planted.stdout)["danger_codes"] == 1
    halted = run("generate", "The fire spread quickly", "--model", str(model), "--max-new-tokens", "4")
    assert halted.returncode == 0 and "halted" in halted.stderr
    shown = run("generate", "A quiet day", "--model", str(model), "--max-new-tokens", "3", "--show-memory")
    assert shown.returncode == 0 and shown.stdout.count("\n") >= 4 and "finish_reason: length" in shown.stdout
    cleared = run("lcm", "danger", "add", "--model", str(model), "--clear")
    assert json.loads(cleared.stdout)["danger_codes"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "sft", "--out", "/dev/null/x"], "cannot create output folder"),
        (["train", "lcm", "--data", "/tmp", "--out", "/dev/null/x"], "cannot create output folder"),
        (["train", "lcm", "--out", "/tmp/x"], "--data is required"),
        (["train", "lcm", "--data", "/no/data", "--out", "/tmp/memlm-test-x"], "make them with `memlm data pack`"),
        (["train", "lm", "--data", "/tmp", "--out", "/dev/null/x"], "cannot create output folder"),
        (["data", "tokenizer", "--out", "/dev/null/x"], "cannot create output folder"),
        (["data", "tokenizer", "--corpus", "/no/file.txt", "--out", "/tmp/memlm-test-t"], "corpus file not found"),
        (["data", "pack", "--out", "/tmp/memlm-test-p"], "--tokenizer is required"),
        (["lcm", "danger", "add", "--model", "/tmp", "--texts", "x"], "not an LCM model folder"),
        (["lcm", "danger", "remove", "--model", "/tmp"], "unknown action"),
        (["lcm", "value", "add", "--model", "/tmp", "--kind", "maybe"], "--kind"),
        (["eval", "lcm", "--model", "/tmp", "--data", "/tmp"], "not an LCM model folder"),
        (["eval", "lcm", "--model", "/tmp", "--data", "/tmp", "--variant", "x"], "NAME=DIR"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(memlm_cli, args, message):
    result = subprocess.run([*memlm_cli, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
