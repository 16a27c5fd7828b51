"""Benchmarks: `memlm bench decode` compares memlm's decode loop against Hugging Face transformers."""

from __future__ import annotations


def __getattr__(name):  # lazy: importing memlm.bench does not pull in torch
    if name == "run_decode_bench":
        from memlm.bench.decode import run_decode_bench

        return run_decode_bench
    raise AttributeError(name)
