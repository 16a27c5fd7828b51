"""int8 weights for CPU decoding.

Decoding one token reads every weight once, so on CPU its speed is bounded by memory bandwidth
and by how fast the matmul kernel streams weights. fbgemm's dynamically quantized Linear (int8
weights with per-output-channel scales; activations quantized on the fly) streams about 6-7x
faster than fp32 GEMV on this class of machine.

Its activation scale is one per call, shared by every token in the input. Over a prompt that is
ruinous. The first token of a sequence carries "massive activations" (over 400, against about 1
for the rest, at SmolLM2's last down_proj), and one scale for all tokens wipes out the others:
perplexity 18.4 -> 54 on a prose sample. For a single decode token the scale is that token's
own, and perplexity only moves 18.4 -> 20.2. So int8 serves single-token decode steps, and prefill
chunks keep using the fp32 weights. Prefill is compute-bound, fp32 GEMM does well there, and the
prompt's KV cache is then exact. The price is the memory of both copies (fp32 + int8: 1.25x fp32).

torch marks `torch.ao.quantization` deprecated in favour of torchao. It is present and correct in
the pinned torch, and this module is the one place that would change.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


class Int8DecodeLinear(nn.Module):
    """A Linear that runs int8 for one token per row ([..., 1, in]) and fp32 for longer chunks."""

    def __init__(self, linear: nn.Linear):
        super().__init__()

        self.full = linear
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.int8 = quantize_dynamic(
                nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False
            )[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.full.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8(x) if x.dim() >= 3 and x.shape[-2] == 1 else self.full(x)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Wrap every nn.Linear of the model (projections and LM head) in an Int8DecodeLinear, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8DecodeLinear(child))
    return model
