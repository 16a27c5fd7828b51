"""A whole decode step of a quantized Llama-family model in one native call.

A token's decode step is ~20 torch ops per layer (norms, projections, RoPE, cache writes,
attention, residuals): ~600 ops for a 30-layer model, whose Python dispatch alone costs several
milliseconds, about as long as reading the 4-bit weights. `mk_decode` runs every layer of a step
in C++ (OpenMP threads for the matmuls and attention heads) and leaves the
embedding lookup, the final norm, the LM head and everything around them (sampling, eviction,
latent memory) to the Python model, unchanged.

It serves chunks of one token per row on a plain KV cache (the shape of every decode step,
batched or not, rows of different lengths included) and records the attention statistics H2O and
TOVA need when the cache tracks them. Anything else (prefill, latent insertion, joining rows, a
step with a LoRA adapter switched on, such as the latent weaver's) takes the layer-by-layer path,
whose linear layers are quantized too.
"""

from __future__ import annotations

import ctypes

import torch

from memlm.cache.kv_cache import KVCache
from memlm.models.qlinear import QLinear, qmat
from memlm.models.rope import rope_cos_sin


class NativeDecoder:
    def __init__(self, lib, model):
        from memlm.kernels import LayerDesc, ModelDesc

        cfg = model.config
        self.lib, self.config = lib, cfg
        null = None
        layers = (LayerDesc * cfg.num_layers)()
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            layers[i] = LayerDesc(
                block.input_layernorm.weight.data_ptr(),
                qmat(attn.qkv_proj.qweight, attn.qkv_proj.bias),
                attn.q_norm.weight.data_ptr() if attn.q_norm is not None else null,
                attn.k_norm.weight.data_ptr() if attn.k_norm is not None else null,
                qmat(attn.o_proj.qweight, attn.o_proj.bias),
                block.post_attention_layernorm.weight.data_ptr(),
                qmat(mlp.gate_up_proj.qweight, mlp.gate_up_proj.bias),
                qmat(mlp.down_proj.qweight, mlp.down_proj.bias),
            )
        desc = ModelDesc(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
            int(model.layers[0].self_attn.qkv_proj.activations == "q8_0"),
            layers,
        )
        self._handle = lib.mk_model_new(ctypes.byref(desc))

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle:
            self.lib.mk_model_free(handle)

    @staticmethod
    def supports(model) -> bool:
        """Every layer's projections quantized, a dense MLP, float32 norms, a head size the step handles."""
        from memlm.models.llama import GatedMLP

        cfg = model.config
        if cfg.head_dim % 8 or cfg.head_dim > 512 or model.dtype != torch.float32:
            return False
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            if not isinstance(mlp, GatedMLP):
                return False
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(lin, QLinear) and lin.qweight.device.type == "cpu" for lin in linears):
                return False
        return True

    @classmethod
    def for_model(cls, model) -> NativeDecoder | None:
        from memlm.kernels import native

        lib = native()
        return cls(lib, model) if lib is not None and cls.supports(model) else None

    def accepts(self, model, embeds: torch.Tensor, positions: torch.Tensor, cache) -> bool:
        return (
            embeds.shape[1] == 1
            and not any(layer.enabled for layer in getattr(model, "lora_modules", ()))
            and embeds.dtype == torch.float32
            and embeds.device.type == "cpu"
            and type(cache) is KVCache
            and cache.k.dtype == torch.float32
            and bool((positions >= 0).all())
        )

    def step(self, model, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run one token per row through all layers -> hidden [B, 1, d] before the final norm."""
        from memlm.kernels import DecodeArgs

        batch, hidden = embeds.shape[0], embeds.shape[2]
        cos, ssin = rope_cos_sin(positions, model.inv_freq, model.attention_scaling, torch.float32)
        cos, ssin = cos.reshape(batch, -1).contiguous(), ssin.reshape(batch, -1).contiguous()
        cache.begin(positions)
        k, v, slots, width = cache.write_target()
        slots = slots[:, 0].contiguous()
        x = embeds.reshape(batch, hidden).clone()
        received = torch.zeros(batch, width) if cache.track_attention else None
        args = DecodeArgs(
            x.data_ptr(),
            batch,
            cos.data_ptr(),
            ssin.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            (ctypes.c_int64 * 4)(*k.stride()[:4]),
            (ctypes.c_int64 * 4)(*v.stride()[:4]),
            slots.data_ptr(),
            received.data_ptr() if received is not None else None,
            width,
        )
        self.lib.mk_decode(self._handle, ctypes.byref(args))
        if received is not None:
            cache.observe_attention_total(received)
        cache.end()
        return x.view(batch, 1, hidden)
