"""`parrot.convert official`: a tiny checkpoint with the official AIDC-AI/Parrot names and shapes is converted, and
the converted model's logits are compared with a plain re-implementation of the official forward (float64).

The reference below follows the official code path by path: `CLIPVisionTower.feature_select` (hidden state
`mm_vision_select_layer`, CLS kept for "cls_patch"), the LLaVA mlp2x_gelu projector, `MultilingualMoE.forward`
(the CLS token attends over the prompt-token embeddings with 1/sqrt(D) scaling, softmax gate without bias, a
Python loop over nn.Linear SwiGLU experts, `moe_weight` residual), and the per-sample splice of
`prepare_inputs_labels_for_multimodal`, with prompts tokenised chunk-wise around "<image>" with the sentinel -200.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

from parrot.convert import ConversionError, convert_official
from parrot.convert.__main__ import main as convert_main
from parrot.convert.official import vision_config_for, read_official_config
from parrot.data.processor import ParrotProcessor
from parrot.model import ParrotForCausalLM

OFFICIAL_IMAGE = -200
HIDDEN, NUM_EXPERTS, MOE_INNER, MOE_WEIGHT = 32, 3, 40, 0.1
TEXT = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TRAINING_TEXTS = ["You are a helpful assistant.", "What colour is the circle?", "Describe the picture briefly.",
                  "system\nuser\nassistant\n", "Answer with the option's letter."] * 4


def official_prompt(query: str) -> str:
    """The official `QwenConversationFormatter.format_query` text for one image + query."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
            f"{query}<|im_end|>\n<|im_start|>assistant\n")


def official_tokenize(prompt: str, tokenizer) -> list[int]:
    """The official `_tokenize_with_image_symbol`: chunks around "<image>" tokenised apart, -200 between."""
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids.append(OFFICIAL_IMAGE)
        ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE like Qwen's, without any `<image>` token (as the official tokenizer)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TRAINING_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   clean_up_tokenization_spaces=False)


def write_official_checkpoint(root, *, vocab_pad: int, use_moe: bool = True, with_vision_weights: bool = True,
                              mm_vision_tower: str = "openai/clip-vit-large-patch14-336"):
    """(src dir, vision dir, official state dict) for a tiny official checkpoint, weights in two shards."""
    torch.manual_seed(0)
    src, vision_dir = root / "official", root / "clip"
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(src)
    vocab = len(tokenizer) + vocab_pad
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION))
    clip.save_pretrained(vision_dir)

    state = dict(Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **TEXT)).state_dict())  # model.* and lm_head
    for name in list(state):
        state[name] = state[name] + 0.02 * torch.randn_like(state[name])  # non-trivial norms and biases
    if with_vision_weights:
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()})
    state["model.mm_projector.0.weight"] = 0.2 * torch.randn(HIDDEN, VISION["hidden_size"])
    state["model.mm_projector.0.bias"] = 0.1 * torch.randn(HIDDEN)
    state["model.mm_projector.2.weight"] = 0.2 * torch.randn(HIDDEN, HIDDEN)
    state["model.mm_projector.2.bias"] = 0.1 * torch.randn(HIDDEN)
    state["model.moe_model.gate.weight"] = torch.randn(NUM_EXPERTS, HIDDEN)
    for e in range(NUM_EXPERTS):
        state[f"model.moe_model.experts.{e}.gate_proj.weight"] = 0.2 * torch.randn(MOE_INNER, HIDDEN)
        state[f"model.moe_model.experts.{e}.up_proj.weight"] = 0.2 * torch.randn(MOE_INNER, HIDDEN)
        state[f"model.moe_model.experts.{e}.down_proj.weight"] = 0.2 * torch.randn(HIDDEN, MOE_INNER)
    state = {k: v.contiguous() for k, v in state.items()}

    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(src / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(
        TEXT, model_type="parrot_qwen2", architectures=["ParrotQwen2ForCausalLM"], vocab_size=vocab,
        torch_dtype="float32", mm_vision_tower=mm_vision_tower, mm_hidden_size=VISION["hidden_size"],
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="cls_patch",
        mm_patch_merge_type="flat", image_aspect_ratio="pad", use_mm_proj=True, tokenizer_model_max_length=512,
        num_experts=NUM_EXPERTS, moe_hidden_size=HIDDEN, moe_intermediate_size=MOE_INNER, use_moe=use_moe,
        use_moe_residual=True, moe_weight=MOE_WEIGHT, moe_top_k=2,
    )
    (src / "config.json").write_text(json.dumps(config))
    return src, vision_dir, state, tokenizer


@torch.no_grad()
def official_forward(state, vocab: int, use_moe: bool, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits (T', V) of one sample as the official model computes them, in float64."""
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **TEXT)).double().eval()
    llm.load_state_dict({k: v for k, v in state.items() if k == "lm_head.weight" or
                         (k.startswith("model.") and not k.startswith(("model.mm_", "model.moe_", "model.vision_")))})
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).double().eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    clip.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    w = {k: v.double() for k, v in state.items() if k.startswith(("model.mm_projector", "model.moe_model"))}

    features = clip(pixel_values[None].double(), output_hidden_states=True).hidden_states[-2][0]  # (1+P, D_v)
    hidden = F.gelu(features @ w["model.mm_projector.0.weight"].T + w["model.mm_projector.0.bias"])
    visual = hidden @ w["model.mm_projector.2.weight"].T + w["model.mm_projector.2.bias"]  # (N, D)

    ids = torch.tensor(ids)
    at = int((ids == OFFICIAL_IMAGE).nonzero()[0, 0])
    text_ids = torch.cat([ids[:at], ids[at + 1:]])
    text = llm.model.embed_tokens(text_ids)  # (T, D): every prompt token (no labels at inference)
    if use_moe:
        scores = (visual[0:1] @ text.T) / math.sqrt(HIDDEN)  # (1, T)
        pooled = torch.softmax(scores, dim=-1) @ text  # (1, D)
        routing = torch.softmax(pooled @ w["model.moe_model.gate.weight"].T, dim=-1)[0]  # (E,)
        out = torch.zeros_like(visual)
        for e in range(NUM_EXPERTS):
            g, u, d = (w[f"model.moe_model.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
            out = out + routing[e] * ((F.silu(visual @ g.T) * (visual @ u.T)) @ d.T)
        visual = out + MOE_WEIGHT * visual
    embeds = torch.cat([text[:at], visual, text[at:]])  # (T', D)
    return llm(inputs_embeds=embeds[None]).logits[0]


def _images():
    torch.manual_seed(1)
    wide = Image.fromarray((torch.rand(24, 40, 3) * 255).byte().numpy())
    tall = Image.fromarray((torch.rand(50, 30, 3) * 255).byte().numpy())
    return [wide, tall]


def _compare(dst, state, tokenizer, vocab: int, use_moe: bool) -> None:
    processor = ParrotProcessor.from_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst)  # our registration, no trust_remote_code
    assert isinstance(model, ParrotForCausalLM)
    model = model.double().eval()
    queries = ["What colour is the circle?", "Describe the picture briefly, please."]
    prompts = [processor.build_prompt(q) for q in queries]
    assert prompts == [official_prompt(q) for q in queries]  # same chat text as the official formatter
    batch = processor(prompts, _images(), padding_side="left")
    official_ids = [official_tokenize(p, tokenizer) for p in prompts]
    for row, mask, expected in zip(batch["input_ids"], batch["attention_mask"], official_ids):
        ours = row[mask.bool()].tolist()
        assert [OFFICIAL_IMAGE if t == processor.image_token_id else t for t in ours] == expected
    with torch.no_grad():
        out = model(**batch)
    for b, ids in enumerate(official_ids):
        reference = official_forward(state, vocab, use_moe, ids, batch["pixel_values"][b])  # (T'_b, V)
        with torch.no_grad():
            alone = model(**processor([prompts[b]], [_images()[b]])).logits[0]  # no padding
        torch.testing.assert_close(alone[:, :vocab], reference, rtol=1e-10, atol=1e-12)
        # In the left-padded batch the same tokens sit at shifted absolute positions; RoPE is relative, but HF
        # builds its cos/sin tables in float32, so only float32-level differences are allowed there.
        length = int(out.attention_mask[b].sum())
        assert length == reference.shape[0]
        torch.testing.assert_close(out.logits[b, -length:, :vocab], reference, rtol=1e-5, atol=1e-6)


def test_converted_model_matches_official_forward(tmp_path):
    src, vision_dir, state, tokenizer = write_official_checkpoint(tmp_path, vocab_pad=5)
    dst = convert_official(src, tmp_path / "ours", vision=vision_dir)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "parrot"
    assert (config["use_moe"], config["moe_num_experts"], config["moe_top_k"]) == (True, NUM_EXPERTS, None)
    assert config["image_token_id"] == len(tokenizer)  # first free id, inside the padded vocabulary
    assert config["text_config"]["vocab_size"] == len(tokenizer) + 5  # no resize needed
    assert json.loads((dst / "parrot_processor.json").read_text())["model_max_length"] == 512
    _compare(dst, state, tokenizer, len(tokenizer) + 5, use_moe=True)


def test_cli_takes_vision_weights_from_vision_dir_and_grows_vocab(tmp_path):
    # A stage-1-like checkpoint (MoE present but off), no vision weights inside, no spare embedding rows.
    src, vision_dir, state, tokenizer = write_official_checkpoint(
        tmp_path, vocab_pad=0, use_moe=False, with_vision_weights=False, mm_vision_tower="/nonexistent/clip-x")
    clip = CLIPVisionModel.from_pretrained(vision_dir)
    state = dict(state, **{f"model.vision_tower.vision_tower.vision_model.{k}": v
                           for k, v in clip.state_dict().items()})
    assert convert_main(["official", "--src", str(src), "--dst", str(tmp_path / "ours"),
                         "--vision", str(vision_dir)]) == 0
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(tokenizer) + 1  # grown by the `<image>` row
    assert config["use_moe"] is False
    _compare(tmp_path / "ours", state, tokenizer, len(tokenizer), use_moe=False)


def test_refuses_missing_misshaped_and_unknown_tensors(tmp_path, capsys):
    src, vision_dir, state, _ = write_official_checkpoint(tmp_path, vocab_pad=5)
    state.pop("model.moe_model.experts.1.up_proj.weight")
    state.pop("model.layers.1.mlp.down_proj.weight")
    state["model.mm_projector.2.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    state["model.mystery.weight"] = torch.zeros(2)
    for path in src.glob("*.safetensors*"):
        path.unlink()
    torch.save(state, src / "pytorch_model.bin")  # also covers single-file PyTorch checkpoints
    dst = tmp_path / "ours"
    with pytest.raises(ConversionError) as err:
        convert_official(src, dst, vision=vision_dir)
    message = str(err.value)
    for expected in ("missing: model.moe_model.experts.1.up_proj.weight",
                     "missing: model.layers.1.mlp.down_proj.weight",
                     f"mis-shaped: model.mm_projector.2.weight is ({HIDDEN}, {HIDDEN + 1}), "
                     f"expected ({HIDDEN}, {HIDDEN})",
                     "unexpected: model.mystery.weight"):
        assert expected in message
    assert not dst.exists()  # nothing written
    assert convert_main(["official", "--src", str(src), "--dst", str(dst), "--vision", str(vision_dir)]) == 2
    assert "missing: model.layers.1.mlp.down_proj.weight" in capsys.readouterr().err


def test_vision_config_resolution(tmp_path):
    src, vision_dir, _, _ = write_official_checkpoint(tmp_path, vocab_pad=5)
    _, settings = read_official_config(src)
    known = vision_config_for(settings, None)  # "openai/clip-vit-large-patch14-336": from the table
    assert (known.hidden_size, known.num_hidden_layers, known.image_size, known.patch_size) == (1024, 24, 336, 14)
    assert vision_config_for(settings, vision_dir).hidden_size == VISION["hidden_size"]
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, mm_vision_tower="/elsewhere/siglip-so400m")))
    _, settings = read_official_config(src)
    with pytest.raises(ConversionError, match="--vision"):
        vision_config_for(settings, None)
    (src / "config.json").write_text(json.dumps(dict(config, mm_patch_merge_type="spatial_unpad")))
    with pytest.raises(ConversionError, match="mm_patch_merge_type"):
        read_official_config(src)
    # Not "pad" (absent and None included): the official code runs CLIP's shortest-side resize + centre crop,
    # parrot's "crop" mode; LLaVA-NeXT's multi-crop grid has no equivalent and is refused.
    for aspect in ("square", None):
        (src / "config.json").write_text(json.dumps(dict(config, image_aspect_ratio=aspect)))
        assert read_official_config(src)[1].image_aspect_mode == "crop"
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "image_aspect_ratio"}))
    assert read_official_config(src)[1].image_aspect_mode == "crop"
    (src / "config.json").write_text(json.dumps(dict(config, image_aspect_ratio="pad")))
    assert read_official_config(src)[1].image_aspect_mode == "pad"
    (src / "config.json").write_text(json.dumps(dict(config, image_aspect_ratio="anyres_max_9")))
    with pytest.raises(ConversionError, match="image_aspect_ratio='anyres_max_9'.*not supported"):
        read_official_config(src)


def test_output_is_a_new_folder_written_whole(tmp_path, monkeypatch):
    """--dst must be new or empty and outside --src / --vision (the output's shard names are the official ones: a
    conversion into the source deleted its weights); a conversion that fails while writing leaves no dst."""
    import parrot.convert.official as official

    src, vision_dir, _, _ = write_official_checkpoint(tmp_path, vocab_pad=5)
    before = {path.name: path.read_bytes() for path in src.iterdir()}
    for dst in (src, src / "converted", vision_dir):
        with pytest.raises(ConversionError, match="is \\(or lies inside\\) the --(src|vision) folder"):
            convert_official(src, dst, vision=vision_dir)
    assert {path.name: path.read_bytes() for path in src.iterdir()} == before  # the source is untouched

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert_official(src, taken, vision=vision_dir)
    assert [path.name for path in taken.iterdir()] == ["notes.txt"]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(official.ParrotProcessor, "for_model", disk_full)  # fails after the weights are written
    with pytest.raises(OSError, match="No space left"):
        convert_official(src, tmp_path / "out", vision=vision_dir)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))  # the staging folder is removed too
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    assert (convert_official(src, tmp_path / "empty", vision=vision_dir) / "parrot_processor.json").is_file()


def test_missing_or_unreadable_shards_and_tokenizer_are_named(tmp_path, monkeypatch, capsys):
    import parrot.convert.official as official

    src, vision_dir, _, _ = write_official_checkpoint(tmp_path, vocab_pad=5)
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # a truncated download
    assert convert_main(["official", "--src", str(src), "--dst", str(tmp_path / "ours"),
                         "--vision", str(vision_dir)]) == 2
    assert f"{shard}: cannot read the weights" in capsys.readouterr().err

    for path in src.glob("tokenizer*"):
        path.rename(tmp_path / path.name)
    with pytest.raises(ConversionError, match="cannot load the checkpoint's tokenizer"):
        convert_official(src, tmp_path / "ours", vision=vision_dir)
    for path in tmp_path.glob("tokenizer*"):
        path.rename(src / path.name)

    shard.unlink()
    reads = []
    monkeypatch.setattr(official, "load_file", lambda path: reads.append(path) or {})
    with pytest.raises(ConversionError, match="listed in the checkpoint index but missing.*model-00002-of-00002"):
        convert_official(src, tmp_path / "ours", vision=vision_dir)
    assert reads == []  # refused before reading the other shards
    assert not (tmp_path / "ours").exists()


def test_each_tensor_keeps_its_dtype(tmp_path):
    """A bfloat16 checkpoint with a float32 vision tower: nothing is rounded and the language model is not widened
    to float32 (which doubled its size in memory and on disk); config `dtype` is the language model's."""
    from safetensors import safe_open

    src, vision_dir, state, tokenizer = write_official_checkpoint(tmp_path, vocab_pad=5)
    state = {k: v if k.startswith("model.vision_tower.") else v.to(torch.bfloat16) for k, v in state.items()}
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for file in set(weight_map.values()):
        save_file({k: state[k] for k, f in weight_map.items() if f == file}, str(src / file))
    dst = convert_official(src, tmp_path / "ours", vision=vision_dir)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    saved = {}
    for path in dst.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            saved.update({key: handle.get_tensor(key) for key in handle.keys()})
    for key, tensor in saved.items():
        assert tensor.dtype == (torch.float32 if key.startswith("vision_tower.") else torch.bfloat16), key
    prefix = "model.vision_tower.vision_tower.vision_model."
    for key, tensor in state.items():
        if key.startswith(prefix):
            assert torch.equal(saved["vision_tower.model." + key[len(prefix):]], tensor)
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float64)  # every saved value exactly
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.vision_tower.model.state_dict()[key], state[prefix + key].double())


def test_image_normalisation_comes_from_a_local_mm_vision_tower(tmp_path):
    """Without --vision, a local `mm_vision_tower` gives the tower's config and its image mean / std (the official
    tower loads its CLIPImageProcessor from there), not only the config."""
    src, vision_dir, _, _ = write_official_checkpoint(tmp_path, vocab_pad=5, mm_vision_tower=str(tmp_path / "clip"))
    mean, std = [0.5, 0.25, 0.125], [0.3, 0.2, 0.1]
    (vision_dir / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=mean, image_std=std)))
    config = json.loads((convert_official(src, tmp_path / "ours") / "config.json").read_text())
    assert (config["image_mean"], config["image_std"]) == (mean, std)


def test_generation_defaults_of_the_checkpoint_are_carried_over(tmp_path):
    """The official folder's generation_config.json (sampling settings, lengths, eos / pad ids) becomes the converted
    model's: `generate()` runs with the same defaults (it used to be dropped for HF's: greedy, max_length 20)."""
    from parrot.model.builder import load_pretrained

    src, vision_dir, _, tokenizer = write_official_checkpoint(tmp_path, vocab_pad=5)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    settings = dict(bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext, do_sample=True,
                    temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_new_tokens=4,
                    min_new_tokens=4)
    (src / "generation_config.json").write_text(json.dumps(settings))
    dst = convert_official(src, tmp_path / "ours", vision=vision_dir)
    model, processor = load_pretrained(dst)
    for loaded in (model, AutoModelForCausalLM.from_pretrained(dst)):
        assert {key: getattr(loaded.generation_config, key) for key in settings} == settings
    batch = processor([processor.build_prompt("What colour is the circle?")], [_images()[0]])
    torch.manual_seed(0)
    assert model.generate(**batch).shape == (1, 4)  # the file's min / max_new_tokens, not HF's max_length 20


def test_generation_token_ids_are_kept_consistent_with_the_converted_tokenizer(tmp_path, caplog):
    """The converted tokenizer's eos (`<|im_end|>`, as the official loader sets it) is added to eos ids that lack it,
    and pad is the tokenizer's pad; each change is logged naming the file. Without the file: the tokenizer's ids."""
    src, vision_dir, _, tokenizer = write_official_checkpoint(tmp_path, vocab_pad=5)
    im_start, im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    dst = convert_official(src, tmp_path / "plain", vision=vision_dir)
    generation = json.loads((dst / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (im_end, endoftext)

    path = src / "generation_config.json"
    path.write_text(json.dumps(dict(eos_token_id=endoftext, pad_token_id=im_start, temperature=0.5, do_sample=True)))
    with caplog.at_level("WARNING", logger="parrot.convert.official"):
        dst = convert_official(src, tmp_path / "ours", vision=vision_dir)
    generation = json.loads((dst / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([endoftext, im_end], endoftext)
    assert generation["temperature"] == 0.5
    assert f"{path}: eos_token_id={endoftext} ('<|endoftext|>')" in caplog.text and "'<|im_end|>'" in caplog.text
    assert f"{path}: pad_token_id={im_start} ('<|im_start|>')" in caplog.text
