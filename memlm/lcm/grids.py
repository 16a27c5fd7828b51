"""The six memory grids. Each maps a batch of bottleneck vectors z [N, D] to a retrieved vector of
the same space, with the distance it had to travel and the code it used:

- hyperbolic: residual quantization on the Poincare ball (coarse code, then a code for the
  Mobius residual), for hierarchy: points near the boundary have room for many children;
- sparse: nearest code among soft-thresholded (sparse) codes;
- lowrank: codes generated from a shared factorised basis (A @ B), cheap and smooth;
- manifold: nearest code plus a slide along its learned tangent plane toward z;
- binding: holographic reduced representations: z is unbound by each role (circular correlation
  by FFT; roles are unitary, so unbinding is exact), the unbound filler is cleaned up against the
  filler codebook, and the result is the re-bound pair (role, clean filler);
- contrastive: two codebooks, keys and values: the nearest key's value is returned, and values are
  trained by InfoNCE to predict the next position's z (a predictive memory).

Retrieval is `q + z - z.detach()`: the forward value is the code, and the gradient reaches both the
encoder (straight-through) and the codebooks, so the decoder's LM loss trains the grids too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlm.lcm.config import GRID_NAMES, LCMConfig

COMMITMENT = 0.25


@dataclass
class Retrieval:
    q: torch.Tensor  # [N, D] retrieved vector (straight-through to z)
    distance: torch.Tensor  # [N] distance between z and what it retrieved: differentiable in z, so the
    # fusion weights built from it give the LM a continuous path into z beyond the straight-through one
    code: torch.Tensor  # [N] index of the code used (for usage statistics)
    vq_loss: torch.Tensor  # scalar: codebook + commitment loss of this retrieval


def nearest(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code to each row of x, and the squared distance to it."""
    d2 = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ codes.t() + codes.pow(2).sum(-1)[None]).clamp_min(0)
    best, index = d2.min(-1)
    return index, best


def vq_loss(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Codebook term (move codes to z) + commitment term (keep z near its code)."""
    return F.mse_loss(q, z.detach()) + COMMITMENT * F.mse_loss(z, q.detach())


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return q + z - z.detach()


def _distance(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (z - target.detach()).pow(2).sum(-1).clamp_min(1e-12).sqrt()


def _codebook(count: int, dim: int, scale: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.randn(count, dim) * scale / dim**0.5)


class Grid(nn.Module):
    name = ""

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        """The vectors orthogonality regularises, [K, D]."""
        raise NotImplementedError

    @property
    def num_codes(self) -> int:
        """How many distinct codes `retrieve` can return (the range of `Retrieval.code`)."""
        return self.codebook().shape[0]

    def restart_rows(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For dead-code restarts: the parameter whose rows are codes, and each row's use given the
        use of every code (`counts`, [num_codes]). None where codes are generated, not stored."""
        return None


# ---- hyperbolic -----------------------------------------------------------------------------


def expmap0(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return torch.tanh(norm) * v / norm


def logmap0(y: torch.Tensor) -> torch.Tensor:
    norm = y.norm(dim=-1, keepdim=True).clamp(1e-9, 1 - 1e-5)
    return torch.atanh(norm) * y / norm


def mobius_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xy = (x * y).sum(-1, keepdim=True)
    x2, y2 = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    numerator = (1 + 2 * xy + y2) * x + (1 - x2) * y
    return numerator / (1 + 2 * xy + x2 * y2).clamp_min(1e-9)


def poincare_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distances on the unit ball (curvature -1) between every x [N, D] and every y [K, D] -> [N, K]."""
    diff = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ y.t() + y.pow(2).sum(-1)[None]).clamp_min(0)
    denominator = (1 - x.pow(2).sum(-1))[:, None] * (1 - y.pow(2).sum(-1))[None]
    return torch.acosh((1 + 2 * diff / denominator.clamp_min(1e-9)).clamp_min(1 + 1e-7))


def poincare_distance_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance between x[i] and y[i] -> [N]."""
    diff = (x - y).pow(2).sum(-1)
    denominator = (1 - x.pow(2).sum(-1)) * (1 - y.pow(2).sum(-1))
    return torch.acosh((1 + 2 * diff / denominator.clamp_min(1e-9)).clamp_min(1 + 1e-7))


class HyperbolicGrid(Grid):
    name = "hyperbolic"

    def __init__(self, dim: int, codes: int, scale: float = 0.25):
        super().__init__()
        self.coarse = _codebook(codes // 2, dim)
        self.fine = _codebook(codes // 2, dim, 0.3)
        self.scale = scale  # z is scaled into the ball so typical vectors stay away from its boundary

    def codebook(self) -> torch.Tensor:
        return self.coarse

    @property
    def num_codes(self) -> int:  # a code is a (coarse, fine) pair
        return self.coarse.shape[0] * self.fine.shape[0]

    def restart_rows(self, counts):
        return self.coarse.data, counts.view(self.coarse.shape[0], -1).sum(1)

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        x = expmap0(z * self.scale)
        coarse, fine = expmap0(self.coarse * self.scale), expmap0(self.fine * self.scale)
        with torch.no_grad():
            i1 = poincare_distance(x, coarse).argmin(-1)
        residual = mobius_add(-coarse[i1], x)  # what the coarse code leaves: the child's position
        with torch.no_grad():
            i2 = poincare_distance(residual, fine).argmin(-1)
        q_ball = mobius_add(coarse[i1], fine[i2])
        q = logmap0(q_ball) / self.scale
        distance = poincare_distance_rows(x, q_ball.detach()) / self.scale
        return Retrieval(straight_through(z, q), distance, i1 * fine.shape[0] + i2, vq_loss(z, q))


# ---- Euclidean codebooks -----------------------------------------------------------------------


class SparseGrid(Grid):
    name = "sparse"

    def __init__(self, dim: int, codes: int, threshold: float = 0.05):
        super().__init__()
        self.codes = _codebook(codes, dim)
        self.threshold = threshold

    def codebook(self) -> torch.Tensor:
        return self.codes

    def restart_rows(self, counts):
        return self.codes.data, counts

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        sparse = F.softshrink(self.codes, self.threshold)  # small entries are exactly zero
        index, _ = nearest(z.detach(), sparse)
        q = sparse[index]
        return Retrieval(straight_through(z, q), _distance(z, q), index, vq_loss(z, q))


class LowRankGrid(Grid):
    name = "lowrank"

    def __init__(self, dim: int, codes: int, rank: int):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(codes, rank) / rank**0.5)
        self.basis = nn.Parameter(torch.randn(rank, dim) / dim**0.5)

    def codebook(self) -> torch.Tensor:
        return self.mix @ self.basis

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        codes = self.codebook()
        index, _ = nearest(z.detach(), codes)
        q = codes[index]
        return Retrieval(straight_through(z, q), _distance(z, q), index, vq_loss(z, q))


class ManifoldGrid(Grid):
    name = "manifold"

    def __init__(self, dim: int, codes: int, tangent_dims: int):
        super().__init__()
        self.codes = _codebook(codes, dim)
        self.tangents = nn.Parameter(torch.randn(codes, tangent_dims, dim) / dim**0.5)

    def codebook(self) -> torch.Tensor:
        return self.codes

    def restart_rows(self, counts):
        return self.codes.data, counts

    def planes(self) -> torch.Tensor:
        """An orthonormal basis of each code's tangent plane [K, m, D]: one small QR per code, not per
        token, and at inference once until the tangents change (a decode step would pay it 3x)."""
        if torch.is_grad_enabled():
            return torch.linalg.qr(self.tangents.transpose(1, 2)).Q.transpose(1, 2)
        key = (self.tangents.data_ptr(), self.tangents._version, self.tangents.dtype)
        if getattr(self, "_planes_key", None) != key:
            self._planes = torch.linalg.qr(self.tangents.transpose(1, 2)).Q.transpose(1, 2)
            self._planes_key = key
        return self._planes

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        index, _ = nearest(z.detach(), self.codes)
        anchor = self.codes[index]
        basis = self.planes()[index]  # [N, m, D]
        coordinates = torch.einsum("nmd,nd->nm", basis, z.detach() - anchor)
        q = anchor + torch.einsum("nm,nmd->nd", coordinates, basis)  # the code, slid along its plane toward z
        return Retrieval(straight_through(z, q), _distance(z, q), index, vq_loss(z, q))


# ---- binding (HRR) -----------------------------------------------------------------------------


def bind(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular convolution."""
    n = a.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(a, n=n) * torch.fft.rfft(b, n=n), n=n)


def unbind(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular correlation: the inverse of bind for unitary b, and its usual approximation otherwise."""
    n = c.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(c, n=n) * torch.fft.rfft(b, n=n).conj(), n=n)


def unitary(phases: torch.Tensor, dim: int) -> torch.Tensor:
    """Real vectors whose spectrum has magnitude one at every frequency (their own exact inverse by correlation)."""
    # The DC bin (and for even dim the Nyquist bin) of a real signal is real: phase 0 there.
    keep = torch.ones(phases.shape[-1], device=phases.device)
    keep[0] = 0
    if dim % 2 == 0:
        keep[-1] = 0
    spectrum = torch.polar(torch.ones_like(phases), phases * keep)
    return torch.fft.irfft(spectrum, n=dim)


class BindingGrid(Grid):
    name = "binding"

    def __init__(self, dim: int, codes: int, roles: int):
        super().__init__()
        self.dim = dim
        self.role_phases = nn.Parameter(torch.rand(roles, dim // 2 + 1) * 2 * torch.pi)
        self.fillers = _codebook(codes, dim)

    def codebook(self) -> torch.Tensor:
        return self.fillers

    @property
    def num_codes(self) -> int:  # a code is a (role, filler) pair
        return self.role_phases.shape[0] * self.fillers.shape[0]

    def restart_rows(self, counts):
        return self.fillers.data, counts.view(-1, self.fillers.shape[0]).sum(0)

    def roles(self) -> torch.Tensor:
        return unitary(self.role_phases, self.dim)

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        roles = self.roles()  # [R, D]
        unbound = unbind(z[:, None, :], roles[None])  # [N, R, D]: z read out under every role
        with torch.no_grad():
            similarity = F.normalize(unbound, dim=-1) @ F.normalize(self.fillers, dim=-1).t()  # [N, R, K]
            best = similarity.flatten(1).argmax(-1)
            role, filler = best // self.fillers.shape[0], best % self.fillers.shape[0]
        q = bind(roles[role], self.fillers[filler])  # the unbound filler, cleaned up and bound back
        loss = vq_loss(unbound[torch.arange(z.shape[0]), role], self.fillers[filler])
        return Retrieval(straight_through(z, q), _distance(z, q), role * self.fillers.shape[0] + filler, loss)


# ---- contrastive (keys and values) ---------------------------------------------------------------


class ContrastiveGrid(Grid):
    name = "contrastive"

    def __init__(self, dim: int, codes: int):
        super().__init__()
        self.keys = _codebook(codes, dim)
        self.values = _codebook(codes, dim)

    def codebook(self) -> torch.Tensor:
        return self.keys

    def restart_rows(self, counts):
        return self.keys.data, counts

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        index, _ = nearest(z.detach(), self.keys)
        q = self.values[index]
        return Retrieval(straight_through(z, q), _distance(z, self.keys[index]), index, vq_loss(z, self.keys[index]))

    def contrastive_loss(self, z: torch.Tensor, z_next: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
        """InfoNCE: the value under z_t's key must pick out z_{t+1} among the other rows' next states.

        It trains the values and, through z_{t+1}, the encoder: the next state is pulled toward what
        the current one's code predicts and away from the others' (the negatives keep it from
        collapsing). The key is chosen without gradient, as retrieval chooses it; keys learn by VQ."""
        index, _ = nearest(z.detach(), self.keys)
        predicted = F.normalize(self.values[index], dim=-1)
        logits = predicted @ F.normalize(z_next, dim=-1).t() / temperature
        return F.cross_entropy(logits, torch.arange(z.shape[0], device=z.device))


def make_grids(cfg: LCMConfig) -> nn.ModuleList:
    dim, codes = cfg.z_dim, cfg.codes
    grids = [
        HyperbolicGrid(dim, codes),
        SparseGrid(dim, codes),
        LowRankGrid(dim, codes, cfg.lowrank_rank),
        ManifoldGrid(dim, codes, cfg.manifold_dims),
        BindingGrid(dim, codes, cfg.binding_roles),
        ContrastiveGrid(dim, codes),
    ]
    assert tuple(g.name for g in grids) == GRID_NAMES
    return nn.ModuleList(grids)


class SingleCodebook(Grid):
    """The ablation: one plain VQ codebook holding as many codes as the six grids together."""

    name = "single"

    def __init__(self, dim: int, codes: int):
        super().__init__()
        self.codes = _codebook(codes, dim)

    def codebook(self) -> torch.Tensor:
        return self.codes

    def restart_rows(self, counts):
        return self.codes.data, counts

    def retrieve(self, z: torch.Tensor) -> Retrieval:
        index, _ = nearest(z.detach(), self.codes)
        q = self.codes[index]
        return Retrieval(straight_through(z, q), _distance(z, q), index, vq_loss(z, q))
