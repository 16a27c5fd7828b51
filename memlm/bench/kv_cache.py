"""`memlm bench kv-cache`: the KV cache as capacity, in three parts, each against a baseline run in
the same process on the same model:

  quality   per KV type (f32, bf16, q8_0, q4_0, q4_0 + rotation), alone and under an eviction
            policy: perplexity on the bundled sample (windows of 256 tokens) with the KL divergence
            of each token's distribution from the fp32 cache's, and greedy agreement with the fp32
            cache (same policy) on the 8 bench prompts x `new_tokens`;
  capacity  with a fixed KV memory budget, how many conversations of `conversation` tokens run at
            once, per KV type, paged or contiguous, with and without a 25%-budget policy, and the
            decode throughput they reach over a few steps;
  speed     decode tok/s of the paged fp32 cache against the contiguous one at batch 1 and 8
            (interleaved, best of `repeats`).

The contiguous cache's count is what today's allocation gives: every row gets the batch's capacity,
min(its slots, prompt + 1,024) doubled until the conversation fits.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from memlm.bench.decode import PROMPTS, encode_prompts
from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.cache.blocks import KVCacheConfig, parse_kv_memory
from memlm.cache.kv_cache import KVCache
from memlm.cache.kv_format import kv_format
from memlm.cache.policies import make_policy
from memlm.formats.loading import load_model
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams

SAMPLE_TEXT = Path(__file__).with_name("sample.txt")
WINDOW = 256
# (label, kv type, rotate)
KV_TYPES = [("f32", "f32", False), ("bf16", "bf16", False), ("q8_0", "q8_0", False), ("q4_0", "q4_0", False),
            ("q4_0+rot", "q4_0", True)]  # fmt: skip
INITIAL_OUTPUT_SLOTS = 1024  # the contiguous cache's first allocation beyond the prompt (engine.py)


def _engine(loaded, kv: KVCacheConfig, max_batch: int = 256) -> Engine:
    # No prefill limit: the capacity part admits every request that fits in its first step.
    return Engine(loaded.model, loaded.tokenizer, loaded.name, loaded.source, loaded.dtype, loaded.num_parameters,
                  max_batch=max_batch, max_prefill_tokens=2**31, kv_cache=kv)  # fmt: skip


def _windows(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(SAMPLE_TEXT.read_text(), add_special_tokens=False)
    return [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i : i + WINDOW]) > 1]


@torch.inference_mode()
def _window_logits(model, window: list[int], kv_type: str, rotate: bool) -> torch.Tensor:
    """Log-probabilities of every next token of one window read through a cache of this type: one
    forward (queries see the stored keys and values, as decoding does)."""
    ids = torch.tensor(window)[None]
    cache = KVCache.for_model(model.config, 1, len(window), model.dtype, model.device, kv_type=kv_type,
                              rotate_keys=rotate)  # fmt: skip
    hidden = model(model.embed(ids), torch.arange(len(window))[None], cache)
    return torch.log_softmax(model.logits(hidden)[0, :-1].float(), dim=-1)


def quality(loaded, policies: list[str], budget: int, new_tokens: int, console) -> list[dict]:
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = _windows(tokenizer)
    targets = [torch.tensor(w[1:]) for w in windows]
    reference = [_window_logits(model, w, "f32", False) for w in windows]
    prompts = encode_prompts(tokenizer, PROMPTS)
    greedy = SamplingParams(max_new_tokens=new_tokens)
    rows, answers = [], {}
    for policy_name in ["full", *policies]:
        for label, kv_type, rotate in KV_TYPES:
            console.print(f"quality: {label}, {policy_name}")
            kv = KVCacheConfig(kv_type=kv_type, rotate=rotate)
            policy = None if policy_name == "full" else make_policy(policy_name, budget)
            row = {"kv_type": label, "policy": policy_name, "budget": None if policy is None else budget}
            if policy is None:  # every token's distribution: perplexity and KL from the fp32 cache
                nll = kl = count = 0.0
                for window, target, ref in zip(windows, targets, reference, strict=True):
                    logp = _window_logits(model, window, kv_type, rotate)
                    nll += float(-logp.gather(1, target[:, None]).sum())
                    kl += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
                    count += len(target)
                row.update(perplexity=round(math.exp(nll / count), 4), kl_from_f32=round(kl / count, 6))
            else:  # through the decode loop, evicting as it goes (teacher forcing)
                scored = _engine(loaded, kv).score([w[:1] for w in windows], [w[1:] for w in windows],
                                                   kv_policy=policy)  # fmt: skip
                logprobs = [lp for c in scored for lp in c.logprobs]
                row.update(perplexity=round(math.exp(-sum(logprobs) / len(logprobs)), 4), kl_from_f32=None)
            outputs = [c.token_ids for c in _engine(loaded, kv).generate_tokens(prompts, greedy, kv_policy=policy)]
            answers[(label, policy_name)] = outputs
            base = answers[("f32", policy_name)]
            row["greedy_identical"] = sum(a == b for a, b in zip(outputs, base, strict=True))
            row["greedy_prompts"] = len(prompts)
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["kv_type"] == "f32" and r["policy"] == row["policy"])
        row["perplexity_vs_f32"] = round(row["perplexity"] / base["perplexity"] - 1, 5)
    return rows


def _contiguous_rows(budget_bytes: int, bytes_per_token: int, slots: int, prompt: int) -> int:
    """Rows today's contiguous cache fits: each row is allocated the batch's capacity."""
    capacity = min(slots, prompt + INITIAL_OUTPUT_SLOTS)
    while capacity < slots:
        capacity *= 2
    return budget_bytes // (capacity * bytes_per_token)


def capacity(loaded, budget: str, conversation: int, prompt_tokens: int, steps: int, policy_name: str,
             console) -> list[dict]:  # fmt: skip
    cfg = loaded.model.config
    prompt = loaded.tokenizer.encode(SAMPLE_TEXT.read_text(), add_special_tokens=False)[:prompt_tokens]
    params = SamplingParams(max_new_tokens=conversation - prompt_tokens, min_new_tokens=conversation - prompt_tokens)
    rows = []
    for label, kv_type, rotate in KV_TYPES:
        per_token = kv_format(kv_type, cfg.head_dim).token_bytes(cfg)
        budget_bytes = parse_kv_memory(budget, 1.0)
        for policy in (None, policy_name):
            kv_budget = conversation // 4
            slots = conversation if policy is None else kv_budget + 1
            for paged in (False, True):
                if paged:
                    kv = KVCacheConfig(kv_type=kv_type, rotate=rotate, memory=budget, prefix_caching=False)
                    fits = None
                else:
                    kv = KVCacheConfig(kv_type=kv_type, rotate=rotate, paged=False)
                    fits = _contiguous_rows(budget_bytes, per_token, slots, prompt_tokens)
                engine = _engine(loaded, kv, max_batch=4096)
                offered = fits if fits is not None else budget_bytes // (per_token * slots) + 8
                console.print(f"capacity: {label}, {policy or 'full'}, {'paged' if paged else 'contiguous'}: "
                              f"{offered} requests offered")  # fmt: skip
                made = policy and make_policy(policy, kv_budget)
                for _ in range(max(offered, 1)):
                    engine.add_request(list(prompt), params, kv_policy=made or None)
                engine.step()  # prefill: as many join as fit
                running = engine.num_running
                start = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                wall = time.perf_counter() - start
                for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                    engine.abort(r.id)
                rows.append({
                    "kv_type": label, "policy": policy or "full", "paged": paged,
                    "kv_budget": kv_budget if policy else None, "bytes_per_token": per_token, "concurrent": running,
                    "decode_tok_s": round(running * steps / wall, 1) if running else 0.0,
                })  # fmt: skip
    base = next(r for r in rows if r["kv_type"] == "f32" and r["policy"] == "full" and not r["paged"])
    for row in rows:
        row["vs_today"] = round(row["concurrent"] / base["concurrent"], 2) if base["concurrent"] else None
    return rows


def speed(loaded, batches: list[int], new_tokens: int, repeats: int, console) -> list[dict]:
    prompts = encode_prompts(loaded.tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    engines = {"contiguous": _engine(loaded, KVCacheConfig(paged=False)), "paged": _engine(loaded, KVCacheConfig())}
    best: dict[tuple[str, int], float] = {}
    for batch in batches:
        chosen = [prompts[i % len(prompts)] for i in range(batch)]
        for _ in range(repeats):
            for name, engine in engines.items():  # interleaved: drift hits both alike
                start = time.perf_counter()
                engine.generate_tokens(chosen, params)
                rate = batch * new_tokens / (time.perf_counter() - start)
                best[(name, batch)] = max(best.get((name, batch), 0.0), rate)
        console.print(f"speed: batch {batch} done")
    return [
        {"batch": batch, "contiguous_tok_s": round(best[("contiguous", batch)], 1),
         "paged_tok_s": round(best[("paged", batch)], 1),
         "paged_vs_contiguous": round(best[("paged", batch)] / best[("contiguous", batch)], 3)}
        for batch in batches
    ]  # fmt: skip


def run_kv_cache_bench(
    model: str,
    dtype: str = "q4_1",
    parts: tuple[str, ...] = ("quality", "capacity", "speed"),
    policies: tuple[str, ...] = ("sinks", "tova"),
    budget: int = 128,
    new_tokens: int = 128,
    kv_memory: str = "1GiB",
    conversation: int = 2048,
    prompt_tokens: int = 64,
    steps: int = 8,
    capacity_policy: str = "tova",
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    threads: int = 2,
    json_path: str | None = None,
    plot_path: str | None = None,
) -> dict:
    torch.set_num_threads(threads)
    console = Console(width=150)
    loaded = load_model(model, dtype)
    result = {"benchmark": "kv_cache", "model": model, "dtype": dtype, "threads": threads,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if "quality" in parts:
        result["quality"] = quality(loaded, list(policies), budget, new_tokens, console)
        result["quality_settings"] = {"window": WINDOW, "policy_budget": budget, "new_tokens": new_tokens}
    if "capacity" in parts:
        result["capacity"] = capacity(loaded, kv_memory, conversation, prompt_tokens, steps, capacity_policy, console)
        result["capacity_settings"] = {"kv_memory": kv_memory, "conversation": conversation,
                                       "prompt_tokens": prompt_tokens, "steps": steps,
                                       "policy": f"{capacity_policy} at {conversation // 4}"}  # fmt: skip
    if "speed" in parts:
        result["speed"] = speed(loaded, list(batches), new_tokens, repeats, console)
    _print(console, result)
    write_outputs(result, console, json_path, plot_path, _plot)
    return result


def _print(console, result: dict) -> None:
    if "quality" in result:
        print_table(console, f"KV type quality, {result['model']} ({result['dtype']})",
                    ["kv type", "policy", "perplexity", "vs f32", "KL", "greedy identical"],
                    [[r["kv_type"], r["policy"], f"{r['perplexity']:.3f}", f"{100 * r['perplexity_vs_f32']:+.2f}%",
                      "-" if r["kl_from_f32"] is None else f"{r['kl_from_f32']:.5f}",
                      f"{r['greedy_identical']}/{r['greedy_prompts']}"] for r in result["quality"]],
                    left=("kv type", "policy"))  # fmt: skip
    if "capacity" in result:
        s = result["capacity_settings"]
        print_table(console, f"Conversations of {s['conversation']} tokens in {s['kv_memory']} of KV",
                    ["kv type", "policy", "storage", "bytes/token", "concurrent", "vs today", "decode tok/s"],
                    [[r["kv_type"], r["policy"], "paged" if r["paged"] else "contiguous", str(r["bytes_per_token"]),
                      str(r["concurrent"]), f"{r['vs_today']}x", str(r["decode_tok_s"])] for r in result["capacity"]],
                    left=("kv type", "policy", "storage"))  # fmt: skip
    if "speed" in result:
        print_table(console, "Decode, paged fp32 blocks vs the contiguous cache",
                    ["batch", "contiguous tok/s", "paged tok/s", "ratio"],
                    [[str(r["batch"]), str(r["contiguous_tok_s"]), str(r["paged_tok_s"]),
                      f"{r['paged_vs_contiguous']:.3f}"] for r in result["speed"]])  # fmt: skip


def _plot(result: dict, path: str) -> None:
    parts = [p for p in ("quality", "capacity") if p in result]
    if not parts:
        return
    fig, axes = pyplot().subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        rows = result[part]
        if part == "quality":
            for policy in dict.fromkeys(r["policy"] for r in rows):
                mine = [r for r in rows if r["policy"] == policy]
                ax.plot([r["kv_type"] for r in mine], [100 * r["perplexity_vs_f32"] for r in mine], marker="o",
                        label=policy)  # fmt: skip
            ax.set_ylabel("perplexity vs the fp32 cache (%)")
            ax.set_title("quality per KV type")
        else:
            labels = [f"{r['kv_type']}\n{r['policy']}\n{'paged' if r['paged'] else 'contig.'}" for r in rows]
            ax.bar(range(len(rows)), [r["concurrent"] for r in rows],
                   color=["tab:blue" if r["paged"] else "tab:gray" for r in rows])  # fmt: skip
            ax.set_xticks(range(len(rows)), labels, fontsize=6)
            ax.set_ylabel("concurrent conversations")
            s = result["capacity_settings"]
            ax.set_title(f"{s['conversation']}-token conversations in {s['kv_memory']}")
        if part == "quality":
            ax.legend()
    fig.suptitle(f"memlm KV cache — {result['model']} ({result['dtype']})")
    fig.tight_layout()
    save_figure(fig, path)
