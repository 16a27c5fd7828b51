"""Model files: GGUF and Hugging Face folders read into memlm's layout, written back; names -> models."""
