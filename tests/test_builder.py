"""Recipes -> models: the tiny default, saved-model loading, and the local-checkpoint (real-scale) path."""

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from parrot.model import ParrotForCausalLM
from parrot.model.builder import build_from_local, build_tiny, load_pretrained, load_recipe, save_pretrained


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(use_moe=True)


def test_tiny_default_generates_and_round_trips(tiny, tmp_path):
    model, processor = tiny
    model.eval()
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    batch = processor([processor.build_prompt("What colour is the shape?")], [image])
    out = model(**batch)
    assert out.router_probs.shape == (1, 6)
    new = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 3) or (new.shape[1] < 3 and new[0, -1] == processor.tokenizer.eos_token_id)

    save_pretrained(model, processor, tmp_path)
    loaded, loaded_processor = load_pretrained(tmp_path)
    batch2 = loaded_processor([processor.build_prompt("What colour is the shape?")], [image])
    assert torch.equal(loaded(**batch2).logits, out.logits)
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parrot:\n  projector: linear\n")
    with pytest.raises(ValueError, match="bad.yaml.*parrot.projector"):
        load_recipe(bad)
    bad.write_text("tokeniser: {}\n")
    with pytest.raises(ValueError, match="unknown key 'tokeniser'"):
        load_recipe(bad)
    bad.write_text("parrot:\n  projector_type: conv\ntext_config: {model_type: qwen2}\n")
    with pytest.raises(ValueError, match="text_config.*vision_config"):
        load_recipe(bad)


def word_tokenizer_without_image_token() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "what", "colour", "?", "\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def test_build_from_local_checkpoints_adds_image_token(tmp_path):
    tokenizer = word_tokenizer_without_image_token()
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=16)).save_pretrained(tmp_path / "clip")
    recipe = tmp_path / "real.yaml"
    recipe.write_text("template: chatml\nmodel_max_length: 64\nparrot:\n  moe_num_experts: 2\n  use_moe: true\n")

    base_vocab = len(AutoTokenizer.from_pretrained(tmp_path / "llm"))
    assert "<image>" not in AutoTokenizer.from_pretrained(tmp_path / "llm").get_vocab()
    model, processor = build_from_local(recipe, str(tmp_path / "llm"), str(tmp_path / "clip"))
    assert isinstance(model, ParrotForCausalLM)
    assert len(processor.tokenizer) == base_vocab + 1 == model.get_input_embeddings().num_embeddings
    assert model.config.image_token_id == processor.image_token_id == base_vocab
    old_rows = llm.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: len(tokenizer)], old_rows)  # pretrained rows kept
    assert processor.settings.num_image_tokens == 5  # (32/16)^2 patches + CLS
    batch = processor([processor.build_prompt("what colour ?")], [Image.new("RGB", (32, 32))])
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1] + 4


def test_tiny_tokenizer_advertises_a_chat_template_only_for_chatml():
    """HF's apply_chat_template must not render ChatML for a model trained on another template."""
    import dataclasses

    from parrot.model.builder import TINY_RECIPE

    _, chatml = build_tiny(TINY_RECIPE)
    messages = [{"role": "user", "content": "What colour?"}]
    assert chatml.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        chatml.build_prompt("What colour?", with_image=False)
    _, llama = build_tiny(dataclasses.replace(load_recipe(TINY_RECIPE), template="llama"))
    assert llama.tokenizer.chat_template is None


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_local_parts(root, pad_rows: int = 0, tower_normalisation: dict | None = None):
    """A local Qwen2 LLM (+ tokenizer without `<image>`, `pad_rows` embedding rows beyond it, as Qwen pads its
    vocabulary) and a CLIP vision tower (+ a preprocessor_config.json with `tower_normalisation`, when given)."""
    from transformers import CLIPImageProcessor

    tokenizer = word_tokenizer_without_image_token()
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer) + pad_rows, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=False))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=16)).save_pretrained(root / "clip")
    if tower_normalisation is not None:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                           **tower_normalisation).save_pretrained(root / "clip")
    recipe = root / "real.yaml"
    recipe.write_text("template: chatml\nmodel_max_length: 64\nparrot:\n  moe_num_experts: 2\n")
    return llm, recipe


def test_build_from_local_normalises_images_as_the_tower_was_trained(tmp_path):
    """The tower's preprocessor_config.json image_mean / image_std (here ImageNet's, not CLIP's defaults) reach the
    model config and the processor, as `parrot.convert` reads them; a recipe's explicit values still win."""
    save_local_parts(tmp_path, tower_normalisation=dict(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)))
    colour = (255, 0, 128)
    image = Image.new("RGB", (32, 32), colour)
    model, processor = build_from_local(tmp_path / "real.yaml", str(tmp_path / "llm"), str(tmp_path / "clip"))
    assert tuple(model.config.image_mean) == IMAGENET_MEAN and tuple(model.config.image_std) == IMAGENET_STD
    pixels = processor([processor.build_prompt("what colour ?")], [image])["pixel_values"][0]
    for channel, (value, mean, std) in enumerate(zip(colour, IMAGENET_MEAN, IMAGENET_STD)):
        torch.testing.assert_close(pixels[channel], torch.full((32, 32), (value / 255 - mean) / std),
                                   atol=1e-5, rtol=0)
    save_pretrained(model, processor, tmp_path / "init")
    loaded, loaded_processor = load_pretrained(tmp_path / "init")
    assert tuple(loaded_processor.settings.image_mean) == IMAGENET_MEAN

    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("template: chatml\nmodel_max_length: 64\nparrot:\n  image_mean: [0.5, 0.5, 0.5]\n"
                        "  image_std: [0.25, 0.25, 0.25]\n")
    model, processor = build_from_local(explicit, str(tmp_path / "llm"), str(tmp_path / "clip"))
    assert tuple(model.config.image_mean) == tuple(processor.settings.image_mean) == (0.5, 0.5, 0.5)
    assert tuple(model.config.image_std) == tuple(processor.settings.image_std) == (0.25, 0.25, 0.25)
    (tmp_path / "clip" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"clip/preprocessor_config\.json: cannot read"):
        build_from_local(tmp_path / "real.yaml", str(tmp_path / "llm"), str(tmp_path / "clip"))


def test_build_from_local_keeps_a_padded_vocabulary(tmp_path):
    """An LLM whose embedding matrix has rows beyond its tokenizer (Qwen: 151936 rows for ~151646 tokens) keeps
    every row, trained padding included: `<image>` takes the tokenizer's next id, which has a row already. The
    model saves and loads (the processor check accepts more rows than tokens) and runs with an image."""
    pad = 5
    llm, recipe = save_local_parts(tmp_path, pad_rows=pad)
    rows = llm.get_input_embeddings().num_embeddings
    base_vocab = len(AutoTokenizer.from_pretrained(tmp_path / "llm"))  # the saved tokenizer, as the builder loads it
    model, processor = build_from_local(recipe, str(tmp_path / "llm"), str(tmp_path / "clip"))
    assert len(processor.tokenizer) == base_vocab + 1 < rows
    assert model.get_input_embeddings().num_embeddings == model.config.text_config.vocab_size == rows
    assert torch.equal(model.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    assert torch.equal(model.language_model.get_output_embeddings().weight, llm.get_output_embeddings().weight)
    assert model.config.image_token_id == processor.image_token_id == base_vocab

    save_pretrained(model, processor, tmp_path / "init")
    loaded, loaded_processor = load_pretrained(tmp_path / "init")
    assert torch.equal(loaded.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    batch = loaded_processor([loaded_processor.build_prompt("what colour ?")], [Image.new("RGB", (32, 32))])
    assert loaded(**batch).logits.shape == (1, batch["input_ids"].shape[1] + 4, rows)
