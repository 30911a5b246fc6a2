"""Splice visual tokens into a padded batch of text embeddings at `<image>` placeholders, vectorized.

Every placeholder token expands to the N_v tokens of one image; images are matched to placeholders in
reading order (sample 0 left to right, then sample 1, ...). Padding is dropped and re-applied on
`padding_side` ("right" for training, "left" for generation), so rows of different lengths stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class MergedInputs:
    inputs_embeds: torch.Tensor  # (B, T', D)
    attention_mask: torch.Tensor  # (B, T') long
    labels: torch.Tensor | None  # (B, T'), IGNORE_INDEX on visual tokens and padding
    visual_mask: torch.Tensor  # (B, T') bool, True on visual tokens


def merge_visual_tokens(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_features: torch.Tensor,
    image_token_id: int,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
) -> MergedInputs:
    """inputs_embeds (B, T, D), input_ids/attention_mask/labels (B, T), image_features (n_images, N_v, D)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
    B, T, D = inputs_embeds.shape
    num_images, num_visual, _ = image_features.shape
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid  # (B, T)
    num_placeholders = int(is_image.sum())
    if num_placeholders != num_images:
        raise ValueError(
            f"got {num_images} images but the batch holds {num_placeholders} '<image>' placeholder tokens "
            f"(image_token_id={image_token_id}); every image needs exactly one placeholder in its prompt"
        )

    token_len = torch.where(is_image, num_visual, 1) * valid  # (B, T): length each token takes in the output
    end = token_len.cumsum(1)  # (B, T)
    start = end - token_len  # (B, T): output position of each token
    new_len = end[:, -1]  # (B,)
    new_T = int(new_len.max())
    if padding_side == "left":
        start = start + (new_T - new_len)[:, None]

    positions = torch.arange(new_T, device=input_ids.device)
    if padding_side == "left":
        new_mask = positions[None, :] >= (new_T - new_len)[:, None]
    else:
        new_mask = positions[None, :] < new_len[:, None]  # (B, T')

    merged = inputs_embeds.new_zeros(B, new_T, D)
    text_b, text_t = torch.nonzero(valid & ~is_image, as_tuple=True)
    text_pos = start[text_b, text_t]
    merged[text_b, text_pos] = inputs_embeds[text_b, text_t]

    img_b, img_t = torch.nonzero(is_image, as_tuple=True)  # row-major = reading order of placeholders
    img_pos = start[img_b, img_t][:, None] + torch.arange(num_visual, device=input_ids.device)  # (n_images, N_v)
    merged[img_b[:, None], img_pos] = image_features.to(merged.dtype)
    visual_mask = torch.zeros(B, new_T, dtype=torch.bool, device=input_ids.device)
    visual_mask[img_b[:, None], img_pos] = True

    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((B, new_T), IGNORE_INDEX)
        new_labels[text_b, text_pos] = labels[text_b, text_t]
    return MergedInputs(merged, new_mask.long(), new_labels, visual_mask)
