"""The shared training loop: it learns, schedules, checkpoints atomically, resumes, and runs under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlm.errors import MemlmError
from memlm.train.loop import CHECKPOINT, CURVE, METRICS, TrainConfig, lr_at

SCRIPT = str(Path(__file__).with_name("train_tiny.py"))


def _run(out, steps, accum=1, mode="fresh", torchrun=0, expect=0):
    launcher = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={torchrun}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
        ]
    cmd = [*launcher, SCRIPT, str(out), str(steps), str(accum), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == expect, result.stderr[-3000:]
    return torch.load(Path(out) / CHECKPOINT, weights_only=False)


def _params(state):
    return state["model"]


def test_loss_goes_down_and_outputs_are_written(tmp_path):
    state = _run(tmp_path, 30)
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 31, 2))
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    assert (tmp_path / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert state["step"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, METRICS, CURVE])  # no temp files


def test_resume_continues_exactly(tmp_path):
    straight = _params(_run(tmp_path / "a", 9))
    crashed = _run(tmp_path / "b", 9, mode="crash-at-7", expect=3)  # dies after the checkpoint at step 6
    assert crashed["step"] == 6
    resumed = _params(_run(tmp_path / "b", 9, mode="resume"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    full = _params(_run(tmp_path / "full", 6))
    accumulated = _params(_run(tmp_path / "accum", 6, accum=2))
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = _params(_run(tmp_path / "single", 6))
    ddp = _params(_run(tmp_path / "ddp", 6, torchrun=2))
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6)


def test_schedule_and_bad_configs(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    with pytest.raises(MemlmError):
        TrainConfig(out_dir=str(tmp_path), steps=0)
    from memlm.train import train

    with pytest.raises(MemlmError, match="no checkpoint"):
        train(
            torch.nn.Linear(2, 1),
            lambda m, b: m(b).sum(),
            lambda *a: torch.ones(1, 2),
            TrainConfig(out_dir=str(tmp_path / "none"), steps=1, resume=True, progress=False),
        )


def test_extra_metrics_are_averaged_over_the_log_window_beside_the_loss(tmp_path):
    from memlm.train import train

    torch.manual_seed(0)
    seen = []

    def loss_fn(model, batch):
        loss = model(batch).pow(2).mean()
        seen.append(loss.item())
        return loss, {"twice": 2 * loss.item(), "step_parity": len(seen) % 2}

    cfg = TrainConfig(out_dir=str(tmp_path), steps=6, lr=0.1, grad_accum=2, log_every=3, progress=False)
    last = train(torch.nn.Linear(2, 1), loss_fn, lambda *a: torch.randn(4, 2), cfg)
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[-1] == last
    for r in rows:
        assert r["twice"] == pytest.approx(2 * r["loss"]) and r["step_parity"] == pytest.approx(0.5)
    assert rows[0]["loss"] == pytest.approx(sum(seen[:6]) / 6)


def test_bf16_autocast_follows_the_hardware_and_the_config(tmp_path):
    """By default the loop trains under bf16 autocast exactly where bf16 matmuls are native (this
    CPU's AVX512-BF16 or AMX, a bf16 CUDA GPU); `bf16=` overrides it either way."""
    from memlm.train import train
    from memlm.train.loop import native_bf16

    def run(bf16):
        seen = []

        def loss_fn(m, batch):
            seen.append(torch.is_autocast_enabled("cpu"))
            return m(batch).pow(2).mean()

        cfg = TrainConfig(out_dir=str(tmp_path / str(bf16)), steps=2, lr=0.1, bf16=bf16, progress=False)
        train(torch.nn.Linear(2, 1), loss_fn, lambda *a: torch.randn(4, 2), cfg)
        return set(seen)

    assert run(None) == {native_bf16(torch.device("cpu"))}
    assert run(True) == {True} and run(False) == {False}
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" in flags or "amx_tile" in flags:
        assert native_bf16(torch.device("cpu"))
