"""Benchmarks, all in one place: the `memlm bench ...` / `memlm eval lcm` commands (decode, kv,
memgen, moe, prune, serve, lcm) and the scripts run as `python -m memlm.bench.<name>` (memgen_lines,
memgen_speed, memgen_sweep, memgen_tokens, memgen_train_speed, serve_load, structured_choice).
Each ends the same way, through `memlm.bench.report`: a table, the JSON and a figure, written
atomically. Their results and notes are in bench/ (README.md, NOTEBOOK.md, results/)."""

from __future__ import annotations


def __getattr__(name):  # lazy: importing memlm.bench does not pull in torch
    if name == "run_decode_bench":
        from memlm.bench.decode import run_decode_bench

        return run_decode_bench
    raise AttributeError(name)
