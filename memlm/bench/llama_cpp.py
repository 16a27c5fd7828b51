"""llama.cpp as a reference engine in `memlm bench decode --against llama.cpp`.

Runs the same GGUF file through llama-cpp-python's low-level API (an optional extra, never a CI
dependency): a batch of prompts is prefilled in one `llama_decode`, then every step decodes one
token per sequence in one `llama_decode`, greedy, with end-of-generation tokens masked so every
sequence emits exactly the requested number of tokens, like the other engines in the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memlm.errors import MemlmError
from memlm.formats.gguf_header import read_header
from memlm.formats.loading import ASSEMBLED, EMBEDDED
from memlm.tokenizer import Tokenizer


def gguf_file_of(model: str) -> Path:
    """The GGUF file behind a model name or path (llama.cpp reads nothing else)."""
    if model.lower() in EMBEDDED:
        return EMBEDDED[model.lower()].path()
    if model.lower() in ASSEMBLED:
        return ASSEMBLED[model.lower()].path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    raise MemlmError(f"--against llama.cpp needs a GGUF model (an embedded name or a .gguf file), not {model}")


def tokenizer_of(path: Path):
    """memlm's tokenizer of a GGUF file: every engine gets the same prompt ids."""
    return Tokenizer.from_gguf(read_header(path)[0])


def _first(module, *names):
    """llama-cpp-python renamed several functions across versions: the first one this one has."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise MemlmError(f"this llama-cpp-python has none of {', '.join(names)}")


class LlamaCppGreedy:
    def __init__(self, path: Path, threads: int, sequences: int, max_tokens_per_sequence: int):
        import llama_cpp as ll  # lazy: llama-cpp-python is optional, never a CI dependency

        self.ll = ll
        # llama.cpp logs every load and context to stderr; the benchmark's table is the output.
        self._quiet = ll.llama_log_callback(lambda level, text, data: None)
        ll.llama_log_set(self._quiet, None)
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        self.model = _first(ll, "llama_model_load_from_file", "llama_load_model_from_file")(
            str(path).encode(), model_params
        )
        if not self.model:
            raise MemlmError(f"llama.cpp could not load {path}")
        params = ll.llama_context_default_params()
        params.n_ctx = sequences * max_tokens_per_sequence
        params.n_batch = params.n_ubatch = max(512, sequences * max_tokens_per_sequence)
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        if hasattr(params, "kv_unified"):
            params.kv_unified = True
        self.ctx = _first(ll, "llama_init_from_model", "llama_new_context_with_model")(self.model, params)
        if not self.ctx:
            raise MemlmError("llama.cpp could not create a context")
        vocab = ll.llama_model_get_vocab(self.model) if hasattr(ll, "llama_model_get_vocab") else self.model
        self.n_vocab = _first(ll, "llama_vocab_n_tokens", "llama_n_vocab")(vocab)
        is_eog = _first(ll, "llama_vocab_is_eog", "llama_token_is_eog")
        self.end_tokens = np.array([t for t in range(self.n_vocab) if is_eog(vocab, t)], dtype=np.int64)
        self.batch = ll.llama_batch_init(params.n_batch, 0, sequences)

    def _clear(self) -> None:
        ll = self.ll
        if hasattr(ll, "llama_memory_clear"):
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        else:
            _first(ll, "llama_kv_self_clear", "llama_kv_cache_clear")(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, sequence, wants_logits) entries -> logits [n_wanted, vocab]."""
        b = self.batch
        for i, (token, pos, seq, wants) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wants
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        status = self.ll.llama_decode(self.ctx, b)
        if status != 0:
            raise MemlmError(f"llama_decode failed with status {status}")
        wanted = sum(e[3] for e in entries)
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(wanted * self.n_vocab,))
        return logits.reshape(wanted, self.n_vocab)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of exactly `new_tokens` tokens per prompt (end tokens masked)."""
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
            if step + 1 == new_tokens:
                break
            logits = self._decode(
                [(t, len(p) + step, seq, True) for seq, (t, p) in enumerate(zip(tokens, prompts, strict=True))]
            )
        return outputs

    def __del__(self):
        ll = getattr(self, "ll", None)
        if ll is None:
            return
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
        if getattr(self, "model", None):
            _first(ll, "llama_model_free", "llama_free_model")(self.model)
