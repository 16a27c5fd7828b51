"""Every layer of a short chunk of a quantized Llama-family model in one native call.

A token's decode step is ~20 torch ops per layer (norms, projections, RoPE, cache writes,
attention, residuals): ~600 ops for a 30-layer model, whose Python dispatch alone costs several
milliseconds, about as long as reading the 4-bit weights. `mk_decode` runs every layer in C++
(OpenMP threads for the matmuls and attention heads) and leaves the embedding lookup, the final
norm, the LM head and everything around them (sampling, eviction, latent memory) to the Python
model, unchanged.

It takes the chunk's real tokens (padding removed), each with its row and cache slot: decode
steps (one token per row, rows of different lengths), and short chunks of up to NATIVE_MAX_ROWS
tokens: latents inserted into the reasoner, the latent weaver's own pass (its LoRA adapters run
beside the quantized weights), requests joining a running batch, and mixed steps. Rows with
different LoRA adapters of the model's AdapterBank run together: each token computes only its
row's adapter's columns. It records the attention statistics H2O and TOVA need when the cache
tracks them (decode steps). Longer chunks (prefill) and chunks that track attention over several
tokens go layer by layer through QLinear.
"""

from __future__ import annotations

import ctypes

import torch

from memlm.adapters.bank import StackedLoRALinear
from memlm.adapters.lora import LoRALinear
from memlm.cache.kv_cache import KVCache
from memlm.kernels import DecodeArgs, LayerDesc, ModelDesc, native
from memlm.models.llama import GatedMLP
from memlm.models.rope import rope_cos_sin
from memlm.quant.qlinear import NATIVE_MAX_ROWS, QLinear, qmat


def _quantized(module) -> tuple[QLinear | None, object]:
    """(the QLinear, its LoRA wrapper or None) of a projection, or (None, None) if not quantized."""
    if isinstance(module, LoRALinear | StackedLoRALinear):
        return (module.base, module) if isinstance(module.base, QLinear) else (None, None)
    return (module, None) if isinstance(module, QLinear) else (None, None)


class NativeDecoder:
    def __init__(self, lib, model):
        self.lib, self.config, self._handle = lib, model.config, None
        self._build(model)

    def _build(self, model) -> None:
        """Describe every layer to the kernels, LoRA adapters included (rebuilt when they change)."""
        cfg = model.config
        self._adapters = self._adapter_signature(model)
        self._keep = []  # tensors the descriptors point into that nothing else holds
        null = None
        layers = (LayerDesc * cfg.num_layers)()
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp

            def desc(module):
                linear, lora = _quantized(module)
                if lora is None:
                    return qmat(linear.qweight, linear.bias)
                if isinstance(lora, StackedLoRALinear):  # every adapter's columns, each owned by one
                    out = qmat(linear.qweight, linear.bias)
                    if lora.owner.numel():
                        a, bt, owner = lora.lora_a.float().contiguous(), lora.lora_b.t().float(), lora.owner
                        bt = bt.contiguous()
                        self._keep += [a, bt, owner]
                        out.lora_a, out.lora_bt, out.lora_owner = a.data_ptr(), bt.data_ptr(), owner.data_ptr()
                        out.rank, out.scaling = a.shape[0], 1.0  # the scaling is folded into B
                    return out
                # The model's own LoRA is adapter 1 of every token that runs with it (all of them,
                # or a latent weaver's queries: the step's `token_adapters`).
                bt = lora.lora_b.detach().t().contiguous().float()
                owner = torch.ones(lora.rank, dtype=torch.int32)
                self._keep += [bt, owner]
                out = qmat(linear.qweight, linear.bias, lora, bt)
                out.lora_owner = owner.data_ptr()
                return out

            layers[i] = LayerDesc(
                block.input_layernorm.weight.data_ptr(),
                desc(attn.qkv_proj),
                attn.q_norm.weight.data_ptr() if attn.q_norm is not None else null,
                attn.k_norm.weight.data_ptr() if attn.k_norm is not None else null,
                desc(attn.o_proj),
                block.post_attention_layernorm.weight.data_ptr(),
                desc(mlp.gate_up_proj),
                desc(mlp.down_proj),
                block.attn_output_norm.weight.data_ptr() if block.attn_output_norm is not None else null,
                block.mlp_output_norm.weight.data_ptr() if block.mlp_output_norm is not None else null,
                cfg.sliding_window if attn.sliding else 0,
                int(attn.sliding and model.local_inv_freq is not None),
            )
        first = model.layers[0].self_attn.qkv_proj
        activations = _quantized(first)[0].activations
        scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else 0.0  # 0: head_dim's
        desc = ModelDesc(
            cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.rms_norm_eps, int(activations == "q8_0"), layers,
            int(cfg.hidden_act == "gelu_tanh"), scale, cfg.rotary_dim,
        )  # fmt: skip
        if self._handle:
            self.lib.mk_model_free(self._handle)
        self._handle = self.lib.mk_model_new(ctypes.byref(desc))

    @staticmethod
    def _adapter_signature(model) -> list:
        """What the descriptors depend on: each adapter's tensors, and B's version (the kernels read
        a transposed copy of B, refreshed when B changes in place, e.g. a memory loaded into it)."""
        bank = model.adapter_bank
        return [
            (id(m.lora_a), id(m.lora_b), m.lora_b._version, m.lora_a.data_ptr())
            for m in getattr(model, "lora_modules", ())
        ] + [bank.version if bank is not None else 0]

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle:
            self.lib.mk_model_free(handle)

    @staticmethod
    def supports(model) -> bool:
        """Every layer's projections quantized, a dense MLP, float32 norms, a head size the step handles.
        Gemma 3's and Phi-3's switches (sandwich norms, gelu, windows, a local RoPE base, a score
        scale, partial rotary) are the kernels' too."""
        cfg = model.config
        if cfg.head_dim % 8 or cfg.head_dim > 512 or model.dtype != torch.float32:
            return False
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            if not isinstance(mlp, GatedMLP):
                return False
            linears = [_quantized(m)[0] for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if not all(lin is not None and lin.qweight.device.type == "cpu" for lin in linears):
                return False
        return True

    @classmethod
    def for_model(cls, model) -> NativeDecoder | None:
        lib = native()
        return cls(lib, model) if lib is not None and cls.supports(model) else None

    def accepts(self, model, embeds: torch.Tensor, positions: torch.Tensor, cache) -> bool:
        if type(cache) is not KVCache or cache.format.code < 0 or cache.compute_dtype != torch.float32:
            return False
        if embeds.dtype != torch.float32 or embeds.device.type != "cpu":
            return False
        adapters = getattr(model, "lora_modules", ())
        if len({layer.enabled for layer in adapters}) > 1:  # some adapters on, some off
            return False
        if cache.track_attention and embeds.shape[1] > 1:  # statistics per query: the layer-by-layer path
            return False
        if cache.query_observer is not None:  # a press reads the queries: the layer-by-layer path
            return False
        # Up to the row count where the kernels beat dequantize + GEMM (the layer-by-layer path's choice too).
        return embeds.shape[1] == 1 or int((positions >= 0).sum()) <= NATIVE_MAX_ROWS

    def step(self, model, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             lora_tokens: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Run the chunk's real tokens through all layers -> hidden [B, T, d] before the final norm
        (zeros at padding); `lora_tokens` [B, T]: the tokens that run with the model's own LoRA."""
        adapters = getattr(model, "lora_modules", ())
        if self._adapter_signature(model) != self._adapters:
            self._build(model)
        own = lora_tokens  # the tokens that run with the model's own LoRA: given, or all when it is on
        if own is None and adapters and adapters[0].enabled:
            own = torch.ones(positions.shape, dtype=torch.bool)
        lora = int(own is not None)
        batch, chunk, hidden = embeds.shape
        real = positions >= 0
        dense = bool(real.all())
        cos, ssin = rope_cos_sin(positions, model.inv_freq, model.attention_scaling, torch.float32)
        local = model.local_inv_freq is not None
        lcos, lssin = rope_cos_sin(positions, model.local_inv_freq, 1.0, torch.float32) if local else (cos, ssin)
        cache.begin(positions) if lora_tokens is None else cache.begin(positions, lora_tokens)
        kv, slots, width = cache.native_target()
        rows = torch.arange(batch)[:, None].expand(batch, chunk)
        if dense:
            x = embeds.reshape(batch * chunk, hidden).clone()
            rows, slots = rows.reshape(-1), slots.reshape(-1)
            cos, ssin = cos.reshape(batch * chunk, -1), ssin.reshape(batch * chunk, -1)
            lcos, lssin = lcos.reshape(batch * chunk, -1), lssin.reshape(batch * chunk, -1)
        else:
            x = embeds[real].clone()
            rows, slots = rows[real], slots[real]
            cos, ssin = cos[:, 0][real], ssin[:, 0][real]
            lcos, lssin = lcos[:, 0][real], lssin[:, 0][real]
        rows, slots, cos, ssin = rows.contiguous(), slots.contiguous(), cos.contiguous(), ssin.contiguous()
        # Stacked adapters (memlm.adapters.bank): each token's adapter is its row's. The model's own
        # LoRA (never beside a bank): adapter 1 where the token runs with it, 0 elsewhere.
        stacked = model.adapter_bank is not None and bool(cache.adapters.any())
        if stacked:
            token_adapters = cache.adapters[rows].contiguous()
        elif lora:
            token_adapters = (own.reshape(-1) if dense else own[real]).to(torch.int32).contiguous()
        else:
            token_adapters = None
        lora = lora or int(stacked)
        lcos, lssin = lcos.contiguous(), lssin.contiguous()
        slot_positions = cache.positions.contiguous()  # sliding layers mask by them
        received = torch.zeros(batch, width) if cache.track_attention else None
        table = kv.table.contiguous()
        args = DecodeArgs(
            x.data_ptr(), x.shape[0], cos.data_ptr(), ssin.data_ptr(), kv.k.data_ptr(), kv.v.data_ptr(),
            kv.strides(kv.k), kv.strides(kv.v), rows.data_ptr(), slots.data_ptr(),
            table.data_ptr(), table.shape[1], kv.block_size, kv.format.code, int(cache.rotate_keys),
            received.data_ptr() if received is not None else None, width, lora,
            token_adapters.data_ptr() if token_adapters is not None else None,
            lcos.data_ptr(), lssin.data_ptr(), slot_positions.data_ptr(), slot_positions.shape[1],
        )  # fmt: skip
        self.lib.mk_decode(self._handle, ctypes.byref(args))
        if received is not None:
            cache.observe_attention_total(received)
        cache.end()
        if dense:
            return x.view(batch, chunk, hidden)
        out = embeds.new_zeros(batch, chunk, hidden)
        out[real] = x
        return out
