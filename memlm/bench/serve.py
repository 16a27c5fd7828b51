"""`memlm bench serve`: concurrent streaming clients against `memlm serve`, over loopback only.

One server process (the engine thread with continuous batching) and, in this process, N client
threads, each with the official `openai` client, streaming chat completions. The requests are a
fixed, varied pool cycled to N: greedy and seeded-sampled, plain, with a KV budget (window), and
with a latent memory when one is given. Each level N in `--clients` runs N clients at once; the
baseline sends the pool's requests one at a time to the same server.

Reported per level: aggregate generated tokens/s (usage tokens over the level's wall time), the
speed-up over the one-at-a-time rate, p50/p99 time to first token and end-to-end latency. Then the
check that nothing was lost, duplicated or crossed: every request got exactly one answer, with one
finish chunk, and every greedy answer equals `Engine.generate` for the same request alone (run in
this process after the server stops, so the two never share the CPU). Bounded: requests are
counted, each has a timeout, and the server stops by itself at the end.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

import memlm
from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.cache.policies import make_policy
from memlm.generation.params import SamplingParams
from memlm.latent.memory import LatentMemory
from memlm.serve.launch import ServerProcess

QUESTIONS = [
    "What is the capital of France, and what is it famous for?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 + 25? Answer briefly.",
    "Give a short definition of photosynthesis.",
    "Name four planets of the solar system.",
    "Suggest a name for a small bakery.",
]
VARIANTS = [  # (label, extra body fields): mixed parameters and memory options
    ("greedy", {"temperature": 0}),
    ("window-64", {"temperature": 0, "kv_policy": "window", "kv_budget": 64}),
    ("sampled", {"temperature": 0.8, "top_p": 0.95, "seed": 1234}),
    ("sinks-48", {"temperature": 0, "kv_policy": "sinks", "kv_budget": 48}),
]


SERVED = "bench-model"
# The `prefix` workload's shared system prompt: ~1,000 tokens (SmolLM2's tokenizer) of a document the
# questions are asked beside, as a help desk's or an agent's long instructions are.
SYSTEM_PROMPT = (
    "You are a helpful assistant. The user may ask about anything; the document below is background "
    "you may use.\n\n" + Path(__file__).with_name("sample.txt").read_text()[:3900]
)


@dataclass
class Spec:
    key: int
    question: str
    label: str
    extra: dict
    system: str | None = None
    adapter: str | None = None  # a LoRA adapter's name (the request's `model`), or the base model

    @property
    def model(self) -> str:
        return self.adapter or SERVED

    @property
    def greedy(self) -> bool:
        return self.extra.get("temperature", 1.0) == 0

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.question}]


@dataclass
class Outcome:
    spec: Spec
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    finishes: int = 0
    ids: set = field(default_factory=set)
    error: str | None = None


def request_pool(memory: str | None, workload: str = "mixed", adapters: list[str] | None = None,
                 max_tokens: int = 64) -> list[Spec]:
    """`mixed`: the questions crossed with the variants (half of the combinations: 16, or 20 with a
    memory). `plain`: each question once, greedy, no memory options -- what batching alone does.
    `prefix`: as plain, each after the same ~1,000-token system prompt (what prefix caching serves).
    `lora`: 16 greedy requests (each question twice), request k on adapter k mod len(adapters) (all on
    the base without adapters), each generating exactly max_tokens (min_tokens): equal work either way."""
    if workload == "lora":
        return [
            Spec(k, QUESTIONS[k % len(QUESTIONS)], "greedy", {"temperature": 0, "min_tokens": max_tokens},
                 adapter=adapters[k % len(adapters)] if adapters else None)
            for k in range(2 * len(QUESTIONS))
        ]
    if workload in ("plain", "prefix"):
        system = SYSTEM_PROMPT if workload == "prefix" else None
        return [Spec(i, question, "greedy", {"temperature": 0}, system) for i, question in enumerate(QUESTIONS)]
    variants = list(VARIANTS) + ([("memory", {"temperature": 0, "memory": memory})] if memory else [])
    pool = []
    for i, question in enumerate(QUESTIONS):
        for j, (label, extra) in enumerate(variants):
            if (i + j) % 2 == 0:
                pool.append(Spec(len(pool), question, label, extra))
    return pool


def _one(client, spec: Spec, max_tokens: int) -> Outcome:
    out, start = Outcome(spec), time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=spec.model, messages=spec.messages(), max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}, extra_body=_extra(spec), **_standard(spec),
        )
        pieces = []
        for chunk in stream:
            out.ids.add(chunk.id)
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - start
                    pieces.append(choice.delta.content)
                out.finishes += choice.finish_reason is not None
        out.text = "".join(pieces)
    except Exception as e:  # noqa: BLE001  (a lost response is a result, not a crash)
        out.error = f"{type(e).__name__}: {e}"
    out.latency = time.perf_counter() - start
    return out


def _standard(spec: Spec) -> dict:
    return {k: v for k, v in spec.extra.items() if k in ("temperature", "top_p", "seed")}


def _extra(spec: Spec) -> dict:
    return {k: v for k, v in spec.extra.items() if k not in ("temperature", "top_p", "seed")}


def _client(url: str):
    from openai import OpenAI  # lazy: a test and benchmark extra, not a memlm dependency

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


def run_level(url: str, n: int, pool: list[Spec], max_tokens: int, seconds: float) -> tuple[list[Outcome], float]:
    """n clients start together; client c sends pool[c], pool[c + n], pool[c + 2n], ... back to back
    and starts no new request once `seconds` have passed (a closed loop of fixed duration, so the
    batch stays full while the level runs). -> outcomes, wall seconds until the last answer."""
    outcomes: list[list[Outcome]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def worker(c: int):
        client = _client(url)
        barrier.wait()
        deadline, k = time.perf_counter() + seconds, 0
        while time.perf_counter() < deadline:
            outcomes[c].append(_one(client, pool[(c + k * n) % len(pool)], max_tokens))
            k += 1

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=seconds + 900)
    return [o for mine in outcomes for o in mine], time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o is not None and o.error is None]
    ttfts = sorted(o.ttft for o in ok if o.ttft is not None)
    latencies = sorted(o.latency for o in ok)
    tokens = sum(o.tokens for o in ok)
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "ttft_p50_s": round(_quantile(ttfts, 0.5), 3),
        "ttft_p99_s": round(_quantile(ttfts, 0.99), 3),
        "latency_p50_s": round(_quantile(latencies, 0.5), 3),
        "latency_p99_s": round(_quantile(latencies, 0.99), 3),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if q < 1 else values[-1]


def check_answers(levels: dict[int | str, list[Outcome]], references: dict[int, str]) -> dict:
    """Lost (no answer or an error), duplicated (more than one finish, or several ids), crossed (a greedy
    answer that differs from the same request alone)."""
    lost = duplicated = crossed = checked = 0
    examples = []
    for n, outcomes in levels.items():
        for o in outcomes:
            if o is None or o.error is not None or o.finishes == 0:
                lost += 1
                examples.append({"clients": n, "request": o.spec.key if o else None, "problem": "lost",
                                 "error": o.error if o else "no outcome"})
                continue
            if o.finishes != 1 or len(o.ids) != 1:
                duplicated += 1
            if o.spec.greedy:
                checked += 1
                if o.text != references[o.spec.key]:
                    crossed += 1
                    examples.append({"clients": n, "request": o.spec.key, "problem": "differs from alone",
                                     "got": o.text[:120], "alone": references[o.spec.key][:120]})
    return {"lost": lost, "duplicated": duplicated, "crossed_or_different": crossed, "greedy_checked": checked,
            "examples": examples[:10]}


def references_alone(model: str, dtype: str, specs: list[Spec], max_tokens: int, memory_dir: str | None,
                     threads: int, adapters: dict[str, str] | None = None) -> dict[int, str]:
    """What `Engine.generate` gives for each greedy request on its own."""
    torch.set_num_threads(threads)
    engine = memlm.load(model, dtype=dtype, adapters=adapters)
    memory = None
    if memory_dir is not None:
        memory = LatentMemory.load(memory_dir, engine)
    out = {}
    for spec in specs:
        if not spec.greedy:
            continue
        policy = make_policy(spec.extra["kv_policy"], spec.extra["kv_budget"]) if "kv_policy" in spec.extra else None
        completion = engine.generate(
            spec.messages(), SamplingParams(max_new_tokens=max_tokens, min_new_tokens=spec.extra.get("min_tokens", 0)),
            kv_policy=policy, memory=memory if "memory" in spec.extra else None, adapter=spec.adapter,
        )
        out[spec.key] = completion.text
    return out


def run_serve_bench(
    model: str,
    clients: tuple[int, ...] = (1, 4, 16, 64),
    max_tokens: int = 64,
    threads: int = 2,
    dtype: str = "float32",
    memory: str | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    seconds: float = 60.0,
    workload: str = "mixed",
    server_args: tuple[str, ...] = (),
    adapters: dict[str, str] | None = None,
    sequential: bool = True,
) -> dict:
    """`adapters`: {name: folder} the server loads (--lora) and the `lora` pool's requests use;
    `sequential`: also send the pool one request at a time first (the speed-up's baseline)."""
    console = Console(width=150)
    memory_name = "bench" if memory and workload == "mixed" else None
    pool = request_pool(memory_name, workload, sorted(adapters or {}), max_tokens)
    args = ["--model", model, "--dtype", dtype, "--threads", str(threads), "--max-batch", str(max(clients)),
            "--max-queue", str(4 * max(clients)), "--served-model-name", SERVED]
    if memory_name:
        args += ["--memory", f"{memory_name}={memory}"]
    for name, folder in sorted((adapters or {}).items()):
        args += ["--lora", f"{name}={folder}"]
    args += list(server_args)
    levels: dict[int | str, list[Outcome]] = {}
    rows = []
    with ServerProcess(*args) as server:
        warm = _client(server.url)
        _one(warm, pool[0], 8)  # first-call costs (allocation, grammar-free path) out of the numbers
        baseline = None
        if sequential:
            console.print(f"[bold]one at a time[/]: {len(pool)} requests")
            single = []
            start = time.perf_counter()
            for spec in pool:
                single.append(_one(warm, spec, max_tokens))
            baseline = summarize(single, time.perf_counter() - start)
            levels["sequential"] = single
            rows.append({"clients": "1 (sequential)", **baseline})
        for n in clients:
            console.print(f"[bold]{n} concurrent clients[/] for {seconds:.0f} s")
            outcomes, wall = run_level(server.url, n, pool, max_tokens, seconds)
            levels[n] = outcomes
            summary = summarize(outcomes, wall)
            if baseline is not None:
                summary["speedup_vs_sequential"] = round(summary["tokens_per_s"] / baseline["tokens_per_s"], 2)
            rows.append({"clients": n, **summary})
    console.print("checking every greedy answer against Engine.generate alone ...")
    references = references_alone(model, dtype, pool, max_tokens, memory if memory_name else None, threads,
                                  adapters)
    check = check_answers(levels, references)
    result = {
        "benchmark": "serve",
        "workload": workload,
        "server_args": list(server_args),
        "model": model,
        "dtype": dtype,
        "threads": threads,
        "max_tokens": max_tokens,
        "seconds_per_level": seconds,
        "request_pool": [{"key": s.key, "question": s.question, "variant": s.label, "model": s.model} for s in pool],
        "adapters": sorted(adapters or {}),
        "rows": rows,
        "check": check,
        "date": time.strftime("%Y-%m-%d"),
    }
    _print(console, result)
    write_outputs(result, console, json_path, plot_path, _plot)
    return result


def _print(console, result: dict) -> None:
    title = (f"memlm serve, {result['workload']} requests, {result['model']} ({result['dtype']}, "
             f"{result['threads']} threads), {result['max_tokens']} max tokens")
    columns = ("clients", "requests", "tokens", "tokens/s", "speed-up", "TTFT p50", "TTFT p99", "latency p50",
               "latency p99")
    cells = [[str(r["clients"]), str(r["requests"]), str(r["tokens"]), f"{r['tokens_per_s']:.1f}",
              f"{r['speedup_vs_sequential']:.2f}x" if "speedup_vs_sequential" in r else "-",
              f"{r['ttft_p50_s']:.2f} s", f"{r['ttft_p99_s']:.2f} s",
              f"{r['latency_p50_s']:.2f} s", f"{r['latency_p99_s']:.2f} s"] for r in result["rows"]]
    print_table(console, title, columns, cells)
    c = result["check"]
    console.print(f"lost {c['lost']}, duplicated {c['duplicated']}, greedy answers different from alone "
                  f"{c['crossed_or_different']} of {c['greedy_checked']}")


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    rows = [r for r in result["rows"] if isinstance(r["clients"], int)]
    n = [r["clients"] for r in rows]
    sequential = result["rows"][0]["tokens_per_s"]  # (plots are drawn for runs with the sequential row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(n, [r["tokens_per_s"] for r in rows], "o-", label="concurrent streaming clients")
    left.axhline(sequential, color="grey", ls="--", label="one request at a time")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput")
    left.set_xticks(n, [str(x) for x in n])
    left.legend()
    right.plot(n, [r["ttft_p50_s"] for r in rows], "o-", label="TTFT p50")
    right.plot(n, [r["ttft_p99_s"] for r in rows], "s-", label="TTFT p99")
    right.plot(n, [r["latency_p99_s"] for r in rows], "^-", label="latency p99")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    right.set_xticks(n, [str(x) for x in n])
    right.legend()
    fig.suptitle(f"memlm serve — {result['workload']} requests, {result['model']} on {result['threads']} CPU threads")
    fig.tight_layout()
    save_figure(fig, path)
