"""Shared mixture-of-experts library: routers, expert executors, MoLE layers and routing diagnostics.

- `routers`: `RouterOutput`, `RouterConfig`, `build_router`, `TopKRouter`, `DynMoLERouter`,
  `GWMoERouter`, `MixtureOfRoutersRouter` (same interface: hidden (T, D), mask (T,) -> RouterOutput).
- `experts`: `SwiGLUExperts` (Parrot projector), `LoRAExperts` (MoLE).
- `mole`: `MoLEConfig`, `MoLELinear`, `inject_mole`, `collect_router_outputs`, `mole_aux_loss`,
  `pooled_balance_loss` (the official MoE-PEFT balance term, also PERFT-R's), `check_aux_loss_trains`, `mole_state_dict`, `load_mole_state_dict`, `save_mole`, `load_mole`, `calibrate_gwmoe`.
- `fused` (+ `kernels`, Triton): a MoLE layer's router + stacked experts as one autograd node on CUDA
  (`MoLEConfig.fused`); `MoLELinear` picks it by itself.
- `diagnostics`: `RouterStatsTracker`, `plot_expert_load`.
"""

from .diagnostics import LayerStepStats, RouterStatsTracker, plot_expert_load
from .experts import LoRAExperts, SwiGLUExperts
from .mole import (
    MoLEConfig,
    MoLELinear,
    calibrate_gwmoe,
    check_aux_loss_trains,
    collect_router_outputs,
    inject_mole,
    load_mole,
    load_mole_state_dict,
    mole_aux_loss,
    mole_parameters,
    mole_state_dict,
    pooled_balance_loss,
    save_mole,
)
from .routers import (
    ROUTER_KINDS,
    DynMoLERouter,
    GWMoERouter,
    MixtureOfRoutersRouter,
    PooledBalance,
    RouterConfig,
    RouterOutput,
    RoutingStats,
    TopKRouter,
    build_router,
    lazy_routing_stats,
    tsallis_entropy,
)

__all__ = [
    "ROUTER_KINDS", "DynMoLERouter", "GWMoERouter", "LayerStepStats", "LoRAExperts", "MixtureOfRoutersRouter",
    "MoLEConfig", "MoLELinear", "RouterConfig", "RouterOutput", "RoutingStats", "RouterStatsTracker", "SwiGLUExperts", "TopKRouter",
    "build_router", "calibrate_gwmoe", "check_aux_loss_trains", "collect_router_outputs", "inject_mole", "load_mole", "load_mole_state_dict",
    "mole_aux_loss", "mole_parameters", "mole_state_dict", "plot_expert_load", "pooled_balance_loss", "PooledBalance",
    "save_mole", "tsallis_entropy", "lazy_routing_stats",
]
