"""Vectorized visual-token merge against a per-sample Python reference (LLaVA's original loop)."""

import pytest
import torch

from parrot.model.merge import IGNORE_INDEX, merge_visual_tokens

IMG = 7


def reference_merge(embeds, ids, mask, feats, labels, padding_side):
    rows, row_labels, k = [], [], 0
    for b in range(ids.shape[0]):
        parts, lab = [], []
        for t in range(ids.shape[1]):
            if not mask[b, t]:
                continue
            if ids[b, t] == IMG:
                parts.append(feats[k])
                lab += [IGNORE_INDEX] * feats.shape[1]
                k += 1
            else:
                parts.append(embeds[b, t][None])
                lab.append(int(labels[b, t]))
        rows.append(torch.cat(parts))
        row_labels.append(lab)
    T = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), T, embeds.shape[-1], dtype=embeds.dtype)
    out_mask = torch.zeros(len(rows), T, dtype=torch.long)
    out_labels = torch.full((len(rows), T), IGNORE_INDEX)
    for b, (r, lab) in enumerate(zip(rows, row_labels)):
        sl = slice(T - r.shape[0], T) if padding_side == "left" else slice(0, r.shape[0])
        out[b, sl], out_mask[b, sl], out_labels[b, sl] = r, 1, torch.tensor(lab)
    return out, out_mask, out_labels


def make_batch(padding_side):
    # rows: two images, one image, no image, one image at the very start
    seqs = [[1, IMG, 2, 3, IMG, 4], [IMG, 5, 6], [8, 9], [IMG, 1, 2, 3, 4, 5, 6, 8]]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = torch.tensor(s), 1
    labels = torch.where(mask.bool() & (ids != IMG), torch.randint(10, 50, ids.shape), IGNORE_INDEX)
    embeds = torch.randn(*ids.shape, 6)
    feats = torch.randn(4, 3, 6)
    return embeds, ids, mask, feats, labels


@pytest.mark.parametrize("in_side", ["left", "right"])
@pytest.mark.parametrize("out_side", ["left", "right"])
def test_merge_matches_reference(in_side, out_side):
    embeds, ids, mask, feats, labels = make_batch(in_side)
    merged = merge_visual_tokens(embeds, ids, mask, feats, IMG, labels, out_side)
    ref, ref_mask, ref_labels = reference_merge(embeds, ids, mask, feats, labels, out_side)
    torch.testing.assert_close(merged.inputs_embeds, ref)
    assert torch.equal(merged.attention_mask, ref_mask)
    assert torch.equal(merged.labels, ref_labels)
    assert int(merged.visual_mask.sum()) == feats.shape[0] * feats.shape[1]
    assert (merged.labels[merged.visual_mask] == IGNORE_INDEX).all()


def test_merge_gradients_flow_to_features():
    embeds, ids, mask, feats, labels = make_batch("right")
    feats.requires_grad_(True)
    merged = merge_visual_tokens(embeds, ids, mask, feats, IMG, labels)
    merged.inputs_embeds.sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))


@pytest.mark.parametrize("in_side", ["left", "right"])
@pytest.mark.parametrize("out_side", ["left", "right"])
def test_merge_gradients_match_reference(in_side, out_side):
    """Gradients to the text embeddings (zero on padding and placeholders) and to the image features under a random
    upstream gradient: exactly autograd's through the per-sample loop; and a float64 gradcheck."""
    embeds, ids, mask, feats, labels = make_batch(in_side)
    embeds, feats = embeds.double(), feats.double()
    merges = (lambda e, f: merge_visual_tokens(e, ids, mask, f, IMG, labels, out_side).inputs_embeds,
              lambda e, f: reference_merge(e, ids, mask, f, labels, out_side)[0])
    grads = []
    for merge in merges:
        e, f = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
        out = merge(e, f)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        grads.append(torch.autograd.grad((out * upstream).sum(), [e, f]))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.autograd.gradcheck(merges[0], (embeds.requires_grad_(), feats.requires_grad_()))


@pytest.mark.parametrize("n_images", [3, 5])
def test_image_placeholder_mismatch_is_an_error(n_images):
    embeds, ids, mask, _, labels = make_batch("right")
    with pytest.raises(ValueError, match="placeholder"):
        merge_visual_tokens(embeds, ids, mask, torch.randn(n_images, 3, 6), IMG, labels)


def test_merge_matches_reference_on_random_batches():
    """Random ids, masks with holes (not only padding), rows without images, several images per row, 1-3 visual
    tokens per image, both output sides: embeddings, mask and labels equal the per-sample loop exactly."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        B, T, n_visual = (int(torch.randint(low, high, (1,), generator=g)) for low, high in ((1, 5), (1, 9), (1, 4)))
        ids = torch.randint(0, 10, (B, T), generator=g)
        mask = (torch.rand(B, T, generator=g) < 0.8).long()
        mask[:, 0] = 1  # every row keeps a token
        labels = torch.randint(-100, 50, (B, T), generator=g)
        n_images = int(((ids == IMG) & mask.bool()).sum())
        embeds = torch.randn(B, T, 4, dtype=torch.float64, generator=g)
        feats = torch.randn(n_images, n_visual, 4, dtype=torch.float64, generator=g)
        for side in ("left", "right"):
            merged = merge_visual_tokens(embeds, ids, mask, feats, IMG, labels, side)
            ref, ref_mask, ref_labels = reference_merge(embeds, ids, mask, feats, labels, side)
            assert torch.equal(merged.inputs_embeds, ref)
            assert torch.equal(merged.attention_mask, ref_mask) and torch.equal(merged.labels, ref_labels)
            assert int(merged.visual_mask.sum()) == n_images * n_visual


def test_placeholder_mismatch_names_the_samples():
    embeds, ids, mask, _, labels = make_batch("left")  # samples 0..3 hold 2, 1, 0, 1 placeholders
    with pytest.raises(ValueError, match=r"sample 0: 2, sample 1: 1, sample 3: 1"):
        merge_visual_tokens(embeds, ids, mask, torch.randn(3, 3, 6), IMG, labels)
