"""Does memlm tokenize a GGUF file's text as llama.cpp does? Token for token, on a multilingual sample.

    python -m memlm.bench.tokenize_agreement [--model gemma3-270m] [--json runs/tokenize.json]

Both tokenizers come from the same GGUF file (memlm's: `Tokenizer.from_gguf`; llama.cpp's: the
file's vocabulary loaded by llama-cpp-python, an optional extra never needed by CI). Every text is
encoded by both with the file's special tokens added and special pieces parsed; a text agrees when
the two id lists are identical. The sample covers what SentencePiece and byte-level BPE files get
wrong most often: leading and repeated spaces, tabs and new lines, Chinese, Japanese, emoji (byte
fallback), accents, code, digits, chat markup, and the lines of bench/sample.txt.
"""

from __future__ import annotations

import argparse
import importlib.util

from rich.console import Console

from memlm.bench.decode import SAMPLE_TEXT, common_prefix
from memlm.bench.llama_cpp import LlamaCppVocab, gguf_file_of, tokenizer_of
from memlm.bench.report import print_table, write_outputs

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "leading spaces": "   three leading spaces, then  two, then one",
    "whitespace": "tabs\tand\t\ttabs\n\nnew lines\r\nand a trailing space ",
    "chinese": "中文文本和标点符号，以及数字 2024 年。",
    "japanese": "日本語のテキストとカタカナ、ひらがな。",
    "emoji": "emoji 🙂🚀🎉 and a family 👨‍👩‍👧",
    "accents": "café naïve Ωmega façade Ærø über straße",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "digits": "3.14159 1,000,000 0x1F 2e-5 12345678901234567890",
    "rare": "∮ ∇ ∞ 龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0nbsp",
    "markup": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
}


def sample_texts(lines: int) -> dict[str, str]:
    texts = dict(TEXTS)
    body = [line for line in SAMPLE_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts |= {f"sample.txt line {i + 1}": line for i, line in enumerate(body[:lines])}
    return texts


def run(model: str, lines: int) -> dict:
    path = gguf_file_of(model)
    ours, theirs = tokenizer_of(path), LlamaCppVocab(path)
    rows = {}
    for name, text in sample_texts(lines).items():
        a, b = ours.encode(text), theirs.encode(text)
        rows[name] = {"tokens_memlm": len(a), "tokens_llama_cpp": len(b), "identical": a == b}
        if a != b:
            diff = common_prefix(a, b)
            rows[name] |= {"first_difference": diff, "memlm": a[diff : diff + 4], "llama.cpp": b[diff : diff + 4]}
    same = sum(r["identical"] for r in rows.values())
    return {"model": model, "file": str(path), "texts": len(rows), "identical": same, "rows": rows}


def print_result(result: dict, console) -> None:
    rows = []
    for name, r in result["rows"].items():
        same = "yes" if r["identical"] else f"no, at {r['first_difference']}"
        rows.append([name, str(r["tokens_memlm"]), str(r["tokens_llama_cpp"]), same])
    title = f"tokenization, memlm vs llama.cpp: {result['model']} ({result['identical']}/{result['texts']} identical)"
    print_table(console, title, ("text", "memlm", "llama.cpp", "identical"), rows, left=("text",))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="an embedded or assembled model name, or a .gguf file")
    parser.add_argument("--lines", type=int, default=40, help="lines of bench/sample.txt added to the sample")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python")
    console = Console()
    result = run(args.model, args.lines)
    print_result(result, console)
    write_outputs(result, console, args.json, None, None)


if __name__ == "__main__":
    main()
