"""The committed LCM model (bench/models/lcm-wiki, see bench/README.md) end to end on real text."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from memlm.data.corpus import DEFAULT_CORPUS, read_corpus
from memlm.data.packed import TokenData, pack
from memlm.train.heldout import bits_per_byte, lcm_logits

MODEL = Path(__file__).resolve().parent.parent / "bench" / "models" / "lcm-wiki"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The held-out split the model never trained on: the same documents, tokenizer and seed as its data."""
    docs, files = read_corpus(list(DEFAULT_CORPUS))
    out = tmp_path_factory.mktemp("lcm-data")
    pack(MODEL, docs, files, out, val_fraction=0.05, seed=0)
    return TokenData.open(out, "train"), TokenData.open(out, "val")


def unigram_bits_per_byte(train: TokenData, val: TokenData) -> float:
    """What a model that knows only token frequencies would score: the bar any language model must clear."""
    counts = np.bincount(np.asarray(train.tokens), minlength=train.header["vocab_size"]) + 1
    logp = np.log(counts / counts.sum())
    ids = np.asarray(val.tokens)
    return float(-logp[ids].sum() / math.log(2) / (len(ids) * val.bytes_per_token))


def test_the_committed_lcm_models_held_out_text(heldout):
    from memlm.lcm.checkpoint import load_lcm

    train, val = heldout
    model = load_lcm(MODEL)
    bpb = bits_per_byte(lcm_logits(model), val, 256, max_windows=8)
    assert bpb < 0.95 * unigram_bits_per_byte(train, val)  # measured: 2.58 against 2.83


def test_incremental_decoding_of_real_text_equals_the_parallel_pass(heldout):
    from memlm.lcm.checkpoint import load_lcm

    _, val = heldout
    model = load_lcm(MODEL, reencode_period=0)
    ids = val.windows([0], 48)
    with torch.no_grad():
        full = model(ids)[0]
        state = model.new_state(1)
        steps = [model.logits(model.forward_tokens(ids[:, t : t + 1], torch.tensor([[t]]), state)) for t in range(48)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-3, rtol=0)


def test_generate_shows_the_memory_of_each_token(memlm_cli):
    result = subprocess.run(
        [*memlm_cli, "generate", "The history of", "--model", str(MODEL), "--max-new-tokens", "6", "--show-memory"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["token", "steps", "distance"] and len(lines) == 8
    assert lines[-1] == "finish_reason: length"
