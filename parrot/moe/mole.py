"""Mixture of LoRA Experts (MoLE) layers and their injection into any Hugging Face causal LM.

A `MoLELinear` wraps a frozen `nn.Linear` W with E LoRA experts and a router (any router from
`parrot.moe.routers`):

    y = W x + sum_{e in selected(x)} w_e(x) * (alpha / r) * B_e A_e x        (MixLoRA, arXiv 2404.15159, eq. 4)

Inference is merge-free: the same forward serves training and generation, nothing is merged into W.

Trainer-facing API (what `--tuning mole --router {topk,dynmole,gwmoe,mor}` should use):

    cfg = MoLEConfig(num_experts=4, rank=8, alpha=16, router=RouterConfig(kind="dynmole"))
    replaced = inject_mole(model, cfg)              # -> ["model.layers.0.self_attn.q_proj", ...]
    out = model(input_ids=..., attention_mask=...)  # attention_mask is picked up for the routers
    routing = collect_router_outputs(model)         # {module name: RouterOutput} of THIS forward
    loss = out.loss + mole_aux_loss(routing)        # mean over layers of the already-scaled aux losses
                                                    # (+ the pooled balance term under balance="pooled")
    if step % log_every == 0:                       # stats are lazy: only logging steps compute them
        tracker.update(step, routing)               # parrot.moe.diagnostics.RouterStatsTracker
    save_mole(model, cfg, out_dir) / load_mole(model, out_dir)   # adapter + router weights only

For `RouterConfig(kind="gwmoe", gw_quantile=q)` call `calibrate_gwmoe(model, batches)` once before
training (a no-grad pass over a few batches that sets each layer's threshold to the q-quantile of its
token entropies). `inject_mole` freezes every pre-existing parameter of the model by default
(`MoLEConfig.freeze_base`); re-enable what else should train (e.g. a multimodal projector) afterwards.

Routing masks: forward pre-hooks read the 2-D `attention_mask` keyword (B, S_total) of the model and
of inner models (the innermost wins, e.g. the language model inside a multimodal model, which sees the
merged text+image mask) and hand each MoLE layer the columns of its current tokens (the last S), so
padding is excluded from aux losses and statistics, also during cached generation. Without such a
keyword every token counts.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from .experts import LoRAExperts
from .fused import FUSED_MODES, fused_mole, fused_plan, shared_gemm_applies, shared_gemm_mole
from .routers import PooledBalance, RouterConfig, RouterOutput, build_router, router_settings, top_k_indices

logger = logging.getLogger(__name__)
BALANCE_MODES: tuple[str, ...] = ("layer", "pooled")
ADAPTER_WEIGHTS_NAME = "mole_adapter.safetensors"
ADAPTER_CONFIG_NAME = "mole_config.json"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoLEConfig:
    """Where to put LoRA experts and how many.

    target_modules: the nn.Linear layers to wrap, by peft's rule (`target_matches`: the full name or a dotted
        suffix of it), e.g. q/k/v/o_proj, gate/up/down_proj, or "self_attn.q_proj".
    num_experts: one int for every layer, or a list with one entry per decoder layer (MoLA-style,
        Gao et al., 2024: more experts in higher layers); the layer comes from the `layers.<i>.` name part.
    rank, alpha, dropout: LoRA rank r, scaling numerator alpha (scale alpha / r), dropout on the input.
    router: which router every MoLE layer uses (`RouterConfig`).
    exclude_modules: name substrings never wrapped (the vision tower, projector, lm_head).
    freeze_base: set requires_grad=False on every parameter that existed before injection.
    expert_execution: "auto" | "stacked" | "grouped", how `LoRAExperts` computes (see its docstring):
        "grouped" runs only the selected (token, expert) pairs; "stacked" runs one rank-E*r product
        with zero weights for unselected experts (faster when E*r is small); "auto" picks by size.
    fused: "auto" | "always" | "never", the fused router + experts path (`parrot.moe.fused`: one autograd
        node, Triton routing kernels): "auto" uses it on CUDA where it applies, "always" also on CPU when
        Triton runs in interpreter mode (TRITON_INTERPRET=1; slow, for tests), "never" keeps the eager modules.
    balance: how the routers' load-balancing loss is computed.
        "layer" (default): each router's own Switch loss on its layer's tokens (`router.balance_coef`, shares of
            the assignments summing to 1), `mole_aux_loss` averages the layers.
        "pooled": the official MoE-PEFT loss (MixLoRA / DynMoLE, TUDB-Labs/MoE-PEFT `mix_lora.py`):
            `router.balance_coef` x transformers' `load_balancing_loss_func` over the router outputs of ALL MoLE
            layers pooled (softmax probabilities, each of a token's k picks counted: shares sum to k; padding
            excluded), one term added by `mole_aux_loss` (`pooled_balance_loss`). The routers are built without
            their own balance term (`router_config()`); their other aux losses (z-loss, DynMoLE's Tsallis term)
            stay per layer, mean over layers. Needs one expert count for every MoLE layer (refused otherwise) and
            the eager routers, whose probabilities carry gradient: the fused path's do not, so `fused="auto"` runs
            eager (logged) and `fused="always"` is refused.
        Configs saved before this field existed load as "layer".
    """

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    num_experts: int | list[int] = 4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    router: RouterConfig = field(default_factory=RouterConfig)
    exclude_modules: tuple[str, ...] = ("vision_tower", "mm_projector", "lm_head")
    freeze_base: bool = True
    expert_execution: str = "auto"
    fused: str = "auto"
    balance: str = "layer"

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):  # from JSON
            self.router = RouterConfig(**self.router)
        self.target_modules = tuple(self.target_modules)
        self.exclude_modules = tuple(self.exclude_modules)
        if not self.target_modules:
            raise ValueError("MoLEConfig.target_modules is empty")
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
            raise ValueError(f"MoLEConfig.num_experts={self.num_experts!r} must be an int >= 1 or a list of them")
        if self.rank < 1:
            raise ValueError(f"MoLEConfig.rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLEConfig.dropout={self.dropout} must be in [0, 1)")
        if self.fused not in FUSED_MODES:
            raise ValueError(f"MoLEConfig.fused={self.fused!r} must be one of {FUSED_MODES}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"MoLEConfig.balance={self.balance!r} must be one of {BALANCE_MODES}")
        if self.balance == "pooled" and self.fused == "always":
            raise ValueError("MoLEConfig(balance='pooled') needs the eager routers (the fused path returns the "
                             "router probabilities without gradient, which the pooled balance loss trains through): "
                             "use fused='auto' (runs eager under 'pooled') or 'never', not 'always'")

    def router_config(self) -> RouterConfig:
        """The RouterConfig every MoLE layer's router is built from: under balance="pooled" without its own
        per-layer balance loss (`router.balance_coef` is then the pooled term's coefficient; both would count)."""
        return self.router if self.balance == "layer" else replace(self.router, balance_coef=0.0)

    def pooled_balance_coef(self) -> float | None:
        """The pooled balance term's coefficient (`router.balance_coef`) under balance="pooled", else None."""
        return self.router.balance_coef if self.balance == "pooled" else None

    def experts_for(self, module_name: str) -> int:
        if isinstance(self.num_experts, int):
            return self.num_experts
        match = _LAYER_INDEX.search(module_name)
        if match is None:
            raise ValueError(f"MoLEConfig.num_experts is per layer but {module_name!r} has no 'layers.<i>.' part")
        layer = int(match.group(1))
        if layer >= len(self.num_experts):
            raise ValueError(
                f"MoLEConfig.num_experts lists {len(self.num_experts)} layers but {module_name!r} is layer {layer}"
            )
        return self.num_experts[layer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MoLELinear(nn.Module):
    """A frozen nn.Linear plus E routed LoRA experts (see the module docstring for the formula).

    `last_routing` holds the RouterOutput of the latest forward (None before any); `token_mask` is set
    by the model-level pre-hook that `inject_mole` installs. `pooled_balance_coef`: the coefficient of the load
    balance pooled over layers (`MoLEConfig.balance="pooled"`; None: the router's own per-layer balance): the layer
    then runs the eager routers (never the fused path: its probabilities carry no gradient) and hands its
    `PooledBalance` inputs on with each `last_routing`.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, dropout: float, router: RouterConfig,
                 expert_execution: str = "auto", fused: str = "auto", pooled_balance_coef: float | None = None):
        super().__init__()
        if fused not in FUSED_MODES:
            raise ValueError(f"MoLELinear fused={fused!r} must be one of {FUSED_MODES}")
        if pooled_balance_coef is not None and fused == "always":
            raise ValueError("MoLELinear: the pooled balance loss needs the eager routers in training (fused='auto' "
                             "or 'never'), the fused path's probabilities carry no gradient")
        self.fused = fused
        self.pooled_balance_coef = pooled_balance_coef
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.num_experts = num_experts
        self.experts = LoRAExperts(num_experts, base.in_features, base.out_features, rank, alpha, expert_execution)
        self.router = build_router(router, base.in_features, num_experts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        self.to(device=weight.device)
        if weight.is_floating_point():
            self.experts.to(dtype=weight.dtype)
            self.router.to(dtype=weight.dtype)
        self.last_routing: RouterOutput | None = None
        self.token_mask: torch.Tensor | None = None  # (B, S_total) attention mask of the current model call
        self.token_seq: int | None = None  # S of the call's new tokens: places a flattened (B*S, D) input's mask
        self._fused_plans: dict = {}  # fused_plan's memo, by the router's and experts' settings
        # The mode of the layer it replaces (so of the model around it): a new module starts in training mode,
        # and injected into (or loaded by `load_mole` into) an eval-mode model it would otherwise apply LoRA
        # dropout and GW-MoE's training-only broadcast at inference.
        self.train(base.training)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads .weight of projections (dtype/device probes)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1])  # (T, D_in)
        mask = routing_mask(self.token_mask, self.token_seq, x, "MoLE")
        out = self.adapter(flat, mask, base=out.reshape(-1, out.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., D_out); -1 cannot be inferred with no tokens

    def adapter(self, flat: torch.Tensor, mask: torch.Tensor | None = None,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """Router + experts on flat tokens (T, D_in) -> base + delta (T, D_out) (delta alone without `base`).

        Sets `last_routing`. Runs the fused path (`parrot.moe.fused`: Triton kernels) where it applies, else its
        torch-op form (`shared_gemm_mole`: one GEMM for the router's logits and the experts' rank hidden) where
        that applies (stacked experts, no LoRA dropout in training), else the router and expert modules; the
        experts add their delta into `base` inside their last GEMM / index_add.
        """
        pooled = self.pooled_balance_coef
        # Not fused where the pooled balance loss trains: the fused path's routing probabilities carry no gradient.
        # Inference (eval or no_grad) may use it.
        trains_pooled = pooled is not None and self.training and torch.is_grad_enabled()
        plan = None if trains_pooled else fused_plan(self.fused, self.router, self.experts, flat, self._fused_plans)
        dropout = self.training and isinstance(self.dropout, nn.Dropout)  # the experts see another input
        if plan is not None:
            dropped = self.dropout(flat) if dropout else None
            out, routing = fused_mole(self.router, self.experts, flat, mask, base, dropped, plan)
        elif not dropout and shared_gemm_applies(self.router, self.experts):
            out, routing = shared_gemm_mole(self.router, self.experts, flat, mask, base)
        else:
            routing = self.router(flat, mask)
            out = self.experts(self.dropout(flat), routing.weights, routing.indices, base=base)
        if pooled is not None:
            routing.pooled_balance = PooledBalance(pooled, getattr(self.router, "top_k", None), mask)
        # A plain attribute: skip nn.Module.__setattr__'s parameter/module bookkeeping on every forward.
        object.__setattr__(self, "last_routing", routing)
        return out


def _mole_modules(model: nn.Module) -> list[tuple[str, MoLELinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoLELinear)]


class MaskCapture:
    """Forward pre-hook: hands a 2-D `attention_mask` keyword to the MoLE layers below a module.

    Installed on the model and on every ancestor of MoLE layers whose forward takes `attention_mask`;
    hooks run outer to inner, so the innermost 2-D mask wins (e.g. a multimodal model's merged
    text+image mask given to its language model). 4-D or absent masks are ignored, except that the
    root hook first resets every layer (mask and per-forward routing outputs).
    """

    def __init__(self, layers: list[MoLELinear], is_root: bool):
        self.layers = layers
        self.is_root = is_root

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.is_root:
            for layer in self.layers:
                layer.token_mask = None
                layer.token_seq = None
                layer.last_routing = None  # routing outputs are per forward
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            mask = mask.to(torch.bool)  # once per model call, not once per routed layer
            tokens = kwargs.get("inputs_embeds")
            tokens = kwargs.get("input_ids") if tokens is None else tokens
            seq = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None
            for layer in self.layers:
                layer.token_mask = mask
                layer.token_seq = seq


def routing_mask(mask: torch.Tensor | None, seq: int | None, x: torch.Tensor, who: str) -> torch.Tensor | None:
    """The (B*S,) bool token mask of a routed module's input `x` from its model call's `MaskCapture` values.

    mask: the call's (B, S_total) attention mask (None: every token counts); seq: S of the call's new tokens.
    `x` (B, S, D) takes the mask's last S columns (cached generation); `x` (B*S, D), the call's tokens flattened in
    order (e.g. Qwen2-MoE's shared-expert MLP), takes them too; any other input (a gathered subset of the tokens,
    e.g. one MoE expert's) has no mask. `who` names the module kind in the error.
    """
    if mask is None:
        return None
    if x.dim() == 2 and seq is not None and mask.dim() == 2 and x.shape[0] == mask.shape[0] * seq:
        batch = mask.shape[0]
    elif x.dim() == 3:
        batch, seq = x.shape[:2]
    else:
        return None
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
        raise ValueError(f"{who} routing mask of shape {tuple(mask.shape)} does not cover hidden states "
                         f"{tuple(x.shape[:-1])}")
    return mask[:, -seq:].reshape(-1).to(device=x.device, dtype=torch.bool)  # (B*S,)


def install_mask_hooks(model: nn.Module, routed: list[tuple[str, nn.Module]]) -> None:
    """Hand the innermost 2-D `attention_mask` of each model call to every routed module (`.token_mask`).

    `routed`: [(qualified name, module)] of the modules that route tokens (MoLE layers, PERFT adapters).
    The mask stays until the next model call so that activation-checkpoint recomputation sees it too.
    """
    targets = {id(m) for _, m in routed}
    model.register_forward_pre_hook(MaskCapture([m for _, m in routed], is_root=True), with_kwargs=True)
    for name, module in model.named_modules():
        if not name or id(module) in targets:
            continue
        below = [m for n, m in routed if n.startswith(name + ".")]
        if below and "attention_mask" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(MaskCapture(below, is_root=False), with_kwargs=True)


TARGET_RULE = 'a target matches a module whose full name equals it or ends with "." + target'


def target_matches(module_name: str, target: str) -> bool:
    """The one target rule of Parrot (MoLE, `--tuning lora`), peft's rule for a `target_modules` list (peft 0.21,
    `peft.tuners.tuners_utils.check_target_module_exists`): `module_name` (relative to the model being injected)
    equals `target` or ends with "." + target. So "q_proj" and "self_attn.q_proj" both match
    "model.layers.0.self_attn.q_proj"; "proj" does not (whole name components only), and neither does
    "layers.0.self_attn" for the q_proj below it (a target names the module itself, not a parent)."""
    return module_name == target or module_name.endswith("." + target)


def match_target_modules(names: Iterable[str], targets: Iterable[str], what: str, candidates: str) -> list[str]:
    """The `names` (candidate module names, in order) that any of `targets` selects by `target_matches`.

    Raises ValueError naming every target that selects none of them: peft silently skips such a target, so a
    misspelled one would train without its adapters. The message reads "<what> [targets] match no <candidates>",
    e.g. what="--lora-targets", candidates="module of the language model (Qwen2ForCausalLM)"."""
    names, targets = list(names), list(targets)
    unmatched = [t for t in targets if not any(target_matches(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"{what} {unmatched} match no {candidates} ({TARGET_RULE}); targets given: {targets}")
    return [n for n in names if any(target_matches(n, t) for t in targets)]


def inject_mole(model: nn.Module, config: MoLEConfig) -> list[str]:
    """Replace every targeted nn.Linear of `model` by a MoLELinear; return the replaced module names.

    Targets follow `target_matches` (peft's rule); `config.exclude_modules` (name substrings) removes modules
    first. Raises if any listed target matches no remaining nn.Linear (a misspelled target, or one that only names
    excluded modules, should not silently get no experts), or, under `balance="pooled"`, if the targeted layers
    have different expert counts (one pooled term cannot mix them), before any layer is replaced.
    """
    if _mole_modules(model):
        raise ValueError("inject_mole: model already has MoLE layers")
    candidates = [
        name for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and not any(part in name for part in config.exclude_modules)
    ]
    targets = match_target_modules(candidates, config.target_modules, "inject_mole: target_modules",
                                   f"nn.Linear of {type(model).__name__} outside {config.exclude_modules}")
    pooled = config.pooled_balance_coef()
    if pooled is not None:
        check_one_expert_count({name: config.experts_for(name) for name in targets}, "inject_mole")
        if config.fused == "auto":
            logger.info("MoLE balance='pooled': the layers train with the eager routers, not the fused path "
                        "(fused='auto'), whose router probabilities carry no gradient for the pooled load-balancing "
                        "loss; inference may use it")
    router = config.router_config()
    if config.freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = MoLELinear(base, config.experts_for(name), config.rank, config.alpha, config.dropout, router,
                           config.expert_execution, config.fused, pooled)
        setattr(parent, child, layer)
    install_mask_hooks(model, _mole_modules(model))
    return targets


def collect_router_outputs(model: nn.Module) -> dict[str, RouterOutput]:
    """{MoLE module name: RouterOutput} from the model's latest forward (layers not run are absent)."""
    return {name: m.last_routing for name, m in _mole_modules(model) if m.last_routing is not None}


def check_one_expert_count(counts: dict[str, int], who: str) -> None:
    """Refuse layers {name: expert count} with more than one count: a load-balancing term pooled over layers
    (`MoLEConfig.balance="pooled"`) sums each expert's picks and probabilities over the layers' tokens."""
    if len(set(counts.values())) > 1:
        by_count: dict[int, list[str]] = {}
        for name, count in counts.items():
            by_count.setdefault(count, []).append(name)
        listed = "; ".join(f"{count} experts: {_listed(names)}" for count, names in sorted(by_count.items()))
        raise ValueError(f"{who}: the pooled load-balancing loss (MoLEConfig.balance='pooled') needs one expert "
                         f"count for every MoLE layer, got {listed}; use balance='layer' (per-layer losses) or one "
                         "num_experts")


def _pooled_selection(routing: RouterOutput, top_k: int | None) -> torch.Tensor:
    """(T, K) experts each token counts for in the pooled balance loss (-1: none). A router with a fixed k (top-k,
    GW-MoE, MoR): its top-k, as transformers' `load_balancing_loss_func` (`torch.topk` of the softmax; the library
    routers pick the same experts, ties aside; MoR: the top-k of its mixture, `logits` = log of it). GW-MoE's
    broadcast tokens (routed to every expert in training) count as their top-k, as its per-layer rule. Without a
    fixed k (DynMoLE, dense top-k): the experts the router selected (`indices`, -1 padding)."""
    if top_k is not None and routing.indices.shape[1] != top_k:
        return top_k_indices(routing.logits, top_k)
    return routing.indices


def pooled_balance_loss(routing: dict[str, RouterOutput]) -> torch.Tensor | float:
    """The official MoE-PEFT load-balancing loss of the MoLE layers under `MoLEConfig.balance="pooled"`:
    coef x transformers' `load_balancing_loss_func(tuple of every layer's router logits, E, k, attention_mask)`,

        coef * E * sum_e f_e P_e,   f_e = (# picks of e) / R,   P_e = (sum of p_e) / R,

    sums over the real tokens of ALL pooled layers together (R = layers x real tokens), p the router's softmax
    (`RouterOutput.probs`, with gradient), the picks `_pooled_selection` (no gradient; shares sum to k). Only the
    outputs that carry `pooled_balance` count; 0.0 without any. 0 (not NaN) when every token is padding. In at least
    float32, element-wise products and sums (autocast would run a matmul in bfloat16). Layers with different expert
    counts, or coefficients, are refused by name."""
    pooled = [(name, r) for name, r in routing.items() if getattr(r, "pooled_balance", None) is not None]
    if not pooled:
        return 0.0
    check_one_expert_count({name: r.probs.shape[-1] for name, r in pooled}, "pooled_balance_loss")
    coefs = {r.pooled_balance.coef for _, r in pooled}
    if len(coefs) > 1:
        raise ValueError(f"pooled_balance_loss: the MoLE layers have different pooled balance coefficients {coefs}")
    first = pooled[0][1].probs
    device, dtype = first.device, torch.promote_types(first.dtype, torch.float32)
    num_experts = first.shape[-1]
    picks = torch.zeros(num_experts, dtype=dtype, device=device)  # (E,) picks of real tokens
    mass = torch.zeros(num_experts, dtype=dtype, device=device)  # (E,) summed probabilities of real tokens
    rows: torch.Tensor | int = 0
    for _, r in pooled:
        probs = r.probs.to(device=device, dtype=dtype)  # (T, E)
        chosen = _pooled_selection(r, r.pooled_balance.top_k).to(device)  # (T, K)
        counted = chosen >= 0
        mask = r.pooled_balance.mask
        if mask is None:
            mass = mass + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            mask = mask.to(device)
            counted = counted & mask[:, None]
            mass = mass + (probs * mask[:, None].to(dtype)).sum(0)
            rows = rows + mask.sum()
        picks = picks.scatter_add(0, chosen.clamp_min(0).reshape(-1), counted.reshape(-1).to(dtype))
    total = rows.clamp_min(1).to(dtype) if isinstance(rows, torch.Tensor) else float(max(rows, 1))
    return coefs.pop() * num_experts * (picks * mass).sum() / (total * total)


def mole_aux_loss(routing: dict[str, RouterOutput]) -> torch.Tensor | float:
    """The MoLE routers' loss of one forward: the mean over MoLE layers of each layer's summed (already
    coefficient-scaled) aux losses, plus, under `MoLEConfig.balance="pooled"`, the one load-balancing term over
    all layers pooled (`pooled_balance_loss`, the official MoE-PEFT loss; the routers then have no balance term of
    their own).

    The default ("layer") is not the official MoE-PEFT balance loss (MixLoRA, DynMoLE): that is one term over the
    tokens of all layers pooled (transformers' `load_balancing_loss_func`, whose shares count each of a token's k
    picks: sum k, ours 1), not a mean of per-layer terms; the README's router section lists the differences.
    """
    losses = [r.aux_loss for r in routing.values() if r.aux_losses]
    per_layer = sum(losses) / len(losses) if losses else 0.0
    if any(getattr(r, "pooled_balance", None) is not None for r in routing.values()):
        return per_layer + pooled_balance_loss(routing)
    return per_layer


def check_aux_loss_trains(aux: torch.Tensor | float, loss: torch.Tensor) -> None:
    """Refuse an aux loss that carries no gradient while the LM loss it is added to does.

    The routed layers then ran under `torch.no_grad` inside a gradient-tracking forward: activation checkpointing
    with `use_reentrant=True` does that (its backward recomputes the layers, but the aux losses, read from the
    layers after the forward, are not outputs of the checkpointed function), and the routers would silently train
    without their balance / Tsallis / prior-approximate losses.
    """
    if isinstance(aux, torch.Tensor) and not aux.requires_grad and loss.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "the routers' aux loss has no gradient while the LM loss has one: the routed layers ran under "
            "torch.no_grad, as activation checkpointing with use_reentrant=True runs them (their aux losses would "
            "be lost); enable checkpointing with use_reentrant=False (transformers' default, what parrot.train uses)"
        )


def mole_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable MoLE parameters (experts + routers) of every MoLE layer."""
    return [p for _, m in _mole_modules(model) for n, p in m.named_parameters() if not n.startswith("base.")]


def mole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter + router weights (and router buffers such as the GW-MoE threshold) only; no base weights."""
    state: dict[str, torch.Tensor] = {}
    for name, module in _mole_modules(model):
        for key, value in module.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def load_mole_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `mole_state_dict` saved; every key must match exactly (names and shapes)."""
    expected = mole_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"MoLE state dict mismatch: missing={missing[:5]} (+{max(0, len(missing) - 5)}), "
                       f"unexpected={unexpected[:5]} (+{max(0, len(unexpected) - 5)})")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"MoLE state dict shape mismatch for {bad[:5]}: "
                         f"{[(tuple(expected[k].shape), tuple(state[k].shape)) for k in bad[:5]]}")
    with torch.no_grad():
        for name, module in _mole_modules(model):
            own = {k: v for k, v in module.state_dict().items() if not k.startswith("base.")}
            for key, tensor in own.items():
                tensor.copy_(state[f"{name}.{key}"].to(device=tensor.device, dtype=tensor.dtype))


def write_adapter_files(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                        weights_name: str, config_name: str) -> Path:
    """Adapter weights as safetensors plus their config as JSON, in `directory` (shared by MoLE and PERFT)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / weights_name))
    (directory / config_name).write_text(json.dumps(config, indent=2))
    return directory


def read_adapter_files(directory: str | Path, weights_name: str, config_name: str,
                       what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) written by `write_adapter_files`; a missing config names the path and `what`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / config_name
    if not config_path.is_file():
        raise FileNotFoundError(f"no {what} config at {config_path}")
    return json.loads(config_path.read_text()), load_file(str(directory / weights_name))


def save_mole(model: nn.Module, config: MoLEConfig, directory: str | Path) -> Path:
    """Write the adapter weights (safetensors) and the MoLEConfig (JSON) to `directory`."""
    return write_adapter_files(directory, mole_state_dict(model), config.to_dict(), ADAPTER_WEIGHTS_NAME,
                               ADAPTER_CONFIG_NAME)


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def mole_config_differences(model: nn.Module, config: MoLEConfig) -> list[str]:
    """How the MoLE layers of `model` differ from what `config` would inject: one line per differing setting,
    "field: saved X, model Y" (field names as in `MoLEConfig` / `RouterConfig`, "router." for the latter), with the
    layers it concerns when it is not all of them. Empty when they agree.

    Compared: the layers `target_modules` / `exclude_modules` select (by name: two spellings that select the same
    layers agree), each layer's `num_experts`, `rank`, `alpha`, `dropout`, `balance` ("layer" / "pooled"; under
    "pooled", `router.balance_coef` is the pooled term's coefficient, the layer's), and every router setting the
    router's kind reads (`router_settings`: kind, top_k, renormalize, coefficients, thresholds and
    hyper-parameters), from the live modules, so a setting changed after injection counts. Not compared:
    `expert_execution`, `fused` (the same outputs either way, tested) and `freeze_base` (an injection-time action)."""
    layers = dict(_mole_modules(model))
    differences: list[str] = []
    prefixes = tuple(name + "." for name in layers)  # the wrapped nn.Linear of a MoLE layer is "<layer>.base"
    candidates = [name for name, module in model.named_modules()
                  if name and isinstance(module, (nn.Linear, MoLELinear)) and not name.startswith(prefixes)
                  and not any(part in name for part in config.exclude_modules)]
    selected = {n for n in candidates if any(target_matches(n, t) for t in config.target_modules)}
    if selected != set(layers):
        only_saved = [n for n in candidates if n in selected and n not in layers]
        only_model = [n for n in layers if n not in selected]
        differences.append(
            f"target_modules: saved {list(config.target_modules)} (exclude_modules {list(config.exclude_modules)}) "
            f"select {len(selected)} layers, the model has {len(layers)} MoLE layers"
            + (f"; saved only: {_listed(only_saved)}" if only_saved else "")
            + (f"; model only: {_listed(only_model)}" if only_model else ""))
    shared = [name for name in layers if name in selected]
    compared = []  # (layer, saved settings, model settings)
    for name in shared:
        layer = layers[name]
        dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        current = {"num_experts": layer.experts.num_experts, "rank": layer.experts.rank, "alpha": layer.experts.alpha,
                   "dropout": dropout, **{f"router.{k}": v for k, v in router_settings(layer.router).items()}}
        pooled = getattr(layer, "pooled_balance_coef", None)
        current["balance"] = "layer" if pooled is None else "pooled"
        if pooled is not None:  # its router was built without a balance term: the pooled one's coefficient
            current["router.balance_coef"] = pooled
        try:
            num_experts = config.experts_for(name)
        except ValueError:  # a per-layer list without this layer: only that is reported for it
            compared.append((name, {"num_experts": _NoEntry(config.num_experts)}, current))
            continue
        saved = {"num_experts": num_experts, "rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
                 **{f"router.{k}": v for k, v in built_router_settings(config.router, num_experts).items()},
                 "balance": config.balance}
        compared.append((name, saved, current))
    return differences + settings_differences(compared, len(shared), "layers")


class _NoEntry:
    """A per-layer expert count list's missing entry: differs from every count, shown with the list."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return f"{self.value!r} (no entry for this layer)"


def built_router_settings(config: RouterConfig, num_experts: int) -> dict[str, object]:
    """`router_settings` of the router that `config` builds for `num_experts` experts (defaults resolved as
    `build_router` resolves them), for comparing a saved config with live routers. Built on "meta": no memory."""
    with torch.device("meta"):
        return router_settings(build_router(config, 1, num_experts))


def settings_differences(compared: Iterable[tuple[str, dict, dict]], total: int, unit: str) -> list[str]:
    """One line per differing (field, saved value, model value) over `compared` ((name, saved settings, model
    settings) per layer or block): "field: saved X, model Y", with the `unit` names it concerns when not all `total`.
    A field only one side has is skipped: it is another kind's own setting, and the kind itself differs."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for name, saved, current in compared:
        for field_name in [k for k in saved if k in current]:
            if saved[field_name] != current[field_name]:
                found.setdefault((field_name, repr(saved[field_name]), repr(current[field_name])), []).append(name)
    return [f"{field_name}: saved {ours}, model {theirs}"
            + ("" if len(names) == total else f" ({unit} {_listed(names)})")
            for (field_name, ours, theirs), names in found.items()]


def load_mole(model: nn.Module, directory: str | Path) -> MoLEConfig:
    """Inject MoLE layers from the saved config if the model has none yet, then load the saved weights.

    A model that already has MoLE layers must have been injected with the saved settings: every difference
    (`mole_config_differences`: targets, experts, rank, alpha, dropout, balance, router kind and hyper-parameters) is
    a ValueError listing each differing field with its saved and model value, before any weight is loaded; shapes
    that happen to fit would otherwise load weights trained for another routing."""
    raw, tensors = read_adapter_files(directory, ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, "MoLE adapter")
    config = MoLEConfig(**raw)
    if not _mole_modules(model):
        inject_mole(model, config)
    else:
        differences = mole_config_differences(model, config)
        if differences:
            raise ValueError(f"load_mole: the MoLE adapter in {directory} was saved with other settings than the "
                             f"model's MoLE layers (saved vs model):\n  " + "\n  ".join(differences))
    load_mole_state_dict(model, tensors)
    return config


@torch.no_grad()
def calibrate_gwmoe(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], quantile: float | None = None) -> dict[str, float]:
    """Set every GW-MoE router's threshold to a quantile of its layer's token entropies (GW-MoE, Sec. 3).

    Runs `model(**batch)` for each batch in eval mode (no broadcast, no gradients), gathers each layer's
    uncertainty over non-padding tokens, then calls `router.calibrate`. Returns {layer: threshold}.
    """
    from .routers import GWMoERouter

    layers = {name: m for name, m in _mole_modules(model) if isinstance(m.router, GWMoERouter)}
    if not layers:
        raise ValueError("calibrate_gwmoe: the model has no MoLE layer with a GW-MoE router")
    was_training = model.training
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    try:
        for batch in batches:
            model(**batch)
            for name, routing in collect_router_outputs(model).items():
                if name in gathered:
                    values = routing.stats["uncertainty"]
                    if "mask" in routing.stats:
                        values = values[routing.stats["mask"]]
                    gathered[name].append(values.float().cpu())
    finally:
        model.train(was_training)
    return {name: layers[name].router.calibrate(torch.cat(vals) if vals else torch.empty(0), quantile)
            for name, vals in gathered.items()}
