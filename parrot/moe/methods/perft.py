"""PERFT: Parameter-Efficient Routed Fine-Tuning for MoE LLMs (Liu et al., 2024, arXiv 2411.08212).

PEFT experts sit in parallel with each frozen sparse MoE FFN block; their output is added to the block's:

    y = MoE(h) + sum_{j in S(h)} g_j(h) * E_j(h),    E_j(h) = (alpha / r) * W_up,j  sigma(W_down,j h)

with W_down,j in R^{r x D}, W_up,j in R^{D x r}. Verified against the paper's framework description ("functional strategies"):
the general expert form W_up sigma(W_down h), the paper's main setting being LoRA (sigma = identity;
`activation` selects sigma), the PEFT module in parallel with the MoE FFN, and the four variants below.
Not verified (the official code sits behind an anonymous link we could not read):
PERFT-R's renormalisation over the kept top-k (our default, as MixLoRA), PERFT-D's unit gates, and the
alpha / r output scale (LoRA convention).

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
    loss = out.loss + perft_aux_loss(routing)    # PERFT-R router aux losses (balance / z), mean over layers
    save_perft(model, cfg, out_dir) / load_perft(model, out_dir)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..experts import LoRAExperts
from ..mole import (built_router_settings, install_mask_hooks, mole_aux_loss, read_adapter_files, routing_mask,
                    settings_differences, write_adapter_files)
from ..routers import RouterConfig, RouterOutput, build_router, lazy_routing_stats, router_settings
from .moe_blocks import find_moe_blocks

PERFT_VARIANTS: tuple[str, ...] = ("perft-r", "perft-e", "perft-d", "perft-s")
PERFT_WEIGHTS_NAME = "perft_adapter.safetensors"
PERFT_CONFIG_NAME = "perft_config.json"
_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


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
    freeze_base: set requires_grad=False on every parameter that existed before injection.
    """

    variant: str = "perft-r"
    num_experts: int = 4
    rank: int = 8
    alpha: float = 16.0
    activation: str = "identity"
    dropout: float = 0.0
    router: RouterConfig = field(default_factory=lambda: RouterConfig(kind="topk", top_k=2))
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

    `last_routing` holds the RouterOutput of the latest forward (PERFT-R / PERFT-E; None for D / S);
    `token_mask` (B, S_total) is set by the model-level mask hooks that `inject_perft` installs.
    """

    def __init__(self, variant: str, hidden_size: int, base_num_experts: int, config: PerftConfig):
        super().__init__()
        self.variant = variant
        num_experts = {"perft-r": config.num_experts, "perft-d": config.num_experts,
                       "perft-e": base_num_experts, "perft-s": 1}[variant]
        self.num_experts = num_experts
        self.experts = bottleneck_experts(num_experts, hidden_size, config.rank, config.alpha, config.activation)
        self.router = build_router(config.router, hidden_size, num_experts) if variant == "perft-r" else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.last_routing: RouterOutput | None = None
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
        self.last_routing = routing
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


def perft_aux_loss(routing: dict[str, RouterOutput]) -> torch.Tensor | float:
    """Mean over blocks of the routers' (coefficient-scaled) aux losses; 0 without any (E / D / S)."""
    return mole_aux_loss(routing)


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
        settings.update({f"router.{k}": v for k, v in router_settings(adapter.router).items()})
    return settings


def perft_config_differences(model: nn.Module, config: PerftConfig) -> list[str]:
    """How the PERFT adapters of `model` differ from what `config` injects: one line per differing setting,
    "field: saved X, model Y" (variant, num_experts for R / D, rank, alpha, activation, dropout and, for PERFT-R,
    every router setting, "router." prefixed), with the blocks it concerns when not all. Empty when they agree."""
    adapters = perft_adapters(model)
    compared = []  # (block, saved settings, model settings)
    for name, adapter in adapters:
        saved: dict[str, object] = {"variant": config.variant, "rank": config.rank, "alpha": config.alpha,
                                    "activation": config.activation, "dropout": config.dropout}
        if config.variant in ("perft-r", "perft-d"):
            saved["num_experts"] = config.num_experts
        if config.variant == "perft-r":
            router = built_router_settings(config.router, config.num_experts)
            saved.update({f"router.{k}": v for k, v in router.items()})
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
