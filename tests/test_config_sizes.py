"""ParrotConfig refuses sub-config sizes that build no working model, naming `text_config.<key>` /
`vision_config.<key>` as config.json holds them (GPT-2's n_embd / n_head included), for a model built in code, a
saved model loaded back (`load_model_strict` names the file) and a converted one; sizes that work still build."""

from __future__ import annotations

import json
import re

import pytest
import torch

from parrot.model import ParrotForCausalLM
from parrot.model.builder import load_model_strict
from tests.conftest import tiny_parrot_config

OPEN_CLIP = dict(width=24, layers=2, patch_size=8, image_size=32, head_width=6)


def _config(text=None, vision=None, open_clip=None, **settings):
    config = tiny_parrot_config(vision="open_clip" if open_clip else "hf_clip", **settings)
    for key, value in (text or {}).items():
        setattr(config.text_config, key, value)
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    if open_clip:
        config.vision_config.vision_cfg = dict(OPEN_CLIP, **open_clip)
    return config


@pytest.mark.parametrize("changes, named", [
    (dict(text=dict(hidden_size=-1)), "text_config.hidden_size=-1 must be a whole number >= 1"),
    (dict(text=dict(hidden_size=34)),
     "text_config.hidden_size=34 must be a multiple of text_config.num_attention_heads=4"),
    (dict(text=dict(hidden_size=36)), "text_config.hidden_size=36 / text_config.num_attention_heads=4 = 9: rotary"),
    (dict(text=dict(num_key_value_heads=3)),
     "text_config.num_attention_heads=4 must be a multiple of text_config.num_key_value_heads=3"),
    (dict(text=dict(num_hidden_layers=0)), "text_config.num_hidden_layers=0 must be a whole number >= 1"),
    (dict(text=dict(vocab_size=0)), "text_config.vocab_size=0 must be a whole number >= 1"),
    (dict(vision=dict(patch_size=-8)), "vision_config.patch_size=-8 must be a whole number >= 1"),
    (dict(vision=dict(num_attention_heads=5)),
     "vision_config.hidden_size=24 must be a multiple of vision_config.num_attention_heads=5"),
    (dict(open_clip=dict(head_width=7)),
     "vision_config.vision_cfg.width=24 must be a multiple of vision_config.vision_cfg.head_width=7"),
    (dict(open_clip=dict(layers=0)), "vision_config.vision_cfg.layers=0 must be a whole number >= 1"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size=0 must be >= 1"),
    (dict(moe_num_experts=0), "moe_num_experts=0 must be >= 1"),
], ids=["hidden_negative", "hidden_not_divisible", "odd_rotary_head", "kv_heads", "no_layers", "vocab_zero",
        "patch_negative", "vision_heads", "open_clip_head_width",
        "open_clip_layers", "moe_inner_zero", "experts_zero"])
def test_impossible_sizes_are_refused_by_field(changes, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        ParrotForCausalLM(_config(**changes))


def test_gpt2_style_configs_are_named_by_their_own_keys():
    config = tiny_parrot_config(text="gpt2")
    config.text_config.n_embd = 30
    with pytest.raises(ValueError, match=re.escape("text_config.n_embd=30 must be a multiple of text_config.n_head=4")):
        ParrotForCausalLM(config)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "open_clip", "explicit_head_dim"])
def test_working_sizes_still_build(kind):
    if kind == "explicit_head_dim":  # an explicit head size: heads x head_dim need not be the hidden size
        config = _config(text=dict(head_dim=6))
    else:
        config = tiny_parrot_config(**({"vision": "open_clip"} if kind == "open_clip" else {"text": kind}))
    model = ParrotForCausalLM(config).eval()
    ids = torch.tensor([[1, config.image_token_id, 2]])
    pixels = torch.zeros(1, 3, 32, 32)
    assert model(input_ids=ids, pixel_values=pixels).logits.shape[1] == 2 + config.num_image_tokens


def test_a_saved_config_with_impossible_sizes_is_named_with_its_file(tmp_path):
    ParrotForCausalLM(tiny_parrot_config()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["vision_config"]["patch_size"] = 0
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*vision_config.patch_size=0 must be a whole"):
        load_model_strict(tmp_path)


@pytest.mark.parametrize("backend", ["hf_clip", "open_clip"])
def test_an_image_size_the_patch_size_does_not_divide_builds_with_whole_patches(backend):
    """Real towers do this (SigLIP so400m/14 at 384 px: 27x27 patches): the tower drops the border pixels and
    num_image_tokens counts whole patches, as the tower's output does."""
    config = _config(vision=dict(image_size=30) if backend == "hf_clip" else None,
                     open_clip=dict(image_size=30) if backend == "open_clip" else None)
    model = ParrotForCausalLM(config).eval()
    assert config.num_image_tokens == (30 // 8) ** 2 + 1
    with torch.no_grad():
        visual = model.encode_images(torch.randn(2, 3, 30, 30))
    assert visual.shape[:2] == (2, config.num_image_tokens)
