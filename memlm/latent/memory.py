"""LatentMemory: weaver + trigger + insertion rules, the hook the Engine runs (generate(memory=...)).

A checkpoint is a folder: latent_memory.safetensors (LoRA, latent queries, projections, trigger
head; a few MB) and latent_memory.json naming the base model and the shapes. Loading it onto a
different model, or a folder that is not one, is a clear error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memlm.adapters.lora import lora_layers
from memlm.atomic import atomic_write
from memlm.cache.importance import same_model
from memlm.errors import ModelFormatError
from memlm.latent.delimiters import DelimiterSet
from memlm.latent.hook import LatentHook
from memlm.latent.spec import WeaverSpec
from memlm.latent.trigger import TRAINED, make_trigger
from memlm.latent.weaver import Weaver

CONFIG_FILE = "latent_memory.json"
WEIGHTS_FILE = "latent_memory.safetensors"


def saved_config(folder: str | Path) -> dict:
    """A saved memory's config.json (what it is and which trigger it was saved with), read without
    loading any weights: for checks before a long run."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelFormatError(f"{folder} is not a latent memory checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is not a valid latent memory config: {e}") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path} is not a valid latent memory config: not an object")
    return config


class LatentMemory:
    def __init__(
        self,
        weaver: Weaver,
        trigger,
        delimiters: DelimiterSet,
        max_prompt_aug: int = 1,
        max_inference_aug: int = 8,
        config: dict | None = None,
    ):
        self.weaver, self.trigger, self.delimiters = weaver, trigger, delimiters
        self.max_prompt_aug, self.max_inference_aug = max_prompt_aug, max_inference_aug
        self.config = config or {}

    @classmethod
    def create(cls, engine, spec: WeaverSpec | None = None, **options) -> LatentMemory:
        """A fresh (untrained) memory of shape `spec` on `engine`'s model; LoRA is added to that
        model in place. Without a spec, the keyword options are a WeaverSpec's fields.

        `weaver_layers` truncates the weaver to the reasoner's first layers; `init` is "random" or
        "delimiter" (latents start as copies of the newline's embedding, or of the first delimiter's
        without a newline among them: see Weaver) or "gated" (those copies plus the weaver's
        projected states behind a gate that starts shut); `weaver_input` is what the weaver reads,
        "embeddings" or the reasoner's "states"; `weaver_output` what it writes, latent "embeddings"
        or the latent slots' keys and values, "kv" (see Weaver)."""
        if spec is None:
            spec = WeaverSpec.of(engine.config.num_layers, **options)
        elif options:
            raise TypeError("LatentMemory.create takes a WeaverSpec or keyword options, not both")
        anchor = None
        if spec.init in ("delimiter", "gated"):
            delimiters = spec.delimiters
            ids = engine.tokenizer.encode("\n" if "\n" in delimiters else delimiters[0], add_special_tokens=False)
            anchor = engine.model.embed(torch.tensor(ids[-1:], device=engine.model.device))[0].detach()
        weaver = Weaver(
            engine.model,
            spec.prompt_latents,
            spec.inference_latents,
            spec.lora_rank,
            spec.lora_alpha,
            spec.weaver_layers,
            anchor,
            spec.weaver_input,
            gated=spec.init == "gated",
            output=spec.weaver_output,
        )
        config = {
            "base_model": engine.name,
            "hidden_size": engine.config.hidden_size,
            **spec.to_json(engine.config.num_layers),
        }
        return cls(
            weaver,
            make_trigger(spec.trigger, engine.config.hidden_size),
            DelimiterSet.for_tokenizer(engine.tokenizer, spec.delimiters),
            spec.max_prompt_aug,
            spec.max_inference_aug,
            config,
        )

    def prompt_latents(self) -> int:
        return self.weaver.num_latents["prompt"] if self.max_prompt_aug > 0 else 0

    def row_hook(self) -> LatentHook:
        """What runs this memory in the decode loop, for the requests of one batch that use it."""
        return LatentHook(self)

    def extra_slots(self) -> int:
        """Most latent slots one sequence can add to the reasoner's cache."""
        return self.prompt_latents() + self.max_inference_aug * self.weaver.num_latents["inference"]

    # ---- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"weaver.{k}": v for k, v in self.weaver.state_dict().items()}
        for name, layer in lora_layers(self.weaver.reasoner):
            tensors[f"lora.{name}.lora_a"], tensors[f"lora.{name}.lora_b"] = layer.lora_a, layer.lora_b
        if self.config.get("trigger") in TRAINED:
            tensors.update({f"trigger.{k}": v for k, v in self.trigger.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def save(self, folder: str | Path, dtype: torch.dtype | None = torch.bfloat16) -> Path:
        """Write the checkpoint folder; floating tensors in `dtype` (bf16 halves it, like adapters)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in self.state_dict().items()
        }
        atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(folder / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(self.config, indent=2)))
        return folder

    @classmethod
    def load(cls, folder: str | Path, engine, check_name: bool = True, trigger: str | None = None) -> LatentMemory:
        """Load a checkpoint onto `engine`'s model. `trigger` overrides the saved trigger: a folder
        with a trained trigger (learned or sequence) can also run `always` or `never` (one folder
        serves those variants too)."""
        folder = Path(folder)
        config = saved_config(folder)
        try:
            spec = WeaverSpec.from_json(config, engine.config.num_layers)
            base, hidden = str(config["base_model"]), int(config["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{folder / CONFIG_FILE} is not a valid latent memory config: {e}") from None
        if hidden != engine.config.hidden_size or (check_name and not same_model(base, engine.name)):
            raise ModelFormatError(f"latent memory {folder} was trained on {base!r}, not {engine.name!r}")
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"cannot read {folder / WEIGHTS_FILE}: {e}") from None
        saved = config.get("trigger", "always")
        if trigger is not None and trigger != saved:
            make_trigger(trigger, hidden)  # an unknown name is the caller's error
            if trigger in TRAINED:
                raise ModelFormatError(f"latent memory {folder} has no {trigger} trigger (saved with {saved!r})")
            tensors = {k: v for k, v in tensors.items() if not k.startswith("trigger.")}
            config = {**config, "trigger": trigger}
            spec = dataclasses.replace(spec, trigger=trigger)
        memory = cls.create(engine, spec)  # a gated weaver has one more tensor, its gate
        memory.config = config
        memory.load_state_dict(tensors, folder)
        return memory

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where="checkpoint") -> None:
        expected = self.state_dict()
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))
            raise ModelFormatError(f"{where}: tensors do not match this model (missing {missing[:2]})")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ModelFormatError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}")
        with torch.no_grad():
            self.weaver.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("weaver.")})
            layers = dict(lora_layers(self.weaver.reasoner))
            for name, tensor in tensors.items():
                if name.startswith("lora."):
                    layer_name, part = name[5:].rsplit(".", 1)
                    getattr(layers[layer_name], part).copy_(tensor)
            if self.config.get("trigger") in TRAINED:
                self.trigger.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("trigger.")})


def mark_insertions(tokenizer, token_ids: list[int], insertions: list[int], mark: str = "⟨mem⟩") -> str:
    """The completion's text with `mark` wherever latent memory was inserted."""
    pieces, cut = [], 0
    for k in sorted(set(insertions)):
        pieces.append(tokenizer.decode(token_ids[cut:k]))
        pieces.append(mark * insertions.count(k))
        cut = k
    pieces.append(tokenizer.decode(token_ids[cut:]))
    return "".join(pieces)
