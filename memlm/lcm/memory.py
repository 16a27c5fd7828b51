"""The reasoning loop over the grids, and the safety grids it consults at every step.

route -> retrieve -> fuse -> value check -> danger check, repeated until z moves less than the
convergence threshold (relative to its norm) or the step limit is reached. Rows converge on
their own: a converged row keeps its z while the others go on. Every row gets a trace: the
steps it took, the grids it used, the distance of its last fused retrieval, and whether the value
grid flagged it or the danger grid halted it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlm.lcm.config import GRID_NAMES, LCMConfig
from memlm.lcm.grids import SingleCodebook, make_grids


@dataclass
class LoopTrace:
    steps: torch.Tensor  # [N] loop steps taken
    grids: torch.Tensor  # [N, G] bool: grids used at any step
    distance: torch.Tensor  # [N] fused retrieval distance at the last step taken
    flagged: torch.Tensor  # [N] bool: z entered a forbidden region of the value grid
    halted: torch.Tensor  # [N] bool: z came near a danger code
    route_probs: torch.Tensor | None = None  # [N, G] routing at the first step (entropy statistics)
    codes: list[torch.Tensor] | None = None  # per grid [N]: the code each row used at the first step
    changes: torch.Tensor | None = None  # [N, max_loop_steps] relative change of z at each step (nan: not taken)

    def route_entropy(self) -> torch.Tensor | None:
        """[N] entropy (nats) of each row's routing at the first step; None without a router."""
        if self.route_probs is None:
            return None
        p = self.route_probs.detach().clamp_min(1e-9)
        return -(p * p.log()).sum(-1)


class Router(nn.Module):
    """Distance-based routing: each grid has a learned prototype; nearer prototypes get more weight."""

    def __init__(self, dim: int, grids: int, top_k: int):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(grids, dim) / dim**0.5)
        self.log_temperature = nn.Parameter(torch.tensor(-2.3))  # temperature 0.1 of the relative distance
        self.top_k = top_k

    def forward(self, z: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (routing probabilities [N, G], grids used [N, G] bool: the top-k allowed ones)."""
        # z enters routing without gradient: the LM reaches z through the retrieved codes (straight
        # through); through the softmax it was a high-variance path that dominated the clipped gradient.
        d2 = (z.detach()[:, None, :] - self.prototypes[None]).pow(2).mean(-1)
        # Distances relative to the token's mean distance: routing is as sharp at any scale of z.
        relative = d2 / d2.detach().mean(-1, keepdim=True).clamp_min(1e-9)
        logits = (-relative / self.log_temperature.exp()).masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(-1)
        k = min(self.top_k, int(allowed.sum()))
        used = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(k, dim=-1).indices, True)
        return probs, used


class Safety(nn.Module):
    """The value grid (allowed / forbidden anchors: flag, or correct by pushing z out of a forbidden
    region) and the danger grid (codes whose neighbourhood halts generation). Both are buffers that
    users plant (`memlm lcm danger add`, `memlm lcm value add`), saved beside the weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("value_anchors", torch.zeros(0, dim))
        self.register_buffer("value_allowed", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("value_radius", torch.zeros(0))
        self.register_buffer("danger_codes", torch.zeros(0, dim))
        self.register_buffer("danger_radius", torch.zeros(0))

    def clear(self) -> None:
        """Remove every planted code and anchor."""
        for name, buffer in self.named_buffers():
            setattr(self, name, buffer[:0])

    def add_danger(self, codes: torch.Tensor, radius: torch.Tensor) -> None:
        self.danger_codes = torch.cat((self.danger_codes, codes.to(self.danger_codes)))
        self.danger_radius = torch.cat((self.danger_radius, radius.to(self.danger_radius)))

    def add_value(self, anchors: torch.Tensor, allowed: bool, radius: torch.Tensor) -> None:
        self.value_anchors = torch.cat((self.value_anchors, anchors.to(self.value_anchors)))
        flags = torch.full((anchors.shape[0],), allowed, dtype=torch.bool, device=self.value_allowed.device)
        self.value_allowed = torch.cat((self.value_allowed, flags))
        self.value_radius = torch.cat((self.value_radius, radius.to(self.value_radius)))

    def danger(self, z: torch.Tensor) -> torch.Tensor:
        """[N] bool: z lies within some danger code's radius."""
        if not self.danger_codes.shape[0]:
            return torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        distance = torch.cdist(z.float(), self.danger_codes.float())
        return (distance <= self.danger_radius[None]).any(-1)

    def value(self, z: torch.Tensor, correct: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (z, flagged [N]). A z inside a forbidden anchor's radius is flagged and, when
        correcting, pushed radially out to that radius (the nearest allowed point)."""
        forbidden = ~self.value_allowed
        if not bool(forbidden.any()):
            return z, torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        anchors, radius = self.value_anchors[forbidden], self.value_radius[forbidden]
        distance = torch.cdist(z.float(), anchors.float())  # [N, M]
        inside = distance <= radius[None]
        flagged = inside.any(-1)
        if correct and bool(flagged.any()):
            nearest = (distance - radius[None]).argmin(-1)
            anchor, r = anchors[nearest].to(z.dtype), radius[nearest].to(z.dtype)
            offset = z - anchor
            norm = offset.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            pushed = anchor + offset / norm * r[:, None] * 1.001
            z = torch.where(flagged[:, None], pushed, z)
        return z, flagged


class CodebookMemory(nn.Module):
    """z [N, D] -> z_q [N, D] through the grids and the reasoning loop (or an ablation of them)."""

    def __init__(self, cfg: LCMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.memory == "grids":
            self.grids = make_grids(cfg)
            self.router = Router(cfg.z_dim, len(self.grids), cfg.route_top_k)
        elif cfg.memory == "single":
            self.grids = nn.ModuleList([SingleCodebook(cfg.z_dim, cfg.codes * len(GRID_NAMES))])
        self.fusion_log_temperature = nn.Parameter(torch.zeros(()))
        self.safety = Safety(cfg.z_dim)

    def allowed(self, device) -> torch.Tensor:
        return torch.tensor([name not in self.cfg.grids_off for name in GRID_NAMES], device=device)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, LoopTrace, dict]:
        """-> (z_q, trace, losses {"vq": scalar}), the losses of the first retrieval step."""
        cfg, n = self.cfg, z.shape[0]
        device = z.device
        no = torch.zeros(n, dtype=torch.bool, device=device)
        safety_on = cfg.safety
        halted = self.safety.danger(z) if safety_on else no
        if cfg.memory in ("continuous", "none"):
            trace = LoopTrace(torch.zeros(n, dtype=torch.long, device=device), no[:, None], z.new_zeros(n), no, halted)
            return z, trace, {"vq": z.new_zeros(())}
        if cfg.memory == "single":
            r = self.grids[0].retrieve(z)
            trace = LoopTrace(
                torch.ones(n, dtype=torch.long, device=device), ~no[:, None], r.distance, no, halted, codes=[r.code]
            )
            return r.q, trace, {"vq": r.vq_loss}

        allowed = self.allowed(device)
        active = torch.ones(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        used_any = torch.zeros(n, len(self.grids), dtype=torch.bool, device=device)
        distance = z.new_zeros(n)
        flagged = no.clone()
        losses: dict[str, torch.Tensor] = {}
        first_probs, first_codes = None, None
        changes = z.new_full((n, cfg.max_loop_steps), float("nan"))
        for step in range(cfg.max_loop_steps):
            probs, used = self.router(z, allowed)
            # Retrieve from the grids some row routes to (a decode step of one row: 3 of 6). Training's
            # first step retrieves from all of them: every codebook learns from its VQ loss.
            wanted = allowed if (step == 0 and torch.is_grad_enabled()) else used.any(0)
            retrievals = [g.retrieve(z) if bool(wanted[i]) else None for i, g in enumerate(self.grids)]
            if step == 0:
                losses["vq"] = sum(r.vq_loss for r in retrievals if r is not None) / int(wanted.sum())
                first_probs = probs
                first_codes = [r.code if r is not None else None for r in retrievals]
            q = torch.stack([r.q if r is not None else torch.zeros_like(z) for r in retrievals], 1)  # [N, G, D]
            d = torch.stack([r.distance if r is not None else z.new_zeros(n) for r in retrievals], 1)  # [N, G]
            # Fusion: routing weight x closeness of what each grid retrieved, over the grids used.
            # Per token (never across the batch: a row's z_q must not depend on its neighbours).
            scale = (d.detach() * used).sum(-1, keepdim=True) / used.sum(-1, keepdim=True)
            scale = scale.clamp_min(1e-6) * self.fusion_log_temperature.exp()
            weights = (probs * torch.exp(-d / scale) * used).clamp_min(0)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
            fused = (weights[..., None] * q).sum(1)
            if safety_on:
                fused, flag = self.safety.value(fused, cfg.value_mode == "correct")
                halted = halted | (self.safety.danger(fused) & active)
                flagged = flagged | (flag & active)
            # Relative RMS change: the threshold means the same at any scale of z.
            change = (fused - z).detach().norm(dim=-1) / z.detach().norm(dim=-1).clamp_min(1e-9)
            changes[:, step] = torch.where(active, change, float("nan"))
            z = torch.where(active[:, None], fused, z)
            steps = steps + active.long()
            used_any = used_any | (used & active[:, None])
            distance = torch.where(active, (weights.detach() * d.detach()).sum(-1), distance)
            active = active & (change >= cfg.converge_threshold)
            if not bool(active.any()):
                break
        trace = LoopTrace(steps, used_any, distance, flagged, halted, first_probs, first_codes, changes.detach())
        return z, trace, losses

    def regularisers(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage-2 losses beyond VQ: codebooks (and prototypes) kept apart by an orthogonality
        penalty, the contrastive grid's InfoNCE on consecutive positions, and z kept spread out.
        z is [B, T, D].

        Spread (VICReg's variance hinge: every dimension of z keeps a standard deviation of at least
        1 over the batch's tokens): measured without it, the commitment term collapsed z onto a few
        codes within 20 steps (1-4 codes used per grid, InfoNCE stuck at log 256), before the
        zero-initialised bridge had grown a route for the LM's gradient to reach the encoder; once
        collapsed, neither restarts (onto collapsed z's) nor InfoNCE (no gradient between equal
        rows) bring it back."""
        out = {}
        if self.cfg.memory not in ("grids", "single"):
            return out
        flat = z.reshape(-1, z.shape[-1]).float()
        out["spread"] = F.relu(1 - (flat.var(0) + 1e-4).sqrt()).mean()
        penalty = z.new_zeros(())
        books = [g.codebook() for g in self.grids] + ([self.router.prototypes] if self.cfg.memory == "grids" else [])
        for book in books:
            unit = F.normalize(book, dim=-1)
            gram = unit @ unit.t()
            penalty = penalty + (gram - torch.eye(gram.shape[0], device=gram.device)).pow(2).mean()
        out["orthogonality"] = penalty / len(books)
        if self.cfg.memory == "grids" and z.shape[1] > 1:
            contrastive = self.grids[GRID_NAMES.index("contrastive")]
            b, t, d = z.shape
            current, following = z[:, :-1].reshape(-1, d), z[:, 1:].reshape(-1, d)
            pick = torch.randperm(current.shape[0], device=z.device)[:256]  # 256 pairs: 255 negatives each
            out["contrastive"] = contrastive.contrastive_loss(current[pick], following[pick])
        return out

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, usage: CodeUsage, min_usage: int = 1) -> int:
        """Move codes used fewer than `min_usage` times (counts since the last restart) onto random z's."""
        restarted = 0
        flat = z.reshape(-1, z.shape[-1])
        for grid, counts in zip(self.grids, usage.counts, strict=True):
            rows = grid.restart_rows(counts)
            if rows is None:
                continue
            book, row_counts = rows
            dead = (row_counts < min_usage).nonzero().squeeze(1)
            if dead.numel():
                picks = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)]
                book[dead] = picks.to(book.dtype) + 0.01 * torch.randn_like(picks) * picks.std()
                restarted += dead.numel()
        return restarted


def convergence_threshold(first_changes: torch.Tensor, stop_share: float = 0.5) -> float:
    """The loop's stopping threshold under which `stop_share` of the tokens stop after one step: that
    quantile of the first step's relative change of z (how far the first fused retrieval moved it,
    with the loop run to its limit). A token whose z already sits near its codes is done; one that
    the retrieval moved far goes round again."""
    values = first_changes[~first_changes.isnan()].float()
    if not values.numel():
        raise ValueError("no loop steps to calibrate on")
    return float(values.quantile(stop_share))


def steps_histogram(steps: torch.Tensor, max_steps: int) -> dict[str, int]:
    """{"1": tokens that took one loop step, ...}."""
    counts = torch.bincount(steps.detach().cpu(), minlength=max_steps + 1)
    return {str(i): int(n) for i, n in enumerate(counts.tolist()) if i > 0}


def loop_report(memory: CodebookMemory, traces: list[LoopTrace]) -> dict:
    """What the loop and the grids did over these traces: loop steps per token and, where there are
    codes, each grid's code use (CodeUsage.summary)."""
    out: dict = {"loop_steps": steps_histogram(torch.cat([t.steps for t in traces]), memory.cfg.max_loop_steps)}
    if memory.cfg.memory in ("grids", "single"):
        usage = CodeUsage(memory)
        for trace in traces:
            usage.add(trace)
        out["code_usage"] = usage.summary()
    return out


class CodeUsage:
    """How often each grid returned each of its codes (at the first loop step), and what that says:
    the trainer logs it and restarts dead codes from it, `memlm eval lcm` reports it."""

    def __init__(self, memory: CodebookMemory):
        self.names = [g.name for g in memory.grids]
        self.counts = [torch.zeros(g.num_codes, dtype=torch.long) for g in memory.grids]

    def add(self, trace: LoopTrace) -> None:
        for counts, codes in zip(self.counts, trace.codes, strict=True):
            if codes is not None:  # a grid no token was routed to this time
                counts += torch.bincount(codes.detach().cpu(), minlength=counts.numel())[: counts.numel()]

    def summary(self) -> dict[str, dict]:
        """Per grid: codes, used, dead (never returned) and the perplexity of their use."""
        out = {}
        for name, c in zip(self.names, self.counts, strict=True):
            p = c.float() / max(1, int(c.sum()))
            p = p[p > 0]
            out[name] = {
                "codes": int(c.numel()),
                "used": int((c > 0).sum()),
                "dead": int((c == 0).sum()),
                "perplexity": math.exp(float(-(p * p.log()).sum())) if p.numel() else 0.0,
            }
        return out


__all__ = [
    "CodebookMemory",
    "CodeUsage",
    "LoopTrace",
    "Router",
    "Safety",
    "convergence_threshold",
    "loop_report",
    "steps_histogram",
]
