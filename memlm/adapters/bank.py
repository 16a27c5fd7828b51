"""Many LoRA adapters beside one model, each row of a batch using its own (or none), in one forward.

S-LoRA / Punica's design on memlm's modules: every adapted projection becomes a `StackedLoRALinear`
that holds the A and B of every registered adapter stacked along the rank ([R, in] and [out, R],
scaling folded into B) and, per rank column, the adapter it belongs to (`owner`). A forward knows
each token's adapter (its row's: `AdapterBank.selecting`, set by the model from the state's
per-row `adapters`); each token then uses only its own adapter's columns:

    y = base(x) + ((x A^T) * [owner == adapter(token)]) B^T

Rows with no adapter (index 0) get a zero delta, so base rows, and batches in which no row uses an
adapter, run the base model unchanged (the bank is skipped entirely then). The native quantized
step (models/native_decode.py) applies the same stacked factors, computing only each token's own
columns. Adapters are never merged into the weights: the base stays shared by every row.

Adapter folders are PEFT's (or memlm's earlier format): `read_adapter_deltas` turns them into
per-module factors; PEFT's q/k/v or gate/up parts become one block-diagonal LoRA per fused module.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from memlm.adapters.lora import LoRALinear, _is_linear, lora_layers, read_adapter_deltas
from memlm.errors import InvalidRequestError, MemlmError


class UnknownAdapterError(InvalidRequestError):
    """A request names an adapter the engine does not hold (the server: 404 model_not_found)."""


def adapter_index(model: nn.Module, name: str | None) -> int:
    """A request's adapter -> its index in the model's bank (0: none, the base model); a name the
    bank does not hold (or a model without one) -> UnknownAdapterError."""
    if name is None:
        return 0
    bank = getattr(model, "adapter_bank", None)
    index = bank.names.get(name) if bank is not None else None
    if index is None:
        known = ", ".join(sorted(bank.names)) if bank is not None and bank.names else "none"
        raise UnknownAdapterError(f"adapter {name!r} not found; registered: {known}")
    return index


class StackedLoRALinear(nn.Module):
    """A (quantized) Linear with every registered adapter's factors stacked beside it."""

    def __init__(self, base: nn.Module, bank: AdapterBank):
        super().__init__()
        self.base, self.bank = base, bank
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_a = torch.zeros(0, self.in_features, dtype=dtype)  # [R, in]: every adapter's A
        self.lora_b = torch.zeros(self.out_features, 0, dtype=dtype)  # [out, R]: B * scaling
        self.owner = torch.zeros(0, dtype=torch.int32)  # [R]: the adapter (1..) each rank column belongs to

    @property
    def weight(self) -> torch.Tensor:  # what code reading `.weight` of a Linear expects
        return self.base.weight

    def add(self, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Stack one adapter's factors (A [r, in], B [out, r], scaling folded in)."""
        dtype = self.lora_a.dtype
        self.lora_a = torch.cat((self.lora_a, a.to(dtype))).contiguous()
        self.lora_b = torch.cat((self.lora_b, b.to(dtype)), dim=1).contiguous()
        self.owner = torch.cat((self.owner, torch.full((a.shape[0],), index, dtype=torch.int32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        tokens = self.bank.token_adapters
        if tokens is None or not self.owner.numel():
            return out
        flat = x.reshape(-1, x.shape[-1])
        h = (flat @ self.lora_a.T) * (tokens[:, None] == self.owner)  # each token: its own adapter's columns
        return out + (h @ self.lora_b.T).view(out.shape)


class AdapterBank:
    """The adapters registered on a model, by name; index 0 means none. `model.adapter_bank`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self.layers: dict[str, StackedLoRALinear] = {}
        self.token_adapters: torch.Tensor | None = None  # [tokens] int32, only inside a forward
        self.version = 0  # changes when an adapter is added (the native step's descriptors follow it)

    @classmethod
    def of(cls, model: nn.Module) -> AdapterBank:
        """The model's bank, made on first use."""
        bank = getattr(model, "adapter_bank", None)
        if bank is None:
            if not hasattr(model, "layers"):
                raise MemlmError("LoRA adapters need a Llama-family model")
            if any(True for _ in lora_layers(model)):  # a weaver's or an unmerged adapter's LoRA
                raise MemlmError(
                    "this model already carries a LoRA adapter beside its weights (a latent memory's weaver, "
                    "or a quantized model loaded from an adapter folder); per-request adapters need a plain base"
                )
            bank = model.adapter_bank = cls(model)
        return bank

    def add(self, name: str, folder: str | Path) -> dict:
        """Register the adapter in `folder` (PEFT or memlm format) under `name` -> its config."""
        if not name or ":" in name:
            raise MemlmError(f"an adapter name must be non-empty and without ':', got {name!r}")
        if name in self.names:
            raise MemlmError(f"adapter {name!r} is registered already")
        config, deltas = read_adapter_deltas(self.model, folder)
        if not deltas:
            raise MemlmError(f"{folder}: the adapter adapts no module")
        index = len(self.names) + 1
        with torch.no_grad():
            for path, (a, b) in deltas.items():
                self._layer(path).add(index, a, b)
        self.names[name] = index
        self.sources[name] = str(folder)
        self.version += 1
        return config

    def _layer(self, path: str) -> StackedLoRALinear:
        layer = self.layers.get(path)
        if layer is None:
            parent_name, _, child_name = path.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            base = getattr(parent, child_name)
            if isinstance(base, LoRALinear) or not _is_linear(base):
                raise MemlmError(f"cannot put stacked adapters on {path} ({type(base).__name__})")
            layer = self.layers[path] = StackedLoRALinear(base, self)
            setattr(parent, child_name, layer)
        return layer

    def index(self, name: str | None) -> int:
        """A request's adapter -> its index (0: none)."""
        return adapter_index(self.model, name)

    @contextlib.contextmanager
    def selecting(self, token_adapters: torch.Tensor | None):
        """Inside the block, each adapted projection gives token t the delta of adapter
        token_adapters[t] (the tokens in the order the projections see them)."""
        self.token_adapters = token_adapters
        try:
            yield
        finally:
            self.token_adapters = None
