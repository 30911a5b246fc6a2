"""Visual-token merge, forward + backward: `merge_visual_tokens` (vectorized) vs LLaVA's per-sample loop.

Reference: the loop of LLaVA's `prepare_inputs_labels_for_multimodal` (also in AIDC-AI/Parrot,
`parrot/model/parrot_arch.py`): per sample, drop padding by boolean indexing, split the text at the `<image>`
placeholders, concatenate text pieces and image features, then pad every sample to the longest and stack.
`llava_style_merge` below re-implements that control flow (written here, not copied) on already-embedded
tokens, and is checked equal to ours (embeddings, attention mask, labels and gradients) before timing.

Second reference, without a target: the same loop on per-sample slices taken once (`unbind(0)`). The official
loop slices the batch with an integer index per sample (`image_features[image_index]`, `inputs_embeds[b]`), and
in backward every such slice makes a zero gradient of the whole batched tensor (`select_backward`): O(B^2)
memory traffic that is most of the loop's cost. `unbind` gives one backward node for all samples, so this
reference measures the loop's control flow without that effect: the fair cost of a per-sample loop.

    python -m benchmarks.bench_merge [--device cuda] [--batch 32] [--out results/]

Issue 8 size: B=32 (default; one 576-token image per sample, prompts up to 128 tokens, D=1024). Target >= 5x over
the loop as written (per-sample integer slicing, as the official code does); the `unbind` loop is reported as a
ratio only.
"""

from __future__ import annotations

import argparse

import torch

from parrot.fileio import positive_int
from parrot.model.merge import IGNORE_INDEX, merge_visual_tokens

from .harness import BenchSettings, Ratio, add_common_args, check_same, finish, grads_of, profile_cases, settings_from_args, time_cases

TARGET_SPEEDUP = 5.0
IMAGE_TOKEN_ID = 5
QUICK_SIZES = dict(batch=8, text_tokens=48, visual_tokens=64, hidden=128)


def llava_style_merge(inputs_embeds, input_ids, attention_mask, image_features, labels, image_token_id):
    """Per-sample merge with right padding -> (embeds (B, T', D), attention_mask (B, T'), labels (B, T')).

    inputs_embeds (B, T, D) and image_features (n_images, N_v, D) are indexed per sample (`inputs_embeds[b]`); pass
    their `unbind(0)` tuples instead to take those slices once.
    """
    new_embeds, new_labels, image_index = [], [], 0
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, embeds, labs = input_ids[b][keep], inputs_embeds[b][keep], labels[b][keep]
        cut = [-1] + torch.where(ids == image_token_id)[0].tolist() + [ids.shape[0]]
        pieces, piece_labels = [], []
        for i in range(len(cut) - 1):
            pieces.append(embeds[cut[i] + 1 : cut[i + 1]])
            piece_labels.append(labs[cut[i] + 1 : cut[i + 1]])
            if i < len(cut) - 2:
                feature = image_features[image_index]
                image_index += 1
                pieces.append(feature)
                piece_labels.append(torch.full((feature.shape[0],), IGNORE_INDEX, device=labs.device, dtype=labs.dtype))
        new_embeds.append(torch.cat(pieces))
        new_labels.append(torch.cat(piece_labels))
    max_len = max(e.shape[0] for e in new_embeds)
    batch = len(new_embeds)
    labels_padded = torch.full((batch, max_len), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    mask = torch.zeros((batch, max_len), dtype=attention_mask.dtype, device=attention_mask.device)
    padded = []
    for i, (embeds, labs) in enumerate(zip(new_embeds, new_labels)):
        n = embeds.shape[0]
        padded.append(torch.cat([embeds, embeds.new_zeros(max_len - n, embeds.shape[1])]))
        labels_padded[i, :n] = labs
        mask[i, :n] = 1
    return torch.stack(padded), mask, labels_padded


def make_batch(sizes: dict, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    B, T, N, D = sizes["batch"], sizes["text_tokens"], sizes["visual_tokens"], sizes["hidden"]
    lengths = torch.randint(T // 2, T + 1, (B,), generator=generator)  # real tokens per row, right padding
    input_ids = torch.randint(10, 1000, (B, T), generator=generator)
    positions = torch.arange(T)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    image_at = torch.randint(0, min(8, T // 2), (B,), generator=generator)  # one placeholder near the start
    input_ids[torch.arange(B), image_at] = IMAGE_TOKEN_ID
    answer_from = lengths - torch.randint(4, T // 4 + 5, (B,), generator=generator)
    labels = torch.where((positions >= answer_from[:, None]) & attention_mask.bool(), input_ids, IGNORE_INDEX)
    inputs_embeds = torch.randn(B, T, D, generator=generator, dtype=torch.float32)
    image_features = torch.randn(B, N, D, generator=generator, dtype=torch.float32)
    to = dict(device=device)
    return (inputs_embeds.to(**to, dtype=dtype).requires_grad_(), input_ids.to(**to), attention_mask.to(**to),
            image_features.to(**to, dtype=dtype).requires_grad_(), labels.to(**to))


def run(args: argparse.Namespace, settings: BenchSettings):
    sizes = dict(QUICK_SIZES) if settings.quick else dict(
        batch=args.batch, text_tokens=args.text_tokens, visual_tokens=args.visual_tokens, hidden=args.hidden)
    generator = torch.Generator().manual_seed(settings.seed)
    inputs_embeds, input_ids, attention_mask, image_features, labels = make_batch(
        sizes, settings.device, settings.dtype, generator)
    merged_len = int(attention_mask.sum(1).max()) - 1 + sizes["visual_tokens"]
    grad_out = torch.randn(sizes["batch"], merged_len, sizes["hidden"], device=settings.device, dtype=settings.dtype)
    leaves = [inputs_embeds, image_features]

    def run_ours():
        merged = merge_visual_tokens(inputs_embeds, input_ids, attention_mask, image_features, IMAGE_TOKEN_ID, labels)
        return grads_of(merged.inputs_embeds, leaves, grad_out) + [merged.attention_mask, merged.labels]

    def run_reference():
        embeds, mask, new_labels = llava_style_merge(inputs_embeds, input_ids, attention_mask, image_features, labels,
                                                     IMAGE_TOKEN_ID)
        return grads_of(embeds, leaves, grad_out) + [mask, new_labels]

    def run_reference_unbind():
        embeds, mask, new_labels = llava_style_merge(inputs_embeds.unbind(0), input_ids, attention_mask,
                                                     image_features.unbind(0), labels, IMAGE_TOKEN_ID)
        return grads_of(embeds, leaves, grad_out) + [mask, new_labels]

    labels_ = ["embeds", "grad inputs_embeds", "grad image_features", "attention_mask", "labels"]
    ours_result = run_ours()
    checks = [check_same("merge fwd+bwd vs LLaVA-style loop", ours_result, run_reference(), settings.dtype, labels_),
              check_same("merge fwd+bwd vs loop on slices taken once (unbind)", ours_result, run_reference_unbind(),
                         settings.dtype, labels_)]
    del ours_result
    cases = {"ours: merge_visual_tokens (vectorized)": run_ours, "reference: LLaVA per-sample loop": run_reference,
             "reference: per-sample loop, slices taken once (unbind)": run_reference_unbind}
    times = time_cases(cases, settings, "merge")
    if settings.profile:
        profile_cases(cases, settings, "merge")
    ours_name, ref_name, unbind_name = list(cases)
    ratios = [Ratio("speedup over the LLaVA-style loop", ref_name, ours_name, TARGET_SPEEDUP, "at_least"),
              Ratio("speedup over the loop on slices taken once (unbind)", unbind_name, ours_name)]
    notes = ["fwd+bwd: merged embeddings, attention mask and labels; gradients to text embeddings and image features; "
             "right padding (training layout), one image per sample, prompt lengths vary per row",
             "the target is over the loop as written (an integer slice per sample, as in the official code: each one a "
             "whole-batch zero gradient in backward); the unbind loop takes the per-sample slices once, no target"]
    return finish("merge", sizes, times, ratios, checks, settings, ours_name, notes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--text-tokens", type=positive_int, default=128)
    parser.add_argument("--visual-tokens", type=positive_int, default=576)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    add_common_args(parser, warmup=(1, 3), repeats=(5, 20))
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    return run(args, settings_from_args(args))


if __name__ == "__main__":
    main()
