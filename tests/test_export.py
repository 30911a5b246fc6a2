"""`parrot.export --merge-lora`: the merged checkpoint computes what base + unmerged peft adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from parrot.data.processor import IMAGE_TOKEN, ParrotProcessor
from parrot.data.tokenizer import build_tiny_tokenizer
from parrot.export import ExportError, export_merged, main as export_main
from parrot.model import ParrotConfig, ParrotForCausalLM
from parrot.moe import MoLEConfig, inject_mole, save_mole


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=300, n_texts=200)


def tiny_model(tokenizer) -> tuple[ParrotForCausalLM, ParrotProcessor]:
    config = ParrotConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256),
        vision_config=dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), use_moe=True, moe_num_experts=3,
        moe_intermediate_size=40,
    )
    torch.manual_seed(0)
    model = ParrotForCausalLM(config).eval()
    return model, ParrotProcessor.for_model(tokenizer, config, "chatml", 256)


def _batch(processor):
    torch.manual_seed(1)
    from PIL import Image

    images = [Image.fromarray((torch.rand(32, 40, 3) * 255).byte().numpy()) for _ in range(2)]
    prompts = [processor.build_prompt("What colour is the circle?"), processor.build_prompt("Describe it.")]
    return processor(prompts, images, padding_side="left")


def _lora(targets) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapter changes the output (peft's default B = 0 would not).
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)


def test_merge_adapter_on_language_model(tmp_path, tokenizer):
    model, processor = tiny_model(tokenizer)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    batch = _batch(processor)
    with torch.no_grad():
        base_logits = model(**batch).logits

    # The adapter lives on the language model (peft's usual save of `get_peft_model(model.language_model)`).
    peft_lm = get_peft_model(model.language_model, _lora(["q_proj", "v_proj", "down_proj"]))
    peft_lm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        unmerged = model(**batch).logits  # the Parrot forward now runs through the LoRA layers
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter matters

    dst = export_merged(tmp_path / "adapter", tmp_path / "merged", base=base_dir)
    merged = AutoModelForCausalLM.from_pretrained(dst).eval()  # our registration, no trust_remote_code
    assert isinstance(merged, ParrotForCausalLM)
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        logits = merged(**batch).logits
    torch.testing.assert_close(logits, unmerged, rtol=1e-4, atol=1e-5)
    assert ParrotProcessor.from_pretrained(dst).settings == processor.settings


def test_merge_adapter_on_full_model_saved_next_to_base_via_cli(tmp_path, tokenizer):
    model, processor = tiny_model(tokenizer)
    src = tmp_path / "checkpoint"
    model.save_pretrained(src)
    processor.save_pretrained(src)
    batch = _batch(processor)
    # Full-model adapter: LLM attention plus the projector's first layer (module paths start at the Parrot model).
    peft_model = get_peft_model(model, _lora(["k_proj", "o_proj", "mm_projector.0"]))
    peft_model.save_pretrained(src)
    keys = json.dumps(sorted(peft_model.state_dict()))
    assert "mm_projector.0.lora_A" in keys
    with torch.no_grad():
        unmerged = peft_model(**batch).logits

    assert export_main(["--merge-lora", "--src", str(src), "--dst", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = merged(**batch).logits
    torch.testing.assert_close(logits, unmerged, rtol=1e-4, atol=1e-5)


def test_refuses_mole_and_mismatched_adapters(tmp_path, tokenizer, capsys):
    model, processor = tiny_model(tokenizer)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)

    mole_dir = tmp_path / "mole"
    config = MoLEConfig(target_modules=("q_proj",), num_experts=2, rank=2)
    inject_mole(model.language_model, config)
    save_mole(model.language_model, config, mole_dir)
    with pytest.raises(ExportError, match="MoLE adapters cannot be merged"):
        export_merged(mole_dir, tmp_path / "out", base=base_dir)
    assert export_main(["--merge-lora", "--src", str(mole_dir), "--base", str(base_dir),
                        "--dst", str(tmp_path / "out")]) == 2
    assert "router weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # A LoRA adapter trained on a module this model does not have.
    other, _ = tiny_model(tokenizer)
    other.language_model.model.layers[1].self_attn.add_module("extra_proj", torch.nn.Linear(32, 32))
    get_peft_model(other.language_model, _lora(["extra_proj"])).save_pretrained(tmp_path / "foreign")
    with pytest.raises(ExportError, match="extra_proj"):
        export_merged(tmp_path / "foreign", tmp_path / "out", base=base_dir)

    # No base model anywhere.
    with pytest.raises(ExportError, match="--base"):
        export_merged(tmp_path / "foreign", tmp_path / "out")
