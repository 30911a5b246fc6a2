"""Splice visual tokens into a padded batch of text embeddings at `<image>` placeholders, vectorized.

Every placeholder token expands to the N_v tokens of one image; images are matched to placeholders in
reading order (sample 0 left to right, then sample 1, ...). Padding is dropped and re-applied on
`padding_side` ("right" for training, "left" for generation), so rows of different lengths stay aligned.

The merge is a row placement: every text token and every image-feature row lands on exactly one row of the
flattened (B * T', D) output, and the remaining rows are padding (zeros). `_PlaceRows` does that in one autograd
node whose backward gathers the same rows back out of the output gradient.
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


class _PlaceRows(torch.autograd.Function):
    """out = zeros(num_rows, D); out[text_dst] = text[text_src]; out[image_dst] = image; backward gathers back.

    No output row is written twice, so each source's gradient is a gather of the output gradient. (Two chained
    `index_put_` under autograd would also give the first write a gradient for the whole output: a clone of the
    (B * T', D) gradient with the second write's rows zeroed, about half the cost of the merge on a CPU.)
    """

    @staticmethod
    def forward(ctx, text, image, text_src, text_dst, image_dst, num_rows):
        # text (B*T, D), image (n_images*N_v, D); text_src/text_dst (n_text,), image_dst (n_images*N_v,)
        out = text.new_zeros(num_rows, text.shape[1])  # (B*T', D): rows nobody writes are padding
        out[text_dst] = text[text_src]
        out[image_dst] = image
        ctx.save_for_backward(text_src, text_dst, image_dst)
        ctx.num_text_rows = text.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (B*T', D)
        text_src, text_dst, image_dst = ctx.saved_tensors
        grad_text = grad_image = None
        if ctx.needs_input_grad[0]:
            grad_text = grad.new_zeros(ctx.num_text_rows, grad.shape[1])  # (B*T, D): zero on placeholders, padding
            grad_text[text_src] = grad[text_dst]
        if ctx.needs_input_grad[1]:
            grad_image = grad[image_dst]  # (n_images*N_v, D)
        return grad_text, grad_image, None, None, None, None


def placeholder_mismatch(is_image: torch.Tensor, num_images: int, image_token_id: int) -> ValueError:
    """The error for `num_images` images against the placeholders of `is_image` (B, T) bool, naming per sample how many
    placeholders it holds (images are matched to them in reading order, so that shows where one is missing)."""
    counts = is_image.sum(1).tolist()
    held = ", ".join(f"sample {b}: {n}" for b, n in enumerate(counts) if n) or "none"
    return ValueError(
        f"got {num_images} images but the batch holds {sum(counts)} '<image>' placeholder tokens "
        f"(image_token_id={image_token_id}); placeholders per sample ({len(counts)} samples, others none): {held}; "
        "every image needs exactly one placeholder in its prompt, pixel_values in the order of the samples"
    )


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
    device = input_ids.device
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid  # (B, T)

    token_len = torch.where(is_image, num_visual, 1) * valid  # (B, T): length each token takes in the output
    end = token_len.cumsum(1)  # (B, T)
    start = end - token_len  # (B, T): output position of each token
    new_len = end[:, -1]  # (B,)
    num_placeholders, new_T = torch.stack([is_image.sum(), new_len.max()]).tolist()  # one host sync for both
    if num_placeholders != num_images:
        raise placeholder_mismatch(is_image, num_images, image_token_id)
    if padding_side == "left":
        start = start + (new_T - new_len)[:, None]

    positions = torch.arange(new_T, device=device)
    if padding_side == "left":
        new_mask = positions[None, :] >= (new_T - new_len)[:, None]
    else:
        new_mask = positions[None, :] < new_len[:, None]  # (B, T')

    # Flat row indices: token (b, t) is row b*T + t of the input, its first output row is b*T' + start[b, t].
    out_row = (start + torch.arange(B, device=device)[:, None] * new_T).flatten()  # (B*T,)
    text_src = torch.nonzero((valid & ~is_image).flatten()).squeeze(1)  # (n_text,)
    text_dst = out_row[text_src]  # (n_text,)
    placeholder = torch.nonzero(is_image.flatten()).squeeze(1)  # (n_images,) in reading order
    image_dst = (out_row[placeholder][:, None] + torch.arange(num_visual, device=device)).flatten()  # (n_images*N_v,)

    merged = _PlaceRows.apply(
        inputs_embeds.reshape(B * T, D), image_features.to(inputs_embeds.dtype).reshape(-1, D),
        text_src, text_dst, image_dst, B * new_T,
    ).view(B, new_T, D)
    visual_mask = torch.zeros(B * new_T, dtype=torch.bool, device=device)
    visual_mask[image_dst] = True

    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((B * new_T,), IGNORE_INDEX)
        new_labels[text_dst] = labels.reshape(-1)[text_src]
        new_labels = new_labels.view(B, new_T)
    return MergedInputs(merged, new_mask.long(), new_labels, visual_mask.view(B, new_T))
