"""One target rule for every adapter injection (`parrot.moe.mole.target_matches`, peft's rule for a `target_modules`
list): `--tuning lora` (peft, `parrot.train.stages._inject_lora`), MoLE (`inject_mole`) and FactorLLM
(`inject_factorllm`) select the same modules for the same targets and name every target that matches nothing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from parrot.model import ParrotForCausalLM
from parrot.moe import MoLEConfig, inject_mole
from parrot.moe.methods import FactorLLMConfig, inject_factorllm
from parrot.moe.mole import MoLELinear, match_target_modules, target_matches
from parrot.train import TrainConfig
from parrot.train.stages import apply_stage
from tests.conftest import tiny_parrot_config

NAMES = ["lm_head", "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.0.mlp",
         "model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_up_proj", "vision_tower.q_proj"]
TARGETS = ["q_proj", "proj", "up_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj", "model.layers.0.mlp",
           "mlp", "layers.0", "lm_head", "head", "model.layers.1", "vision_tower.q_proj", "q_proj.weight"]


def test_the_rule_is_peft_list_rule():
    for target in TARGETS:
        peft_config = LoraConfig(target_modules=[target])
        for name in NAMES:
            assert target_matches(name, target) == bool(check_target_module_exists(peft_config, name)), (name, target)
    assert target_matches("model.layers.0.self_attn.q_proj", "self_attn.q_proj")
    assert not target_matches("model.layers.0.self_attn.q_proj", "proj")  # whole name components only
    assert not target_matches("model.layers.0.mlp.up_proj", "layers.0")  # a target names the module, not a parent
    assert match_target_modules(NAMES, ["layers.1.self_attn.q_proj", "lm_head"], "x", "y") == [
        "lm_head", "model.layers.1.self_attn.q_proj"]  # in model order, layer 10 not taken for layer 1
    with pytest.raises(ValueError, match=r"^--opt \['qproj', 'proj'\] match no module \(a target matches a module "
                                         r"whose full name equals it or ends with \"\.\" \+ target\)"):
        match_target_modules(NAMES, ["q_proj", "qproj", "proj"], "--opt", "module")


def _stage2(tuning: str, targets: str, tmp_path) -> ParrotForCausalLM:
    torch.manual_seed(0)
    model = ParrotForCausalLM(tiny_parrot_config())
    apply_stage(model, TrainConfig(stage=2, tuning=tuning, lora_targets=targets, mole_experts=2, mole_top_k=1,
                                   mole_fused="never", output_dir=str(tmp_path)))
    return model


def _adapted(model: ParrotForCausalLM, tuning: str) -> list[str]:
    """The LLM modules that got adapters: LoRA layers (peft) or MoLELinear."""
    lm = model.language_model
    if tuning == "lora":
        return [n for n, m in lm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    return [n for n, m in lm.named_modules() if isinstance(m, MoLELinear)]


@pytest.mark.parametrize("targets, expected", [
    ("q_proj,down_proj", [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]),
    ("self_attn.q_proj", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    ("model.layers.1.mlp.up_proj,layers.0.self_attn.v_proj",
     ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]),
])
def test_lora_and_mole_select_the_same_modules(targets, expected, tmp_path):
    for tuning in ("lora", "mole"):
        assert _adapted(_stage2(tuning, targets, tmp_path), tuning) == expected, tuning


@pytest.mark.parametrize("tuning", ["lora", "mole"])
def test_a_misspelled_target_is_named_by_both_callers(tuning, tmp_path):
    option = "--lora-targets:" if tuning == "lora" else "inject_mole: target_modules"
    with pytest.raises(ValueError, match=rf"{option} \['self_attn.q_prj', 'layers.7.mlp.up_proj'\] match no .*"
                                         r"ends with \"\.\" \+ target"):
        _stage2(tuning, "v_proj,self_attn.q_prj,layers.7.mlp.up_proj", tmp_path)


def test_mole_exclude_rules_still_apply():
    torch.manual_seed(0)
    lm = ParrotForCausalLM(tiny_parrot_config()).language_model
    # lm_head matches the rule but the default exclude_modules (name substrings) removes it: named as unmatched
    with pytest.raises(ValueError, match=r"\['lm_head'\] match no nn.Linear of Qwen2ForCausalLM outside "
                                         r"\('vision_tower', 'mm_projector', 'lm_head'\)"):
        inject_mole(lm, MoLEConfig(target_modules=("q_proj", "lm_head")))
    assert not any(isinstance(m, MoLELinear) for m in lm.modules())
    assert all(p.requires_grad for p in lm.parameters())  # refused before freezing anything
    config = MoLEConfig(target_modules=("q_proj",), exclude_modules=("layers.1.",), num_experts=2)
    with pytest.raises(ValueError, match=r"\['layers.1.self_attn.q_proj'\] match no"):
        inject_mole(lm, MoLEConfig(target_modules=("q_proj", "layers.1.self_attn.q_proj"),
                                   exclude_modules=("layers.1.",)))
    assert inject_mole(lm, config) == ["model.layers.0.self_attn.q_proj"]


def test_factorllm_follows_the_same_rule():
    torch.manual_seed(0)
    lm = ParrotForCausalLM(tiny_parrot_config()).language_model
    with pytest.raises(ValueError, match=r"inject_factorllm: target_modules \['mpl'\] match no SwiGLU MLP"):
        inject_factorllm(lm, FactorLLMConfig(num_experts=2, top_k=1, target_modules=("mlp", "mpl")))
    assert inject_factorllm(lm, FactorLLMConfig(num_experts=2, top_k=1, target_modules=("layers.1.mlp",))) == [
        "model.layers.1.mlp"]
