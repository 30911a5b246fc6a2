"""Stage presets: which parts of a `ParrotForCausalLM` train, and the LLM adapters of stage 2.

Parrot (Sun et al., 2024, sec. 3.3 / 4.1), following LLaVA's two stages:

- stage 1 (modality alignment): the vision tower and the LLM are frozen, the MoE is off (identity), only
  `mm_projector` trains on image-caption pairs;
- stage 2 (instruction tuning): the MoE is switched on; `mm_projector`, the MoE (router + experts) and the LLM
  train. The LLM trains fully (`full`, as the paper), through LoRA adapters (`lora`, peft) or through Mixture of
  LoRA Experts layers with a router (`mole`, `parrot.moe.mole`). The vision tower stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..model import ParrotForCausalLM
from ..moe import MoLEConfig, RouterConfig, inject_mole
from .config import TrainConfig

PARTS = ("vision_tower", "mm_projector", "moe", "language_model")


@dataclass
class StagePlan:
    """What `apply_stage` did: the trained parts and, for MoLE, the injected layers' config."""

    stage: int
    tuning: str | None  # None in stage 1
    trained_parts: tuple[str, ...]
    mole_config: MoLEConfig | None = None
    lora_scaling: float | None = None  # alpha / r of the LoRA adapters (tuning "lora")


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def mole_config_from(cfg: TrainConfig) -> MoLEConfig:
    router = RouterConfig(
        kind=cfg.router,
        top_k=cfg.mole_top_k,
        gw_quantile=cfg.gw_quantile if cfg.router == "gwmoe" else None,
    )
    return MoLEConfig(target_modules=cfg.targets, num_experts=cfg.mole_experts, rank=cfg.lora_rank,
                      alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, router=router)


def _inject_lora(model: ParrotForCausalLM, cfg: TrainConfig) -> None:
    """LoRA adapters (peft) on the LLM's linear layers, injected in place (no PeftModel wrapper), so the
    Parrot model keeps its own forward; only the `lora_` parameters of the LLM train."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.targets), bias="none")
    inject_adapter_in_model(lora, model.language_model)
    for name, param in model.language_model.named_parameters():
        param.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.language_model.parameters()):
        raise ValueError(f"LoRA matched none of --lora-targets {cfg.targets} in the language model")


def apply_stage(model: ParrotForCausalLM, cfg: TrainConfig) -> StagePlan:
    """Freeze/unfreeze for `cfg.stage`, switch the MoE, inject LoRA/MoLE for stage 2. Mutates `model`."""
    _set_trainable(model, False)
    if cfg.stage == 1:
        model.config.use_moe = False
        _set_trainable(model.mm_projector, True)
        return StagePlan(stage=1, tuning=None, trained_parts=("mm_projector",))

    model.config.use_moe = True
    model.config.check_model_settings()
    mole_config = lora_scaling = None
    if cfg.tuning == "full":
        _set_trainable(model.language_model, True)
    elif cfg.tuning == "lora":
        _inject_lora(model, cfg)
        lora_scaling = cfg.lora_alpha / cfg.lora_rank
    else:
        mole_config = mole_config_from(cfg)
        inject_mole(model.language_model, mole_config)  # freezes the LLM, MoLE experts + routers train
    _set_trainable(model.mm_projector, True)
    _set_trainable(model.moe, True)
    return StagePlan(stage=2, tuning=cfg.tuning, trained_parts=("mm_projector", "moe", "language_model"),
                     mole_config=mole_config, lora_scaling=lora_scaling)


def parameter_table(model: nn.Module) -> list[tuple[str, int, int]]:
    """[(part, trainable, total)] per top-level part of the model (tied weights counted once), then 'all'."""
    rows = []
    seen: set[int] = set()
    all_trainable = all_total = 0
    for part, module in model.named_children():
        trainable = total = 0
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()  # ZeRO-3 partitions params
            total += count
            trainable += count if param.requires_grad else 0
        rows.append((part, trainable, total))
        all_trainable += trainable
        all_total += total
    rows.append(("all", all_trainable, all_total))
    return rows


def describe_trainable(model: nn.Module, plan: StagePlan) -> str:
    """A table of trainable / total parameters per part, printed at the start of a run."""
    header = f"stage {plan.stage}" + (f" (LLM tuning: {plan.tuning})" if plan.tuning else "")
    if plan.mole_config is not None:
        header += f", router {plan.mole_config.router.kind}, {plan.mole_config.num_experts} experts/layer"
    lines = [header, f"{'part':<16} {'trainable':>14} {'total':>14} {'share':>7}"]
    for part, trainable, total in parameter_table(model):
        share = 100.0 * trainable / total if total else 0.0
        lines.append(f"{part:<16} {trainable:>14,} {total:>14,} {share:>6.2f}%")
    return "\n".join(lines)
