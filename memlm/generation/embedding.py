"""Text embeddings from a language model: the mean of the last hidden states over the input's tokens
(after the final norm), L2-normalised, so the dot product of two embeddings is their cosine.

Mean pooling is what a decoder trained only to predict the next token supports best without a
trained pooling head (the last token's state mostly encodes what comes next); the vectors are
good for "closer or further", not a trained retrieval model. Inputs are right-padded into batches
of at most `max_tokens` tokens and run through the model's own state (a KV cache, or LCM's sums),
so padding never changes a row's result.
"""

from __future__ import annotations

import torch

from memlm.errors import InvalidRequestError


@torch.inference_mode()
def embed_token_lists(model, inputs: list[list[int]], max_tokens: int = 4096) -> torch.Tensor:
    """Token-id lists -> [len(inputs), hidden] float32 unit vectors, in input order."""
    if not inputs or any(not ids for ids in inputs):
        raise InvalidRequestError("every input to embed needs at least one token")
    out = torch.empty(len(inputs), model.config.hidden_size, dtype=torch.float32)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths together: less padding
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= max_tokens:
            end += 1
        rows = order[start:end]
        out[rows] = _pool(model, [inputs[i] for i in rows])
        start = end
    return out


def _pool(model, batch: list[list[int]]) -> torch.Tensor:
    width = max(len(ids) for ids in batch)
    device = model.device
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    positions = torch.full((len(batch), width), -1, dtype=torch.long, device=device)
    for row, tokens in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
        positions[row, : len(tokens)] = torch.arange(len(tokens), device=device)
    state = model.new_state(len(batch), width)
    hidden = model.forward_tokens(ids, positions, state).float()
    valid = (positions >= 0).unsqueeze(-1).float()
    mean = (hidden * valid).sum(1) / valid.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).cpu()
