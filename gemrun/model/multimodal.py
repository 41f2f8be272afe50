"""Media soft tokens into the token sequence: embeddings with the placeholder positions replaced, and the blocks
of image (and video frame) tokens that attend to each other bidirectionally. Both families, the reference's
`get_placeholder_mask` / `masked_scatter` and `token_type_ids` blocks (modeling_gemma3.py, Gemma3Model.forward;
modeling_gemma4_unified.py, get_block_sequence_ids_for_mask)."""

from __future__ import annotations

import torch

from ..errors import InputError


def prompt_embeddings(model, ids: torch.Tensor, soft: dict[int, torch.Tensor]) -> torch.Tensor:
    """(1, T, E): scaled token embeddings of ids (T,) with each placeholder id's positions replaced, in order, by
    its soft tokens (M, E), unscaled. Placeholders (and ids past the embedding table) embed as id 0 first, as the
    reference does; their rows are overwritten anyway."""
    placeholders = torch.isin(ids, torch.tensor(list(soft) or [-1], device=ids.device))
    x = model.embed(ids.masked_fill(placeholders | (ids >= model.config.vocab_size), 0)[None])
    for token_id, tokens in soft.items():
        where = ids == token_id
        if int(where.sum()) != tokens.shape[0]:
            raise InputError(f"{int(where.sum())} placeholder tokens {token_id} in the prompt for "
                             f"{tokens.shape[0]} soft tokens")
        x[0, where] = tokens.to(x.dtype)
    return x


def media_blocks(ids: torch.Tensor, block_ids: tuple[int, ...]) -> torch.Tensor:
    """(T,) block id of each token: each run of soft tokens with an id in `block_ids` (one image or video frame)
    forms a block 0, 1, ...; the rest (text, audio) is -1 and stays causal."""
    inside = torch.isin(ids, torch.tensor(block_ids, device=ids.device))
    starts = inside & ~torch.cat([inside.new_zeros(1), inside[:-1]])
    return torch.where(inside, torch.cumsum(starts.long(), 0) - 1, torch.full_like(ids, -1))
