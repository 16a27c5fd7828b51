"""llama.cpp beside memlm in the benchmarks (llama-cpp-python: optional, never a CI dependency).

- the GGUF file a model name stands for, and memlm's tokenizer of it (every engine gets the same ids);
- `measure_greedy`: llama.cpp's greedy decoding timed in a process of its own
  (`llama_cpp_runner.py`, which imports nothing of memlm), so its peak RSS is llama.cpp's alone;
- `llama_cpp_quantize`: llama.cpp's own quantizer (`memlm bench`'s quantizer comparison);
- `LlamaCppVocab`: llama.cpp's tokenizer of a file (the tokenization comparison).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from memlm.bench import llama_cpp_runner
from memlm.bench.llama_cpp_runner import free_model, init_quietly, load_model
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


def llama_cpp_quantize(source: Path, target: Path, file_type: int, threads: int) -> Path:
    """`source` (an unquantized GGUF) quantized by llama.cpp's own quantizer into `target` as
    LLAMA_FTYPE `file_type` (no importance matrix: its defaults, as `llama-quantize IN OUT TYPE`),
    written beside it and renamed into place; kept if it exists."""
    if target.is_file():
        return target
    import llama_cpp as ll  # lazy: llama-cpp-python is optional, never a CI dependency

    init_quietly(ll)
    params = ll.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = threads
    tmp = target.with_name(f".{target.name}.partial")
    try:
        status = ll.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if status != 0:
            raise MemlmError(f"llama.cpp could not quantize {source} (status {status})")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class LlamaCppVocab:
    """llama.cpp's tokenizer of a GGUF file (the vocabulary alone is loaded, no weights)."""

    def __init__(self, path: Path):
        import llama_cpp as ll  # lazy: llama-cpp-python is optional, never a CI dependency

        self.ll = ll
        self.model, self.vocab = load_model(ll, path, vocab_only=True)
        if not self.model:
            raise MemlmError(f"llama.cpp could not load {path}")

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """As llama.cpp's tokenize: BOS where the file asks for it, special pieces parsed as tokens."""
        data = text.encode()
        room = len(data) + 8
        tokens = (self.ll.llama_token * room)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, True)
        if n < 0:
            raise MemlmError(f"llama.cpp needs {-n} tokens for a text of {len(data)} bytes")
        return list(tokens[:n])

    def __del__(self):
        if hasattr(self, "ll"):
            free_model(self.ll, getattr(self, "model", None))


def measure_greedy(path: Path, threads: int, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """llama.cpp's best prefill and full-run times, outputs and peak RSS, from a process that holds
    llama.cpp alone (llama_cpp_runner.py run as a script)."""
    job = {"path": str(path), "threads": threads, "prompts": prompts, "new_tokens": new_tokens, "repeats": repeats}
    done = subprocess.run(
        [sys.executable, "-I", llama_cpp_runner.__file__],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise MemlmError(f"llama.cpp failed on {path}: {last}")
    return json.loads(done.stdout)
