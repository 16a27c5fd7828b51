"""`memlm bench decode`: memlm's decode loop against Hugging Face transformers on the same model.

Both engines get the same chat-templated prompts (token ids from memlm's tokenizer), decode
greedily and are forced to emit exactly `new_tokens` tokens (`min_new_tokens` in both: end
tokens are masked until then). Every (engine, batch) pair runs in a fresh "spawn" child process, one after
the other, so the peak RSS reported for it is that engine's alone and no two measurements share
the CPU. In each child:

* one short warm-up generation;
* `repeats` runs of `new_tokens`, each timed inside: prefill ends when every row has its first
  token, decode when the last row has its last (memlm's Completion.ttft_s / decode_s, a
  transformers streamer, llama.cpp's loop). Until 2026-12-07 decode was a full run's time minus a
  prefill-only run's, which at long prompts is smaller than the noise of either;
* prefill tok/s = real (unpadded) prompt tokens / best prefill time;
  decode tok/s  = batch * (new_tokens - 1) / best decode time.

memlm runs in each requested dtype (int8 by default; q4_0/q4_1/q8_0/q4_k/... run GGUF blocks
natively). A dtype may also name a llama.cpp file type (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, with an
optional :q8_0): the model written by `memlm quantize` in that type, cached, loaded with dtype
auto (bench/quantized_files.py). A dtype listed twice is measured twice, interleaved with the
others: a ratio taken on a shared machine can then be checked against its own spread.
The reference engines: transformers, always in float32 (with a GGUF model, the file's weights
dequantized: the exact reference), and llama.cpp (`--against llama.cpp`, when llama-cpp-python is
importable), which runs the same GGUF file with the same threads, prompt ids and token counts.
Every engine's greedy output is compared token for token with transformers' at the same batch.
For each non-float32 dtype the benchmark also measures what it costs in quality, in another
child: greedy agreement with memlm float32 on the prompts one at a time, and perplexity of both on
a public-domain text sample (`sample.txt`), the dtype's scored token by token through the KV cache
(the path generated tokens take).
"""

from __future__ import annotations

import importlib.util
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from rich.console import Console

import memlm
from memlm.bench.llama_cpp import gguf_file_of, measure_greedy, tokenizer_of
from memlm.bench.llama_cpp_runner import Timed, best_times
from memlm.bench.quantized_files import file_type_of, load_args, quantized_file
from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.cache.blocks import KVCacheConfig
from memlm.cache.kv_cache import KVCache
from memlm.errors import InvalidRequestError, MemlmError
from memlm.formats.loading import DTYPES, resolve
from memlm.quant.mix import SCHEMES
from memlm.tokenizer import Tokenizer

SAMPLE_TEXT = Path(__file__).with_name("sample.txt")
ENGINES = ("memlm", "hf", "llama.cpp")
REFERENCES = ("hf", "llama.cpp")
PPL_WINDOW = 256

# Varied natural requests: short and long, factual, creative, code, reasoning.
PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a short poem about the ocean at night.",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Give me three tips for staying focused while studying for an exam.",
    "Write a Python function that checks whether a string is a palindrome.",
    "If a train travels 60 miles in 1.5 hours, what is its average speed? Show your reasoning.",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "What are the main differences between a cat and a dog as pets?",
]


# ---- helpers (pure, unit-tested) -----------------------------------------------------------------


def batch_prompts(prompts: Sequence[Any], batch: int) -> list[Any]:
    """The first `batch` prompts, cycling through the list when the batch is larger than it."""
    if batch < 1 or not prompts:
        raise ValueError("need a batch size >= 1 and at least one prompt")
    return [prompts[i % len(prompts)] for i in range(batch)]


def bench_prompts(tokenizer, batch: int, prompt_tokens: int | None = None) -> list[list[int]]:
    """The prompt ids of one measurement: the chat-templated bench prompts, or with `prompt_tokens`
    that many tokens per sequence: the tokenizer's own start (BOS where the model wants one), then
    sample.txt (repeated as needed; row i starts 97 i tokens in, so the rows differ), for prefill
    and decode at a chosen context length."""
    if prompt_tokens is None:
        return encode_prompts(tokenizer, batch_prompts(PROMPTS, batch))
    start = tokenizer.encode("")[:prompt_tokens]
    ids = tokenizer.encode(SAMPLE_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    body = prompt_tokens - len(start)
    ids = ids * ((body + 97 * batch) // len(ids) + 1)
    return [start + ids[97 * i : 97 * i + body] for i in range(batch)]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn through the model's chat template, then encoded."""
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]


def perplexity(model, ids: Sequence[int], window: int = PPL_WINDOW, incremental: bool = False) -> float:
    """exp(mean next-token NLL) of `ids`, scored in independent windows of `window` tokens.

    Every token is predicted from at most `window - 1` tokens of its own window. By default each
    window is one cache-less forward (`model.forward`). With `incremental=True` the window is fed
    one token at a time through a KV cache (teacher forcing): the path generated tokens take, which
    is where memlm's int8 mode uses its int8 weights (chunks of several tokens run in fp32).
    """
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = torch.tensor(ids[start : start + window], dtype=torch.long)[None]
            n = chunk.shape[1]
            if n < 2:
                continue
            if incremental:
                cache = KVCache.for_model(model.config, 1, n, model.dtype, model.device)
                steps = [
                    model.logits(model(model.embed(chunk[:, i : i + 1]), torch.tensor([[i]]), cache)[:, -1])
                    for i in range(n - 1)
                ]
                logits = torch.cat(steps)
            else:
                logits = model.logits(model(model.embed(chunk), torch.arange(n)[None]))[0, :-1]
            total += F.cross_entropy(logits.float(), chunk[0, 1:], reduction="sum").item()
            count += n - 1
    if count == 0:
        raise ValueError("perplexity needs at least two tokens")
    return math.exp(total / count)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(
    outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], new_tokens: int
) -> tuple[float, float]:
    """-> (fraction of outputs identical to their reference, mean common prefix / new_tokens)."""
    if len(outputs) != len(reference) or not outputs:
        raise ValueError("need the same, non-zero number of outputs and references")
    pairs = list(zip(outputs, reference, strict=True))
    identical = sum(list(a) == list(b) for a, b in pairs) / len(pairs)
    prefix = sum(common_prefix(a, b) for a, b in pairs) / (len(pairs) * new_tokens)
    return identical, prefix


def decode_ratios(rows: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """{"<memlm dtype>/<reference engine>": {batch: memlm decode tok/s / the reference's}} for every
    memlm dtype and reference engine measured at the same batch size."""
    memlm = {(r["dtype"], r["batch"]): r["decode_tok_s"] for r in rows if r["engine"] == "memlm"}
    refs = {(r["engine"], r["batch"]): r["decode_tok_s"] for r in rows if r["engine"] != "memlm"}
    ratios: dict[str, dict[str, float | None]] = {}
    for (dtype, batch), ours in sorted(memlm.items()):
        for engine in REFERENCES:
            theirs = refs.get((engine, batch))
            if theirs is None or ours is None:
                continue
            ratios.setdefault(f"{dtype}/{engine}", {})[str(batch)] = round(ours / theirs, 3) if theirs > 0 else None
    return ratios


def build_result(rows: Sequence[dict], threads: int, new_tokens: int, model: str, quality: dict | None) -> dict:
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    engines = {r["engine"] for r in rows}
    agreement = {  # greedy outputs against each reference engine measured (llama.cpp: the same file)
        ref: {
            f"{label}, batch {batch}": {"identical": round(i, 4), "prefix": round(p, 4), "first_8": round(h, 4)}
            for (label, batch), (i, p, h) in _cross_check(rows, new_tokens, ref).items()
        }
        for ref in REFERENCES
        if ref in engines
    }
    return {
        "rows": public,
        "ratio_decode": decode_ratios(public),
        "agreement": agreement,
        "threads": threads,
        "new_tokens": new_tokens,
        "model": model,
        "quality": quality or {},
    }


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KB on Linux


class CpuWatch:
    """Which other processes used the CPU between construction and `busy()` (they skew timings).

    On a 2-core machine one competing process slows transformers down by up to 10x (its OpenMP
    threads spin), so a measurement taken alongside one should be repeated.
    """

    def __init__(self):
        self.start = time.time()
        self.used: dict[tuple[int, float], float] = {}
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                self.used[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass

    def busy(self, threshold: float = 20.0) -> list[str]:
        """Other processes (not this one nor its children) that used over `threshold`% of a core."""
        elapsed = max(time.time() - self.start, 1e-3)
        me = psutil.Process()
        mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
        found = []
        for p in psutil.process_iter(["name"]):
            if p.pid in mine:
                continue
            try:
                created, t = p.create_time(), p.cpu_times()
            except psutil.Error:
                continue
            before = self.used.get((p.pid, created), 0.0 if created >= self.start - 1 else None)
            if before is None:  # existed before but unreadable then
                continue
            pct = 100 * (t.user + t.system - before) / elapsed
            if pct > threshold:
                found.append(f"{p.info['name']} (pid {p.pid}, {pct:.0f}% of a core)")
        return found


def _measure_watched(console, fn: Callable, *args) -> Any:
    watch = CpuWatch()
    result = _in_child(fn, *args)
    busy = watch.busy()
    if busy:
        console.print(f"[yellow]other processes used the CPU during this measurement: {', '.join(busy)}[/yellow]")
    return result


# ---- child processes -------------------------------------------------------------------------------


def _in_child(fn: Callable, *args) -> Any:
    """Run fn(*args) in a fresh spawned process (its own peak RSS, its own thread pool)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _measure(
    engine: str,
    model: str,
    dtype: str,
    batch: int,
    new_tokens: int,
    threads: int,
    repeats: int,
    prompt_tokens: int | None = None,
):
    """Child: measure one engine at one batch size. Returns a result row plus its outputs."""
    torch.set_num_threads(threads)
    runtime_mb = psutil.Process().memory_info().rss / 2**20  # torch and memlm imported, nothing loaded
    if engine == "memlm":
        # Prefix caching off: every timed run repeats the same prompts, and a cache hit would time
        # a lookup, not a prefill (before this, memlm's prefill rows since 2026-12-06 were hits).
        mm = memlm.load(*load_args(model, dtype), kv_cache=KVCacheConfig(prefix_caching=False))
        prompt_ids = bench_prompts(mm.tokenizer, batch, prompt_tokens)

        def run(n: int) -> Timed:
            params = memlm.SamplingParams(max_new_tokens=n, min_new_tokens=n)
            done = mm.generate_tokens(prompt_ids, params)
            # The batch's prefill ends when its last row has a token; its decode, when the last row ends.
            prefill = max(c.ttft_s for c in done)
            return Timed([c.token_ids for c in done], prefill, max(c.ttft_s + c.decode_s for c in done) - prefill)

    elif engine == "hf":
        # Only memlm's tokenizer is loaded here (same prompt ids for both engines): peak RSS is a
        # high-water mark, and loading memlm's model first would count it against transformers.
        import transformers  # lazy: an optional extra, and in the memlm child it would count in peak RSS
        from transformers import AutoModelForCausalLM  # lazy: as above

        runtime_mb = psutil.Process().memory_info().rss / 2**20
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        _, folder = resolve(model)
        prompt_ids = bench_prompts(Tokenizer.from_folder(folder), batch, prompt_tokens)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        eos = hf.generation_config.eos_token_id
        eos_ids = sorted(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        pad = eos_ids[0] if eos_ids else 0
        longest = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompt_ids])  # left padding
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompt_ids])

        def run(n: int) -> Timed:
            clock = TokenClock()
            with torch.inference_mode():
                out = hf.generate(
                    input_ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=pad,
                    streamer=clock,
                )
            return Timed(out[:, longest:].tolist(), clock.first - clock.start, clock.last - clock.first)

    elif engine == "llama.cpp":  # timed in a process of its own: its peak RSS is llama.cpp's alone
        path = gguf_file_of(model)
        prompt_ids = bench_prompts(tokenizer_of(path), batch, prompt_tokens)
        done = measure_greedy(path, threads, prompt_ids, new_tokens, repeats)
        timed = Timed(done["outputs"], done["prefill_s"], done["decode_s"])
        return _row(
            engine, "gguf file", batch, prompt_ids, new_tokens, timed, done["peak_rss_mb"], done["runtime_rss_mb"]
        )

    else:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")

    shown = dtype if engine == "memlm" else "float32"
    return _row(
        engine, shown, batch, prompt_ids, new_tokens, best_times(run, new_tokens, repeats), peak_rss_mb(), runtime_mb
    )


class TokenClock:
    """A transformers streamer that only notes when generate starts (the prompt is put) and when
    the first and the last new tokens are put."""

    def __init__(self):
        self.start = self.first = self.last = None

    def put(self, value) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        else:
            self.first = self.first or now
            self.last = now

    def end(self) -> None:
        pass


def _row(engine, dtype, batch, prompt_ids, new_tokens, timed: Timed, peak_mb, runtime_mb) -> dict:
    """A measurement. runtime_rss_mb: the process with its engine's libraries imported and no model
    loaded (torch + memlm ~220 MB, llama-cpp-python ~40 MB): part of peak_rss_mb, which model and
    engine add to it."""
    prompt_tokens = sum(len(p) for p in prompt_ids)
    prefill, decode_time, outputs = timed.prefill_s, timed.decode_s, timed.outputs
    return {
        "engine": engine,
        "batch": batch,
        "dtype": dtype,
        "prefill_tok_s": round(prompt_tokens / prefill, 2),
        "decode_tok_s": round(batch * (new_tokens - 1) / decode_time, 2) if decode_time > 0 else None,
        "peak_rss_mb": round(peak_mb, 1),
        "runtime_rss_mb": round(runtime_mb, 1),
        "_outputs": outputs,
    }


def _quality(model: str, dtype: str, new_tokens: int, threads: int) -> dict:
    """Child: what `dtype` costs against float32 (greedy agreement, perplexity on sample.txt)."""
    torch.set_num_threads(threads)
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    params = memlm.SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    results = {}
    for d in ("float32", dtype):
        engine = memlm.load(*load_args(model, d))
        prompt_ids = encode_prompts(engine.tokenizer, PROMPTS)
        # One prompt at a time: int8 dynamic quantization scales activations per tensor, so in a
        # batch a row's output also depends on the other rows; this measures the dtype alone.
        outputs = [engine.generate_tokens([p], params)[0].token_ids for p in prompt_ids]
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        # float32 scores the same either way (to ~1e-6; see tests) and the cache-less forward is
        # 20x faster; other dtypes go token by token, the path their generated tokens take.
        results[d] = (outputs, perplexity(engine.model, ids, incremental=d != "float32"))
        del engine
    (ref, ppl_ref), (outs, ppl) = results["float32"], results[dtype]
    identical, prefix = greedy_agreement(outs, ref, new_tokens)
    return {
        "ppl_float32": round(ppl_ref, 4),
        f"ppl_{dtype}": round(ppl, 4),
        "ppl_delta": round(ppl - ppl_ref, 4),
        "ppl_delta_pct": round(100 * (ppl - ppl_ref) / ppl_ref, 3),
        "greedy_identical_frac": round(identical, 4),
        "greedy_prefix_frac": round(prefix, 4),
    }


# ---- report ------------------------------------------------------------------------------------------


def print_report(result: dict, console) -> None:
    title = (
        f"decode benchmark: {result['model']}, {result['new_tokens']} new tokens, {result['threads']} threads, greedy"
    )
    columns = ("engine", "batch", "dtype", "prefill tok/s", "decode tok/s", "peak RSS MB", "of it, runtime")
    rows = [
        [
            r["engine"],
            str(r["batch"]),
            r["dtype"],
            f"{r['prefill_tok_s']:.1f}",
            "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['runtime_rss_mb']:.0f}" if "runtime_rss_mb" in r else "-",
        ]
        for r in result["rows"]
    ]
    print_table(console, title, columns, rows, left=("engine", "dtype"))
    for pair, by_batch in result["ratio_decode"].items():
        dtype, engine = pair.split("/", 1)
        ratios = ", ".join(f"batch {b}: {'-' if x is None else f'{x:.2f}x'}" for b, x in by_batch.items())
        console.print(f"decode speed memlm {dtype} / {engine}: {ratios}")
    for reference, by_row in (result.get("agreement") or {}).items():
        for key, a in by_row.items():
            console.print(
                f"{key} vs {reference} greedy outputs: {a['identical']:.0%} identical, the first 8 tokens "
                f"equal on {a['first_8']:.0%}, mean common prefix {a['prefix']:.0%}"
            )
    for dtype, q in (result.get("quality") or {}).items():
        console.print(
            f"quality {dtype} vs float32: perplexity {q['ppl_float32']:.3f} -> {q[f'ppl_{dtype}']:.3f} "
            f"(delta {q['ppl_delta']:+.3f}) on {SAMPLE_TEXT.name}, {dtype} scored token by token; "
            f"greedy ({result['new_tokens']} tokens, {len(PROMPTS)} prompts one at a time): "
            f"{q['greedy_identical_frac']:.0%} identical, mean common prefix {q['greedy_prefix_frac']:.0%}"
        )


def _cross_check(rows: Sequence[dict], new_tokens: int, reference: str = "hf", first: int = 8) -> dict:
    """Every engine's greedy outputs against the `reference` engine's at the same batch (all forbid
    end tokens until new_tokens, so the sequences are comparable token for token):
    {(label, batch): (identical fraction, mean common-prefix fraction, fraction equal over the
    first `first` tokens)}."""
    refs = {r["batch"]: r for r in rows if r["engine"] == reference}
    out = {}
    for row in rows:
        ref = refs.get(row["batch"])
        if row["engine"] == reference or ref is None or "_outputs" not in row:
            continue
        identical = prefix_sum = head = 0.0
        for a, b in zip(row["_outputs"], ref["_outputs"], strict=True):
            identical += a == b
            head += a[:first] == b[:first]
            prefix_sum += common_prefix(a, b) / len(a) if a else 1.0
        n = len(row["_outputs"])
        label = f"memlm {row['dtype']}" if row["engine"] == "memlm" else row["engine"]
        out[(label, row["batch"])] = (identical / n, prefix_sum / n, head / n)
    return out


def plot_result(result: dict, path: str) -> None:
    """Decode tok/s of every engine and dtype, one group of bars per batch size; PNG, written atomically."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r["decode_tok_s"] is not None]
    labels = list(dict.fromkeys(f"{r['engine']} {r['dtype']}" if r["engine"] == "memlm" else r["engine"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, label in enumerate(labels):
        values = {
            r["batch"]: r["decode_tok_s"]
            for r in rows
            if (f"{r['engine']} {r['dtype']}" if r["engine"] == "memlm" else r["engine"]) == label
        }
        xs = [j + i * width for j in range(len(batches)) if batches[j] in values]
        bars = ax.bar(xs, [values[b] for b in batches if b in values], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tok/s (summed over the batch)")
    ax.set_title(f"{result['model']}, {result['threads']} threads, {result['new_tokens']} new tokens", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---- entry point ---------------------------------------------------------------------------------------


def run_decode_bench(
    model: str = "smollm2-135m-instruct",
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 64,
    threads: int = 2,
    dtype: str | Sequence[str] = "int8",
    json_path: str | None = None,
    quality: bool = True,
    console=None,
    repeats: int = 3,
    against: Sequence[str] = ("hf",),
    plot_path: str | None = None,
    prompt_tokens: int | None = None,
) -> dict:
    """Measure memlm in each dtype (a comma-separated string or a list) and the reference engines
    in `against` (hf: transformers float32; llama.cpp: the same GGUF file); return (and optionally
    write) the result dict described in bench/README.md."""
    dtypes = [d.strip() for d in (dtype.split(",") if isinstance(dtype, str) else dtype) if d.strip()]
    unknown = [
        d
        for d in dtypes
        if (d.partition(":")[0] not in DTYPES and file_type_of(d) is None) or d.partition(":")[2] not in ("", "q8_0")
    ]
    if not dtypes or unknown:
        choices = ", ".join([*DTYPES, *SCHEMES])
        raise InvalidRequestError(f"unknown dtype {(unknown or [''])[0]!r}; choose from {choices}")
    against = [a.strip() for a in against if a.strip()]
    if any(a not in REFERENCES for a in against):
        raise InvalidRequestError(f"--against takes {' and '.join(REFERENCES)}, not {', '.join(against)}")
    if new_tokens < 2:
        raise InvalidRequestError("new_tokens must be >= 2 (decode speed is measured past the first token)")
    if prompt_tokens is not None and prompt_tokens < 1:
        raise InvalidRequestError("prompt_tokens must be >= 1")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise InvalidRequestError("batch sizes must be >= 1")
    if threads < 1 or repeats < 1:
        raise InvalidRequestError("threads and repeats must be >= 1")
    if "hf" in against and importlib.util.find_spec("transformers") is None:
        raise MemlmError("the decode benchmark compares against transformers: pip install 'memlm[bench]'")
    if "llama.cpp" in against:
        if importlib.util.find_spec("llama_cpp") is None:
            raise MemlmError("--against llama.cpp needs llama-cpp-python: pip install llama-cpp-python")
        gguf_file_of(model)  # a clear error now, not in a child process
    if console is None:
        console = Console()

    for d in dtypes:  # files written by memlm quantize: made here, once, not inside a measured child
        if file_type_of(d):
            console.print(f"[dim]{d}: {quantized_file(model, file_type_of(d))}[/dim]")
    runs = [("memlm", d) for d in dtypes] + [(engine, "float32") for engine in against]
    rows = []
    for engine, d in runs:
        for batch in batch_sizes:
            what = d if engine == "memlm" else "reference"
            console.print(f"[dim]measuring {engine} ({what}), batch {batch} ...[/dim]")
            args = (engine, model, d, batch, new_tokens, threads, repeats, prompt_tokens)
            rows.append(_measure_watched(console, _measure, *args))

    q = {}
    for d in dtypes if quality else ():
        if d != "float32":
            console.print(f"[dim]measuring quality of {d} against float32 ...[/dim]")
            q[d] = _measure_watched(console, _quality, model, d, new_tokens, threads)

    result = build_result(rows, threads, new_tokens, model, q)
    result["prompt_tokens"] = prompt_tokens  # None: the chat-templated bench prompts
    print_report(result, console)
    write_outputs(result, console, json_path, plot_path, plot_result)
    return result
