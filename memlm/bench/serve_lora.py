"""`memlm bench serve --workload lora`: many LoRA adapters batched together against the base alone.

Makes `count` random-init LoRA adapters for the model (PEFT folders under runs/, B nonzero so each
changes the answers; nothing is committed), then runs the `lora` request pool (memlm.bench.serve)
twice against `memlm serve`, same clients, same prompts, every request generating exactly
`max_tokens`: once on the base model alone, once with the requests spread over the adapters (each
level's batch mixes them). Reported: both runs' rows, the throughput ratio adapters / base per
level (the goal: >= 0.8 at 16 clients), and each run's check that every greedy answer equals the
same request alone (`Engine.generate(..., adapter=...)`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from memlm.adapters.lora import ADAPTER_CONFIG, PEFT_WEIGHTS, add_lora, peft_state_dict
from memlm.atomic import atomic_write
from memlm.bench.report import print_table, write_outputs
from memlm.bench.serve import run_serve_bench
from memlm.formats.loading import load_model

ADAPTERS_HOME = Path("runs") / "bench-lora-adapters"


def make_adapters(model: str, count: int = 4, rank: int = 8, folder: Path | None = None) -> dict[str, str]:
    """`count` random PEFT adapters of rank `rank` on every projection (q, k, v, o, gate, up, down:
    PEFT's "all-linear"), each projection with its own A as PEFT trains them; made once per (model,
    rank) under runs/ and reused. -> {name: folder}"""
    root = folder or ADAPTERS_HOME / f"{Path(model).name}-r{rank}"
    out = {}
    for i in range(count):
        name, where = f"lora{i}", root / f"lora{i}"
        if not (where / ADAPTER_CONFIG).is_file():
            _write_random_adapter(model, where, rank, seed=1000 + i)
        out[name] = str(where)
    return out


def _write_random_adapter(model: str, where: Path, rank: int, seed: int) -> None:
    """A as PEFT initialises it (kaiming-uniform-like scale), B nonzero (a trained adapter's is)."""
    base = load_model(model, "float32").model
    add_lora(base, rank=rank, alpha=2.0 * rank)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in peft_state_dict(base).items():
        scale = value.shape[1] ** -0.5 if "lora_A" in key else 0.02
        tensors[key] = (torch.randn(value.shape, generator=generator) * scale).to(torch.bfloat16).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model, "r": rank,
        "lora_alpha": 2.0 * rank, "target_modules": sorted({key.split(".")[-3] for key in tensors}),
        "lora_dropout": 0.0, "bias": "none", "memlm": {"note": "random init, for memlm bench serve"},
    }  # fmt: skip
    where.mkdir(parents=True, exist_ok=True)
    atomic_write(where / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(where / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def run_lora_bench(
    model: str,
    clients: tuple[int, ...] = (16,),
    max_tokens: int = 32,
    threads: int = 2,
    dtype: str = "float32",
    json_path: str | None = None,
    seconds: float = 60.0,
    server_args: tuple[str, ...] = (),
    count: int = 4,
    rank: int = 8,
) -> dict:
    console = Console(width=150)
    adapters = make_adapters(model, count, rank)
    options = dict(max_tokens=max_tokens, threads=threads, dtype=dtype, seconds=seconds, workload="lora",
                   server_args=server_args, sequential=False)
    console.print(f"[bold]base model alone[/] ({model}, {dtype})")
    base = run_serve_bench(model, clients, **options)
    console.print(f"[bold]{count} adapters of rank {rank}, batched together[/]")
    lora = run_serve_bench(model, clients, adapters=adapters, **options)
    ratios = {
        str(b["clients"]): round(a["tokens_per_s"] / b["tokens_per_s"], 3)
        for b, a in zip(base["rows"], lora["rows"], strict=True)
    }
    result = {
        "benchmark": "serve-lora",
        "model": model,
        "dtype": dtype,
        "threads": threads,
        "max_tokens": max_tokens,
        "seconds_per_level": seconds,
        "adapters": {"count": count, "rank": rank, "targets": "q, k, v, o, gate, up, down", "init": "random"},
        "throughput_ratio_adapters_over_base": ratios,
        "base": base,
        "lora": lora,
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [[clients, f"{b['tokens_per_s']:.1f}", f"{a['tokens_per_s']:.1f}", f"{ratios[str(clients)]:.2f}x"]
            for clients, b, a in zip(ratios, base["rows"], lora["rows"], strict=True)]
    print_table(console, f"memlm serve: {count} LoRA adapters (rank {rank}) batched vs the base alone, {dtype}",
                ("clients", "base tok/s", "adapters tok/s", "ratio"), rows)
    write_outputs(result, console, json_path)
    return result
