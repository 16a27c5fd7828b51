"""What memlm's quantizer costs in quality, per llama.cpp file type, on one model.

    python -m memlm.bench.quant_quality [--model smollm2-135m-instruct] [--types Q4_0,Q8_0,Q4_K_M,Q5_K_M,Q6_K]
                                        [--tokens 2048] [--json runs/quant_quality.json]

For each type, the model is written once as a GGUF by `memlm quantize` (cached under
$MEMLM_HOME/quantized, named by the source file's size and mtime) and loaded with dtype auto, on
its own blocks. Against the float32 model (for the embedded model: its Q4_1 file dequantized,
the only "full precision" there is), on the first `tokens` tokens of bench/sample.txt in
independent windows of 256 tokens:

* perplexity of both, and the quantized model's change in percent;
* KL divergence KL(p_fp32 || p_quant) of the next-token distributions, mean over tokens, and
  the fraction of tokens whose top-1 prediction agrees;

and, exactness of the kernels on the real model: greedy agreement (32 new tokens, the 8 bench
prompts, one at a time) of the file in exact mode (fp32 activations) with the same file
dequantized to float32. Prints a table and writes JSON.

With `--against llama.cpp` (llama-cpp-python installed; never a CI dependency) every type is also
made by llama.cpp's own quantizer from the same float32 weights (memlm's F32 file of the model)
and scored the same way by memlm, so the two quantizers differ in nothing but their blocks.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from functools import partial

import torch
import torch.nn.functional as F
from rich.console import Console

import memlm
from memlm.bench.decode import PROMPTS, SAMPLE_TEXT, encode_prompts, greedy_agreement
from memlm.bench.quantized_files import llama_cpp_quantized_file, quantized_file
from memlm.bench.report import print_table, write_outputs
from memlm.formats.loading import resolve

WINDOW = 256


def window_logits(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities [n-1, vocab], targets [n-1]) per window of WINDOW tokens."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), WINDOW):
            chunk = torch.tensor(ids[start : start + WINDOW])[None]
            n = chunk.shape[1]
            if n < 2:
                continue
            logits = model.logits(model(model.embed(chunk), torch.arange(n)[None]))[0, :-1].float()
            out.append((F.log_softmax(logits, -1), chunk[0, 1:]))
    return out


def compare(reference: list, candidate: list) -> dict:
    nll_ref = nll = kl = agree = count = 0.0
    for (lp_ref, target), (lp, _) in zip(reference, candidate, strict=True):
        nll_ref += F.nll_loss(lp_ref, target, reduction="sum").item()
        nll += F.nll_loss(lp, target, reduction="sum").item()
        kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
        agree += (lp_ref.argmax(-1) == lp.argmax(-1)).sum().item()
        count += len(target)
    ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
    return {
        "ppl_float32": round(ppl_ref, 4),
        "ppl": round(ppl, 4),
        "ppl_delta_pct": round(100 * (ppl - ppl_ref) / ppl_ref, 3),
        "kl_mean": round(kl / count, 5),
        "top1_agree": round(agree / count, 4),
        "tokens": int(count),
    }


def scored_file(make, ref_windows: list, ids: list[int]):
    """(row, engine): the file `make()` returns (timed: cached files cost ~0 s), loaded on its own
    blocks and scored against the float32 windows."""
    start = time.perf_counter()
    path = make()
    made = time.perf_counter() - start
    engine = memlm.load(str(path), dtype="auto")
    row = compare(ref_windows, window_logits(engine.model, ids))
    return row | {"file_mb": round(os.path.getsize(path) / 1e6, 1), "quantize_s": round(made, 1)}, engine


def run(model: str, types: list[str], tokens: int, new_tokens: int, threads: int, against: bool = False) -> dict:
    torch.set_num_threads(threads)
    reference = memlm.load(model, dtype="float32")
    ids = reference.tokenizer.encode(SAMPLE_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)[:tokens]
    ref_windows = window_logits(reference.model, ids)
    prompts = encode_prompts(reference.tokenizer, PROMPTS)
    del reference
    params = memlm.SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rows = {}
    for type_name in types:
        row, quant = scored_file(partial(quantized_file, model, type_name), ref_windows, ids)
        exact = [quant.generate_tokens([p], params)[0].token_ids for p in prompts]
        del quant
        dequantized = memlm.load(str(quantized_file(model, type_name)), dtype="float32")  # made above: cached
        want = [dequantized.generate_tokens([p], params)[0].token_ids for p in prompts]
        del dequantized
        identical, prefix = greedy_agreement(exact, want, new_tokens)
        row |= {"exact_vs_dequantized_identical": identical, "exact_vs_dequantized_prefix": round(prefix, 4)}
        if against:  # the same type by llama.cpp's quantizer, from memlm's float32 file of the model
            theirs, _ = scored_file(partial(llama_cpp_quantized_file, model, type_name, threads), ref_windows, ids)
            row["llama.cpp"] = theirs
            row["ppl_vs_llama_cpp_pct"] = round(100 * (row["ppl"] - theirs["ppl"]) / theirs["ppl"], 3)
        rows[type_name] = row
        print(f"{type_name}: {row}", flush=True)  # progress: each type takes minutes on 2 cores
    return {
        "model": model,
        "source": str(resolve(model)[1]),
        "threads": threads,
        "window": WINDOW,
        "against": ["llama.cpp"] if against else [],
        "types": rows,
    }


def print_result(result: dict, console) -> None:
    columns = ("type", "quantizer", "file MB", "ppl fp32", "ppl", "ppl +%", "KL mean", "top-1 agree", "exact==dequant")
    rows = []
    for name, r in result["types"].items():
        for quantizer, q in (("memlm", r), ("llama.cpp", r.get("llama.cpp"))):
            if q is None:
                continue
            exact = q.get("exact_vs_dequantized_identical")
            rows.append([
                name,
                quantizer,
                f"{q['file_mb']:.1f}",
                f"{q['ppl_float32']:.3f}",
                f"{q['ppl']:.3f}",
                f"{q['ppl_delta_pct']:+.2f}",
                f"{q['kl_mean']:.4f}",
                f"{q['top1_agree']:.3f}",
                "" if exact is None else f"{exact:.2f}",
            ])  # fmt: skip
    title = f"memlm quantize quality: {result['model']}, {next(iter(result['types'].values()))['tokens']} tokens"
    print_table(console, title, columns, rows, left=("type", "quantizer"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M,Q5_K_M,Q6_K")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--against", default="", help="llama.cpp: also quantize with llama.cpp's quantizer (needs llama-cpp-python)"
    )
    args = parser.parse_args(argv)
    if args.against not in ("", "llama.cpp"):
        parser.error(f"--against takes llama.cpp, not {args.against!r}")
    if args.against and importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("--against llama.cpp needs llama-cpp-python: pip install llama-cpp-python")
    console = Console()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    result = run(args.model, types, args.tokens, args.new_tokens, args.threads, against=bool(args.against))
    print_result(result, console)
    write_outputs(result, console, args.json, None, None)


if __name__ == "__main__":
    main()
