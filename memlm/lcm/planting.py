"""Planting safety codes from example texts.

A text's code is the encoder's z at its last token: the state of having read it. Its default
radius is half the distance from that z to the nearest z of the text's own earlier positions, so
the code fires on reaching the end of the text, not on the way there. The danger grid halts a row
whose z (at any loop step) comes within a code's radius; the value grid flags, or pushes out, a z
inside a forbidden anchor's radius.
"""

from __future__ import annotations

import torch

from memlm.errors import MemlmError
from memlm.lcm.model import LCMModel


@torch.no_grad()
def text_codes(model: LCMModel, tokenizer, texts: list[str], radius: float | None = None):
    """-> (codes [N, z_dim], radii [N]) for the non-empty texts."""
    if not model.has_memory:
        raise MemlmError("this LCM model has no memory (decoder alone): it has no safety grids")
    texts = [t for t in (t.strip() for t in texts) if t]
    if not texts:
        raise MemlmError("no texts to plant (the file is empty)")
    codes, radii = [], []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text)], device=model.device)
        z = model.encoder(ids, torch.ones_like(ids, dtype=torch.bool))[0].float()  # [T, D]
        code = z[-1]
        if radius is not None:
            r = radius
        elif z.shape[0] > 1:
            r = 0.5 * float((z[:-1] - code).norm(dim=-1).min())
        else:
            r = 0.1 * float(code.norm())
        codes.append(code)
        radii.append(max(r, 1e-6))
    return torch.stack(codes), torch.tensor(radii)
