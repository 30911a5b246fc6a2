"""One entry point that prepares a model for stage-2 tuning with an MoE method (`--tuning ...`).

    setup = prepare_for_tuning(model, "perft-r", num_experts=4, rank=8, router={"kind": "topk", "top_k": 2})
    optimizer = AdamW([p for n, p in model.named_parameters() if n in set(setup.trainable)], ...)
    out = model(**batch, **setup.forward_kwargs)  # .loss: the loss the method's official trainer optimises
    loss = out.loss + setup.aux_loss()           # router aux losses of THIS forward (0.0 when none)
    tracker.update(step, setup.routing())        # parrot.moe.diagnostics.RouterStatsTracker
    torch.save(setup.state_dict(), ...)          # the tuned weights only

Methods and their keyword settings:
- "perft-r" | "perft-e" | "perft-d" | "perft-s": `PerftConfig` fields (num_experts, rank, alpha, activation,
  dropout, router=RouterConfig or dict). The LM must be a sparse MoE LLM (OLMoE, Mixtral, Qwen2-MoE, ...).
- "factorllm": `FactorLLMConfig` fields (num_experts, top_k, rescale, pa_coef, router, target_modules,
  train_experts); `permutations` {mlp name: neuron permutation} optional. The LM must be dense SwiGLU.
- "ceft": one of `selection` ({block: [expert ids]}), `ranking` (list[ExpertScore]) or `ranking_path`
  (a Router Lens CSV), plus `top_n` (default 8, the official `ceft-8`) and `per_layer` (default True).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..mole import check_aux_loss_trains, mole_aux_loss
from ..routers import RouterOutput
from .factorllm import FactorLLMConfig, collect_factorllm_routing, inject_factorllm
from .perft import (PERFT_VARIANTS, PerftConfig, collect_perft_routing, inject_perft, perft_aux_loss,
                    perft_forward_kwargs, perft_parameter_names, perft_state_dict)
from .router_lens import ceft_state_dict, lm_loss_only_kwargs, load_ranking_csv, prepare_ceft, select_context_experts

TUNING_METHODS: tuple[str, ...] = (*PERFT_VARIANTS, "factorllm", "ceft")


@dataclass
class TuningSetup:
    """What the trainer needs after `prepare_for_tuning`.

    method: the tuning name; modules: the blocks / MLPs the method changed; trainable: names (as in
    model.named_parameters()) of the parameters that train -- everything else is frozen; aux_loss():
    the router aux losses of the latest forward, add it to the LM loss (mean over layers of each layer's losses;
    PERFT-R's load balance is one term over all layers' tokens pooled, `perft.perft_aux_loss`);
    routing(): {module: RouterOutput} of the latest forward for diagnostics; state_dict(): the tuned
    weights only; forward_kwargs: keywords for every training call of the model (`model(**batch,
    **setup.forward_kwargs)`) that make its `.loss` the loss the method's official trainer optimises, as far as
    the base model's own load-balancing loss goes (transformers adds `router_aux_loss_coef` x it to `.loss` when
    `output_router_logits` is on):
      - CEFT: off, the LM cross-entropy alone (`router_lens.lm_loss_only_kwargs`; the official RouterLens
        trainer computes the cross-entropy from the logits);
      - PERFT (every variant): on (`perft.perft_forward_kwargs`; the official finetune.py sets
        `output_router_logits=True`);
      - FactorLLM: {} (a dense LLM has no such loss).
    """

    method: str
    modules: list[str]
    trainable: list[str]
    aux_loss: Callable[[], torch.Tensor | float]
    routing: Callable[[], dict[str, RouterOutput]]
    state_dict: Callable[[], dict[str, torch.Tensor]]
    forward_kwargs: dict[str, Any] = field(default_factory=dict)


def _no_routing() -> dict[str, RouterOutput]:
    return {}


def prepare_for_tuning(model: nn.Module, tuning: str, **cfg: Any) -> TuningSetup:
    """Prepare `model` in place for `tuning` (one of TUNING_METHODS); see the module docstring for `cfg`."""
    if tuning in PERFT_VARIANTS:
        config = PerftConfig(variant=tuning, **cfg)
        modules = inject_perft(model, config)
        routing = lambda: collect_perft_routing(model)  # noqa: E731
        return TuningSetup(tuning, modules, perft_parameter_names(model), lambda: perft_aux_loss(model), routing,
                           lambda: perft_state_dict(model), perft_forward_kwargs(model))
    if tuning == "factorllm":
        permutations = cfg.pop("permutations", None)
        modules = inject_factorllm(model, FactorLLMConfig(**cfg), permutations)
        routing = lambda: collect_factorllm_routing(model)  # noqa: E731
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        return TuningSetup(tuning, modules, trainable, lambda: mole_aux_loss(routing()), routing,
                           lambda: {n: p.detach().clone() for n, p in model.named_parameters() if n in set(trainable)})
    if tuning == "ceft":
        allowed = {"selection", "ranking", "ranking_path", "top_n", "per_layer"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"prepare_for_tuning('ceft'): unknown settings {unknown}; allowed {sorted(allowed)}")
        given = [key for key in ("selection", "ranking", "ranking_path") if cfg.get(key) is not None]
        if len(given) > 1:
            raise ValueError(f"prepare_for_tuning('ceft'): give one of selection=, ranking=, ranking_path=; got {given}")
        selection = cfg.get("selection")
        if selection is None:
            ranking = cfg.get("ranking")
            if ranking is None:
                if cfg.get("ranking_path") is None:
                    raise ValueError("prepare_for_tuning('ceft') needs selection=, ranking= or ranking_path= (a Router Lens CSV)")
                ranking = load_ranking_csv(cfg["ranking_path"])
            selection = select_context_experts(ranking, cfg.get("top_n", 8), cfg.get("per_layer", True))
        trainable = prepare_ceft(model, selection)
        return TuningSetup(tuning, sorted(selection), trainable, lambda: 0.0, _no_routing, lambda: ceft_state_dict(model),
                           lm_loss_only_kwargs(model))
    raise ValueError(f"prepare_for_tuning: unknown tuning {tuning!r}; choose from {TUNING_METHODS}")


def train_steps(model: nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float,
                aux_loss: Callable[[], torch.Tensor | float] | None = None, desc: str = "tuning",
                on_step: Callable[[int], None] | None = None,
                forward_kwargs: dict[str, Any] | None = None) -> list[float]:
    """A minimal AdamW loop over the trainable parameters (commands and tests; the real trainer is parrot.train).

    `on_step(step)` runs after each forward/backward (e.g. to record routing diagnostics); `forward_kwargs` join
    every model call (a `TuningSetup.forward_kwargs`). Returns the model's `.loss` (without `aux_loss`) of every
    step.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_steps: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, leave=False):
        out = model(**batches[step % len(batches)], **(forward_kwargs or {}))
        aux = aux_loss() if aux_loss is not None else 0.0
        check_aux_loss_trains(aux, out.loss)
        loss = out.loss + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(out.loss.detach().item())
        if on_step is not None:
            on_step(step)
    return losses
