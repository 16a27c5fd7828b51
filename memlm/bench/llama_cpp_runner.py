"""llama.cpp's greedy decoding on a GGUF file, runnable on its own: `python llama_cpp_runner.py`.

llama-cpp-python's low-level API (an optional extra, never a CI dependency): a batch of prompts is
prefilled in one `llama_decode`, then every step decodes one token per sequence in one
`llama_decode`, greedy, with end-of-generation tokens masked so every sequence emits exactly the
requested number of tokens, like the other engines of `memlm bench decode`.

This module imports nothing of memlm (nor torch): run as a script it is a process that holds
llama.cpp and numpy alone, so the peak RSS it reports is llama.cpp's own, not llama.cpp's plus
torch's and memlm's tokenizer. It reads {"path", "threads", "prompts", "new_tokens", "repeats"} as
JSON on stdin and writes {"outputs", "prefill_s", "decode_s", "peak_rss_mb", "runtime_rss_mb"} (the
process with llama-cpp-python imported, before the model is loaded) as JSON on stdout.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class LlamaCppError(RuntimeError):
    """llama.cpp refused a file, a context or a batch."""


_QUIET = None  # the log callback, kept alive while llama.cpp may call it


def init_quietly(ll) -> None:
    """llama.cpp logs every load, context and quantized tensor to stderr: the benchmarks' tables
    are their output, so its log goes nowhere. The backend is initialised once per process."""
    global _QUIET
    if _QUIET is None:
        _QUIET = ll.llama_log_callback(lambda level, text, data: None)
        ll.llama_log_set(_QUIET, None)
        ll.llama_backend_init()


def first(module, *names):
    """llama-cpp-python renamed several functions across versions: the first one this one has."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise LlamaCppError(f"this llama-cpp-python has none of {', '.join(names)}")


def load_model(ll, path: Path, vocab_only: bool = False):
    """(model handle, its vocabulary) of a GGUF file, llama.cpp quiet; the handle is null (falsy)
    when llama.cpp could not load the file: callers raise their own error."""
    init_quietly(ll)
    params = ll.llama_model_default_params()
    params.vocab_only = vocab_only
    model = first(ll, "llama_model_load_from_file", "llama_load_model_from_file")(str(path).encode(), params)
    if not model:
        return model, None
    return model, ll.llama_model_get_vocab(model) if hasattr(ll, "llama_model_get_vocab") else model


def free_model(ll, model) -> None:
    if model:
        first(ll, "llama_model_free", "llama_free_model")(model)


class LlamaCppGreedy:
    def __init__(self, path: Path, threads: int, sequences: int, max_tokens_per_sequence: int):
        import llama_cpp as ll  # lazy: llama-cpp-python is optional, never a CI dependency

        self.ll = ll
        self.model, vocab = load_model(ll, path)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {path}")
        params = ll.llama_context_default_params()
        params.n_ctx = sequences * max_tokens_per_sequence
        params.n_batch = params.n_ubatch = max(512, sequences * max_tokens_per_sequence)
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        if hasattr(params, "kv_unified"):
            params.kv_unified = True
        self.ctx = first(ll, "llama_init_from_model", "llama_new_context_with_model")(self.model, params)
        if not self.ctx:
            raise LlamaCppError("llama.cpp could not create a context")
        self.n_vocab = first(ll, "llama_vocab_n_tokens", "llama_n_vocab")(vocab)
        is_eog = first(ll, "llama_vocab_is_eog", "llama_token_is_eog")
        self.end_tokens = np.array([t for t in range(self.n_vocab) if is_eog(vocab, t)], dtype=np.int64)
        self.batch = ll.llama_batch_init(params.n_batch, 0, sequences)

    def _clear(self) -> None:
        ll = self.ll
        if hasattr(ll, "llama_memory_clear"):
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        else:
            first(ll, "llama_kv_self_clear", "llama_kv_cache_clear")(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, sequence, wants_logits) entries -> logits [n_wanted, vocab]."""
        b = self.batch
        for i, (token, pos, seq, wants) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wants
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        status = self.ll.llama_decode(self.ctx, b)
        if status != 0:
            raise LlamaCppError(f"llama_decode failed with status {status}")
        wanted = sum(e[3] for e in entries)
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(wanted * self.n_vocab,))
        return logits.reshape(wanted, self.n_vocab)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Timed:
        """Greedy continuations of exactly `new_tokens` tokens per prompt (end tokens masked), timed."""
        start = time.perf_counter()
        self._clear()
        entries = [
            (token, pos, seq, pos == len(prompt) - 1)
            for seq, prompt in enumerate(prompts)
            for pos, token in enumerate(prompt)
        ]
        logits = self._decode(entries)
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in range(new_tokens):
            logits = logits.copy()
            logits[:, self.end_tokens] = -np.inf
            tokens = logits.argmax(axis=1).tolist()
            for out, token in zip(outputs, tokens, strict=True):
                out.append(int(token))
            if step == 0:
                first = time.perf_counter()
            if step + 1 == new_tokens:
                break
            logits = self._decode(
                [(t, len(p) + step, seq, True) for seq, (t, p) in enumerate(zip(tokens, prompts, strict=True))]
            )
        return Timed(outputs, first - start, time.perf_counter() - first)

    def __del__(self):
        ll = getattr(self, "ll", None)
        if ll is None:
            return
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
        free_model(ll, getattr(self, "model", None))


class Timed(NamedTuple):
    """One greedy run: its outputs, the seconds to the first new token of every row (prefill), and
    from there to the last (the decode steps), each taken inside the run."""

    outputs: Any
    prefill_s: float
    decode_s: float


def best_times(run: Callable[[int], Timed], new_tokens: int, repeats: int) -> Timed:
    """The best prefill and the best decode time of `repeats` runs (after a short warm-up), with the
    last run's outputs. Decode is timed directly, not as a full run minus a prefill-only run: at long
    prompts that difference is smaller than the noise of either."""
    run(min(4, new_tokens))  # warm-up: allocator, oneDNN/fbgemm kernels, lazy inits
    runs = [run(new_tokens) for _ in range(repeats)]
    return Timed(runs[-1].outputs, min(r.prefill_s for r in runs), min(r.decode_s for r in runs))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:  # Linux, as the benchmarks
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    import llama_cpp  # noqa: F401  lazy: llama-cpp-python is optional; imported first to size the runtime

    runtime = current_rss_mb()
    job = json.load(sys.stdin)
    prompts, new_tokens = job["prompts"], job["new_tokens"]
    runner = LlamaCppGreedy(Path(job["path"]), job["threads"], len(prompts), max(map(len, prompts)) + new_tokens + 8)
    timed = best_times(lambda n: runner.generate(prompts, n), new_tokens, job["repeats"])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    done = timed._asdict() | {"peak_rss_mb": peak_kb / 1024}
    json.dump(done | {"runtime_rss_mb": runtime}, sys.stdout)


if __name__ == "__main__":
    main()
