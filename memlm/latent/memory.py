"""LatentMemory: weaver + trigger + insertion rules, the hook the Engine runs (generate(memory=...)).

A checkpoint is a folder: latent_memory.safetensors (LoRA, latent queries, projections, trigger
head; a few MB) and latent_memory.json naming the base model and the shapes. Loading it onto a
different model, or a folder that is not one, is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memlm.atomic import atomic_write
from memlm.cache.importance import same_model
from memlm.errors import ModelFormatError
from memlm.latent.delimiters import DEFAULT_DELIMITERS, DelimiterSet
from memlm.latent.trigger import make_trigger
from memlm.latent.weaver import Weaver
from memlm.models.lora import lora_layers

CONFIG_FILE = "latent_memory.json"
WEIGHTS_FILE = "latent_memory.safetensors"


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
        # RL (memlm train trigger): sample decisions from the learned trigger with this generator
        # and record (hidden state, decision) per request of the next generation.
        self.explore: torch.Generator | None = None
        self.decisions: list[list[tuple[torch.Tensor, bool]]] | None = None

    @classmethod
    def create(
        cls,
        engine,
        prompt_latents: int = 8,
        inference_latents: int = 8,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        trigger: str = "always",
        max_prompt_aug: int = 1,
        max_inference_aug: int = 8,
        delimiters=DEFAULT_DELIMITERS,
    ) -> LatentMemory:
        """A fresh (untrained) memory on `engine`'s model; LoRA is added to that model in place."""
        weaver = Weaver(engine.model, prompt_latents, inference_latents, lora_rank, lora_alpha)
        config = {
            "base_model": engine.name,
            "hidden_size": engine.config.hidden_size,
            "prompt_latents": prompt_latents,
            "inference_latents": inference_latents,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "trigger": trigger,
            "max_prompt_aug": max_prompt_aug,
            "max_inference_aug": max_inference_aug,
            "delimiters": list(delimiters),
        }
        return cls(
            weaver,
            make_trigger(trigger, engine.config.hidden_size),
            DelimiterSet.for_tokenizer(engine.tokenizer, delimiters),
            max_prompt_aug,
            max_inference_aug,
            config,
        )

    def prompt_latents(self) -> int:
        return self.weaver.num_latents["prompt"] if self.max_prompt_aug > 0 else 0

    def extra_slots(self) -> int:
        """Most latent slots one sequence can add to the reasoner's cache."""
        return self.prompt_latents() + self.max_inference_aug * self.weaver.num_latents["inference"]

    # ---- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"weaver.{k}": v for k, v in self.weaver.state_dict().items()}
        for name, layer in lora_layers(self.weaver.reasoner):
            tensors[f"lora.{name}.lora_a"], tensors[f"lora.{name}.lora_b"] = layer.lora_a, layer.lora_b
        if self.config.get("trigger") == "learned":
            tensors.update({f"trigger.{k}": v for k, v in self.trigger.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def save(self, folder: str | Path, dtype: torch.dtype | None = torch.bfloat16) -> Path:
        """Write the checkpoint folder; floating tensors in `dtype` (bf16 halves it, like adapters)."""
        from safetensors.torch import save_file

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
        with a learned trigger can also run `always` or `never` (one folder serves both variants)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ModelFormatError(f"{folder} is not a latent memory checkpoint (no {CONFIG_FILE})")
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            shape = {k: config[k] for k in ("prompt_latents", "inference_latents", "lora_rank", "lora_alpha")}
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
            if trigger == "learned":
                raise ModelFormatError(f"latent memory {folder} has no learned trigger (saved with {saved!r})")
            tensors = {k: v for k, v in tensors.items() if not k.startswith("trigger.")}
            config = {**config, "trigger": trigger}
        memory = cls.create(
            engine,
            trigger=config.get("trigger", "always"),
            max_prompt_aug=config.get("max_prompt_aug", 1),
            max_inference_aug=config.get("max_inference_aug", 8),
            delimiters=tuple(config.get("delimiters", DEFAULT_DELIMITERS)),
            **shape,
        )
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
            if self.config.get("trigger") == "learned":
                self.trigger.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("trigger.")})


class LatentSession:
    """One generation's use of a LatentMemory: the weaver's cache and what each row has used.

    Rows are the engine's active rows; `select_rows` follows the engine when rows finish.
    """

    def __init__(self, memory: LatentMemory, prompts: list[list[int]], capacity: int):
        self.memory = memory
        self.cache = memory.weaver.new_cache(len(prompts), capacity)
        self.fed = [0] * len(prompts)  # tokens of each row the weaver has read
        self.inserted = [0] * len(prompts)  # inference insertions so far
        self.last_at = [-1] * len(prompts)  # output length at the last insertion (never twice in a row)
        self.origin = list(range(len(prompts)))  # each row's request index
        if memory.explore is not None:
            memory.decisions = [[] for _ in prompts]

    def prompt_latents(self, prompts: list[list[int]]) -> list[torch.Tensor] | None:
        if self.memory.prompt_latents() == 0:
            return None
        latents = self._weave(prompts, [True] * len(prompts), "prompt")
        self.last_at = [0] * len(prompts)
        return latents

    def choose(self, rows: list[tuple[list[int], list[int]]], following: list[int], hidden: torch.Tensor) -> list[int]:
        """Rows that insert now: their last token is a delimiter (given the token sampled after
        it), they have insertions left, and the trigger fires on the delimiter's hidden state."""
        memory, candidates = self.memory, []
        for row, ((prompt, output), token) in enumerate(zip(rows, following, strict=True)):
            if not output or self.inserted[row] >= memory.max_inference_aug or self.last_at[row] == len(output):
                continue
            previous = output[-2] if len(output) > 1 else prompt[-1]
            if memory.delimiters.is_insertion_point(previous, output[-1], token):
                candidates.append(row)
        if not candidates:
            return []
        states = hidden[candidates]
        if memory.explore is not None:  # exploring: sample, and remember what was decided where
            p = memory.trigger.probability(states).float()
            fire = (torch.rand(p.shape, generator=memory.explore).to(p.device) < p).tolist()  # a CPU generator
            for row, state, yes in zip(candidates, states, fire, strict=True):
                memory.decisions[self.origin[row]].append((state.detach().float().cpu(), yes))
        else:
            fire = memory.trigger.decide(states).tolist()
        return [row for row, yes in zip(candidates, fire, strict=True) if yes]

    def inference_latents(self, rows: list[tuple[list[int], list[int]]], inserting: list[int]) -> list:
        sequences = [prompt + output for prompt, output in rows]
        wanted = [row in inserting for row in range(len(rows))]
        latents = self._weave(sequences, wanted, "inference")
        for row in inserting:
            self.inserted[row] += 1
            self.last_at[row] = len(rows[row][1])
        return latents

    def _weave(self, sequences: list[list[int]], wanted: list[bool], kind: str) -> list:
        pending = [seq[self.fed[row] :] if wanted[row] else [] for row, seq in enumerate(sequences)]
        latents = self.memory.weaver.weave(self.cache, pending, [kind if w else None for w in wanted])
        for row, w in enumerate(wanted):
            if w:
                self.fed[row] = len(sequences[row])
        return latents

    def select_rows(self, keep: list[int]) -> None:
        self.cache.select_rows(keep)
        self.fed = [self.fed[i] for i in keep]
        self.inserted = [self.inserted[i] for i in keep]
        self.last_at = [self.last_at[i] for i in keep]
        self.origin = [self.origin[i] for i in keep]


def mark_insertions(tokenizer, token_ids: list[int], insertions: list[int], mark: str = "⟨mem⟩") -> str:
    """The completion's text with `mark` wherever latent memory was inserted."""
    pieces, cut = [], 0
    for k in sorted(set(insertions)):
        pieces.append(tokenizer.decode(token_ids[cut:k]))
        pieces.append(mark * insertions.count(k))
        cut = k
    pieces.append(tokenizer.decode(token_ids[cut:]))
    return "".join(pieces)
