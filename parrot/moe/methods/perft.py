"""PERFT: Parameter-Efficient Routed Fine-Tuning for MoE LLMs (Liu et al., 2024, arXiv 2411.08212).

PEFT experts sit in parallel with each frozen sparse MoE FFN block; their output is added to the block's:

    y = MoE(h) + sum_{j in S(h)} g_j(h) * E_j(h),    E_j(h) = (alpha / r) * W_up,j  sigma(W_down,j h)

with W_down,j in R^{r x D}, W_up,j in R^{D x r}. Verified against the paper's framework description ("functional strategies"):
the general expert form W_up sigma(W_down h), the paper's main setting being LoRA (sigma = identity;
`activation` selects sigma), the PEFT module in parallel with the MoE FFN, and the four variants below.

Checked in the first author's code (github.com/liuyilun2000/PERFUME, the earlier repository of the code that
github.com/liuyilun2000/PERFT describes, same files: `finetune.py`, `math/finetune.py`,
`{olmoe,mixtral}_modification/modeling_*.py`, `configuration_*.py`):
- the LoRA expert's alpha / r scale (`OlmoeBlockLoraExpert`: `self.scaling = lora_alpha / r`), PERFT-D's unit
  gates (each shared adapter's output added as is), PERFT-E's PEFT expert inside expert j, scaled by the base
  router's weight of j;
- PERFT-R's top-k renormalisation: the Mixtral code renormalises always, the OLMoE code only under the base
  config's `norm_topk_prob` (False for OLMoE), and there it scales the PEFT experts by the BASE router's top-k
  weights (`routing_weights[top_x, idx, None]`), apparently a slip. We renormalise (the Mixtral code, MixLoRA).
- The training loss: `finetune.py` builds the model config with `output_router_logits=True` for every variant,
  and the model's forward adds `router_aux_loss_coef` x the load-balancing loss of the FROZEN base routers to the
  cross-entropy (its gradient reaches the PEFT experts of earlier layers through the hidden states), plus, for
  PERFT-R, `shared_routing_adapter_router_aux_loss_coef` x `load_balancing_loss_func` (transformers' Switch loss)
  applied ONCE to the tuple of every layer's PERFT-R router logits (pre-softmax, all layers' tokens pooled,
  padding excluded with the call's `attention_mask`, top-k = the PERFT-R top-k). That coefficient defaults to
  0.01 in the OLMoE config (`math/olmoe_modification/configuration_olmoe.py`), 0.001 in the Mixtral one
  (`mixtral_modification/configuration_mixtral.py`; 0.02 in `commonsense/mixtral_modification/`); no script
  sets it. `perft_forward_kwargs` asks the model call for the first term (the trainer passes it); `perft_aux_loss`
  is the second (`perft_balance_loss`, coefficient `PerftConfig.balance_coef`, default 0.01) plus any other aux
  loss of PERFT-R's library router (e.g. a z-loss), mean over layers.

- PERFT-R (routed):   a new trainable router over N PEFT experts, top-k (any `parrot.moe.routers` router,
                      `RouterConfig`; default softmax top-2 with renormalisation).
- PERFT-E (embedded): N = number of original experts; the frozen original router's choice and weights
                      (its top-k indices and scores) route the PEFT experts, PEFT expert j beside expert j.
- PERFT-D (dense):    N PEFT experts always active, no router (g_j = 1: their outputs are summed).
- PERFT-S (single):   one shared PEFT expert, always active (g = 1).

Only the PEFT experts (and PERFT-R's router) train; `inject_perft` freezes everything else. W_up starts at
zero (LoRA init), so an injected model starts exactly equal to the base model.

Design: the adapter is attached as a child `perft` of each MoE block and added by a forward hook, so the
base model's parameter names (and `save_pretrained` keys) do not change. PERFT-E reads the base router's
output through a forward hook on the block's `gate` (no second router call, no double counting in HF's
router-logit recorders). Deviation: Mixtral's router jitter (off by default) scales the block input in
place, so the PEFT branch then sees the jittered input, exactly as the frozen experts do.

Trainer-facing API:

    cfg = PerftConfig(variant="perft-r", num_experts=4, rank=8, router=RouterConfig(kind="topk", top_k=2))
    blocks = inject_perft(model, cfg)            # -> ["model.layers.0.mlp", ...]
    out = model(input_ids=..., attention_mask=..., labels=...)
    routing = collect_perft_routing(model)       # {block name: RouterOutput} (R and E variants)
    loss = out.loss + perft_aux_loss(model)      # PERFT-R: pooled load balance (+ its router's other aux losses)
    save_perft(model, cfg, out_dir) / load_perft(model, out_dir)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...fileio import is_finite_number
from ..experts import LoRAExperts
from ..mole import (built_router_settings, install_mask_hooks, mole_aux_loss, pooled_balance_loss, read_adapter_files,
                    routing_mask, settings_differences, write_adapter_files)
from ..routers import (PooledBalance, RouterConfig, RouterOutput, build_router, lazy_routing_stats,
                       router_settings)
from .moe_blocks import find_moe_blocks

PERFT_VARIANTS: tuple[str, ...] = ("perft-r", "perft-e", "perft-d", "perft-s")
PERFT_WEIGHTS_NAME = "perft_adapter.safetensors"
PERFT_CONFIG_NAME = "perft_config.json"
_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# The official `shared_routing_adapter_router_aux_loss_coef` default of the OLMoE code (see the module docstring).
PERFT_BALANCE_COEF = 0.01


@dataclass
class PerftConfig:
    """PERFT settings.

    variant: "perft-r" | "perft-e" | "perft-d" | "perft-s".
    num_experts: N PEFT experts per block for R and D (E uses the block's expert count, S uses 1).
    rank: bottleneck width r; alpha: output scale alpha / r (LoRA convention).
    activation: sigma between W_down and W_up: "identity" (LoRA-style, the paper's main setting), "relu",
        "gelu", "silu" (bottleneck adapter).
    dropout: dropout on the PEFT branch input.
    router: PERFT-R's router (a library router; `top_k` must be <= N: `build_router` raises otherwise).
    balance_coef: PERFT-R's load-balancing loss, as the official code: `balance_coef` x transformers'
        `load_balancing_loss_func` over the router logits of ALL PERFT-R routers of the model pooled (one Switch
        loss over every layer's real tokens, padding excluded; `perft_balance_loss`, in `perft_aux_loss`). Default
        0.01, the official OLMoE default (`shared_routing_adapter_router_aux_loss_coef`; its Mixtral code defaults
        to 0.001). The routers are then built without their own per-layer balance loss: `router.balance_coef` is
        not used (their other aux losses, e.g. a z-loss, stay, mean over layers). None: the behaviour before this
        field existed, each router's own per-layer Switch balance (`router.balance_coef`, normalised by k, so 1/k
        of transformers' value), mean over layers.
        A perft_config.json saved before this field existed loads as None (`load_perft`): the per-layer loss it
        was trained with.
    freeze_base: set requires_grad=False on every parameter that existed before injection.
    """

    variant: str = "perft-r"
    num_experts: int = 4
    rank: int = 8
    alpha: float = 16.0
    activation: str = "identity"
    dropout: float = 0.0
    router: RouterConfig = field(default_factory=lambda: RouterConfig(kind="topk", top_k=2))
    balance_coef: float | None = PERFT_BALANCE_COEF
    freeze_base: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):  # from JSON
            self.router = RouterConfig(**self.router)
        if self.variant not in PERFT_VARIANTS:
            raise ValueError(f"PerftConfig.variant={self.variant!r} must be one of {PERFT_VARIANTS}")
        if self.num_experts < 1 or self.rank < 1:
            raise ValueError(f"PerftConfig needs num_experts >= 1 and rank >= 1, got {self.num_experts}, {self.rank}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"PerftConfig.activation={self.activation!r} must be one of {tuple(_ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PerftConfig.dropout={self.dropout} must be in [0, 1)")
        if self.balance_coef is not None and not (is_finite_number(self.balance_coef) and self.balance_coef >= 0.0):
            raise ValueError(f"PerftConfig.balance_coef={self.balance_coef!r} must be a finite number >= 0 or None "
                             "(per-layer balance)")

    def router_config(self) -> RouterConfig:
        """The RouterConfig PERFT-R's routers are built from: without their per-layer balance loss under the pooled
        one (`balance_coef` set), which would otherwise count twice."""
        return self.router if self.balance_coef is None else replace(self.router, balance_coef=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bottleneck_experts(num_experts: int, hidden_size: int, rank: int, alpha: float, activation: str) -> LoRAExperts:
    """N bottleneck PEFT experts E_j(x) = (alpha / r) W_up,j sigma(W_down,j x) on the LoRA-expert executor.

    `lora_A` (N, r, D) holds W_down, `lora_B` (N, D, r) W_up (zero init); with sigma = identity they are
    exactly LoRA experts.
    """
    return LoRAExperts(num_experts, hidden_size, hidden_size, rank, alpha, activation=_ACTIVATIONS[activation]())


class PerftAdapter(nn.Module):
    """The PEFT branch of one MoE block: hidden (B, S, D) -> delta (B, S, D) to add to the block output.

    `last_routing` holds the RouterOutput of the latest forward (PERFT-R / PERFT-E; None for D / S) and
    `last_mask` its (T,) bool token mask (None: every token counts); `token_mask` (B, S_total) is set by the
    model-level mask hooks that `inject_perft` installs. `balance_coef`: PERFT-R's pooled balance coefficient
    (`PerftConfig.balance_coef`; None for the per-layer one and for the other variants).
    """

    def __init__(self, variant: str, hidden_size: int, base_num_experts: int, config: PerftConfig):
        super().__init__()
        self.variant = variant
        num_experts = {"perft-r": config.num_experts, "perft-d": config.num_experts,
                       "perft-e": base_num_experts, "perft-s": 1}[variant]
        self.num_experts = num_experts
        self.experts = bottleneck_experts(num_experts, hidden_size, config.rank, config.alpha, config.activation)
        self.router = build_router(config.router_config(), hidden_size, num_experts) if variant == "perft-r" else None
        self.balance_coef = config.balance_coef if variant == "perft-r" else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.last_routing: RouterOutput | None = None
        self.last_mask: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # set by the model-level MaskCapture pre-hook
        self.token_seq: int | None = None
        self._gate_output: tuple[torch.Tensor, ...] | None = None  # PERFT-E: the frozen router's latest output

    def capture_gate(self, module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> None:
        """Forward hook on the base block's `gate`: keep (logits, scores, indices) for PERFT-E."""
        self._gate_output = output

    def _routing_from_base(self, T: int, mask: torch.Tensor | None, dtype: torch.dtype) -> RouterOutput:
        if self._gate_output is None:
            raise RuntimeError("PERFT-E: the base router produced no output in this forward (gate hook missing?)")
        logits, scores, indices = self._gate_output
        self._gate_output = None
        # The scores stay attached: g_j(h) depends on h through the frozen router, so the gradient reaching h (and
        # every trainable parameter upstream, e.g. earlier layers' PEFT experts) includes dg_j/dh * E_j(h), exactly as
        # the base experts' outputs carry it. Only the logits (diagnostics) are detached.
        logits, scores, indices = logits.reshape(T, -1).detach(), scores.reshape(T, -1), indices.reshape(T, -1)
        weights = torch.zeros(T, self.num_experts, dtype=dtype, device=scores.device).scatter(1, indices, scores.to(dtype))
        probs = F.softmax(logits.float(), dim=-1).to(dtype)
        return RouterOutput(weights, indices, probs, logits, {}, lazy_routing_stats(probs, indices, mask))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        T, D = hidden.shape[0] * hidden.shape[1], hidden.shape[-1]
        flat = hidden.reshape(T, D)  # (T, D)
        mask = routing_mask(self.token_mask, self.token_seq, hidden, "PERFT")
        if self.variant == "perft-r":
            routing = self.router(flat, mask)
        elif self.variant == "perft-e":
            routing = self._routing_from_base(T, mask, flat.dtype)
        else:
            routing = None
        self.last_routing, self.last_mask = routing, mask
        if routing is None:
            weights = flat.new_ones(T, self.num_experts)
            indices = torch.arange(self.num_experts, device=flat.device).expand(T, self.num_experts)
        else:
            weights, indices = routing.weights, routing.indices
        delta = self.experts(self.dropout(flat), weights, indices)  # (T, D)
        return delta.view_as(hidden)


def _add_perft_branch(block: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook on an MoE block: output + PEFT branch of the block's input.

    A block that returns a tuple (hidden, router_logits, ...) -- transformers 4.x style, kept by some 5.x MoE
    blocks -- gets the branch added to its first element, the rest passed through. A block whose (first) output
    is not the input's (B, S, D) shape (e.g. Ernie-4.5-VL's flattened, modality-split tokens) is refused by name.
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    main = output[0] if isinstance(output, tuple) else output
    if not isinstance(main, torch.Tensor) or hidden.dim() != 3 or main.shape != hidden.shape:
        got = tuple(main.shape) if isinstance(main, torch.Tensor) else type(main).__name__
        raise TypeError(f"PERFT: {type(block).__name__} maps hidden states {tuple(hidden.shape)} to {got}"
                        f"{' (first of a tuple)' if isinstance(output, tuple) else ''}; PERFT needs an MoE block "
                        "mapping (B, S, D) -> (B, S, D) (OLMoE, Mixtral, Qwen2-MoE and their relatives)")
    main = main + block.perft(hidden).to(main.dtype)
    return (main, *output[1:]) if isinstance(output, tuple) else main


def perft_adapters(model: nn.Module) -> list[tuple[str, PerftAdapter]]:
    """[(MoE block name, its PerftAdapter)] in model order."""
    return [(name[: -len(".perft")], m) for name, m in model.named_modules() if isinstance(m, PerftAdapter)]


def inject_perft(model: nn.Module, config: PerftConfig) -> list[str]:
    """Attach a PERFT adapter beside every sparse MoE block of `model`; return the block names.

    Raises if the model has no MoE block or already has PERFT adapters.
    """
    if perft_adapters(model):
        raise ValueError("inject_perft: model already has PERFT adapters")
    blocks = find_moe_blocks(model)
    if config.freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, block in blocks:
        gate_weight = block.gate.weight  # (E, D)
        adapter = PerftAdapter(config.variant, gate_weight.shape[1], block.gate.num_experts, config)
        adapter.to(device=gate_weight.device, dtype=gate_weight.dtype)
        block.add_module("perft", adapter)
        block.register_forward_hook(_add_perft_branch, with_kwargs=True)
        if config.variant == "perft-e":
            block.gate.register_forward_hook(adapter.capture_gate)
    install_mask_hooks(model, perft_adapters(model))
    return [name for name, _ in blocks]


def collect_perft_routing(model: nn.Module) -> dict[str, RouterOutput]:
    """{block name: RouterOutput} of the latest forward (PERFT-R and PERFT-E; D / S have no routing)."""
    return {name: a.last_routing for name, a in perft_adapters(model) if a.last_routing is not None}


def perft_balance_loss(model: nn.Module) -> torch.Tensor | float:
    """PERFT-R's load-balancing loss as the official code computes it: `balance_coef` x transformers'
    `load_balancing_loss_func(tuple of every PERFT-R router's logits, N, k, attention_mask)` of the latest forward,
    i.e. `parrot.moe.mole.pooled_balance_loss` (the same term MoLE's `balance="pooled"` uses) over the PERFT-R
    layers' routing with their token masks (`last_mask`). 0.0 without PERFT-R routers under the pooled loss (other
    variants, `balance_coef=None`) or before a forward; 0 (not NaN) when every token is padding.
    """
    pooled = {}
    for name, adapter in perft_adapters(model):
        if adapter.balance_coef is not None and adapter.router is not None and adapter.last_routing is not None:
            share = PooledBalance(adapter.balance_coef, getattr(adapter.router, "top_k", None), adapter.last_mask)
            pooled[name] = replace(adapter.last_routing, pooled_balance=share)
    return pooled_balance_loss(pooled)


def perft_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The PERFT routers' loss of the latest forward, to add to the model's `.loss`: `perft_balance_loss` (PERFT-R
    under the pooled balance loss, the default) plus the mean over blocks of the routers' own (coefficient-scaled)
    aux losses (the per-layer balance with `balance_coef=None`, a z-loss, ...); 0.0 without any (E / D / S)."""
    if isinstance(model, dict):
        raise TypeError("perft_aux_loss takes the model (its PERFT-R balance loss pools all layers' routers and token "
                        "masks), not a routing dict")
    return perft_balance_loss(model) + mole_aux_loss(collect_perft_routing(model))


def perft_forward_kwargs(model: nn.Module) -> dict[str, bool]:
    """Keywords for the model call that make `.loss` the official PERFT training loss minus the PERFT-R router's
    own aux losses (`perft_aux_loss`): `{"output_router_logits": True}`, so transformers adds
    `router_aux_loss_coef` x the load-balancing loss of the frozen base routers to the cross-entropy, as the
    official `finetune.py` (config built with `output_router_logits=True`) for every variant; `{}` for a model
    whose config has no `output_router_logits` (it cannot compute that loss)."""
    return {"output_router_logits": True} if hasattr(getattr(model, "config", None), "output_router_logits") else {}


def perft_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in model.named_parameters()) of the trainable PERFT parameters."""
    return [name for name, _ in model.named_parameters() if ".perft." in f".{name}"]


def perft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT experts (+ PERFT-R router) weights only, keyed by their model parameter names."""
    return {f"{name}.perft.{k}": v.detach().clone() for name, a in perft_adapters(model) for k, v in a.state_dict().items()}


def load_perft_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `perft_state_dict` saved; names and shapes must match exactly."""
    expected = perft_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"PERFT state dict mismatch: missing={missing[:5]} (+{max(0, len(missing) - 5)}), "
                       f"unexpected={unexpected[:5]} (+{max(0, len(unexpected) - 5)})")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"PERFT state dict shape mismatch for {bad[:5]}: "
                         f"{[(tuple(expected[k].shape), tuple(state[k].shape)) for k in bad[:5]]}")
    with torch.no_grad():
        for name, adapter in perft_adapters(model):
            for key, tensor in adapter.state_dict().items():
                tensor.copy_(state[f"{name}.perft.{key}"].to(device=tensor.device, dtype=tensor.dtype))


def save_perft(model: nn.Module, config: PerftConfig, directory: str | Path) -> Path:
    """Write the PERFT weights (safetensors) and config (JSON) to `directory`."""
    return write_adapter_files(directory, perft_state_dict(model), config.to_dict(), PERFT_WEIGHTS_NAME,
                               PERFT_CONFIG_NAME)


def _adapter_settings(adapter: PerftAdapter) -> dict[str, object]:
    """The settings that decide an adapter's output, read from the live modules (by `PerftConfig` field name)."""
    act = adapter.experts.act
    activation = "identity" if act is None else next((name for name, cls in _ACTIVATIONS.items() if type(act) is cls),
                                                      type(act).__name__)
    settings: dict[str, object] = {
        "variant": adapter.variant, "rank": adapter.experts.rank, "alpha": adapter.experts.alpha, "activation": activation,
        "dropout": adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0}
    if adapter.variant in ("perft-r", "perft-d"):
        settings["num_experts"] = adapter.num_experts
    if adapter.router is not None:
        router = router_settings(adapter.router)
        if adapter.balance_coef is not None:  # built without its own balance loss: the pooled one replaces it
            router.pop("balance_coef")
        settings.update({f"router.{k}": v for k, v in router.items()})
        settings["balance_coef"] = adapter.balance_coef
    return settings


def perft_config_differences(model: nn.Module, config: PerftConfig) -> list[str]:
    """How the PERFT adapters of `model` differ from what `config` injects: one line per differing setting,
    "field: saved X, model Y" (variant, num_experts for R / D, rank, alpha, activation, dropout and, for PERFT-R,
    balance_coef and every router setting, "router." prefixed; `router.balance_coef` only where both sides use it,
    i.e. under balance_coef=None), with the blocks it concerns when not all. Empty when they agree."""
    adapters = perft_adapters(model)
    compared = []  # (block, saved settings, model settings)
    for name, adapter in adapters:
        saved: dict[str, object] = {"variant": config.variant, "rank": config.rank, "alpha": config.alpha,
                                    "activation": config.activation, "dropout": config.dropout}
        if config.variant in ("perft-r", "perft-d"):
            saved["num_experts"] = config.num_experts
        if config.variant == "perft-r":
            router = built_router_settings(config.router_config(), config.num_experts)
            if config.balance_coef is not None:
                router.pop("balance_coef")
            saved.update({f"router.{k}": v for k, v in router.items()})
            saved["balance_coef"] = config.balance_coef
        compared.append((name, saved, _adapter_settings(adapter)))
    return settings_differences(compared, len(adapters), "blocks")


def load_perft(model: nn.Module, directory: str | Path) -> PerftConfig:
    """Inject PERFT adapters from the saved config if the model has none, then load the saved weights.

    A model that already has PERFT adapters must have been injected with the saved settings: every difference
    (`perft_config_differences`: variant, experts, rank, alpha, activation, dropout, PERFT-R's router) is a
    ValueError listing each field with its saved and model value, before any weight is loaded (weights whose
    shapes happen to fit would otherwise run under another alpha / activation / routing, silently).
    """
    raw, tensors = read_adapter_files(directory, PERFT_WEIGHTS_NAME, PERFT_CONFIG_NAME, "PERFT")
    raw.setdefault("balance_coef", None)  # saved before the pooled loss existed: trained with the per-layer one
    config = PerftConfig(**raw)
    if not perft_adapters(model):
        inject_perft(model, config)
    else:
        differences = perft_config_differences(model, config)
        if differences:
            raise ValueError(f"load_perft: the PERFT adapter in {directory} was saved with other settings than the "
                             f"model's PERFT adapters (saved vs model):\n  " + "\n  ".join(differences))
    load_perft_state_dict(model, tensors)
    return config
