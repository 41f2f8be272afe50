"""Images into the token sequence (Gemma 3): placeholder expansion as `Gemma3Processor` does it, soft-token
embeddings scattered over the image-token positions, and image blocks for bidirectional attention."""

from __future__ import annotations

import torch

from ..errors import InputError

BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def image_sequence(tokens_per_image: int) -> str:
    """What one image (or crop) becomes in the prompt text; the newlines merge with their neighbours when the
    whole string is tokenized, as in the reference."""
    return f"\n\n{BOI}{IMAGE_TOKEN * tokens_per_image}{EOI}\n\n"


def expand_images(rendered: str, num_crops: list[int], tokens_per_image: int) -> str:
    """Replace each `<start_of_image>` the template emitted by its full sequence; an image with Pan & Scan crops
    gets the reference's wording around the original and its crops (Gemma3Processor.replace_image_token)."""
    parts = rendered.split(BOI)
    if len(parts) - 1 != len(num_crops):
        raise InputError(f"the prompt has {len(parts) - 1} image placeholders for {len(num_crops)} images")
    seq = image_sequence(tokens_per_image)
    out = [parts[0]]
    for crops, rest in zip(num_crops, parts[1:]):
        if crops:
            out.append(f"Here is the original image {seq} and here are some crops to help you see better "
                       + " ".join([seq] * crops))
        else:
            out.append(seq)
        out.append(rest)
    return "".join(out)


def image_blocks(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(T,) block id of each token: consecutive image soft tokens form one block (0, 1, ...), text is -1."""
    is_image = ids == image_token_id
    starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
    return torch.where(is_image, torch.cumsum(starts.long(), 0) - 1, torch.full_like(ids, -1))


def prompt_embeddings(model, ids: torch.Tensor, image_token_id: int, soft_tokens: torch.Tensor) -> torch.Tensor:
    """(1, T, E): scaled token embeddings with the image positions replaced by the (unscaled) soft tokens
    (M, E), in order. Image ids past the embedding table embed as id 0 first, as the reference does."""
    positions = ids == image_token_id
    if int(positions.sum()) != soft_tokens.shape[0]:
        raise InputError(f"{int(positions.sum())} image tokens in the prompt for {soft_tokens.shape[0]} soft tokens")
    safe = ids.masked_fill(ids >= model.config.vocab_size, 0)
    x = model.embed(safe[None])
    x[0, positions] = soft_tokens.to(x.dtype)
    return x
