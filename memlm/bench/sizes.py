"""Speed at the sizes people run: random-weight models of real shapes, as GGUF files made by
llama.cpp's own quantizer, for `memlm bench decode --against llama.cpp` (bench/sizes.sh).

    python -m memlm.bench.sizes make --shape llama-3.2-1b --types Q4_K_M,Q4_0 --out runs/sizes
    python -m memlm.bench.sizes merge runs/sizes/*.json --json bench/results/sizes.json --plot bench/results/sizes.png

`make` writes a Hugging Face folder of random weights (normal, sd 0.02; norms 1) in the shape's
layout with SmolLM2's 49,152-piece tokenizer (every shape, so one tokenizer serves; a real Qwen
vocabulary would add ~190M embedding parameters), converts it to a float32 GGUF with
`memlm quantize --type F32`, has llama.cpp quantize that into each file type, and prints the
files. Random weights are fine for speed (the work per token does not depend on the values);
quality is measured on real weights elsewhere. `merge` joins decode-benchmark JSONs (one per
file, prompt length) into one table of memlm / llama.cpp ratios and a plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console

from memlm.bench.report import print_table, pyplot, save_figure, write_outputs

# The shapes of the models people run at these sizes (their configs), with SmolLM2's vocabulary.
SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0},
    "qwen2.5-1.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0},
}  # fmt: skip
TOKENIZER_MODEL = "smollm2-135m-instruct"


def random_hf_folder(shape: str, folder: Path, seed: int = 0) -> Path:
    """A loadable Hugging Face folder of random weights in `shape` (float16 safetensors)."""
    import torch  # lazy: `merge` needs none of it
    from safetensors.torch import save_file

    from memlm.formats.loading import resolve

    _, source = resolve(TOKENIZER_MODEL)
    config = json.loads((source / "config.json").read_text())
    config |= SHAPES[shape]
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    config["torch_dtype"] = "float16"
    qwen = config.get("model_type") == "qwen2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    g = torch.Generator().manual_seed(seed)
    h, f, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], h), "model.norm.weight": torch.ones(h).half()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            weights[f"{p}self_attn.{name}_proj.weight"] = normal(rows, h)
            if qwen:  # Qwen2's q/k/v carry biases
                weights[f"{p}self_attn.{name}_proj.bias"] = normal(rows)
        weights[f"{p}self_attn.o_proj.weight"] = normal(h, q)
        weights[f"{p}mlp.gate_proj.weight"] = normal(f, h)
        weights[f"{p}mlp.up_proj.weight"] = normal(f, h)
        weights[f"{p}mlp.down_proj.weight"] = normal(h, f)
        weights[f"{p}input_layernorm.weight"] = torch.ones(h).half()
        weights[f"{p}post_attention_layernorm.weight"] = torch.ones(h).half()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def make(shape: str, types: list[str], out: Path, threads: int) -> list[Path]:
    """The shape's GGUF files, one per llama.cpp file type (kept if already made)."""
    from memlm.bench.llama_cpp import llama_cpp_quantize  # lazy: llama-cpp-python is optional
    from memlm.formats.gguf_writer import quantize_file
    from memlm.quant.mix import scheme

    files = [out / f"{shape}-{t.upper()}.gguf" for t in types]
    if all(p.is_file() for p in files):
        return files
    source = out / f"{shape}-F32.gguf"
    if not source.is_file():
        folder = random_hf_folder(shape, out / f"{shape}-hf")
        quantize_file(str(folder), source, scheme("F32"))
        shutil.rmtree(folder)
    for t, target in zip(types, files, strict=True):
        llama_cpp_quantize(source, target, scheme(t).file_type, threads)
    return files


def merge(paths: list[str]) -> dict:
    """Rows of (shape file, prompt tokens, batch): memlm's best dtype against llama.cpp."""
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        name = Path(result["model"]).stem
        for batch in sorted({r["batch"] for r in result["rows"]}):
            at = [r for r in result["rows"] if r["batch"] == batch]
            theirs = next((r for r in at if r["engine"] == "llama.cpp"), None)
            for ours in (r for r in at if r["engine"] == "memlm"):
                rows.append({
                    "file": name,
                    "prompt_tokens": result.get("prompt_tokens"),
                    "batch": batch,
                    "dtype": ours["dtype"],
                    "decode_tok_s": ours["decode_tok_s"],
                    "prefill_tok_s": ours["prefill_tok_s"],
                    "peak_rss_mb": ours["peak_rss_mb"],
                    "llama_cpp_decode_tok_s": theirs and theirs["decode_tok_s"],
                    "llama_cpp_prefill_tok_s": theirs and theirs["prefill_tok_s"],
                    "llama_cpp_peak_rss_mb": theirs and theirs["peak_rss_mb"],
                    "decode_ratio": theirs and round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3),
                    "prefill_ratio": theirs and round(ours["prefill_tok_s"] / theirs["prefill_tok_s"], 3),
                    "rss_ratio": theirs and round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                })  # fmt: skip
    return {"rows": rows, "sources": paths}


def print_result(result: dict, console) -> None:
    columns = ("file", "prompt", "batch", "memlm dtype", "decode tok/s", "vs llama.cpp", "prefill vs", "RSS vs")
    rows = [
        [r["file"], str(r["prompt_tokens"]), str(r["batch"]), r["dtype"], f"{r['decode_tok_s']:.1f}",
         f"{r['decode_ratio']:.2f}x" if r["decode_ratio"] else "-",
         f"{r['prefill_ratio']:.2f}x" if r["prefill_ratio"] else "-",
         f"{r['rss_ratio']:.2f}x" if r["rss_ratio"] else "-"]
        for r in result["rows"]
    ]  # fmt: skip
    print_table(console, "memlm against llama.cpp at real shapes (random weights)", columns, rows,
                left=("file", "memlm dtype"))  # fmt: skip


def plot_result(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    rows = [r for r in result["rows"] if r["decode_ratio"]]
    labels = [f"{r['file']}\n{r['dtype']} p{r['prompt_tokens']} b{r['batch']}" for r in rows]
    ax.bar(range(len(rows)), [r["decode_ratio"] for r in rows], color="tab:blue", label="decode")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("memlm / llama.cpp, decode tok/s")
    ax.set_title("memlm against llama.cpp on the same files (1.0 = parity)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a shape's random-weight GGUF files; print their paths")
    m.add_argument("--shape", required=True, choices=sorted(SHAPES))
    m.add_argument("--types", default="Q4_K_M,Q4_0,Q8_0")
    m.add_argument("--out", default="runs/sizes")
    m.add_argument("--threads", type=int, default=2)
    g = sub.add_parser("merge", help="join decode-benchmark JSONs into one table and plot")
    g.add_argument("results", nargs="+")
    g.add_argument("--json", default=None)
    g.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    if args.command == "make":
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        for path in make(args.shape, types, Path(args.out), args.threads):
            print(path)
        return
    console = Console()
    result = merge(args.results)
    print_result(result, console)
    write_outputs(result, console, args.json, args.plot, plot_result)


if __name__ == "__main__":
    main()
