"""Fused MoLE layer path: router + stacked LoRA experts as one autograd node, ~5 kernels per direction.

Why: at MoLE sizes (E*r ~ 64, thousands of tokens) a GPU runs the eager layer faster than the host can issue its
kernels: the routers' softmax / top-k / scatter / balance-loss ops and their backward are ~20-40 tiny kernels,
each costing a launch (see benchmarks/README.md). Here the whole adapter is

    forward:  z = x [W_gate; A]^T                    one GEMM (gate logits and all experts' rank hidden)
              hs, weights, probs, ... = route(z)       one Triton kernel per token block (kernels.py)
              losses = finalize(partial sums)          one Triton kernel (aux losses, scalars)
              out = base + hs B                        one GEMM (`addmm` into the frozen layer's output)
    backward: dB = dout^T hs, dhs = dout B             two GEMMs
              dz = [d gate | d h] = route_backward()   one Triton kernel (routing recomputed, not stored)
              dx = dz [W_gate; A], dW = dz^T x         two GEMMs (both gradients side by side in dz)

plus two small weight copies (the stacked B in GEMM layout, and the concatenated [W_gate; A]). The math is the
eager routers' (`routers.py`) and `LoRAExperts._stacked`; the tests check values and gradients against them
(on CPU through Triton's interpreter).

When it runs (`MoLEConfig.fused`): "auto" (default) on CUDA tensors with Triton installed; "always" also on
CPU when Triton runs in interpreter mode (`TRITON_INTERPRET=1` set before Triton is imported: slow, for the
tests, whose conftest sets it); "never" keeps the eager path. Either way only where it
applies: a supported router without gate bias (top-k, DynMoLE with q != 1, GW-MoE, MoR), plain LoRA
experts with the stacked executor, no DeepSpeed ZeRO-3 partitioned weights.
With dropout the router still sees the clean input and the experts the dropped one (two GEMMs instead of one).

Where the kernels do not run (CPU, `fused="never"`, torch without Triton) but the layout applies, `shared_gemm_mole` is
the same layout in torch ops: one GEMM with [W_gate; A], the router's own math on the logits (`router.route`), the
stacked executor's second GEMM (`MoLELinear.adapter` picks it; ~20% faster than router + experts on CPU).

Under `torch.compile` the layer traces as one graph (fullgraph) with the same GEMMs as torch ops and the routing
kernels as two registered ops, `parrot::mole_route` and its backward `parrot::mole_route_backward` (fake
implementations for tracing, an autograd formula, `torch.library.opcheck`-tested), so that compiled training,
including `mode="reduce-overhead"` CUDA graphs of a whole step, keeps the fused kernels. Eager calls skip the
op dispatcher (`_FusedMoLE`).

Differences from the eager path (documented, tested): routing is computed in float32 whatever the input dtype (the
eager routers also decide from float32 probabilities -- entropies, top-p sums, the MoR mixture -- and select by the
same gate logits with ties going to the lower expert id, so a bfloat16 layer picks the same experts on both paths
bar float32 rounding at a boundary); the aux losses are float32 scalars; `RouterOutput.weights / probs / logits / indices` are
returned detached (the aux losses carry the router's gradient, and the experts' output carries the routing
weights' gradient, as in eager); indices are in descending score order (eager dense top-k: expert order).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import LoRAExperts
from .routers import (DynMoLERouter, GWMoERouter, MixtureOfRoutersRouter, RouterOutput, RoutingStats, TopKRouter,
                      check_router_inputs, lazy_routing_stats, masked_mean, routing_stats, tsallis_entropy)

try:
    from . import kernels
except ImportError:  # Triton is not installed (e.g. a CPU-only torch build): the eager path serves
    kernels = None

FUSED_MODES = ("auto", "always", "never")
_MAX_TILE = 4096  # elements of the (BLOCK_T, E, r) hidden tile per program


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class RoutingSpec:
    """What the kernels need to know about a router (all of it compile-time constants of the kernels)."""

    kind: int
    top_k: int  # experts per token for the fixed-k kinds (DynMoLE: unused)
    keep_top_k: int = 1
    index_width: int = 0  # columns of RouterOutput.indices
    renormalize: bool = False
    broadcast: bool = False  # GW-MoE training
    uniform: bool = False  # GW-MoE broadcast_weights="uniform"
    num_routers: int = 1  # MoR sub-routers
    top_p: float = 1.0
    dyn_threshold: float = 0.0
    eps: float = 0.0
    tsallis_scale: float = 0.0
    q: float = 1.0
    entropy_scale: float = 1.0
    balance_coef: float = 0.0
    dyn_coef: float = 0.0
    z_coef: float = 0.0
    aux_slots: tuple = ()  # (name, index in the kernels' loss vector) per enabled aux loss, in eager order

    def __post_init__(self) -> None:
        slots = (("tsallis", 1, self.dyn_coef if self.kind == kernels.DYNMOLE else 0.0), ("balance", 0, self.balance_coef),
                 ("z", 2, self.z_coef))
        object.__setattr__(self, "aux_slots", tuple((name, index) for name, index, coef in slots if coef))


def _gates(router: nn.Module) -> tuple[nn.Linear, ...]:
    """The router's gate linear(s), in the column order of its logits: (gate,) or MoR's (sub-routers, main)."""
    return (router.gate, router.main_gate) if isinstance(router, MixtureOfRoutersRouter) else (router.gate,)


def _hook_managed(router: nn.Module, experts: LoRAExperts) -> bool:
    """Whether module hooks materialise these weights at each module call (DeepSpeed ZeRO-3 partitions, accelerate
    offloading leaves them on "meta"): a path that reads several modules' weights at once cannot use them. Checked
    on every call (ZeRO-3 may start after the first forward)."""
    # From the parameter dicts (every child module of a router is a gate), not one nn.Module.__getattr__ per weight:
    # this runs on every forward. A weight that is not in them (a parametrisation's property) by attribute.
    params = experts._parameters
    weights = [params.get("lora_A"), params.get("lora_B"),
               *(gate._parameters.get("weight") for gate in router._modules.values())]
    if any(w is None for w in weights):
        weights = [experts.lora_A, experts.lora_B, *(g.weight for g in _gates(router))]
    return any(hasattr(w, "ds_id") or w.is_meta for w in weights)


def routing_spec(router: nn.Module) -> RoutingSpec | None:
    """The kernel description of `router`, or None if the fused path does not cover it."""
    if any(g.bias is not None for g in _gates(router)):
        return None
    E = router.num_experts
    if type(router) is TopKRouter:
        k = E if router.top_k is None else router.top_k
        return RoutingSpec(kernels.TOPK, k, index_width=k, renormalize=router.renormalize and router.top_k is not None,
                           balance_coef=router.balance_coef, z_coef=router.z_loss_coef)
    if type(router) is GWMoERouter:
        scale = 1.0 / math.log(E) if router.normalize_entropy and E > 1 else 1.0
        return RoutingSpec(kernels.GWMOE, router.top_k, index_width=E if router.training else router.top_k,
                           renormalize=router.renormalize, broadcast=router.training,
                           uniform=router.broadcast_weights == "uniform", eps=router.entropy_eps, entropy_scale=scale,
                           balance_coef=router.balance_coef, z_coef=router.z_loss_coef)
    if type(router) is DynMoLERouter:
        q = router.tsallis_q
        if abs(q - 1.0) < 1e-12:  # the Shannon limit has another derivative: eager only
            return None
        max_entropy = (1.0 - E ** (1.0 - q)) / (q - 1.0)
        if router.normalize_entropy:
            scale = 0.0 if E == 1 else 1.0 / ((q - 1.0) * max_entropy)
        else:
            scale = 1.0 / (q - 1.0)
        return RoutingSpec(kernels.DYNMOLE, E, keep_top_k=router.keep_top_k, index_width=E,
                           renormalize=router.renormalize, top_p=router.top_p, dyn_threshold=router.entropy_threshold,
                           eps=router.entropy_eps, tsallis_scale=scale, q=q, balance_coef=router.balance_coef,
                           dyn_coef=router.dyn_loss_coef, z_coef=router.z_loss_coef)
    if type(router) is MixtureOfRoutersRouter:
        return RoutingSpec(kernels.MOR, router.top_k, index_width=router.top_k, renormalize=router.renormalize,
                           num_routers=router.num_routers, balance_coef=router.balance_coef, z_coef=router.z_loss_coef)
    return None


def fused_applies(mode: str, router: nn.Module, experts: LoRAExperts, x: torch.Tensor) -> bool:
    """Whether `fused_mole` serves this call (see the module docstring for the conditions)."""
    return fused_plan(mode, router, experts, x) is not None


def _settings_key(router: nn.Module, experts: LoRAExperts) -> tuple:
    """Everything a plan is built from: the router's class and plain attributes (training mode, top_k, thresholds,
    coefficients, ...: every public non-module attribute, so a setting added to a router later is covered too),
    whether each gate has a bias, and the experts' plain attributes (execution, sizes, scaling, `act` when None)."""
    return (type(router), *[v for k, v in router.__dict__.items() if k[0] != "_"],
            *[m._parameters.get("bias") is None for m in router._modules.values()],
            *[v for k, v in experts.__dict__.items() if k[0] != "_"])


_MAX_PLANS = 16  # per layer: a memo that settings changes keep growing is cleared (a rebuild costs 20-30 us)


def fused_plan(mode: str, router: nn.Module, experts: LoRAExperts, x: torch.Tensor,
               cache: dict | None = None) -> FusedPlan | None:
    """The layer's `FusedPlan` if the fused path serves this call, else None.

    `cache` (a dict the caller keeps per layer) memoises the plans by the settings they are built from
    (`_settings_key`: the router's and experts' plain attributes, training mode included), so that a setting
    changed after the first forward (top_k, a threshold, a coefficient, train / eval) gets its own plan, as the
    eager router would route with it. Host cost, CPU time on this project's 2-core container: the key ~3 us per
    call (rebuilding the plan instead: 20-30 us); with `_hook_managed` reading the parameter dicts, a whole call
    takes 8.4-9.2 us against 7.8-9.6 us for the earlier memo by training mode alone. Device, dtype and ZeRO-3
    partitioning (which may start after the first forward) are checked on every call. While `torch.compile`
    traces, the plan is built without the memo: the compiled graph guards on the router's attributes it reads
    (a changed setting recompiles), and a memo write would fail a guard on its contents at the next call.
    """
    if mode == "never" or kernels is None:
        return None
    if x.device.type != "cuda" and (mode == "auto" or not kernels.INTERPRETED):
        return None  # off CUDA only Triton's interpreter can run the kernels
    if x.device.type == "cpu" and (x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu")):
        return None  # the interpreter computes in NumPy: no bfloat16
    if _hook_managed(router, experts):
        return None
    if cache is None or torch.compiler.is_compiling():
        return _plan_for(router, experts)
    key = _settings_key(router, experts)
    try:
        return cache[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable attribute value: no memo
        return _plan_for(router, experts)
    if len(cache) >= _MAX_PLANS:
        cache.clear()
    plan = cache[key] = _plan_for(router, experts)
    return plan


def _plan_for(router: nn.Module, experts: LoRAExperts) -> FusedPlan | None:
    return build_plan(router, experts) if experts.act is None and experts.always_stacked() else None


def shared_gemm_applies(router: nn.Module, experts: LoRAExperts) -> bool:
    """Whether `shared_gemm_mole` can serve this layer: plain LoRA experts that always run stacked, one of the four
    MoLE routers without gate bias, no hook-managed weights (ZeRO-3, offloading)."""
    return (type(router) in (TopKRouter, DynMoLERouter, GWMoERouter, MixtureOfRoutersRouter)
            and all(g.bias is None for g in _gates(router)) and experts.act is None and experts.always_stacked()
            and not _hook_managed(router, experts))


def shared_gemm_mole(router: nn.Module, experts: LoRAExperts, x: torch.Tensor, mask: torch.Tensor | None,
                     base: torch.Tensor | None) -> tuple[torch.Tensor, RouterOutput]:
    """The fused path's layout in torch ops, where the kernels do not run (CPU, `fused="never"`): the gate logits
    and every expert's rank hidden from one GEMM with [W_gate; A], the router's own math on those logits
    (`router.route`), then the stacked executor's second GEMM into `base`. Same values as router + experts; the
    input is read once, and the backward's dx and d[W_gate; A] are one GEMM each instead of two (plus an add).
    As on the fused path, the router's and gates' `forward` is not called (hooks on them do not fire); the layer's
    `last_routing` holds the routing. x (T, D_in), mask (T,) or None, base (T, D_out) or None
    -> (out (T, D_out), RouterOutput)."""
    check_router_inputs(x, mask)
    gates = [g.weight for g in _gates(router)]
    G = sum(w.shape[0] for w in gates)
    a_flat = experts.lora_A.reshape(-1, experts.in_features)  # (E*r, D_in)
    logits, h = F.linear(x, torch.cat((*gates, a_flat))).split([G, a_flat.shape[0]], dim=-1)  # (T, G), (T, E*r)
    routing = router.route(logits, mask, x.dtype)
    return experts.stacked_from_hidden(h, routing.weights, base), routing


def _route_forward(plan: FusedPlan, gate: torch.Tensor, h: torch.Tensor, h_offset: int, mask: torch.Tensor | None,
                   threshold: torch.Tensor | None, routed_dtype: torch.dtype):
    """Launch the routing kernels. gate (T, >=G) rows of gate logits; h: the experts' rank hidden, at column
    `h_offset` of its rows (h may be the gate's own GEMM output). -> hs (T, E*r) the hidden scaled by the routing
    weights, routed (2 or 3, T, E), indices (T, KI) int64, work (float32: partial sums | 3 losses | saved)."""
    T = gate.shape[0]
    E, r, EP = plan.num_experts, plan.rank, plan.experts_pow2
    grid = (T + plan.block - 1) // plan.block
    mask = None if mask is None else mask.contiguous()  # the kernels index it by token (e.g. a 2-D mask's column)
    hs = torch.empty(T, E * r, device=gate.device, dtype=h.dtype)
    routed = torch.empty(3 if plan.logits_out else 2, T, E, device=gate.device, dtype=routed_dtype)
    indices = torch.empty(T, plan.index_width, device=gate.device, dtype=torch.long)
    work = torch.empty(grid * 4 * EP + 3 + 2 * EP + 1, device=gate.device, dtype=torch.float32)
    kernels._mole_route_fwd[(grid,)](
        gate, gate.stride(0), h, h.stride(0), gate if mask is None else mask, gate if threshold is None else threshold,
        hs, routed, indices, work, T, **plan.fwd_constexprs, HAS_MASK=mask is not None, H_OFFSET=h_offset)
    kernels._mole_route_finalize[(1,)](work, grid, **plan.finalize_constexprs, BLOCK_NB=min(64, _next_pow2(grid)))
    return hs, routed, indices, work


def _route_backward(plan: FusedPlan, gate: torch.Tensor, h: torch.Tensor, h_offset: int, d_hs: torch.Tensor,
                    mask: torch.Tensor | None, threshold: torch.Tensor | None, work: torch.Tensor,
                    d_losses: torch.Tensor | None, d_gate: torch.Tensor, d_h: torch.Tensor, dh_offset: int) -> None:
    """Launch the routing backward kernel: writes d(gate logits) into d_gate (T, G) and d(rank hidden) into d_h at
    column `dh_offset` (d_h may be d_gate's own buffer). d_losses: the 3 losses' gradient (None: not used)."""
    grid = (gate.shape[0] + plan.block - 1) // plan.block
    mask = None if mask is None else mask.contiguous()
    kernels._mole_route_bwd[(grid,)](
        gate, gate.stride(0), h, h.stride(0), d_hs, gate if mask is None else mask,
        gate if threshold is None else threshold, work, grid, gate if d_losses is None else d_losses,
        d_gate, d_gate.stride(0), d_h, d_h.stride(0), gate.shape[0], **plan.bwd_constexprs, HAS_MASK=mask is not None,
        HAS_G_LOSSES=d_losses is not None, H_OFFSET=h_offset, DH_OFFSET=dh_offset)


def _losses_of(plan: FusedPlan, work: torch.Tensor) -> torch.Tensor:
    """The (3,) aux losses (balance, tsallis, z; already scaled) inside the kernels' work buffer."""
    start = work.shape[0] - (3 + 2 * plan.experts_pow2 + 1)
    return work[start: start + 3]


class _FusedMoLE(torch.autograd.Function):
    """(x, x_experts, base, W_gate, W_main, A, B, mask, threshold) -> (out (T, D_out), losses (3,): balance,
    tsallis, z, already scaled). W_main: MoR's main router (None otherwise). The routing tensors (not
    differentiable) go to `sink`: [(weights, probs, logits) stacked as (2 or 3, T, E), indices, gate logits].

    The eager-mode path: one autograd node for the whole layer, so that the host issues as few calls as possible.
    Under `torch.compile` the same kernels run as the `parrot::mole_route` op instead (`_traced_mole`)."""

    @staticmethod
    def forward(ctx, x, x_experts, base, gate_weight, main_weight, lora_a, lora_b, mask, threshold,
                plan: FusedPlan, sink: list):
        T, D = x.shape
        E, r, G = plan.num_experts, plan.rank, plan.gate_width
        a_flat = lora_a.view(E * r, D)
        gates = (gate_weight,) if main_weight is None else (gate_weight, main_weight)
        if x_experts is None:  # one GEMM for the router(s) and every expert's A
            weight = torch.cat((*gates, a_flat))  # (G + E*r, D)
            z = F.linear(x, weight)  # (T, G + E*r): gate logits, then the rank hidden
            h, h_offset = z, G
        else:
            weight = torch.cat(gates) if main_weight is not None else gate_weight  # (G, D)
            z, h, h_offset = F.linear(x, weight), F.linear(x_experts, a_flat), 0  # (T, G), (T, E*r)
        hs, routed, indices, work = _route_forward(plan, z, h, h_offset, mask, threshold, x.dtype)
        b_flat = lora_b.transpose(1, 2).reshape(E * r, lora_b.shape[1])  # (E*r, D_out), a copy
        out = torch.mm(hs, b_flat) if base is None else torch.addmm(base, hs, b_flat)
        sink.append((routed, indices, z[:, :G]))
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused loss vector
        ctx.save_for_backward(x, x_experts, weight, a_flat, z, h, hs, b_flat, mask, threshold, work)
        ctx.plan, ctx.has_base, ctx.h_offset = plan, base is not None, h_offset
        return out, _losses_of(plan, work)

    @staticmethod
    def backward(ctx, d_out, d_losses):
        x, x_experts, weight, a_flat, z, h, hs, b_flat, mask, threshold, work = ctx.saved_tensors
        plan = ctx.plan
        T, D = x.shape
        E, r, G = plan.num_experts, plan.rank, plan.gate_width
        need_x, need_xe, need_base, need_gate, need_main, need_a, need_b = ctx.needs_input_grad[:7]
        if d_out is None:  # only the aux losses were used
            d_out = hs.new_zeros(T, b_flat.shape[1])
        d_b = torch.mm(d_out.t(), hs).view(-1, E, r).permute(1, 0, 2) if need_b else None  # (E, D_out, r)
        d_hs = F.linear(d_out, b_flat)  # (T, E*r)
        d_z = torch.empty(T, G + E * r, device=x.device, dtype=z.dtype)  # [d gate logits | d rank hidden]
        _route_backward(plan, z, h, ctx.h_offset, d_hs, mask, threshold, work, d_losses, d_z, d_z, G)
        d_x = d_xe = d_gates = d_a = None
        if x_experts is None:  # [gate | h] came from one GEMM with [W_gate; (W_main;) A]
            if need_x:
                d_x = torch.mm(d_z, weight)  # (T, D)
            if need_gate or need_main or need_a:
                d_weight = torch.mm(d_z.t(), x)  # (G + E*r, D)
                d_gates, d_a = d_weight[:G], d_weight[G:].view(E, r, D)
        else:
            d_gate, d_h = d_z[:, :G], d_z[:, G:]
            if need_x:
                d_x = torch.mm(d_gate, weight)
            if need_xe:
                d_xe = torch.mm(d_h, a_flat)
            if need_gate or need_main:
                d_gates = torch.mm(d_gate.t(), x)  # (G, D)
            if need_a:
                d_a = torch.mm(d_h.t(), x_experts).view(E, r, D)
        d_gate_w = d_main = None
        if d_gates is not None:
            d_gate_w = d_gates if plan.gate_rows == G else d_gates[: plan.gate_rows]
            d_main = d_gates[plan.gate_rows:] if need_main else None
        d_base = d_out if ctx.has_base and need_base else None
        return d_x, d_xe, d_base, d_gate_w, d_main, d_a, d_b, None, None, None, None


@dataclass(frozen=True)
class FusedPlan:
    """Everything about the fused path that is fixed for a layer and its router's settings (built once per layer and
    settings, see `fused_plan`): the router's spec, the sizes and the kernels' compile-time arguments. `op_ints` /
    `op_floats` encode it for the `parrot::mole_route` ops (`plan_from_op_args` decodes them)."""

    spec: RoutingSpec
    num_experts: int
    rank: int
    scaling: float
    gate_width: int  # G: gate logit columns (MoR: M*E + M)
    gate_rows: int  # rows of the (first) gate weight: E, or M*E for MoR
    experts_pow2: int
    block: int
    index_width: int
    logits_out: bool
    fwd_constexprs: dict
    bwd_constexprs: dict
    finalize_constexprs: dict
    op_ints: tuple
    op_floats: tuple


def build_plan(router: nn.Module, experts: LoRAExperts) -> FusedPlan | None:
    """The `FusedPlan` of a router and its experts in the router's current mode (None: router not covered);
    `fused_plan` adds the conditions of one call."""
    spec = routing_spec(router)
    if spec is None:
        return None
    return make_plan(spec, experts.num_experts, experts.rank, experts.scaling)


_SPEC_INTS = ("kind", "top_k", "keep_top_k", "index_width", "num_routers")
_SPEC_BOOLS = ("renormalize", "broadcast", "uniform")
_SPEC_FLOATS = ("top_p", "dyn_threshold", "eps", "tsallis_scale", "q", "entropy_scale", "balance_coef", "dyn_coef",
                "z_coef")


def make_plan(spec: RoutingSpec, num_experts: int, rank: int, scaling: float) -> FusedPlan:
    """The `FusedPlan` of a routing spec with E experts of rank r scaled by alpha / r."""
    E, M = num_experts, spec.num_routers
    # EP >= 4: a partial-sum row of the work buffer (EP wide) also carries three per-block scalars (kernels.py).
    EP, RP, MP = max(_next_pow2(E), 4), _next_pow2(rank), _next_pow2(M)
    block = max(1, min(64, _MAX_TILE // (EP * max(RP, MP))))
    block = 1 << (block.bit_length() - 1)  # a power of two
    mor = spec.kind == kernels.MOR
    common = dict(scaling=scaling, top_p=spec.top_p, dyn_threshold=spec.dyn_threshold, eps=spec.eps,
                  tsallis_scale=spec.tsallis_scale, q=spec.q, entropy_scale=spec.entropy_scale,
                  KIND=spec.kind, E=E, EP=EP, R=rank, RP=RP, M=M, MP=MP, K=spec.top_k, KEEP=spec.keep_top_k,
                  RENORM=spec.renormalize, BROADCAST=spec.broadcast, UNIFORM=spec.uniform, BLOCK_T=block)
    op_ints = (*(getattr(spec, f) for f in _SPEC_INTS), *(int(getattr(spec, f)) for f in _SPEC_BOOLS), E, rank)
    op_floats = (*(float(getattr(spec, f)) for f in _SPEC_FLOATS), float(scaling))
    return FusedPlan(
        spec=spec, num_experts=E, rank=rank, scaling=scaling, gate_width=M * E + M if mor else E,
        gate_rows=M * E if mor else E, experts_pow2=EP, block=block, index_width=spec.index_width, logits_out=mor,
        fwd_constexprs=dict(common, KI=spec.index_width),
        bwd_constexprs=dict(common, dyn_coef=spec.dyn_coef, z_coef=spec.z_coef),
        finalize_constexprs=dict(KIND=spec.kind, E=E, EP=EP, balance_coef=spec.balance_coef, dyn_coef=spec.dyn_coef,
                                 z_coef=spec.z_coef),
        op_ints=op_ints, op_floats=op_floats,
    )


@functools.lru_cache(maxsize=None)
def plan_from_op_args(op_ints: tuple, op_floats: tuple) -> FusedPlan:
    """Inverse of `FusedPlan.op_ints / op_floats` (memoised: the ops call it on every launch)."""
    n, b = len(_SPEC_INTS), len(_SPEC_BOOLS)
    values = dict(zip(_SPEC_INTS, op_ints[:n]))
    values.update((name, bool(v)) for name, v in zip(_SPEC_BOOLS, op_ints[n: n + b]))
    values.update(zip(_SPEC_FLOATS, op_floats[:-1]))
    num_experts, rank = op_ints[n + b:]
    return make_plan(RoutingSpec(**values), num_experts, rank, op_floats[-1])


# ----------------------------------------------------------------------------------------------------
# The routing kernels as torch.library ops: what `torch.compile` sees of the fused path
# ----------------------------------------------------------------------------------------------------
# Dynamo cannot trace into `_FusedMoLE`'s kernel launches on every device (and not in the interpreter), so under
# compilation the layer is written with torch ops around one opaque op per direction: the GEMMs and weight copies
# stay visible to the compiler, and the whole step can be captured as a CUDA graph (mode="reduce-overhead").
# The eager path keeps `_FusedMoLE`: a custom op's dispatch costs ~20 us of host time per call.


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernels take a row stride, columns must be dense


if kernels is not None:
    @torch.library.custom_op("parrot::mole_route", mutates_args=())
    def _mole_route_op(gate: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None, threshold: torch.Tensor | None,
                       op_ints: list[int], op_floats: list[float]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate (T, G) logits, h (T, E*r) rank hidden -> hs (T, E*r), routed (2|3, T, E), indices, work."""
        plan = plan_from_op_args(tuple(op_ints), tuple(op_floats))
        return _route_forward(plan, _contiguous_rows(gate), _contiguous_rows(h), 0, mask, threshold, gate.dtype)

    @_mole_route_op.register_fake
    def _(gate, h, mask, threshold, op_ints, op_floats):
        plan = plan_from_op_args(tuple(op_ints), tuple(op_floats))
        T, E, EP = gate.shape[0], plan.num_experts, plan.experts_pow2
        grid = (T + plan.block - 1) // plan.block
        return (h.new_empty(T, E * plan.rank), gate.new_empty(3 if plan.logits_out else 2, T, E),
                gate.new_empty(T, plan.index_width, dtype=torch.long),
                gate.new_empty(grid * 4 * EP + 3 + 2 * EP + 1, dtype=torch.float32))

    @torch.library.custom_op("parrot::mole_route_backward", mutates_args=())
    def _mole_route_backward_op(gate: torch.Tensor, h: torch.Tensor, d_hs: torch.Tensor, mask: torch.Tensor | None,
                                threshold: torch.Tensor | None, work: torch.Tensor, d_work: torch.Tensor | None,
                                op_ints: list[int], op_floats: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> d gate (T, G), d h (T, E*r). d_work: the gradient of `work` (only its loss slots are read)."""
        plan = plan_from_op_args(tuple(op_ints), tuple(op_floats))
        gate, h = _contiguous_rows(gate), _contiguous_rows(h)
        d_gate, d_h = torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(h)
        d_losses = None if d_work is None else _losses_of(plan, d_work.contiguous())
        _route_backward(plan, gate, h, 0, d_hs.contiguous(), mask, threshold, work, d_losses, d_gate, d_h, 0)
        return d_gate, d_h

    @_mole_route_backward_op.register_fake
    def _(gate, h, d_hs, mask, threshold, work, d_work, op_ints, op_floats):
        return torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(h)

    def _mole_route_setup(ctx, inputs, output):
        gate, h, mask, threshold, op_ints, op_floats = inputs
        ctx.mark_non_differentiable(output[1], output[2])  # routed, indices: reported, not differentiated
        ctx.save_for_backward(gate, h, mask, threshold, output[3])
        ctx.op_args = (op_ints, op_floats)

    def _mole_route_grad(ctx, d_hs, d_routed, d_indices, d_work):
        gate, h, mask, threshold, work = ctx.saved_tensors
        if d_hs is None:
            d_hs = torch.zeros_like(h)
        d_gate, d_h = torch.ops.parrot.mole_route_backward(gate, h, d_hs, mask, threshold, work, d_work, *ctx.op_args)
        return d_gate, d_h, None, None, None, None

    _mole_route_op.register_autograd(_mole_route_grad, setup_context=_mole_route_setup)


def _traced_mole(x, x_experts, base, gate_weight, main_weight, lora_a, lora_b, mask, threshold, plan: FusedPlan):
    """`_FusedMoLE` written for `torch.compile`: the same math as torch ops around `parrot::mole_route`.
    -> out (T, D_out), losses (3,), routed, indices, gate logits (T, G)."""
    T, D = x.shape
    E, r, G = plan.num_experts, plan.rank, plan.gate_width
    a_flat = lora_a.reshape(E * r, D)
    gates = (gate_weight,) if main_weight is None else (gate_weight, main_weight)
    if x_experts is None:
        z = F.linear(x, torch.cat((*gates, a_flat)))  # (T, G + E*r)
        gate, h = z[:, :G], z[:, G:]
    else:
        gate, h = F.linear(x, torch.cat(gates)), F.linear(x_experts, a_flat)  # (T, G), (T, E*r)
    hs, routed, indices, work = torch.ops.parrot.mole_route(gate, h, mask, threshold, list(plan.op_ints),
                                                            list(plan.op_floats))
    b_flat = lora_b.transpose(1, 2).reshape(E * r, lora_b.shape[1])  # (E*r, D_out)
    out = torch.mm(hs, b_flat) if base is None else torch.addmm(base, hs, b_flat)
    return out, _losses_of(plan, work), routed, indices, gate.detach()


def fused_mole(router: nn.Module, experts: LoRAExperts, x: torch.Tensor, mask: torch.Tensor | None,
               base: torch.Tensor | None, x_experts: torch.Tensor | None = None,
               plan: FusedPlan | None = None) -> tuple[torch.Tensor, RouterOutput]:
    """base + sum_e w_e(x) delta_e(x_experts) and the RouterOutput, fused (check `fused_plan` first).

    x (T, D_in): the router's input; x_experts: the experts' input when it differs (dropout), else None;
    base (T, D_out) or None; mask (T,) bool or None; plan: `fused_plan(...)` if already computed.
    Returns (out (T, D_out), RouterOutput).
    """
    if plan is None:
        plan = build_plan(router, experts)
    spec = plan.spec
    if spec.kind == kernels.GWMOE and spec.broadcast:
        router._require_threshold()
    gate_weight = router.gate.weight
    main_weight = router.main_gate.weight if spec.kind == kernels.MOR else None
    threshold = router.threshold if spec.kind == kernels.GWMOE else None
    lora_a, lora_b = experts.lora_A, experts.lora_B
    device_type = x.device.type
    args = [x, x_experts, base, gate_weight, main_weight, lora_a, lora_b, mask, threshold, plan]
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # cast as autocast does for the eager path's matmuls
        dtype = torch.get_autocast_dtype(device_type)
        args[:7] = [None if t is None else t.to(dtype) for t in args[:7]]
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            out, losses, routed, indices, gate_logits = _traced_mole(*args)
        else:
            sink: list = []
            out, losses = _FusedMoLE.apply(*args, sink)
            routed, indices, gate_logits = sink[0]
    if plan.logits_out:
        weights, probs, logits = routed.unbind()
    else:
        (weights, probs), logits = routed.unbind(), gate_logits
    aux = {name: losses[i] for name, i in spec.aux_slots}
    main_logits = gate_logits[:, plan.gate_rows:] if plan.logits_out else None  # MoR
    stats = _stats(router, spec, probs, indices, mask, main_logits, gate_logits)
    return out, RouterOutput(weights, indices, probs, logits, aux, stats)


def _stats(router: nn.Module, spec: RoutingSpec, probs: torch.Tensor, indices: torch.Tensor,
           mask: torch.Tensor | None, main_logits: torch.Tensor | None,
           gate_logits: torch.Tensor | None = None) -> RoutingStats:
    """The eager router's lazy statistics, from the fused outputs (DynMoLE's / GW-MoE's uncertainty and broadcast
    flags recomputed from the float32 softmax of the gate logits, as the kernels decided them (not from the returned
    p, which has the input's dtype), MoR's main-router weights from its logits, on first read)."""

    def exact_probs() -> torch.Tensor:
        return probs.float() if gate_logits is None else torch.softmax(gate_logits.float(), dim=-1)

    if spec.kind == kernels.TOPK:
        return lazy_routing_stats(probs, indices, mask)
    if spec.kind == kernels.MOR:
        def compute_mor() -> dict[str, torch.Tensor]:
            values = routing_stats(probs, indices, mask)
            router_weights = torch.softmax(main_logits.float(), dim=-1).to(probs.dtype)  # (T, M)
            values["router_weights"] = masked_mean(router_weights, mask)  # (M,)
            return values
        return RoutingStats(compute_mor)
    if spec.kind == kernels.DYNMOLE:
        def compute() -> dict[str, torch.Tensor]:
            tsallis = tsallis_entropy(exact_probs(), router.tsallis_q, router.entropy_eps, router.normalize_entropy)
            return routing_stats(probs, indices, mask, broadcast=tsallis > router.entropy_threshold,
                                 uncertainty=tsallis.to(probs.dtype))
        return RoutingStats(compute)

    def compute_gw() -> dict[str, torch.Tensor]:
        uncertainty = router.uncertainty(exact_probs())
        broadcast = uncertainty >= router.threshold if spec.broadcast else None
        return routing_stats(probs, indices, mask, broadcast=broadcast, uncertainty=uncertainty.to(probs.dtype))
    return RoutingStats(compute_gw)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed): python scripts/compile_fused_kernels.py --arch 90
# ----------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def compile_kernels(plan: FusedPlan, dtype: torch.dtype = torch.float32, arch: int = 90, masked: bool = True,
                    loss_grads: bool = True) -> list[str]:
    """Compile the forward, aux-loss and backward kernels of `plan` for CUDA compute capability `arch` (e.g. 90 =
    H100) with Triton's bundled compiler, without a GPU; returns the kernel names. Raises what Triton raises.

    Needs Triton's compiler, not its interpreter (TRITON_INTERPRET unset or 0 when Triton was imported).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernels.INTERPRETED:
        raise RuntimeError("compile_kernels needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    # Pointer types as `_FusedMoLE` passes them: an absent mask / threshold / loss gradient is replaced by x, and
    # GW-MoE's threshold buffer is float32 (float64 in a float64 model), whatever the model's dtype.
    data = "*" + _TRITON_DTYPES[dtype]
    wide = _TRITON_DTYPES[torch.promote_types(dtype, torch.float32)]
    threshold = "*" + wide if plan.spec.kind == kernels.GWMOE else data
    mask = "*i1" if masked else data
    G = plan.gate_width
    shared = dict(gate_ptr=data, stride_gate="i32", h_ptr=data, stride_h="i32")
    launches = [
        (kernels._mole_route_fwd,
         dict(shared, mask_ptr=mask, thr_ptr=threshold, hs_ptr=data, routed_ptr=data, idx_ptr="*i64", work_ptr="*fp32",
              T="i32"),
         dict(plan.fwd_constexprs, HAS_MASK=masked, H_OFFSET=G)),
        (kernels._mole_route_finalize, dict(work_ptr="*fp32", NB="i32"), dict(plan.finalize_constexprs, BLOCK_NB=64)),
        (kernels._mole_route_bwd,
         dict(shared, dhs_ptr=data, mask_ptr=mask, thr_ptr=threshold, work_ptr="*fp32", NB="i32",
              g_losses_ptr="*fp32" if loss_grads else data, dgate_ptr=data, stride_dgate="i32", dh_ptr=data,
              stride_dh="i32", T="i32"),
         dict(plan.bwd_constexprs, HAS_MASK=masked, HAS_G_LOSSES=loss_grads, H_OFFSET=G, DH_OFFSET=G)),
    ]
    target = GPUTarget("cuda", arch, 32)
    for fn, signature, constexprs in launches:
        signature = dict(signature, **{name: "constexpr" for name in constexprs})
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
    return [fn.fn.__name__ for fn, _, _ in launches]
