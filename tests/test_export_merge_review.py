"""`parrot.export --merge-lora` review: float64 reference, tied embeddings, adapter settings that cannot be merged
here, LoRA on the Parrot MoE projector, corrupt adapter / base files, the output folder (never the source, never a
half-written folder) and the output dtype."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import parrot.export as export_module
from parrot.data.tokenizer import build_tiny_tokenizer
from parrot.export import ExportError, export_merged, main as export_main
from tests.test_export import _batch, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=300, n_texts=200)


def _lora(**settings) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0)
    base.update(settings)
    return LoraConfig(**base)


def _save_base(model, processor, directory):
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _tie(model):
    for config in (model.config, model.config.text_config, model.language_model.config):
        config.tie_word_embeddings = True
    model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _adapter(tmp_path, tokenizer, on="lm", tie=False, **settings):
    """(base dir, adapter dir, unmerged logits, batch) for a fresh tiny model with a random LoRA."""
    model, processor = tiny_model(tokenizer)
    if tie:
        _tie(model)
    base_dir = _save_base(model, processor, tmp_path / "base")
    batch = _batch(processor)
    peft_model = get_peft_model(model.language_model if on == "lm" else model, _lora(**settings))
    peft_model.save_pretrained(tmp_path / "adapter")
    unmerged = _logits(model if on == "lm" else peft_model, batch)
    with peft_model.disable_adapter():
        assert (unmerged - _logits(model if on == "lm" else peft_model, batch)).abs().max() > 1e-4
    return base_dir, tmp_path / "adapter", unmerged, batch


def test_merged_weights_match_a_float64_reference(tmp_path, tokenizer):
    """W' = W + (alpha / r) B A, computed by hand in float64 from the saved files; logits equal the unmerged model's."""
    base_dir, adapter_dir, unmerged, batch = _adapter(tmp_path, tokenizer, target_modules=["q_proj", "down_proj"],
                                                      lora_alpha=12, r=3)
    dst = export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    base, merged = load_file(str(base_dir / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    touched = 0
    for key, value in base.items():
        module = key.removeprefix("language_model.").removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            lora_a, lora_b = adapter[a_key].double(), adapter[a_key.replace("lora_A", "lora_B")].double()
            expected = value.double() + (12 / 3) * lora_b @ lora_a
            torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-5)
            touched += 1
        else:
            assert torch.equal(merged[key], value), key
    assert touched == 4  # q_proj and down_proj of both layers
    merged_model = AutoModelForCausalLM.from_pretrained(dst).eval()
    torch.testing.assert_close(_logits(merged_model, batch), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [dict(use_rslora=True), dict(use_dora=True), dict(lora_bias=True),
                                      dict(rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16})],
                         ids=["rslora", "dora", "lora_bias", "rank_alpha_pattern"])
def test_peft_variants_merge_to_the_unmerged_function(tmp_path, tokenizer, settings):
    base_dir, adapter_dir, unmerged, batch = _adapter(tmp_path, tokenizer, target_modules=["q_proj", "v_proj"],
                                                      **settings)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(adapter_dir, tmp_path / "m", base=base_dir)).eval()
    torch.testing.assert_close(_logits(merged, batch), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_adapter_on_a_tied_embedding_is_merged_into_that_side_only(tmp_path, tokenizer, target):
    """With tied input/output embeddings, a LoRA on lm_head (or embed_tokens) changes one side only; merging into
    the shared matrix would change the other side too. The export unties them."""
    base_dir, adapter_dir, unmerged, batch = _adapter(tmp_path, tokenizer, tie=True, target_modules=[target])
    dst = export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    merged = AutoModelForCausalLM.from_pretrained(dst).eval()
    torch.testing.assert_close(_logits(merged, batch), unmerged, rtol=1e-4, atol=1e-5)
    config = json.loads((dst / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False


def test_trainable_tokens_on_a_tied_embedding_merge_exactly(tmp_path, tokenizer):
    model, processor = tiny_model(tokenizer)
    _tie(model)
    base_dir = _save_base(model, processor, tmp_path / "base")
    batch = _batch(processor)
    peft_lm = get_peft_model(model.language_model, _lora(target_modules=["q_proj"], trainable_token_indices=[5, 6]))
    with torch.no_grad():
        for name, parameter in peft_lm.named_parameters():
            if "trainable_tokens" in name:
                parameter.add_(torch.randn_like(parameter))
    peft_lm.save_pretrained(tmp_path / "adapter")
    unmerged = _logits(model, batch)
    dst = export_merged(tmp_path / "adapter", tmp_path / "merged", base=base_dir)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(dst).eval(), batch), unmerged,
                               rtol=1e-4, atol=1e-5)


def test_weight_tied_adapter_on_tied_embeddings_is_refused(tmp_path, tokenizer):
    """peft's ensure_weight_tying shares one adapter between embed_tokens and lm_head; merging it into the shared
    matrix would add it twice."""
    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, tie=True, target_modules=["lm_head"],
                                           ensure_weight_tying=True)
    with pytest.raises(ExportError, match="adapter_config.json: ensure_weight_tying"):
        export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    assert not (tmp_path / "merged").exists()


def test_adapter_elsewhere_keeps_tied_embeddings(tmp_path, tokenizer):
    base_dir, adapter_dir, unmerged, batch = _adapter(tmp_path, tokenizer, tie=True, target_modules=["q_proj"])
    dst = export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    assert json.loads((dst / "config.json").read_text())["text_config"]["tie_word_embeddings"] is True
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(dst).eval(), batch), unmerged,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", [dict(target_modules=["moe.router.gate", "mm_projector.2"]),
                                     dict(target_modules=[], target_parameters=["moe.experts.down_proj"]),
                                     dict(target_modules=[], target_parameters=["moe.experts.gate_proj",
                                                                                "moe.experts.down_proj"]),
                                     dict(target_modules=["q_proj", "fc1"])],
                         ids=["router_and_projector", "one_expert_tensor", "two_expert_tensors", "llm_and_vision"])
def test_adapters_on_the_moe_projector_and_vision_tower(tmp_path, tokenizer, targets):
    model, processor = tiny_model(tokenizer)
    with torch.no_grad():  # larger MoE weights so that the adapter's effect is visible in the logits
        for parameter in model.moe.parameters():
            parameter.copy_(torch.randn_like(parameter))
    base_dir = _save_base(model, processor, tmp_path / "base")
    batch = _batch(processor)
    peft_model = get_peft_model(model, _lora(**targets))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    peft_model.save_pretrained(tmp_path / "adapter")
    unmerged = _logits(peft_model, batch)
    with peft_model.disable_adapter():
        assert (unmerged - _logits(peft_model, batch)).abs().max() > 1e-3
    dst = export_merged(tmp_path / "adapter", tmp_path / "merged", base=base_dir)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(dst).eval(), batch), unmerged,
                               rtol=1e-4, atol=1e-5)


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("change, field", [
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(init_lora_weights="olora"), "init_lora_weights"),
    (dict(init_lora_weights="loftq"), "init_lora_weights"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
    (dict(use_qalora=True), "use_qalora"),
    (dict(future_lora_option=True), "future_lora_option"),
])
def test_adapter_settings_that_are_not_merged_here_are_refused(tmp_path, tokenizer, change, field, capsys):
    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, target_modules=["q_proj"])
    _edit_config(adapter_dir, **change)
    with pytest.raises(ExportError, match=rf"adapter_config.json: .*{field}"):
        export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    assert not (tmp_path / "merged").exists()
    assert export_main(["--merge-lora", "--src", str(adapter_dir), "--base", str(base_dir),
                        "--dst", str(tmp_path / "merged")]) == 2
    assert field in capsys.readouterr().err


def _truncate(path, keep=300):
    path.write_bytes(path.read_bytes()[:keep])


def _reshape_first_lora_a(path):
    state = load_file(str(path))
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros(4, 7)
    save_file(state, str(path))


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model"),
    (lambda d: _truncate(d / "adapter_model.safetensors"), "adapter_model.safetensors"),
    (lambda d: _reshape_first_lora_a(d / "adapter_model.safetensors"), "adapter_model.safetensors"),
    (lambda d: _edit_config(d, r=8), "adapter_model.safetensors"),
], ids=["bad_json", "not_a_mapping", "no_weights", "truncated_weights", "wrong_shape", "config_rank_differs"])
def test_corrupt_adapter_files_are_named(tmp_path, tokenizer, damage, named, capsys):
    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, target_modules=["q_proj"])
    damage(adapter_dir)
    with pytest.raises(ExportError, match=named):
        export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    assert export_main(["--merge-lora", "--src", str(adapter_dir), "--base", str(base_dir),
                        "--dst", str(tmp_path / "merged")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_modules_to_save_missing_from_the_weights_is_refused(tmp_path, tokenizer):
    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, target_modules=["q_proj"], modules_to_save=["norm"])
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "lora_" in k}, str(path))
    with pytest.raises(ExportError, match="norm"):
        export_merged(adapter_dir, tmp_path / "merged", base=base_dir)


def test_corrupt_or_incomplete_base_is_named(tmp_path, tokenizer):
    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, target_modules=["q_proj"])
    truncated = tmp_path / "truncated"
    shutil.copytree(base_dir, truncated)
    _truncate(truncated / "model.safetensors", 1000)
    with pytest.raises(ExportError, match=str(truncated)):
        export_merged(adapter_dir, tmp_path / "merged", base=truncated)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(base_dir, incomplete)
    state = load_file(str(incomplete / "model.safetensors"))
    del state["mm_projector.0.weight"]
    save_file(state, str(incomplete / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"mm_projector\.0\.weight"):  # never a randomly initialised tensor
        export_merged(adapter_dir, tmp_path / "merged", base=incomplete)
    assert not (tmp_path / "merged").exists()


def test_output_never_overwrites_the_source_the_base_or_an_existing_folder(tmp_path, tokenizer):
    model, processor = tiny_model(tokenizer)
    together = _save_base(model, processor, tmp_path / "together")
    get_peft_model(model.language_model, _lora(target_modules=["q_proj"])).save_pretrained(together)
    before = {p.name: p.read_bytes() for p in together.iterdir()}
    for dst in (together, together / "merged"):
        with pytest.raises(ExportError, match="--dst"):
            export_merged(together, dst)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_merged(together, occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in together.iterdir()} == before  # base and adapter untouched
    (tmp_path / "empty").mkdir()
    export_merged(together, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_write_that_fails_midway_leaves_no_output(tmp_path, tokenizer, monkeypatch):
    base_dir, adapter_dir, _, _ = _adapter(tmp_path, tokenizer, target_modules=["q_proj"])
    real_save = export_module.ParrotProcessor.save_pretrained

    def disk_full(self, directory):
        real_save(self, directory)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(export_module.ParrotProcessor, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_merged(adapter_dir, tmp_path / "merged", base=base_dir)
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no staging folder left behind


@pytest.mark.parametrize("dtype, key", [(torch.bfloat16, "dtype"), (torch.float16, "torch_dtype")])
def test_output_keeps_the_base_dtype(tmp_path, tokenizer, dtype, key):
    model, processor = tiny_model(tokenizer)
    model.to(dtype)
    base_dir = _save_base(model, processor, tmp_path / "base")
    if key == "torch_dtype":  # a config written by transformers 4 names the dtype torch_dtype
        config = json.loads((base_dir / "config.json").read_text())
        config["torch_dtype"] = str(config.pop("dtype")).removeprefix("torch.")
        (base_dir / "config.json").write_text(json.dumps(config))
    get_peft_model(model.float().language_model, _lora(target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    dst = export_merged(tmp_path / "a", tmp_path / "merged", base=base_dir)
    assert {t.dtype for t in load_file(str(dst / "model.safetensors")).values()} == {dtype}


def test_a_training_checkpoint_is_explained(tmp_path, tokenizer):
    """A `--tuning lora` run's checkpoint holds the Parrot model with the LoRA injected, not a peft adapter folder."""
    model, processor = tiny_model(tokenizer)
    checkpoint = _save_base(model, processor, tmp_path / "checkpoint-4")
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ExportError, match="adapter_config.json: not found.*training checkpoint"):
        export_merged(checkpoint, tmp_path / "merged")


@pytest.mark.parametrize("kind", ["mole", "perft", "factorllm"])
def test_a_base_with_a_routed_adapter_beside_it_is_refused(tmp_path, tokenizer, kind, capsys):
    """A MoLE / PERFT / FactorLLM run's output is its model files plus a routed adapter that cannot be folded; the
    merge reads the model files only, so such a base would lose its adapter in the output without a word."""
    from parrot.moe import MoLEConfig, inject_mole, save_mole
    from parrot.train.export import ADAPTER_FILES

    model, processor = tiny_model(tokenizer)
    base_dir = _save_base(model, processor, tmp_path / "run")
    lora_on = tiny_model(tokenizer)[0].language_model
    get_peft_model(lora_on, _lora(target_modules=["v_proj"])).save_pretrained(tmp_path / "adapter")
    if kind == "mole":
        config = MoLEConfig(target_modules=("q_proj",), num_experts=2, rank=2)
        inject_mole(model.language_model, config)
        save_mole(model.language_model, config, base_dir)
    else:
        for name in ADAPTER_FILES[kind]:
            (base_dir / name).write_text("{}")
    with pytest.raises(ExportError, match=f"holds a {kind} adapter \\({ADAPTER_FILES[kind][0]}"):
        export_merged(tmp_path / "adapter", tmp_path / "merged", base=base_dir)
    assert export_main(["--merge-lora", "--src", str(tmp_path / "adapter"), "--base", str(base_dir),
                        "--dst", str(tmp_path / "merged")]) == 2
    assert "would silently drop them" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
