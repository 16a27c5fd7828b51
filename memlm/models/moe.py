"""A mixture-of-experts FFN block: a router sends each token to k of N expert MLPs (Mixtral,
Qwen2-MoE with its gated shared expert, Qwen3-MoE). It replaces the dense MLP inside the same
decoder block, so the KV cache, eviction, latent memory and packing are unchanged.

Routing: softmax over the experts' logits (in float32), the top k, optionally renormalised to sum
to 1 (`norm_topk_prob`; Mixtral always does). Expert weights are stored fused like the dense MLP:
`experts_gate_up` [E, 2I, H] and `experts_down` [E, H, I].

Dispatch, without a Python loop over all experts:
* grouped (the default): sort the (token, expert) pairs by expert, then run each expert that has
  tokens once, as one matmul on its contiguous slice;
* gathered: gather the chosen experts' weights and run all pairs in two batched matmuls (bmm).
  Few kernel launches, but the gather copies the weights: it only pays for very small experts
  (`memlm bench moe`: 1.2-1.6x the loop on a tiny config, 0.4x and worse on a mid-size one);
* loop: the reference the benchmark compares against: each expert that got tokens, found with a
  mask, as the transformers implementation does.
On CPU in float32 a mid-size expert's decode is bound by reading its weights, which every strategy
does once per hit expert, so grouped and the loop run even there (bench/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlm.models.layers import GatedMLP

DISPATCHES = ("grouped", "gathered", "loop")


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        nn.init.normal_(self.weight, std=0.02)
        self.top_k, self.normalize = top_k, normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (logits [N, E] float32, weights [N, k], expert ids [N, k])."""
        logits = F.linear(x, self.weight).float()
        weights, ids = route(logits, self.top_k, self.normalize)
        return logits, weights.to(x.dtype), ids


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, then the top k (and renormalise them if asked)."""
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int, normalize: bool,
                 shared_intermediate: int = 0):
        super().__init__()
        self.num_experts, self.top_k, self.intermediate = experts, top_k, intermediate
        self.gate = Router(hidden, experts, top_k, normalize)
        self.experts_gate_up = nn.Parameter(torch.empty(experts, 2 * intermediate, hidden))
        self.experts_down = nn.Parameter(torch.empty(experts, hidden, intermediate))
        nn.init.normal_(self.experts_gate_up, std=0.02)
        nn.init.normal_(self.experts_down, std=0.02)
        self.shared = None
        if shared_intermediate:
            self.shared = GatedMLP(hidden, shared_intermediate)
            self.shared_gate = nn.Linear(hidden, 1, bias=False)
        self.dispatch = "grouped"
        self.last_router_logits: torch.Tensor | None = None  # for load-balancing losses in training

    @classmethod
    def from_config(cls, cfg) -> MoEBlock:
        return cls(cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.experts_per_token,
                   cfg.norm_topk_prob, cfg.shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, ids = self.gate(flat)
        self.last_router_logits = logits
        dispatch = {"grouped": self._grouped, "gathered": self._gathered, "loop": self._loop}[self.dispatch]
        out = dispatch(flat, weights, ids)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        return out.reshape(shape)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.experts_gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.experts_down[e])

    def _grouped(self, x, weights, ids) -> torch.Tensor:
        tokens, k = ids.shape
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)  # pairs sorted by expert; pair p is token p // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // k
        inputs = x.index_select(0, token_of)
        outputs = torch.empty_like(inputs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                outputs[start : start + n] = self._expert(e, inputs[start : start + n])
                start += n
        outputs = outputs * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, outputs)

    def _gathered(self, x, weights, ids) -> torch.Tensor:
        tokens, k = ids.shape
        flat_ids = ids.flatten()
        inputs = x.repeat_interleave(k, dim=0)  # [P, H], pair p is token p // k
        gate_up = torch.bmm(self.experts_gate_up.index_select(0, flat_ids), inputs[:, :, None])[:, :, 0]
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = (F.silu(gate) * up)[:, :, None]
        outputs = torch.bmm(self.experts_down.index_select(0, flat_ids), hidden)[:, :, 0]  # [P, H]
        return (outputs.view(tokens, k, -1) * weights[:, :, None]).sum(dim=1)

    def _loop(self, x, weights, ids) -> torch.Tensor:
        """The reference: for each expert that got tokens, find them with a mask (as transformers does)."""
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, self._expert(e, x[token]) * weights[token, slot, None])
        return out


# ---- training: keeping the experts in use ---------------------------------------------------------


def router_logits_of(model: nn.Module) -> list[torch.Tensor]:
    """The router logits [tokens, E] of every MoE block from the model's last forward."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    return [m.last_router_logits for m in blocks if m.last_router_logits is not None]


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """The Switch / Mixtral auxiliary loss: E * sum_e f_e * P_e, where f_e is the share of top-k
    assignments expert e receives and P_e its mean router probability, pooled over layers. It is
    top_k when every expert gets the same share, and grows as the routing collapses onto a few."""
    experts = router_logits[0].shape[-1]
    counts = torch.zeros(experts, device=router_logits[0].device)
    probs_sum = torch.zeros(experts, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        counts = counts + torch.bincount(chosen.flatten(), minlength=experts).float()
        probs_sum = probs_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return experts * ((counts / rows) * (probs_sum / rows)).sum()


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-partition of the router logits (keeps them small)."""
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]).mean()


def expert_load(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Share of top-k assignments per expert [E], pooled over layers (sums to 1): what the trainer logs."""
    experts = router_logits[0].shape[-1]
    counts = sum(torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=experts).float()
                 for logits in router_logits)
    return counts / counts.sum()
