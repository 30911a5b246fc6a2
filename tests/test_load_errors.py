"""`load_pretrained` / `load_trained` on corrupt or mismatched folders: an error naming the folder or file, never a
randomly initialised tensor, a default in place of an unreadable file, or an exception that names nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parrot.data.tokenizer import build_tiny_tokenizer
from parrot.model.builder import load_pretrained
from parrot.moe import MoLEConfig, inject_mole, save_mole
from parrot.train import load_trained
from parrot.train.export import TRAINING_INFO
from tests.conftest import save_tiny_parrot_for


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny Parrot model, and the same model with a MoLE adapter as a `--tuning mole` run saves it."""
    root = tmp_path_factory.mktemp("load_errors")
    tokenizer = build_tiny_tokenizer(vocab_size=300, n_texts=200)
    plain = save_tiny_parrot_for(tokenizer, root / "plain")
    mole = root / "mole"
    shutil.copytree(plain, mole)
    model, _ = load_pretrained(plain)
    config = MoLEConfig(target_modules=("q_proj",), num_experts=2, rank=2)
    inject_mole(model.language_model, config)
    save_mole(model.language_model, config, mole)
    (mole / TRAINING_INFO).write_text(json.dumps({"stage": 2, "tuning": "mole"}))
    load_trained(mole)  # both load as saved
    return {"plain": plain, "mole": mole}


def _copy(saved, kind, tmp_path):
    return shutil.copytree(saved[kind], tmp_path / kind)


def _edit_json(path, **changes):
    raw = json.loads(path.read_text())
    for dotted, value in changes.items():
        owner, *rest = dotted.split("__")
        if rest:
            raw[owner][rest[0]] = value
        else:
            raw[owner] = value
    path.write_text(json.dumps(raw))


def _edit_weights(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: _edit_weights(d / "model.safetensors", lambda s: s.__setitem__("mm_projector.0.weight",
                                                                              torch.zeros(3, 3))),
     r"mismatched keys: \['mm_projector\.0\.weight saved \(3, 3\) vs model \(32, 24\)'\]"),
    (lambda d: _edit_json(d / "config.json", text_config__intermediate_size=80),
     r"mismatched keys: .*mlp\.down_proj\.weight saved \(32, 64\) vs model \(32, 80\)"),
    (lambda d: _edit_json(d / "config.json", moe_num_experts=4), r"mismatched keys: .*moe\.experts"),
    (lambda d: (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text())["text_config"])),
     r"config.json: model_type='qwen2', not a Parrot model config"),
    (lambda d: (d / "config.json").write_text("[]"),
     r"cannot load the saved model \(.*config.json: expected a JSON object"),
    (lambda d: _edit_json(d / "config.json", projector_type="mlp9"), r"config.json: cannot build the saved model "
                                                                      r".*projector_type='mlp9'"),
    (lambda d: (d / "generation_config.json").write_text("{not json"), r"generation_config.json: cannot read"),
    (lambda d: (d / "tokenizer.json").unlink(), r"cannot load the processor / tokenizer files"),
    (lambda d: (d / "model.safetensors").unlink(), r"cannot load the saved model .*no file named model.safetensors"),
], ids=["tensor_shape", "config_of_another_size", "config_other_expert_count", "plain_llm_config", "config_not_object",
        "config_bad_setting", "generation_config", "tokenizer_missing", "weights_missing"])
def test_load_pretrained_names_what_is_wrong(saved, tmp_path, damage, pattern):
    broken = _copy(saved, "plain", tmp_path)
    damage(broken)
    with pytest.raises(ValueError, match=pattern) as info:
        load_pretrained(broken)
    assert str(broken) in str(info.value)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _reshape_lora_a(path):
    _edit_weights(path, lambda s: s.__setitem__(next(k for k in s if "lora_A" in k), torch.zeros(2, 3, 5)))


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: _truncate(d / "mole_adapter.safetensors"), r"mole_adapter.safetensors: cannot read the mole adapter"),
    (lambda d: (d / "mole_config.json").write_text("{x"), r"mole_config.json: cannot read the mole adapter config"),
    (lambda d: _reshape_lora_a(d / "mole_adapter.safetensors"), r"mole adapter \(mole_config.json \+ "
                                                                r"mole_adapter.safetensors\) does not fit .*lora_A"),
    (lambda d: _edit_json(d / "mole_config.json", num_experts=3), r"mole adapter .* does not fit .*shape mismatch"),
    (lambda d: _edit_json(d / "mole_config.json", num_expertz=3), r"mole adapter .* does not fit .*num_expertz"),
], ids=["adapter_truncated", "adapter_config_json", "adapter_tensor_shape", "adapter_config_experts",
        "adapter_config_unknown_key"])
def test_load_trained_names_the_adapter_file(saved, tmp_path, damage, pattern):
    broken = _copy(saved, "mole", tmp_path)
    damage(broken)
    with pytest.raises(ValueError, match=pattern) as info:
        load_trained(broken)
    assert str(broken) in str(info.value)
