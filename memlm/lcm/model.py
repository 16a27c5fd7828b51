"""The LCM language model: causal encoder -> z -> codebook memory (six grids, reasoning loop,
safety) -> z_q -> GenHead decoder, which reads z_q at every position of every layer.

Causality holds everywhere: z_t depends on tokens <= t only (causal linear attention and causal
convolution), the memory works on each position's z on its own, and the decoder's prediction of
token t+1 sees tokens <= t and z_q <= t. Training runs whole windows in parallel; generation runs
the same modules incrementally from an `LCMState`, whose size does not grow with the text.

Engine contract (shared with the Llama family): `new_state(batch, ...)`, `forward_tokens(ids,
positions, state) -> hidden`, `logits(hidden)`, `device`, `dtype`, `config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from memlm.errors import InvalidRequestError
from memlm.lcm.config import GRID_NAMES, LCMConfig
from memlm.lcm.hook import HaltHook
from memlm.lcm.linear_attention import BlockState, Reach, Stack
from memlm.lcm.memory import CodebookMemory, LoopTrace


class Encoder(nn.Module):
    """Tokens -> z_t [B, T, z_dim], causal."""

    def __init__(self, cfg: LCMConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.stack = Stack(cfg.encoder_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.conv_kernel)
        self.to_z = nn.Linear(cfg.hidden_size, cfg.z_dim, bias=False)

    def forward(self, ids, valid, states=None) -> torch.Tensor:
        return self.to_z(self.stack(self.embed(ids), valid, states))


class GenHead(nn.Module):
    """The decoder: causal linear attention + GLU blocks, conditioned on z_q at every layer."""

    def __init__(self, cfg: LCMConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.stack = Stack(
            cfg.decoder_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.intermediate_size,
            cfg.conv_kernel,
            cfg.decoder_experts,
            cfg.decoder_experts_per_token,
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids, valid, states=None, conditions=None, reach: Reach | None = None) -> torch.Tensor:
        return self.stack(self.embed(ids), valid, states, conditions, reach)


@dataclass
class LCMState:
    """Per-batch generation state: recurrent sums of every block, plus bookkeeping.

    The recurrent part is constant in size. `history` (the row's token ids) is kept only when a
    re-encode period is set: re-encoding recomputes the sums from the whole text, because the
    encoder reads all of it, so the history grows with the text (a Python int list: ~8 bytes a
    token, plus the list's own 8). Without a period the state is all there is."""

    encoder: list[BlockState]
    decoder: list[BlockState]
    lengths: torch.Tensor  # [B] tokens consumed per row
    halted: torch.Tensor  # [B] bool: the danger grid stopped this row
    since_encode: torch.Tensor  # [B] tokens consumed since the row's last full (parallel) encode
    history: list[list[int]] | None
    traces: list[dict | None] = field(default_factory=list)  # per row: the loop trace of its last token
    reencodes: int = 0
    supports_eviction = False  # KV-eviction policies need a KV cache

    def select_rows(self, rows) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.encoder = [s.select(rows) for s in self.encoder]
        self.decoder = [s.select(rows) for s in self.decoder]
        self.lengths, self.halted, self.since_encode = self.lengths[rows], self.halted[rows], self.since_encode[rows]
        keep = rows.tolist()
        if self.history is not None:
            self.history = [self.history[i] for i in keep]
        self.traces = [self.traces[i] for i in keep] if self.traces else []

    def extend(self, other: LCMState) -> None:
        """Append another state's rows to this batch (requests joining a running batch)."""
        self.encoder = [a.cat(b) for a, b in zip(self.encoder, other.encoder, strict=True)]
        self.decoder = [a.cat(b) for a, b in zip(self.decoder, other.decoder, strict=True)]
        self.lengths = torch.cat((self.lengths, other.lengths))
        self.halted = torch.cat((self.halted, other.halted))
        self.since_encode = torch.cat((self.since_encode, other.since_encode))
        if self.history is not None:
            self.history = self.history + other.history
        self.traces = list(self.traces) + list(other.traces)

    def row_hooks(self, tokenizer, vocab_size: int) -> list:
        """The state's part in the decode loop: halts and loop traces (memlm.lcm.hook)."""
        return [HaltHook()]

    def recurrent_bytes_per_sequence(self) -> int:
        batch = max(1, int(self.lengths.shape[0]))
        return sum(s.nbytes() for s in self.encoder + self.decoder) // batch


class LCMModel(nn.Module):
    supports_eviction = False  # a recurrent state has no tokens to evict

    def __init__(self, cfg: LCMConfig):
        super().__init__()
        self.config = cfg
        self.decoder = GenHead(cfg)
        if cfg.memory != "none":
            self.encoder = Encoder(cfg)
            self.memory = CodebookMemory(cfg)
            # z_q enters every decoder layer additively; zero at first, so stage 2 starts from stage 1's decoder.
            self.bridge = nn.Linear(cfg.z_dim, cfg.decoder_layers * cfg.hidden_size)
            nn.init.zeros_(self.bridge.weight)
            nn.init.zeros_(self.bridge.bias)
        self._shuffle_generator = torch.Generator().manual_seed(0)
        self._init_weights()

    def _init_weights(self) -> None:
        """Small normal weights (GPT-style, std 0.02); the bridge stays zero and convolutions identity."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("bridge"):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def has_memory(self) -> bool:
        return self.config.memory != "none"

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    def set_runtime(self, **overrides) -> None:
        """Change runtime switches (loop steps, re-encode period, safety, ablations) in place."""
        cfg = self.config.with_runtime(**overrides)
        self.config = cfg
        if self.has_memory:
            self.memory.cfg = cfg

    # ---- the memory path, shared by training and generation ------------------------------------

    def remember(self, z: torch.Tensor, valid: torch.Tensor, use_memory: bool = True):
        """z [B, T, Dz] -> (per-layer decoder conditions, z_q [B, T, Dz], trace over the valid tokens, losses)."""
        if not self.has_memory or not use_memory:
            return None, None, None, {}
        flat = z[valid]  # padding never reaches the grids (nor trips a danger code)
        z_q_flat, trace, losses = self.memory(flat)
        ablation = self.config.z_ablation
        if ablation == "zero":
            z_q_flat = torch.zeros_like(z_q_flat)
        elif ablation == "shuffle":  # z of some other position: is the decoder using *this* position's z?
            order = torch.randperm(z_q_flat.shape[0], generator=self._shuffle_generator).to(z.device)
            z_q_flat = z_q_flat[order]
        z_q = z.new_zeros(z.shape)
        z_q[valid] = z_q_flat.to(z.dtype)
        conditions = self.bridge(z_q).chunk(self.config.decoder_layers, dim=-1)
        return conditions, z_q, trace, losses

    # ---- training: whole windows ---------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, use_memory: bool = True, with_regularisers: bool = False):
        """ids [B, T] -> (logits [B, T, V] float32, aux). aux has "z", "z_q" and "trace" when the memory ran,
        and the memory's losses (vq, and with_regularisers: orthogonality, contrastive)."""
        valid = torch.ones_like(ids, dtype=torch.bool)
        aux: dict = {}
        conditions = None
        if self.has_memory and use_memory:
            z = self.encoder(ids, valid)
            conditions, z_q, trace, losses = self.remember(z, valid)
            aux.update(losses, z=z, z_q=z_q, trace=trace)
            if with_regularisers:
                aux.update(self.memory.regularisers(z))
        hidden = self.decoder(ids, valid, None, conditions, self._reach(valid))
        return self.decoder.lm_head(hidden).float(), aux

    # ---- generation: the engine's contract -----------------------------------------------------------

    def new_state(
        self, batch: int, capacity: int = 0, track_attention=False, track_importance=False, state_dtype=None
    ) -> LCMState:
        """A fresh state for `batch` rows (`capacity` is a KV-cache notion: unused). `state_dtype`
        stores the recurrent sums in another precision than the weights (drift measurements)."""
        if track_attention or track_importance:
            raise InvalidRequestError(
                "KV-cache eviction policies need a model with a KV cache; an LCM model keeps a constant-size "
                "recurrent state instead"
            )
        dtype, device = state_dtype or self.dtype, self.device
        return LCMState(
            encoder=self.encoder.stack.new_state(batch, dtype, device) if self.has_memory else [],
            decoder=self.decoder.stack.new_state(batch, dtype, device),
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
            halted=torch.zeros(batch, dtype=torch.bool, device=device),
            since_encode=torch.zeros(batch, dtype=torch.long, device=device),
            history=[[] for _ in range(batch)] if self.config.reencode_period > 0 else None,
            traces=[None] * batch,
        )

    def forward_tokens(self, ids: torch.Tensor, positions: torch.Tensor, state: LCMState) -> torch.Tensor:
        """Consume a right-padded chunk (positions < 0 = padding) into `state`; -> hidden [B, T, d]."""
        valid = positions >= 0
        hidden, trace = self._advance(ids, valid, state)
        before = state.lengths.clone()
        real = valid.sum(1)
        state.lengths += real
        if state.history is not None:
            for row, (tokens, n) in enumerate(zip(ids.tolist(), real.tolist(), strict=True)):
                state.history[row] += tokens[:n]
        if trace is not None:
            self._note_traces(trace, valid, state)
        period = self.config.reencode_period
        if period > 0 and state.history is not None:
            # Counted from the last full encode: a text read from its start in one chunk (a prompt) was
            # just encoded in the parallel form, so a long prompt is not re-encoded at once.
            state.since_encode = torch.where(before == 0, 0, state.since_encode + real)
            due = (state.since_encode >= period).nonzero().squeeze(1).tolist()
            if due:
                self._reencode(state, due)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.lm_head(hidden).float()

    def _advance(self, ids, valid, state: LCMState, check_safety: bool = True):
        conditions, trace = None, None
        if self.has_memory:
            z = self.encoder(ids, valid, state.encoder)
            conditions, _, trace, _ = self.remember(z, valid)
        hidden = self.decoder(ids, valid, state.decoder, conditions, self._reach(valid, state.lengths))
        return hidden, trace

    def _reach(self, valid: torch.Tensor, start: torch.Tensor | None = None) -> Reach | None:
        """The decoder's bounded view of the past (config.decoder_window) for a right-padded chunk
        whose rows start at absolute positions `start` ([B]; None: 0), or None: unbounded."""
        window = self.config.decoder_window
        if not window:
            return None
        positions = torch.arange(valid.shape[1], device=valid.device)[None].expand_as(valid)
        if start is not None:
            positions = positions + start[:, None]
        return Reach(torch.where(valid, positions, -1), valid, window)

    def _note_traces(self, trace: LoopTrace, valid: torch.Tensor, state: LCMState) -> None:
        """Per row: halted if any of its new tokens came near a danger code; the trace of its last token."""
        row_of = valid.nonzero()[:, 0]  # flattened valid tokens -> their row (row-major, like z[valid])
        halted = torch.zeros_like(state.lengths).index_add_(0, row_of, trace.halted.long()) > 0
        state.halted |= halted
        last = (valid.sum(1).cumsum(0) - 1).clamp_min(0)  # each row's last valid token in the flattened order
        steps, grids = trace.steps[last].tolist(), trace.grids[last].tolist()
        distance, flagged = trace.distance[last].tolist(), trace.flagged[last].tolist()
        for row in range(valid.shape[0]):
            if valid[row].any():
                state.traces[row] = {
                    "steps": steps[row],
                    "grids": [GRID_NAMES[g] for g, on in enumerate(grids[row]) if on]
                    if self.config.memory == "grids"
                    else [],
                    "distance": distance[row],
                    "flagged": flagged[row],
                    "halted": bool(halted[row]),
                }

    @torch.no_grad()
    def _reencode(self, state: LCMState, rows: list[int]) -> None:
        """Recompute these rows' recurrent sums from their text (parallel form, float32 sums): resets the
        rounding drift that token-by-token accumulation builds up, above all in low precision."""
        fresh = self.new_state(len(rows), state_dtype=torch.float32)
        longest = max(len(state.history[r]) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            n = len(state.history[r])
            ids[i, :n] = torch.tensor(state.history[r], device=self.device)
            valid[i, :n] = True
        self._advance(ids, valid, fresh)
        index = torch.tensor(rows, device=self.device)
        for target, source in zip(state.encoder + state.decoder, fresh.encoder + fresh.decoder, strict=True):
            target.assign(index, source)
        state.since_encode[index] = 0
        state.reencodes += len(rows)
