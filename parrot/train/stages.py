"""Stage presets: which parts of a `ParrotForCausalLM` train, and the LLM adapters of stage 2.

Parrot (Sun et al., 2024, sec. 3.3 / 4.1), following LLaVA's two stages:

- stage 1 (modality alignment): the vision tower and the LLM are frozen, the MoE is off (identity), only
  `mm_projector` trains on image-caption pairs;
- stage 2 (instruction tuning): the MoE is switched on; `mm_projector`, the MoE (router + experts) and the LLM
  train. The LLM trains fully (`full`, as the paper), through LoRA adapters (`lora`, peft) or through Mixture of
  LoRA Experts layers with a router (`mole`, `parrot.moe.mole`), or through an MoE tuning method of
  `parrot.moe.methods` (`perft-r|e|d|s`, `factorllm`, `ceft`; `prepare_for_tuning` on the language model).
  The vision tower stays frozen. Such a method also decides whether the MoE LLM's own load-balancing loss joins
  the loss, as its official trainer (`TuningSetup.forward_kwargs`, passed to every model call by the trainer):
  CEFT trains on the LM cross-entropy alone, even where the LLM config sets `output_router_logits`; PERFT with
  `router_aux_loss_coef` x that loss, even where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..model import ParrotForCausalLM
from ..moe import MoLEConfig, RouterConfig, inject_mole
from ..moe.mole import match_target_modules
from ..moe.methods import PERFT_VARIANTS, TuningSetup, prepare_for_tuning
from .config import MOE_METHOD_TUNINGS, TrainConfig

PARTS = ("vision_tower", "mm_projector", "moe", "language_model")


@dataclass
class StagePlan:
    """What `apply_stage` did: the trained parts and, for MoLE, the injected layers' config."""

    stage: int
    tuning: str | None  # None in stage 1
    trained_parts: tuple[str, ...]
    mole_config: MoLEConfig | None = None
    lora_scaling: float | None = None  # alpha / r of the LoRA adapters (tuning "lora")
    tuning_setup: TuningSetup | None = None  # MoE tuning methods (perft-*, factorllm, ceft)
    method_settings: dict[str, Any] = field(default_factory=dict)  # the prepare_for_tuning keywords


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def mole_config_from(cfg: TrainConfig) -> MoLEConfig:
    router = RouterConfig(
        kind=cfg.router,
        top_k=cfg.mole_top_k,
        gw_threshold=cfg.gw_threshold if cfg.router == "gwmoe" else None,
        gw_quantile=cfg.gw_quantile if cfg.router == "gwmoe" and cfg.gw_threshold is None else None,
    )
    return MoLEConfig(target_modules=cfg.targets, num_experts=cfg.mole_experts, rank=cfg.lora_rank,
                      alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, router=router, fused=cfg.mole_fused,
                      balance=cfg.mole_balance)


def method_settings_from(cfg: TrainConfig) -> dict[str, Any]:
    """The `prepare_for_tuning` keywords of `cfg.tuning` (JSON-serialisable: they are saved with the model)."""
    if cfg.tuning in PERFT_VARIANTS:
        return {"num_experts": cfg.perft_experts, "rank": cfg.perft_rank, "alpha": cfg.perft_alpha,
                "router": {"kind": "topk", "top_k": cfg.perft_top_k}, "balance_coef": cfg.perft_balance_coef}
    if cfg.tuning == "factorllm":
        return {"num_experts": cfg.factorllm_experts, "top_k": cfg.factorllm_top_k}
    if cfg.tuning == "ceft":
        return {"ranking_path": cfg.ceft_ranking, "top_n": cfg.ceft_top_n, "per_layer": cfg.ceft_per_layer}
    raise ValueError(f"--tuning {cfg.tuning!r} is not an MoE tuning method ({MOE_METHOD_TUNINGS})")


def _inject_lora(model: ParrotForCausalLM, cfg: TrainConfig) -> None:
    """LoRA adapters (peft) on the LLM's linear layers, injected in place (no PeftModel wrapper), so the
    Parrot model keeps its own forward; only the `lora_` parameters of the LLM train."""
    from peft import LoraConfig, inject_adapter_in_model

    # peft silently skips a listed target that matches nothing (a typo would train without that adapter): every
    # target must name at least one module, by the rule peft applies and MoLE shares (`target_matches`).
    names = [name for name, _ in model.language_model.named_modules() if name]
    match_target_modules(names, cfg.targets, "--lora-targets:",
                         f"module of the language model ({type(model.language_model).__name__})")
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
    mole_config = lora_scaling = tuning_setup = None
    settings: dict[str, Any] = {}
    if cfg.tuning == "full":
        _set_trainable(model.language_model, True)
    elif cfg.tuning == "lora":
        _inject_lora(model, cfg)
        lora_scaling = cfg.lora_alpha / cfg.lora_rank
    elif cfg.tuning in MOE_METHOD_TUNINGS:
        settings = method_settings_from(cfg)
        # freezes the LLM; only the method's parameters train
        tuning_setup = prepare_for_tuning(model.language_model, cfg.tuning, **settings)
    else:
        mole_config = mole_config_from(cfg)
        inject_mole(model.language_model, mole_config)  # freezes the LLM, MoLE experts + routers train
    _set_trainable(model.mm_projector, True)
    _set_trainable(model.moe, True)
    return StagePlan(stage=2, tuning=cfg.tuning, trained_parts=("mm_projector", "moe", "language_model"),
                     mole_config=mole_config, lora_scaling=lora_scaling, tuning_setup=tuning_setup,
                     method_settings=settings)


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
        header += (f", router {plan.mole_config.router.kind}, {plan.mole_config.num_experts} experts/layer, "
                   f"{plan.mole_config.balance} load-balancing loss")
    if plan.tuning_setup is not None:
        header += f", {len(plan.tuning_setup.modules)} LLM modules tuned, settings {plan.method_settings}"
        balance = plan.tuning_setup.forward_kwargs.get("output_router_logits")
        if balance is not None:
            header += (f", LLM routers' load-balancing loss {'in' if balance else 'not in'} the loss (as the official "
                       f"{plan.tuning} trainer)")
    lines = [header, f"{'part':<16} {'trainable':>14} {'total':>14} {'share':>7}"]
    for part, trainable, total in parameter_table(model):
        share = 100.0 * trainable / total if total else 0.0
        lines.append(f"{part:<16} {trainable:>14,} {total:>14,} {share:>6.2f}%")
    return "\n".join(lines)
