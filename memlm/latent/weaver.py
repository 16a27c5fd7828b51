"""The MemGen weaver: the reasoner's own weights plus LoRA, writing latent memory.

The weaver appends K learned query vectors (`prompt_queries` after the prompt,
`inference_queries` at a delimiter) to the sequence so far and returns the last-layer hidden
states of those queries projected into the reasoner's embedding space (`to_reasoner`). The
reasoner then reads them as K extra positions of its context. What the queries attend to is the
weaver's `input`:

* "embeddings": the sequence's input embeddings (projected by `to_weaver`), read by the weaver
  itself with LoRA on, in its own incremental cache over the real tokens (the reference
  implementation's choice). The weaver recomputes the whole prefix with its adapted weights.
* "states": the reasoner's own keys and values, layer by layer, in the reasoner's KV cache: what
  the reasoner computed for the prefix, latents inserted so far included (its hidden states at
  every layer, as attention sees them). Only the K queries run with LoRA on, over that cache,
  and are dropped from it again: no second cache, no catching up on the tokens since the last
  insertion. The price is in training: each insertion's latents depend on the reasoner's pass
  over the earlier ones, so the differentiable twin runs segment by segment (training.py).

What the weaver writes is its `output`:

* "embeddings": K latent embeddings (`to_reasoner` of the queries' last hidden states), which the
  reasoner then reads as K extra tokens, computing their keys and values itself with its frozen
  weights (MemGen's form). The token sampled at the insertion point is dropped and sampled
  again after the latents.
* "kv" (reading "states" only): the queries' own keys and values at every layer, computed with
  LoRA on, stay in the reasoner's cache as the K latent slots. The reasoner never re-reads them
  as tokens, so the memory reaches each layer directly (deep prefix tuning, made dynamic),
  and the token sampled at the insertion point is kept: the latents go in before it is fed. In
  the engine the queries are K more positions of the batch's own forward, before that token, with
  LoRA on for them alone (memlm.generation.batch.feed): an insertion costs no pass of its own.
  With the delimiter start the queries begin as copies of the newline's embedding and LoRA's B
  starts at 0, so step 0 writes exactly the keys and values of newlines (nearly harmless, see
  `anchor`) while LoRA already has a route to the loss.

Two more choices decide how fast it learns (measured in bench/NOTEBOOK.md, "the weaver sweep"):

* `depth`: a truncated weaver runs only the reasoner's first `depth` layers (LoRA on those only),
  cheaper per insertion and per training step.
* `anchor`: an untrained weaver's latents are noise to the reasoner (its loss on chain sums
  rises from 0.33 to 1.18 nats/token with 8 of them at every line end), and zero latents are no
  better (0.85): they still hold keys and values that take attention. Copies of the delimiter's
  own embedding are nearly neutral (0.38; "\n" after "\n" is text the reasoner has seen). With an
  anchor, `to_reasoner` starts at weight 0 and bias `anchor`, so step 0 writes those copies and
  training moves away from a reasoner that still works, as LoRA's zero-initialised B does.
  That start has no route from the weaver's hidden states, though (weight 0), so the LoRA inside
  the weaver gets no gradient until the projection has grown one. `gated` keeps both: latent =
  anchor + g * W h, W the pass-through projection and g a scalar gate that starts at 0 (so step 0
  still writes the anchor copies) and moves GATE_GAIN times faster than the other parameters
  (Adam moves a parameter by about lr a step; a gate moving at lr would stay near 0 for
  hundreds of steps).

Weaver and reasoner are one LlamaModel: LoRA wrappers share the frozen base weights and stay
switched off except inside the weaver's own forward, so the engine, which runs the model as is,
sees the plain reasoner. No second copy of the base model exists.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.adapters.lora import add_lora, lora_layers, lora_switched
from memlm.cache.kv_cache import KVCache
from memlm.errors import MemlmError
from memlm.models.llama import LlamaModel

QUERY_KINDS = ("prompt", "inference")
GATE_GAIN = 25.0  # the gate's effective learning rate, as a multiple of the weaver's


class Weaver(nn.Module):
    def __init__(
        self,
        reasoner: LlamaModel,
        prompt_latents: int = 8,
        inference_latents: int = 8,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        depth: int | None = None,
        anchor: torch.Tensor | None = None,
        input: str = "embeddings",
        gated: bool = False,
        output: str = "embeddings",
    ):
        super().__init__()
        # The options themselves were checked by WeaverSpec (LatentMemory.create builds from one);
        # here only what needs the reasoner: its number of layers and the adapters already on it.
        self.input, self.output = input, output
        layers = reasoner.config.num_layers
        if depth is not None and not 1 <= depth <= layers:
            raise MemlmError(f"the weaver's layers must be 1..{layers}, got {depth}")
        self.depth = None if depth == layers else depth
        present = list(lora_layers(reasoner))
        if not present:
            add_lora(reasoner, lora_rank, lora_alpha, depth=self.depth)
        else:  # adapters already on the model are shared: only a memory of the same shape may use them
            deepest = max(int(name.split(".")[1]) for name, _ in present) + 1
            if deepest != (self.depth or layers) or any(layer.rank != lora_rank for _, layer in present):
                raise MemlmError(
                    "this model already carries a latent memory's adapters of another shape; "
                    "load each memory onto its own engine"
                )
        for _, layer in lora_layers(reasoner):
            layer.enabled = False  # the reasoner's view by default
        object.__setattr__(self, "reasoner", reasoner)  # shared, not a submodule: never saved with the weaver
        d = reasoner.config.hidden_size
        scale = float(reasoner.embed_tokens.weight.std())
        self.prompt_queries = nn.Parameter(torch.randn(prompt_latents, d, dtype=reasoner.dtype) * scale)
        self.inference_queries = nn.Parameter(torch.randn(inference_latents, d, dtype=reasoner.dtype) * scale)
        self.gate = None
        if output == "kv":  # the queries' keys and values are the memory: nothing to project
            self.to_weaver = self.to_reasoner = None
            if anchor is not None:  # start as the anchor's keys and values (see the module doc)
                with torch.no_grad():
                    self.prompt_queries.copy_(anchor.expand_as(self.prompt_queries))
                    self.inference_queries.copy_(anchor.expand_as(self.inference_queries))
            return
        # Reading the reasoner's states, the weaver sees no embeddings of its own to project.
        self.to_weaver = nn.Linear(d, d, dtype=reasoner.dtype) if input == "embeddings" else None
        self.to_reasoner = nn.Linear(d, d, dtype=reasoner.dtype)
        with torch.no_grad():  # start as "pass through": embeddings in, hidden states out at embedding scale
            if self.to_weaver is not None:
                self.to_weaver.weight.copy_(torch.eye(d))
                self.to_weaver.bias.zero_()
            self.to_reasoner.weight.copy_(torch.eye(d) * scale)
            self.to_reasoner.bias.zero_()
            if anchor is not None:  # start as copies of the anchor embedding (see the module doc)
                if not gated:
                    self.to_reasoner.weight.zero_()
                self.to_reasoner.bias.copy_(anchor)
        if gated and anchor is None:
            raise MemlmError("a gated weaver starts from an anchor embedding")
        self.gate = nn.Parameter(torch.zeros(1, dtype=reasoner.dtype)) if gated else None

    @property
    def num_latents(self) -> dict[str, int]:
        return {"prompt": self.prompt_queries.shape[0], "inference": self.inference_queries.shape[0]}

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for _, layer in lora_layers(self.reasoner) for p in (layer.lora_a, layer.lora_b)]

    def queries(self, kind: str) -> torch.Tensor:
        return self.prompt_queries if kind == "prompt" else self.inference_queries

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The queries' last hidden states [K, d] -> latent embeddings for the reasoner [K, d]."""
        if self.gate is None:
            return self.to_reasoner(hidden)
        route = hidden @ self.to_reasoner.weight.T
        return self.to_reasoner.bias + (GATE_GAIN * self.gate) * route

    @property
    def reads_states(self) -> bool:
        return self.input == "states"

    @property
    def writes_kv(self) -> bool:
        return self.output == "kv"

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        model, config = self.reasoner, self.reasoner.config
        layers = self.depth or config.num_layers
        return KVCache(layers, batch, config.num_kv_heads, config.head_dim, capacity, model.dtype, model.device)

    def weave(
        self,
        cache: KVCache,
        pending: list[list[int]],
        kinds: list[str | None],
    ) -> list[torch.Tensor | None]:
        """Latent memory for the rows whose kind is not None.

        `pending[row]` are the token ids the weaver has not read yet (they enter its cache for
        good); `kinds[row]` says which queries to append ("prompt" or "inference"). Queries are
        read after the tokens and then dropped from the cache again, so the weaver's cache only
        ever holds real tokens. -> per row, [K, d] latent embeddings for the reasoner, or None.
        """
        model = self.reasoner
        batch = len(pending)
        chunks, starts = [], cache.lengths.tolist()
        for row in range(batch):
            ids = torch.tensor(pending[row], dtype=torch.long, device=model.device)
            embeds = self.to_weaver(model.embed(ids))
            if kinds[row] is not None:
                embeds = torch.cat((embeds, self.queries(kinds[row])))
            chunks.append(embeds)
        width = max(c.shape[0] for c in chunks)
        if width == 0:
            return [None] * batch
        x = torch.zeros(batch, width, model.config.hidden_size, dtype=model.dtype, device=model.device)
        positions = torch.full((batch, width), -1, dtype=torch.long, device=model.device)
        for row, c in enumerate(chunks):
            x[row, : c.shape[0]] = c
            positions[row, : c.shape[0]] = torch.arange(starts[row], starts[row] + c.shape[0])
        with lora_switched(model, True):
            hidden = model(x, positions, cache, depth=self.depth)
        keep = torch.tensor([s + len(p) for s, p in zip(starts, pending, strict=True)])
        cache.truncate(keep)  # forget the queries
        out = []
        for row, kind in enumerate(kinds):
            if kind is None:
                out.append(None)
                continue
            n, k = len(pending[row]), self.num_latents[kind]
            out.append(self.project(hidden[row, n : n + k]))
        return out

    def weave_states(self, cache, starts: list[int], kinds: list[str | None]) -> list[torch.Tensor | None]:
        """Latent memory for the rows whose kind is not None, read from the reasoner's own `cache`.

        Each such row's queries run at positions `starts[row]` onwards (where its latents will go),
        attend to everything the row's cache holds, and leave the cache as they found it: its
        lengths, and no attention statistics from them (an eviction policy must not count what
        the weaver looked at). -> per row, [K, d] latent embeddings for the reasoner, or None.
        `cache` is a KVCache, or training's differentiable segment cache (training.py).
        """
        hidden = self._run_queries(cache, starts, self._kind_queries(kinds), keep=False)
        return [
            None if kind is None else self.project(hidden[row, : self.num_latents[kind]])
            for row, kind in enumerate(kinds)
        ]

    def write_states(self, cache, starts: list[int], kinds: list[str | None]) -> list[int]:
        """A "kv" weaver's insertion as a pass of its own (the training twin's; the engine folds the
        same queries into its step): the queries of the rows whose kind is not None run at positions
        `starts[row]` onwards over the reasoner's `cache`, and their keys and values stay there as
        the row's latent slots (no attention statistics recorded). -> slots written per row."""
        self._run_queries(cache, starts, self._kind_queries(kinds), keep=True)
        return [0 if kind is None else self.num_latents[kind] for kind in kinds]

    def probe(self, cache, starts: list[int], vectors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The weaver's model (LoRA on) reading the reasoner's `cache` through one position per row:
        `vectors[row]` [d] (None: the row is not probed) at position `starts[row]`, dropped from the
        cache again, no attention statistics. -> per row, its last-layer hidden state [d], or None.
        What a trigger that reads the whole sequence decides on (latent/trigger.py)."""
        hidden = self._run_queries(cache, starts, [None if v is None else v[None] for v in vectors], keep=False)
        return [None if v is None else hidden[row, 0] for row, v in enumerate(vectors)]

    def _kind_queries(self, kinds: list[str | None]) -> list[torch.Tensor | None]:
        return [None if kind is None else self.queries(kind) for kind in kinds]

    def _run_queries(self, cache, starts: list[int], queries: list[torch.Tensor | None], keep: bool):
        """Rows' query vectors (`queries[row]` [k, d] or None) at positions `starts[row]` onwards,
        through the weaver's layers with LoRA on, over `cache` -> hidden [batch, width, d] (None when
        no row has queries). Their keys and values stay in the cache when `keep`."""
        model = self.reasoner
        batch = len(queries)
        width = max((q.shape[0] for q in queries if q is not None), default=0)
        if width == 0:
            return None
        x = torch.zeros(batch, width, model.config.hidden_size, dtype=model.dtype, device=model.device)
        positions = torch.full((batch, width), -1, dtype=torch.long, device=model.device)
        for row, q in enumerate(queries):
            if q is not None:
                k = q.shape[0]
                x[row, :k] = q
                positions[row, :k] = torch.arange(starts[row], starts[row] + k)
        lengths, tracking = cache.lengths.clone(), cache.track_attention
        last_step = getattr(cache, "last_step", None)
        cache.track_attention = False
        try:
            with lora_switched(model, True):
                return model(x, positions, cache, depth=self.depth)
        finally:
            cache.track_attention = tracking
            if not keep:
                cache.truncate(lengths)  # forget the queries
            cache.last_step = last_step
