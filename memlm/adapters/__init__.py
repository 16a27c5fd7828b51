"""Adapters beside frozen weights: LoRA, read and written in PEFT's format."""
