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
from memlm.errors import MemlmError, ModelFormatError
from memlm.latent.delimiters import DEFAULT_DELIMITERS, DelimiterSet
from memlm.latent.trigger import make_trigger
from memlm.latent.weaver import Weaver
from memlm.models.lora import lora_layers

CONFIG_FILE = "latent_memory.json"
WEAVER_INITS = ("random", "delimiter", "gated")
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
        # RL (memlm train trigger): sample decisions from the learned trigger with this generator; each
        # request then records (hidden state, decision) at every delimiter (`Completion.decisions`)
        self.explore: torch.Generator | None = None

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
        weaver_layers: int | None = None,
        init: str = "random",
        weaver_input: str = "embeddings",
        weaver_output: str = "embeddings",
    ) -> LatentMemory:
        """A fresh (untrained) memory on `engine`'s model; LoRA is added to that model in place.

        `weaver_layers` truncates the weaver to the reasoner's first layers; `init` is "random" or
        "delimiter" (latents start as copies of the newline's embedding, or of the first delimiter's
        without a newline among them: see Weaver) or "gated" (those copies plus the weaver's
        projected states behind a gate that starts shut); `weaver_input` is what the weaver reads,
        "embeddings" or the reasoner's "states"; `weaver_output` what it writes, latent "embeddings"
        or the latent slots' keys and values, "kv" (see Weaver)."""
        if init not in WEAVER_INITS:
            raise MemlmError(f"unknown weaver init {init!r}; choose from {', '.join(WEAVER_INITS)}")
        anchor = None
        if init in ("delimiter", "gated"):
            ids = engine.tokenizer.encode("\n" if "\n" in delimiters else delimiters[0], add_special_tokens=False)
            anchor = engine.model.embed(torch.tensor(ids[-1:], device=engine.model.device))[0].detach()
        weaver = Weaver(
            engine.model,
            prompt_latents,
            inference_latents,
            lora_rank,
            lora_alpha,
            weaver_layers,
            anchor,
            weaver_input,
            gated=init == "gated",
            output=weaver_output,
        )
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
            "weaver_layers": weaver.depth or engine.config.num_layers,
            "init": init,
            "weaver_input": weaver_input,
            "weaver_output": weaver_output,
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
            layers = config.get("weaver_layers")
            layers = None if layers is None else int(layers)
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
            weaver_layers=layers,
            weaver_input=str(config.get("weaver_input", "embeddings")),
            weaver_output=str(config.get("weaver_output", "embeddings")),
            init=str(config.get("init", "random")),  # a gated weaver has one more tensor, its gate
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
    """A LatentMemory in use by some requests of a running batch: the weaver's cache (one row per
    request, in `requests` order) and what each request has read and inserted so far. Requests join
    (`add`) and leave (`keep`) as the engine's batch changes.

    A weaver that reads the reasoner's states has no cache of its own. Its prompt latents need the
    reasoner's pass over the prompt, so they come one step later, the way a delimiter's do: the
    token sampled after the prompt is dropped, and the next one is sampled after the latents.
    A weaver that writes keys and values keeps that token instead (`write_latents`)."""

    def __init__(self, memory: LatentMemory):
        self.memory = memory
        self.requests: list = []
        self.cache = None
        self.fed: list[int] = []  # tokens of each request the weaver has read
        self.inserted: list[int] = []  # inference insertions so far
        self.last_at: list[int] = []  # output length at the last insertion (never twice in a row)
        self.awaiting_prompt: list[bool] = []  # states weaver: prompt latents still to write

    def add(self, requests: list) -> list[torch.Tensor | None]:
        """Take these requests in; -> the latents to insert right after each prompt (None: none,
        or, for a weaver that reads the reasoner's states, not yet)."""
        states = self.memory.weaver.reads_states
        if not states:
            capacity = max(len(r.prompt_ids) for r in requests) + self.memory.extra_slots() + 16
            fresh = self.memory.weaver.new_cache(len(requests), capacity)
            if self.cache is None:
                self.cache = fresh
            else:
                self.cache.extend(fresh)
        first = len(self.requests)
        self.requests += requests
        self.fed += [0] * len(requests)
        self.inserted += [0] * len(requests)
        self.last_at += [-1] * len(requests)
        self.awaiting_prompt += [states and self.memory.prompt_latents() > 0] * len(requests)
        if self.memory.prompt_latents() == 0 or states:
            return [None] * len(requests)
        rows = range(first, len(self.requests))
        latents = self._weave({row: self.requests[row].prompt_ids for row in rows}, "prompt")
        for row in rows:
            self.last_at[row] = 0
        return [latents[row] for row in rows]

    def choose(self, requests: list, following: list[int], hidden: torch.Tensor) -> list:
        """The requests that insert now: their last token is a delimiter (given the token sampled after
        it), they have insertions left, and the trigger fires on the delimiter's hidden state.
        `requests` are some of this session's, `following` their sampled tokens, `hidden` [n, d]."""
        memory, candidates, prompt = self.memory, [], []
        for i, (r, token) in enumerate(zip(requests, following, strict=True)):
            row, output = self.requests.index(r), r.output_ids
            if self.awaiting_prompt[row]:  # the prompt's latents are not the trigger's to decide
                prompt.append(r)
                continue
            if not output or self.inserted[row] >= memory.max_inference_aug or self.last_at[row] == len(output):
                continue
            previous = output[-2] if len(output) > 1 else r.prompt_ids[-1]
            if memory.delimiters.is_insertion_point(previous, output[-1], token):
                candidates.append(i)
        if not candidates:
            return prompt
        states = hidden[candidates]
        if memory.explore is not None:  # exploring: sample, and remember what was decided where
            p = memory.trigger.probability(states).float()
            fire = (torch.rand(p.shape, generator=memory.explore).to(p.device) < p).tolist()  # a CPU generator
            for i, state, yes in zip(candidates, states, fire, strict=True):
                requests[i].decisions.append((state.detach().float().cpu(), yes))
        else:
            fire = memory.trigger.decide(states).tolist()
        return prompt + [requests[i] for i, yes in zip(candidates, fire, strict=True) if yes]

    def inference_latents(self, inserting: list, state=None, state_rows: list[int] | None = None) -> list[torch.Tensor]:
        """Latents for these requests, from everything they have read and written so far.

        A weaver that reads the reasoner's states reads them from `state` (the reasoner's cache),
        where request `inserting[i]` is row `state_rows[i]`."""
        rows = [self.requests.index(r) for r in inserting]
        if self.memory.weaver.reads_states:
            woven = self.memory.weaver.weave_states(state, *self._state_layout(rows, state, state_rows))
            latents = {row: woven[at] for row, at in zip(rows, state_rows, strict=True)}
        else:
            latents = self._weave({row: self.requests[row].prompt_ids + self.requests[row].output_ids for row in rows})
        self._inserted(rows)
        return [latents[row] for row in rows]

    def write_latents(self, inserting: list, state, state_rows: list[int]) -> list[int]:
        """A "kv" weaver's insertion for these requests: their latent slots go straight into `state`
        (the reasoner's cache, request `inserting[i]` at row `state_rows[i]`), at each request's
        next position, before the token just sampled is fed. -> slots written per request."""
        rows = [self.requests.index(r) for r in inserting]
        written = self.memory.weaver.write_states(state, *self._state_layout(rows, state, state_rows))
        self._inserted(rows)
        return [written[at] for at in state_rows]

    def _state_layout(self, rows: list[int], state, state_rows: list[int]) -> tuple[list[int], list[str | None]]:
        """Per row of the reasoner's `state`: where the queries start, and which to run (None: none)."""
        kinds: list[str | None] = [None] * state.batch_size
        starts = [0] * state.batch_size
        for row, at in zip(rows, state_rows, strict=True):
            kinds[at] = "prompt" if self.awaiting_prompt[row] else "inference"
            starts[at] = self.requests[row].next_position
        return starts, kinds

    def _inserted(self, rows: list[int]) -> None:
        for row in rows:
            if self.awaiting_prompt[row]:
                self.awaiting_prompt[row] = False
            else:
                self.inserted[row] += 1
            self.last_at[row] = len(self.requests[row].output_ids)

    def _weave(self, sequences: dict[int, list[int]], kind: str = "inference") -> list:
        n = len(self.requests)
        pending = [sequences[row][self.fed[row] :] if row in sequences else [] for row in range(n)]
        kinds = [kind if row in sequences else None for row in range(n)]
        latents = self.memory.weaver.weave(self.cache, pending, kinds)
        for row, seq in sequences.items():
            self.fed[row] = len(seq)
        return latents

    def keep(self, requests: list) -> None:
        """Only these requests stay (in this order, a subsequence of the current one)."""
        rows = [self.requests.index(r) for r in requests]
        if self.cache is not None:
            self.cache.select_rows(rows)
        self.requests = list(requests)
        self.fed = [self.fed[i] for i in rows]
        self.inserted = [self.inserted[i] for i in rows]
        self.last_at = [self.last_at[i] for i in rows]
        self.awaiting_prompt = [self.awaiting_prompt[i] for i in rows]


def mark_insertions(tokenizer, token_ids: list[int], insertions: list[int], mark: str = "⟨mem⟩") -> str:
    """The completion's text with `mark` wherever latent memory was inserted."""
    pieces, cut = [], 0
    for k in sorted(set(insertions)):
        pieces.append(tokenizer.decode(token_ids[cut:k]))
        pieces.append(mark * insertions.count(k))
        cut = k
    pieces.append(tokenizer.decode(token_ids[cut:]))
    return "".join(pieces)
