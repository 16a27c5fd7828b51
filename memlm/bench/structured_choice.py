"""Which grammar library enforces structured output: llguidance or xgrammar, measured on the
embedded SmolLM2 tokenizer (49152 tokens), one thread.

For each: tokenizer setup, compiling one JSON schema, and the time to compute the next-token mask
at every token of a valid document. Run with both installed (xgrammar is not a memlm dependency):

    .venv/bin/pip install xgrammar==0.2.8
    .venv/bin/python -m memlm.bench.structured_choice

Measured 2026-11-25 (this machine): llguidance setup 0.33 s, compile 0.83 ms, mask 0.010 ms median
(1.2 ms worst, the first); xgrammar setup 0.22 s, compile 4.9 ms, mask 0.003 ms median (0.1 ms worst).
Both masks are noise beside a ~25 ms decode step; llguidance compiles a request's schema 6x faster
and has no dependencies, while xgrammar pulls in triton and transformers. memlm uses llguidance.
"""

import argparse
import json
import statistics
import time

import llguidance
import llguidance.torch as llt
import torch

import memlm

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poet", "engine"], "ok": True})


def with_llguidance(tokenizer, vocab):
    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_id)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - start
    mask = llt.allocate_token_bitmask(1, vocab)

    def fill():
        llt.fill_next_token_bitmask(matcher, mask, 0)

    return setup, compile_s, fill, matcher.consume_token


def with_xgrammar(tokenizer, vocab):
    import xgrammar  # lazy: not a memlm dependency (installed by hand for this comparison)
    from transformers import PreTrainedTokenizerFast  # lazy: an optional extra, pulled in by xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend), vocab)
    compiler = xgrammar.GrammarCompiler(info)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - start
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    return setup, compile_s, lambda: matcher.fill_next_token_bitmask(mask), matcher.accept_token


def main():
    torch.set_num_threads(1)
    engine = memlm.load()
    tokenizer, vocab = engine.tokenizer, engine.config.vocab_size
    ids = tokenizer.encode(DOCUMENT, add_special_tokens=False)
    for name, build in (("llguidance", with_llguidance), ("xgrammar", with_xgrammar)):
        setup, compile_s, fill, accept = build(tokenizer, vocab)
        times = []
        for token in ids:
            start = time.perf_counter()
            fill()
            times.append(time.perf_counter() - start)
            assert accept(token), token
        print(
            f"{name:10s} setup {setup:.2f} s  compile {1e3 * compile_s:.2f} ms  "
            f"mask median {1e3 * statistics.median(times):.3f} ms  max {1e3 * max(times):.3f} ms  ({len(ids)} tokens)"
        )


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
