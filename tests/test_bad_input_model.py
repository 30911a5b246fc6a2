"""Bad input to the model-side entry points is refused with an error naming the file and the field / flag, never
substituted silently: processor settings (parrot_processor.json), official checkpoint conversion (config.json,
--model-max-length), LoRA merge (NaN / inf adapters), the FactorLLM demo's counts and model recipes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from parrot.convert import ConversionError, convert_official
from parrot.convert.__main__ import main as convert_main
from parrot.convert.official import image_normalisation, load_checkpoint_tensors, read_official_config
from parrot.data.processor import PROCESSOR_FILE, ParrotProcessor, ProcessorSettings
from parrot.export import ExportError, export_merged, main as export_main
from parrot.model.builder import TINY_RECIPE, load_recipe
from parrot.moe.methods.factorllm import main as factorllm_main

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
GOOD_SETTINGS = dict(image_size=32, image_mean=list(MEAN), image_std=list(STD), image_mode="pad", template="chatml",
                     num_image_tokens=17, model_max_length=256)


# --------------------------------------------------------------------------------------------- processor settings
@pytest.mark.parametrize("field, value", [
    ("model_max_length", -1), ("model_max_length", 0), ("model_max_length", float("nan")),
    ("model_max_length", "256"), ("model_max_length", 25.5), ("model_max_length", True),
    ("image_size", 0), ("num_image_tokens", -1),
    ("image_mean", [float("nan"), 0.5, 0.5]), ("image_std", [0, 0, 0]), ("image_std", [0.5, 0.5]),
    ("image_mean", [True, 0.5, 0.5]), ("image_std", "abc"),
    ("image_mode", "squash"), ("template", "bogus"), ("template", ["chatml"]),
])
def test_processor_settings_refuse_bad_values_by_field(field, value):
    with pytest.raises(ValueError, match=rf"processor setting {field}="):
        ProcessorSettings(**{**GOOD_SETTINGS, field: value})


def test_processor_settings_accept_good_values():
    settings = ProcessorSettings(**GOOD_SETTINGS)
    assert settings.model_max_length == 256 and settings.image_std == STD


@pytest.mark.parametrize("text, field", [
    (json.dumps({**GOOD_SETTINGS, "model_max_length": float("nan")}), "model_max_length"),  # written as NaN
    (json.dumps({**GOOD_SETTINGS, "model_max_length": -1}), "model_max_length"),
    (json.dumps({**GOOD_SETTINGS, "model_max_length": 0}), "model_max_length"),
    (json.dumps({**GOOD_SETTINGS, "image_std": [0, 0, 0]}), "image_std"),
    ("[1, 2]", "JSON object"),
    (b'{"template": "\xff"}', "utf-8"),
], ids=["nan", "negative", "zero", "zero_std", "list", "not_utf8"])
def test_a_processor_file_with_bad_settings_is_refused_naming_file_and_field(tmp_path, text, field):
    path = tmp_path / PROCESSOR_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: invalid processor settings .*{field}"):
        ParrotProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- model config
@pytest.mark.parametrize("field, value, message", [
    ("image_mean", [0.5, 0.5], "image_mean=[0.5, 0.5] must be 3 finite numbers (RGB)"),
    ("image_mean", [True, 0.5, 0.5], "image_mean=[True, 0.5, 0.5] must be 3 finite numbers (RGB)"),
    ("image_std", [0.2, 0.0, 0.2], "image_std=[0.2, 0.0, 0.2] must be 3 finite numbers (RGB), each > 0"),
    ("image_std", [0.2, float("inf"), 0.2], "image_std=[0.2, inf, 0.2] must be 3 finite numbers (RGB), each > 0"),
])
def test_the_model_config_refuses_bad_image_normalisation_by_field(field, value, message):
    """The config's check is the processor's rule (`check_image_normalisation`), its message led by the field."""
    from tests.conftest import tiny_parrot_config

    with pytest.raises(ValueError, match=rf"^{re.escape(message)}"):
        tiny_parrot_config(**{field: value}).check_model_settings()


# ------------------------------------------------------------------------------------- official checkpoint config
@pytest.fixture
def official(tmp_path):
    from tests.test_convert import write_official_checkpoint

    src, vision_dir, _, _ = write_official_checkpoint(tmp_path, vocab_pad=5)
    return src, vision_dir


def _set_config(src, **changes):
    path = src / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("text, reason", [
    ("{bad", "JSONDecodeError"), (b'{"model_type": "\xff"}', r"NotUTF8Error: not UTF-8 text \(byte 0xff at column 17\)"),
    ("[1]", "JSON object"),
], ids=["malformed", "not_utf8", "list"])
def test_an_unreadable_official_config_is_named(official, text, reason):
    src, _ = official
    (src / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConversionError, match=rf"{re.escape(str(src / 'config.json'))}: .*{reason}"):
        read_official_config(src)


@pytest.mark.parametrize("key, value", [
    ("tokenizer_model_max_length", float("nan")), ("tokenizer_model_max_length", 0),
    ("tokenizer_model_max_length", -5), ("tokenizer_model_max_length", "512"),
    ("moe_weight", "0.1"), ("moe_weight", float("nan")), ("num_experts", "3"), ("num_experts", 0),
    ("mm_vision_select_layer", "-2"), ("mm_vision_select_layer", 1.5), ("use_moe", "false"),
    ("mm_vision_tower", 5),
])
def test_bad_official_config_values_are_named(official, key, value):
    src, _ = official
    _set_config(src, **{key: value})
    with pytest.raises(ConversionError, match=rf"{re.escape(str(src / 'config.json'))}: {key}="):
        read_official_config(src)


def test_an_unreadable_shard_index_is_named(official):
    src, _ = official
    (src / "model.safetensors.index.json").write_text("{bad")
    with pytest.raises(ConversionError, match=re.escape(str(src / "model.safetensors.index.json"))):
        load_checkpoint_tensors(src)
    (src / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(ConversionError, match="model.safetensors.index.json: 'weight_map'"):
        load_checkpoint_tensors(src)


def test_a_bad_tower_preprocessor_config_is_named(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0, 0, 0]}))
    with pytest.raises(ConversionError, match=rf"{re.escape(str(path))}: image_std=\[0, 0, 0\] .*each > 0"):
        image_normalisation(tmp_path)
    path.write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": [0.2, 0.2, 0.2]}))
    with pytest.raises(ConversionError, match=rf"{re.escape(str(path))}: image_mean=\[0.5, 0.5\] must be 3 finite"):
        image_normalisation(tmp_path)
    path.write_bytes(b'{"image_mean": "\xff"}')
    with pytest.raises(ConversionError, match=re.escape(str(path))):
        image_normalisation(tmp_path)


@pytest.mark.parametrize("value", [0, -5])
def test_model_max_length_zero_or_negative_is_refused_not_replaced(official, tmp_path, value, capsys):
    """`model_max_length or ... or 2048` used to replace 0 by the checkpoint's length without a word."""
    src, vision_dir = official
    with pytest.raises(ConversionError, match=rf"--model-max-length\)={value}"):
        convert_official(src, tmp_path / "ours", vision=vision_dir, model_max_length=value)
    with pytest.raises(SystemExit) as exc:  # the command line refuses it at argparse (positive_int)
        convert_main(["official", "--src", str(src), "--dst", str(tmp_path / "ours"), "--vision", str(vision_dir),
                      "--model-max-length", str(value)])
    assert exc.value.code == 2
    assert "--model-max-length" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_an_unknown_template_is_refused_before_reading_the_checkpoint(official, tmp_path, monkeypatch):
    import parrot.convert.official as official_module

    src, vision_dir = official
    monkeypatch.setattr(official_module, "load_checkpoint_tensors", lambda directory: pytest.fail("read"))
    with pytest.raises(ConversionError, match=r"--template\)='bogus'"):
        convert_official(src, tmp_path / "ours", vision=vision_dir, template="bogus")


def test_the_checkpoint_length_is_used_when_the_flag_is_left_out(official, tmp_path):
    src, vision_dir = official
    _set_config(src, tokenizer_model_max_length=None)  # null: neither given -> 2048
    dst = convert_official(src, tmp_path / "ours", vision=vision_dir)
    assert json.loads((dst / PROCESSOR_FILE).read_text())["model_max_length"] == 2048


# ------------------------------------------------------------------------------------------------- LoRA merge
@pytest.fixture(scope="module")
def tokenizer():
    from parrot.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(vocab_size=300, n_texts=200)


def _adapter(tmp_path, tokenizer, **settings):
    from tests.test_export_merge_review import _adapter

    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, target_modules=["q_proj"], **settings)
    return base_dir, adapter_dir


def _edit_adapter_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _merge_is_refused(tmp_path, base_dir, adapter_dir, pattern, capsys):
    with pytest.raises(ExportError, match=pattern):
        export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    assert export_main(["--merge-lora", "--src", str(adapter_dir), "--base", str(base_dir),
                        "--dst", str(tmp_path / "merged")]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "8"])
def test_a_non_finite_or_non_numeric_lora_alpha_is_refused(tmp_path, tokenizer, alpha, capsys):
    base_dir, adapter_dir = _adapter(tmp_path, tokenizer)
    _edit_adapter_config(adapter_dir, lora_alpha=alpha)
    _merge_is_refused(tmp_path, base_dir, adapter_dir, r"adapter_config.json: lora_alpha=", capsys)


def test_a_non_finite_alpha_pattern_is_refused(tmp_path, tokenizer, capsys):
    base_dir, adapter_dir = _adapter(tmp_path, tokenizer)
    _edit_adapter_config(adapter_dir, alpha_pattern={"q_proj": float("nan")})
    _merge_is_refused(tmp_path, base_dir, adapter_dir, r"adapter_config.json: alpha_pattern\['q_proj'\]=", capsys)


def test_nan_in_the_adapter_weights_is_refused_naming_the_file_and_tensor(tmp_path, tokenizer, capsys):
    base_dir, adapter_dir = _adapter(tmp_path, tokenizer)
    path = adapter_dir / "adapter_model.safetensors"
    state = load_file(str(path))
    key = sorted(k for k in state if "lora_B" in k)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(path))
    _merge_is_refused(tmp_path, base_dir, adapter_dir,
                      rf"adapter_model.safetensors: 1 adapter tensor\(s\) hold NaN / inf.*{re.escape(key)}", capsys)


def test_a_merge_that_overflows_is_refused_naming_the_modules(tmp_path, tokenizer, capsys):
    base_dir, adapter_dir = _adapter(tmp_path, tokenizer)
    _edit_adapter_config(adapter_dir, lora_alpha=1e300)  # finite, but alpha / r * B A overflows float32
    _merge_is_refused(tmp_path, base_dir, adapter_dir, r"NaN / inf weights in \[.*q_proj.weight", capsys)


def test_a_merge_that_overflows_the_base_dtype_is_refused(tmp_path, tokenizer, capsys):
    from peft import LoraConfig, get_peft_model

    from tests.test_export import tiny_model
    from tests.test_export_merge_review import _save_base

    model, processor = tiny_model(tokenizer)
    base_dir = _save_base(model.to(torch.float16), processor, tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model.float().language_model, lora).save_pretrained(tmp_path / "adapter")
    _edit_adapter_config(tmp_path / "adapter", lora_alpha=1e9)  # finite in float32, beyond float16's 65504
    _merge_is_refused(tmp_path, base_dir, tmp_path / "adapter", r"q_proj.weight.* overflow .*torch.float16", capsys)


def _bf16_base_and_adapter(tmp_path, tokenizer, lora_alpha):
    """A bfloat16 base and a LoRA on its q_proj with peft's default init (B = 0), alpha set in its config."""
    from peft import LoraConfig, get_peft_model

    from tests.test_export import tiny_model
    from tests.test_export_merge_review import _save_base

    model, processor = tiny_model(tokenizer)
    base_dir = _save_base(model.to(torch.bfloat16), processor, tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0)
    get_peft_model(model.float().language_model, lora).save_pretrained(tmp_path / "adapter")
    _edit_adapter_config(tmp_path / "adapter", lora_alpha=lora_alpha)
    return base_dir, tmp_path / "adapter"


def test_a_nan_in_a_merged_bf16_weight_is_refused_naming_the_tensor(tmp_path, tokenizer, capsys):
    """alpha / r overflows float32 to inf and B = 0, so the merged q_proj weights are W + 0 * inf = NaN: refused by
    name (the name of the saved tensor), though the base dtype is not float32."""
    base_dir, adapter_dir = _bf16_base_and_adapter(tmp_path, tokenizer, lora_alpha=1e300)
    _merge_is_refused(tmp_path, base_dir, adapter_dir,
                      r"merging the adapter gives NaN / inf weights in \[.*'language_model\.model\.layers\.0\."
                      r"self_attn\.q_proj\.weight'", capsys)


def test_a_nan_the_bf16_base_already_holds_is_not_blamed_on_the_adapter(tmp_path, tokenizer):
    base_dir, adapter_dir = _bf16_base_and_adapter(tmp_path, tokenizer, lora_alpha=8)
    path = base_dir / "model.safetensors"
    state = load_file(str(path))
    key = "vision_tower.model.embeddings.patch_embedding.weight"
    state[key][0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    merged = load_file(str(export_merged(adapter_dir, tmp_path / "merged", base=base_dir) / "model.safetensors"))
    assert merged[key].dtype == torch.bfloat16 and merged[key][0].isnan().all()


# ------------------------------------------------------------------------------------------- FactorLLM command
SMALL = ["--dense-steps", "1", "--router-steps", "1", "--hidden", "16", "--intermediate", "32", "--layers", "1",
         "--vocab", "31"]


@pytest.mark.parametrize("extra, flag", [
    (["--dense-steps", "0"], "--dense-steps"), (["--router-steps", "0"], "--router-steps"),
    (["--threads", "0"], "--threads"), (["--threads", "-1"], "--threads"), (["--num-experts", "0"], "--num-experts"),
    (["--top-k", "0"], "--top-k"), (["--vocab", "0"], "--vocab"), (["--layers", "0"], "--layers"),
    (["--hidden", "-8"], "--hidden"), (["--intermediate", "0"], "--intermediate"),
    (["--top-k", "9"], "--top-k"), (["--num-experts", "3"], "--intermediate"), (["--hidden", "12"], "--hidden"),
])
def test_factorllm_command_refuses_bad_counts_naming_the_flag(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exit_info:
        factorllm_main(["--out", str(tmp_path / "out"), *SMALL, *extra])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_factorllm_command_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        factorllm_main(["--out", str(tmp_path / "f"), *SMALL])
    assert "--out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- model recipes
TINY = TINY_RECIPE.read_text()


def _recipe(tmp_path, text) -> str:
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _sub(old, new):
    assert TINY.count(old) == 1, old
    return TINY.replace(old, new)


@pytest.mark.parametrize("text, named", [
    (_sub("hidden_size: 128", "hidden_size: abc"), "text_config.hidden_size="),
    (_sub("patch_size: 8", "patch_size: '8'"), "vision_config.patch_size="),
    (_sub("model_type: qwen2", "model_type: bogus"), "text_config.model_type="),
    (re.sub(r"text_config:\n(  .*\n)+", "text_config: [1, 2]\n", TINY), "'text_config' must be a mapping"),
    ("- 1\n- 2\n", "a recipe is a mapping"),
    ("hello\n", "a recipe is a mapping"),
    (_sub("vocab_size: 2000", "vocab_size: abc"), "tokenizer.vocab_size="),
    (_sub("vocab_size: 2000", "vocab_size: 5"), "tokenizer.vocab_size="),
    (_sub("seed: 0", "seed: -1"), "tokenizer.seed="),
    (_sub("model_max_length: 256", "model_max_length: -1"), "model_max_length="),
    (_sub("model_max_length: 256", "model_max_length: 0"), "model_max_length="),
    (_sub("model_max_length: 256", "model_max_length: abc"), "model_max_length="),
    (_sub("model_max_length: 256", "model_max_length: .nan"), "model_max_length="),
    (_sub("template: chatml", "template: 5"), "template="),
    (_sub("moe_num_experts: 6", "moe_num_experts: '6'"), "parrot.moe_num_experts="),
    (_sub("moe_weight: 0.1", "moe_weight: .nan"), "parrot.moe_weight="),
    (_sub("use_moe: false", "use_moe: 'no'"), "parrot.use_moe="),
    (_sub("image_aspect_mode: pad", "image_aspect_mode: squash"), "parrot.image_aspect_mode="),
    (_sub("image_aspect_mode: pad", "image_aspect_mode: pad\n  image_std: [a, b, c]"), "parrot.image_std="),
    (_sub("image_aspect_mode: pad", "image_aspect_mode: pad\n  image_std: [0.2, 0, 0.2]"),
     "parrot.image_std=[0.2, 0, 0.2] must be 3 finite numbers (RGB), each > 0"),
    (_sub("image_aspect_mode: pad", "image_aspect_mode: pad\n  image_mean: [0.5, 0.5]"),
     "parrot.image_mean=[0.5, 0.5] must be 3 finite numbers (RGB)"),
    (_sub("template: chatml", "template: bogus"), "template='bogus'; use one of"),
    (b"# caf\xe9\n" + TINY.encode(), "not UTF-8"),
], ids=["hidden_str", "patch_str", "model_type", "text_config_list", "top_list", "top_scalar", "vocab_str",
        "vocab_tiny", "seed_negative", "length_negative", "length_zero", "length_str", "length_nan", "template_int",
        "experts_str", "moe_weight_nan", "use_moe_str", "aspect_mode", "image_std_str", "image_std_zero",
        "image_mean_short", "template_unknown", "not_utf8"])
def test_recipe_errors_name_the_file_and_the_key(tmp_path, text, named):
    path = _recipe(tmp_path, text)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}\S*: .*{re.escape(named)}"):
        load_recipe(path)


GPT2_TEXT = "text_config:\n  model_type: gpt2\n  n_embd: 130\n  n_head: 4\n  n_layer: 2\n  n_positions: 512\n"


def _section(name, text):
    """TINY with its `name:` section replaced by `text`."""
    return re.sub(rf"{name}:\n(  .*\n)+", text, TINY)


@pytest.mark.parametrize("text, named", [
    (_sub("hidden_size: 128", "hidden_size: -1"), "text_config.hidden_size=-1 must be a whole number >= 1"),
    (_sub("hidden_size: 128", "hidden_size: 130"),
     "text_config.hidden_size=130 must be a multiple of text_config.num_attention_heads=4"),
    (_sub("hidden_size: 128", "hidden_size: 132"),
     "text_config.hidden_size=132 / text_config.num_attention_heads=4 = 33: rotary position embeddings need an even"),
    (_sub("num_key_value_heads: 2", "num_key_value_heads: 3"),
     "text_config.num_attention_heads=4 must be a multiple of text_config.num_key_value_heads=3"),
    (_sub("max_position_embeddings: 512", "max_position_embeddings: 0"), "text_config.max_position_embeddings=0"),
    (_sub("patch_size: 8", "patch_size: 0"), "vision_config.patch_size=0 must be a whole number >= 1"),
    (_sub("hidden_size: 64", "hidden_size: -64"), "vision_config.hidden_size=-64 must be a whole number >= 1"),
    (_section("text_config", GPT2_TEXT), "text_config.n_embd=130 must be a multiple of text_config.n_head=4"),
    (_sub("image_size: 32", "image_size: 32\n  num_attention_heads: 5").replace("  num_attention_heads: 4\n  image",
                                                                               "  image"),
     "vision_config.hidden_size=64 must be a multiple of vision_config.num_attention_heads=5"),
    (_sub("model_type: qwen2", "model_type: llama").replace("hidden_size: 128", "hidden_size: 130"),
     "text_config.hidden_size=130 must be a multiple of text_config.num_attention_heads=4"),
    (_sub("num_key_value_heads: 2", "num_key_value_heads: 2\n  head_dim: 31"),
     "text_config.head_dim=31: rotary position embeddings need an even size per attention head"),
    (_sub("moe_intermediate_size: 128", "moe_intermediate_size: -3"), "parrot.moe_intermediate_size=-3 must be >= 1"),
    (_sub("moe_num_experts: 6", "moe_num_experts: 0"), "parrot.moe_num_experts=0 must be >= 1"),
    (_sub("use_moe: false", "use_moe: false\n  moe_top_k: 7"), "parrot.moe_top_k=7"),
    (_sub("projector_type: mlp2x_gelu", "projector_type: conv"), "parrot.projector_type='conv' is unknown"),
], ids=["hidden_negative", "hidden_not_divisible", "odd_rotary_head", "kv_heads", "positions_zero",
        "patch_zero", "vision_hidden_negative", "gpt2_names", "vision_heads",
        "llama_derived_head_dim", "odd_head_dim", "moe_inner",
        "experts_zero", "top_k", "projector"])
def test_impossible_model_sizes_in_a_recipe_are_named(tmp_path, text, named):
    """Values of the right type that build no working model (a raw torch error, a failure at the first forward, or a
    model that silently drops pixels) are refused naming the recipe file and the key as written."""
    path = _recipe(tmp_path, text)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: {re.escape(named)}"):
        load_recipe(path)


def test_a_recipe_may_choose_its_head_size(tmp_path):
    """An explicit head_dim (Qwen3 / Gemma style: heads x head_dim need not be the hidden size) is no error."""
    recipe = load_recipe(_recipe(tmp_path, _sub("hidden_size: 128", "hidden_size: 130\n  head_dim: 32")))
    assert recipe.text_config["head_dim"] == 32


def test_a_parrot_section_that_is_not_a_mapping_is_named(tmp_path):
    text = TINY.split("parrot:\n")[0] + "parrot: 5\n"
    with pytest.raises(ValueError, match=rf"{re.escape(_recipe(tmp_path, text))}: 'parrot' must be a mapping"):
        load_recipe(tmp_path / "r.yaml")


def test_the_shipped_recipes_still_load():
    recipe = load_recipe(TINY_RECIPE)
    assert recipe.model_max_length == 256 and recipe.tokenizer.vocab_size == 2000
    assert not load_recipe(TINY_RECIPE.parent / "parrot-7b.yaml").is_tiny


# --------------------------------------------------------------------------- official generation_config.json
@pytest.mark.parametrize("content, named", [
    ("{bad", "cannot read the generation settings (JSONDecodeError"),
    ("[1]", "must be a JSON object"),
    (dict(temperature="0.7", do_sample=True), "temperature='0.7' must be a finite number > 0"),
    (dict(temperature=float("nan"), do_sample=True), "temperature=nan"),
    (dict(temperature=0, do_sample=True), "temperature=0 must be a finite number > 0"),
    (dict(top_p=2.0), "top_p=2.0 must be a finite number > 0 and <= 1"),
    (dict(top_k=-1), "top_k=-1 must be a whole number >= 0"),
    (dict(max_length=-5), "max_length=-5 must be a whole number >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be a whole number"),
    (dict(do_sample="yes"), "do_sample='yes' must be true or false"),
    (dict(eos_token_id="2"), "eos_token_id='2' must be a token id"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id=[2, 'x'] must be a token id"),
    (dict(eos_token_id=[2, 100000]), "eos_token_id=[2, 100000]: 100000 is not a token of the checkpoint's tokenizer"),
    (dict(pad_token_id=-1), "pad_token_id=-1: -1 is not a token"),
    ("image", "is the id of the image placeholder '<image>'"),
    (dict(early_stopping="sometimes"), "cannot read the generation settings (ValueError"),
], ids=["malformed", "list", "temperature_str", "temperature_nan", "temperature_zero", "top_p", "top_k",
        "max_length", "max_new_tokens_float", "do_sample_str", "eos_str", "eos_list_str", "eos_out_of_range",
        "pad_negative", "pad_is_image_token", "hf_refuses"])
def test_a_bad_official_generation_config_is_refused_by_name(official, tmp_path, monkeypatch, capsys, content,
                                                              named):
    """A malformed generation_config.json (which HF reads without a word and `generate()` then fails on, or samples
    with) is refused naming the file and key, before the weights are read; nothing is written."""
    import parrot.convert.official as official_module
    from transformers import AutoTokenizer

    src, vision_dir = official
    path = src / "generation_config.json"
    if content == "image":  # the id `<image>` takes in the converted tokenizer: the first free one
        content = dict(pad_token_id=len(AutoTokenizer.from_pretrained(src)))
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.setattr(official_module, "load_checkpoint_tensors", lambda directory: pytest.fail("weights read"))
    with pytest.raises(ConversionError, match=rf"{re.escape(str(path))}: .*{re.escape(named)}"):
        convert_official(src, tmp_path / "ours", vision=vision_dir)
    assert convert_main(["official", "--src", str(src), "--dst", str(tmp_path / "ours"),
                         "--vision", str(vision_dir)]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_builder_command_reports_a_bad_recipe_without_a_traceback(tmp_path, capsys):
    from parrot.model.builder import main as builder_main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("parrot:\n  moe_num_experts: 0\n")
    with pytest.raises(SystemExit) as exc:
        builder_main(["--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"error: {recipe}: parrot.moe_num_experts=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
