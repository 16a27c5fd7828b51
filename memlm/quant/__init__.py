"""Quantized weights: GGUF block layouts (QWeight), QLinear / QEmbedding over the native kernels, int8."""
