"""ParrotForCausalLM end to end against a float64 per-sample reference: MoE routing by each image's own prompt
(padding, placeholders and answers excluded), left vs right padding, KV-cache generation, generate() input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from parrot.model import ParrotForCausalLM

from .conftest import IMAGE_TOKEN_ID, tiny_parrot_config

N_V = 17  # visual tokens per image of the tiny tower (16 patches + CLS)

# Prompts of different lengths: one image, one image, no image, two images.
PROMPTS = [[1, 2, IMAGE_TOKEN_ID, 3, 4, 9, 10, 11], [6, IMAGE_TOKEN_ID, 7], [8, 9, 12, 13],
           [IMAGE_TOKEN_ID, 3, IMAGE_TOKEN_ID, 4]]


def strong_moe_model(**overrides) -> ParrotForCausalLM:
    """A float64 model whose routing visibly changes the output (the default init routes almost uniformly)."""
    config = tiny_parrot_config(**overrides)
    config.text_config.eos_token_id = None  # decode a fixed number of steps
    model = ParrotForCausalLM(config).double().eval()
    with torch.no_grad():
        model.moe.router.gate.weight.normal_(0.0, 30.0)
        for weight in (model.moe.experts.gate_proj, model.moe.experts.up_proj, model.moe.experts.down_proj):
            weight.normal_(0.0, 0.5)
    return model


def reference_embeds(model, ids, pixels, labels=None):
    """One unpadded sample: ids (T,), pixels (its images), labels (T,) | None -> merged embeddings, router probs.

    Paper eqs. 2-5 per image with loops: the CLS token attends over the sample's prompt tokens (not `<image>`,
    not answer tokens, i.e. labels != -100), softmax router, every expert, residual.
    """
    moe = model.moe
    emb = model.get_input_embeddings()(ids)
    is_image = ids == IMAGE_TOKEN_ID
    prompt = ~is_image if labels is None else ~is_image & (labels == -100)
    text = emb[prompt]
    pieces, probs, k = [], [], 0
    for t in range(ids.shape[0]):
        if not is_image[t]:
            pieces.append(emb[t : t + 1])
            continue
        v = model.encode_images(pixels[k : k + 1])[0]
        k += 1
        attn = torch.softmax(v[0] @ text.T / math.sqrt(text.shape[-1]), dim=-1)
        p = torch.softmax(moe.router.gate.weight @ (attn @ text), dim=-1)
        out = moe.moe_weight * v
        for e in range(p.shape[0]):
            gate, up, down = moe.experts.gate_proj[e], moe.experts.up_proj[e], moe.experts.down_proj[e]
            out = out + p[e] * ((F.silu(v @ gate) * (v @ up)) @ down)
        pieces.append(out)
        probs.append(p)
    return torch.cat(pieces), probs


def pad(rows, side, value=0):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        sl = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[b, sl], mask[b, sl] = torch.tensor(row), 1
    return ids, mask


def images_of(prompts, pixels):
    counts = [p.count(IMAGE_TOKEN_ID) for p in prompts]
    starts = [sum(counts[:b]) for b in range(len(prompts))]
    return [pixels[s : s + n] for s, n in zip(starts, counts)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_routing_loss_and_logits_match_per_sample_reference(side):
    """Routing by each sample's prompt only (labels mark the answers), visual tokens at the placeholders."""
    model = strong_moe_model()
    prompts = [p + [20, 21] for p in PROMPTS]  # each ends with a two-token answer
    labels = [[-100] * (len(p) - 2) + [20, 21] for p in prompts]
    pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ids, mask = pad(prompts, side)
    label_ids, _ = pad(labels, side, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=label_ids)
        ref_probs, nll, count = [], 0.0, 0
        for b, (prompt, label, images) in enumerate(zip(prompts, labels, images_of(prompts, pixels))):
            embeds, probs = reference_embeds(model, torch.tensor(prompt), images, torch.tensor(label))
            ref_probs += probs
            logits = model.language_model(inputs_embeds=embeds[None]).logits[0]
            torch.testing.assert_close(out.logits[b][out.attention_mask[b].bool()], logits, rtol=0, atol=1e-6)
            merged_labels = torch.tensor(sum(([-100] * N_V if t == IMAGE_TOKEN_ID else [y]
                                              for t, y in zip(prompt, label)), []))
            keep = merged_labels[1:] != -100
            nll += F.cross_entropy(logits[:-1][keep], merged_labels[1:][keep], reduction="sum")
            count += int(keep.sum())
    torch.testing.assert_close(out.router_probs, torch.stack(ref_probs), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss.double(), nll / count, rtol=1e-6, atol=0)


def test_generate_matches_per_sample_no_cache_reference():
    """Batched KV-cache generation (left padding, mixed image counts) = each prompt decoded alone without a cache,
    the router seeing the prompt only (fixed at prefill), at every step's logits."""
    model = strong_moe_model()
    steps = 5
    pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ids, mask = pad(PROMPTS, "left")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
        for b, (prompt, images) in enumerate(zip(PROMPTS, images_of(PROMPTS, pixels))):
            embeds, _ = reference_embeds(model, torch.tensor(prompt), images)
            for t in range(steps):
                logits = model.language_model(inputs_embeds=embeds[None]).logits[0, -1]
                torch.testing.assert_close(out.logits[t][b].double(), logits, rtol=0, atol=1e-5)
                token = out.sequences[b, t]
                assert token == logits.argmax()
                embeds = torch.cat([embeds, model.get_input_embeddings()(token[None])])
            alone = model.generate(input_ids=torch.tensor([prompt]), pixel_values=images if len(images) else None,
                                   max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            assert torch.equal(alone[0], out.sequences[b])


def test_generate_rejects_placeholders_without_images():
    """As forward() does: a prompt with `<image>` but no pixel_values would generate from the placeholder's
    embedding row as if it were text."""
    model = strong_moe_model()
    ids, mask = pad(PROMPTS, "left")
    with pytest.raises(ValueError, match="no pixel_values"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_generate_text_only_needs_left_padding():
    """Right padding decodes the short prompts after their padding; refused with images, so also without."""
    model = strong_moe_model()
    ids, mask = pad([[8, 9, 12, 13], [3, 4]], "right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    ids, mask = pad([[8, 9, 12, 13], [3, 4]], "left")
    new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    alone = model.generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(new[1], alone[0])


def test_position_ids_with_images_are_refused_by_name():
    # Positions numbered before the visual tokens are spliced in would not fit the merged sequence (an obscure
    # shape error deep in the language model before).
    model = ParrotForCausalLM(tiny_parrot_config()).eval()
    ids = torch.tensor([[1, 2, IMAGE_TOKEN_ID, 3]])
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with pytest.raises(ValueError, match="position_ids cannot be given with pixel_values"):
        model(input_ids=ids, pixel_values=pixels, position_ids=torch.arange(4)[None])


def test_manual_decoding_with_the_cache_needs_the_merged_mask():
    """Decoding by hand after a prefill with images: the cache holds the merged sequence, so the next step's mask
    extends output.attention_mask. Extending the prompt's (shorter) mask instead used to run silently with the
    wrong positions masked; it is refused, and the merged mask gives generate()'s tokens."""
    model = strong_moe_model()
    pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ids, mask = pad(PROMPTS, "left")
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                  min_new_tokens=3, do_sample=False)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        merged_mask, tokens = out.attention_mask, []
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            if len(tokens) == 1:
                with pytest.raises(ValueError, match="output.attention_mask"):
                    model(input_ids=token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1),
                          cache=out.cache)
            merged_mask = torch.cat([merged_mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=merged_mask, cache=out.cache)
    assert torch.equal(torch.cat(tokens, 1), expected)
