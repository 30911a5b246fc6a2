"""Routers: hidden states -> routing weights over experts.

Every router in this library has the same interface so that the executors in `experts.py` and every
user (the Parrot MoE projector on the vision side, MoLE layers on the language side) can swap them:

    router(hidden (T, D), mask (T,) bool | None) -> RouterOutput

`T` is any flattened set of routed items: tokens for MoLE, samples for the Parrot projector (one
pooled text vector per image). `mask` marks real tokens (padding excluded from aux losses and stats).

Routers (build any of them from a `RouterConfig` with `build_router(config, hidden_size, num_experts)`):

- `TopKRouter`          softmax top-k (MixLoRA / Switch baseline; dense soft routing with top_k=None).
- `DynMoLERouter`       Tsallis-entropy hybrid routing (Li et al., 2025, arXiv 2504.00661).
- `GWMoERouter`         Global-Workspace broadcast of uncertain tokens in training (Wu et al., 2024,
                        arXiv 2406.12375); plain top-k at inference.
- `MixtureOfRoutersRouter`  M sub-routers mixed by a main router, then top-k (Zhang et al., 2025,
                        arXiv 2503.23362).

`RouterOutput.stats` is a `RoutingStats` mapping, computed on first read (never on the training hot
path: a step that does not log diagnostics pays nothing for them). Once read it holds (detached):
    "entropy"     (T,)  Shannon entropy of the full router distribution (nats),
    "load"        (E,)  fraction of (valid) tokens that selected each expert,
    "num_active"  (T,)  number of experts selected per token,
    "broadcast"   (T,)  1.0 where a token was soft-routed / broadcast to all experts (DynMoLE, GW-MoE),
    "uncertainty" (T,)  the quantity a router thresholds (Tsallis for DynMoLE, entropy for GW-MoE;
                        equals "entropy" otherwise); GW-MoE calibration reads it,
    "mask"        (T,)  bool, only when a mask was given.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

RouterKind = Literal["topk", "dynmole", "gwmoe", "mor"]
ROUTER_KINDS: tuple[str, ...] = ("topk", "dynmole", "gwmoe", "mor")


@dataclass
class PooledBalance:
    """A routed layer's share of a load-balancing loss pooled over layers (`parrot.moe.mole.pooled_balance_loss`).

    coef: the pooled term's coefficient; top_k: the router's k (None: it has no fixed k, e.g. DynMoLE or dense
    top-k; the experts it selected count); mask: (T,) bool real tokens of the layer's call (None: every token).
    """

    coef: float
    top_k: int | None
    mask: torch.Tensor | None


@dataclass
class RouterOutput:
    """What a router returns.

    weights: (T, E) combine weights, exactly zero for experts that are not selected.
    indices: (T, K) selected expert ids, -1 where a token selected fewer than K experts.
    probs:   (T, E) the router's full probability distribution (for diagnostics and aux losses).
    logits:  (T, E) raw router logits (MoR: log of the mixed distribution).
    aux_losses: named scalar losses, already multiplied by their coefficients (sum them into the loss).
    stats: named diagnostics (detached tensors), see the module docstring; the routers here return a
        lazy `RoutingStats` (computed on first read), a plain dict works too.
    pooled_balance: set by a MoLE layer under `MoLEConfig.balance="pooled"` (None otherwise): what this layer
        contributes to the one load-balancing term over all layers pooled (`parrot.moe.mole.pooled_balance_loss`).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    pooled_balance: PooledBalance | None = None

    @property
    def aux_loss(self) -> torch.Tensor | float:
        return sum(self.aux_losses.values()) if self.aux_losses else 0.0


# ----------------------------------------------------------------------------------------------------
# Helpers (pure functions; the tests check them against naive loops)
# ----------------------------------------------------------------------------------------------------


def shannon_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_e p_e log p_e over the last dim; 0 log 0 := 0."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


def tsallis_entropy(probs: torch.Tensor, q: float, eps: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """Tsallis entropy S_q(p) = (1 - sum_e (p_e + eps)^q) / (q - 1) over the last dim.

    DynMoLE (Li et al., 2025, arXiv 2504.00661, eq. for S_q in Sec. 3). As in the official code
    (mikecovlee/DynMoLE, `moe_peft/common/moe_utils.py`, verified) `eps` is added to every probability
    and, with `normalize`, the value is divided by the maximum S_q of the uniform distribution over E
    experts, (1 - E^(1-q)) / (q - 1), so thresholds live in [0, 1]. q -> 1 gives Shannon entropy.
    """
    if q <= 0:
        raise ValueError(f"Tsallis index q must be > 0, got {q}")
    num_experts = probs.shape[-1]
    if abs(q - 1.0) < 1e-12:
        shifted = probs + eps
        entropy = -(shifted * shifted.log()).sum(-1)
        max_entropy = math.log(num_experts)
    else:
        power_sum = (probs + eps).pow(q).sum(-1)
        max_entropy = (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)
        if normalize and num_experts > 1:  # one scale for 1 / (q - 1) and the normalisation
            return (1.0 - power_sum) * (1.0 / ((q - 1.0) * max_entropy))
        entropy = (1.0 - power_sum) / (q - 1.0)
    if normalize:
        if num_experts == 1:
            return torch.zeros_like(entropy)
        return entropy / max_entropy
    return entropy


def token_weights(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Mask (T,) bool -> (T,) weights 1 / n_valid on valid tokens and 0 on padding (None without a mask).

    Built once per forward so that every masked mean of that forward is one product `weights @ values`.
    """
    if mask is None:
        return None
    m = mask.to(dtype)
    return m / m.sum().clamp_min(1.0)


def token_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the first dim of `values` (T, ...) with `token_weights` (plain mean when None)."""
    if weights is None:
        # No tokens: 0 like a fully masked mean (mean(0) would be NaN and poison the aux losses).
        return values.mean(0) if values.shape[0] else values.sum(0)
    return torch.tensordot(weights, values, dims=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the first dim of `values` (T, ...) counting only rows where mask (T,) is True."""
    return token_mean(values, token_weights(mask, values.dtype))


def _switch_balance(probs: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor | None, coef: float = 1.0,
                    per_token: int | None = None) -> torch.Tensor:
    # coef * E * sum_e f_e P_e with f = a / sum(a), a_e = share of tokens that selected e. `per_token` = the
    # number of experts every token selects (plain top-k): then sum(a) = per_token is known and the
    # normalisation is a constant. Without a mask, sums replace means and 1 / T goes into the one scalar.
    # Fewer kernels matter here: this runs in every routed layer's forward (launch-bound on GPUs).
    num_experts, num_tokens = probs.shape[-1], max(probs.shape[0], 1)
    if tokens is None:
        assignments = torch.count_nonzero(weights, dim=0).to(probs.dtype)  # (E,) counts, no gradient
        prob_mass = probs.sum(0)  # (E,) = T * P
        scale = coef * num_experts / num_tokens  # f uses counts / sum(counts): no 1 / T there
    else:
        assignments = token_mean((weights > 0).to(probs.dtype), tokens)  # (E,)
        prob_mass = token_mean(probs, tokens)  # (E,) = P
        scale = coef * num_experts
    if per_token is not None:  # sum(counts) = k * T (sum of shares = k with a mask)
        return (assignments @ prob_mass) * (scale / (per_token * (num_tokens if tokens is None else 1)))
    # Normalise the (gradient-free) assignments before the product: dividing the product by a clamped sum of 0
    # (every token padded) would give the backward 1 / tiny, which overflows (to inf, then inf * 0 = NaN gradients).
    share = assignments / assignments.sum().clamp_min(torch.finfo(probs.dtype).tiny)
    return scale * (share @ prob_mass)


def load_balance_loss(probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss (Fedus et al., 2021, eq. 4): E * sum_e f_e * P_e.

    f_e is the share of expert assignments that go to e (from the selection in `weights`, no gradient),
    P_e the mean router probability of e. Padding tokens (mask False) are excluded.
    """
    return _switch_balance(probs, weights, token_weights(mask, probs.dtype))


def _z_term(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(logsumexp_e z_te)^2 per token (..., E) -> (...), in the probabilities' dtype: under autocast the gate's
    logits are bfloat16 while the probabilities (and the masked mean's token weights) keep the input's dtype."""
    return torch.logsumexp(logits.to(dtype), dim=-1).square()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al., 2022, eq. 5): mean_t (logsumexp_e z_te)^2 (the routers' own term)."""
    return token_mean(_z_term(logits, logits.dtype), token_weights(mask, logits.dtype))


def top_k_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The `top_k` largest scores per row (T, E) -> expert ids (T, k) in descending score order; equal scores go to
    the lower expert id (a stable sort, as the fused kernels select). `torch.topk` breaks ties arbitrarily (e.g. all
    equal logits of a zero-initialised gate, or bfloat16 logits that round to the same value), which would make the
    choice of expert depend on the backend."""
    return scores.detach().sort(dim=-1, descending=True, stable=True).indices[:, :top_k]


def topk_weights(probs: torch.Tensor, top_k: int | None, renormalize: bool,
                 logits: torch.Tensor | None = None,
                 scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-k probabilities per row (all when top_k is None); optionally renormalise them.

    Returns weights (T, E) with zeros outside the selection and indices (T, K). The experts are the k largest
    `scores` (default: the logits when given, else the probabilities; see `top_k_indices` for ties). With `logits`
    (probs = softmax(logits)) the renormalised top-k probabilities are computed as the softmax of the top-k
    logits, p_i / sum_{j in top-k} p_j = exp(z_i) / sum_{j in top-k} exp(z_j): the same values and
    gradients without a sum, clamp and division (and their backward).
    """
    num_experts = probs.shape[-1]
    if top_k is None or top_k >= num_experts:
        indices = torch.arange(num_experts, device=probs.device).expand(probs.shape[0], num_experts)
        weights = probs
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        return weights, indices
    if scores is None:
        scores = probs if logits is None else logits  # softmax is monotone: the same experts (logits: no rounding)
    indices = top_k_indices(scores, top_k)  # (T, k)
    if renormalize and logits is not None:
        top_p = _softmax(logits.gather(-1, indices), probs.dtype)
    else:
        top_p = probs.gather(-1, indices)  # (T, k)
        if renormalize:  # on the k kept values, before scattering them into (T, E)
            top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.zeros_like(probs).scatter(-1, indices, top_p), indices


def indices_from_selection(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Selected experts (T, E) bool -> ids (T, E) sorted by descending probability, -1 padding at the end."""
    order = probs.detach().argsort(dim=-1, descending=True, stable=True)  # (T, E); ties: lower expert id first
    chosen = selected.gather(-1, order)  # (T, E) bool, in probability order
    # Stable sort pushes the unselected (False -> key 1) behind the selected while keeping probability order.
    perm = (~chosen).to(torch.int8).argsort(dim=-1, stable=True)
    order, chosen = order.gather(-1, perm), chosen.gather(-1, perm)
    return torch.where(chosen, order, torch.full_like(order, -1))


def selection_from_indices(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Indices (T, K) with -1 padding -> bool selection (T, E)."""
    valid = indices >= 0
    one_hot = F.one_hot(indices.clamp_min(0), num_experts).to(torch.bool) & valid[..., None]  # (T, K, E)
    return one_hot.any(dim=1)


def routing_stats(
    probs: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    broadcast: torch.Tensor | None = None,
    uncertainty: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The diagnostics every router reports (see the module docstring), all detached, computed now."""
    probs = probs.detach()
    selected = selection_from_indices(indices, probs.shape[-1]).to(probs.dtype)  # (T, E)
    entropy = shannon_entropy(probs)
    stats = {
        "entropy": entropy,
        "load": masked_mean(selected, mask),
        "num_active": selected.sum(-1),
        "broadcast": torch.zeros_like(entropy) if broadcast is None else broadcast.detach().to(probs.dtype),
        "uncertainty": entropy if uncertainty is None else uncertainty.detach(),
    }
    if mask is not None:
        stats["mask"] = mask.detach().to(torch.bool)
    return stats


class RoutingStats(Mapping[str, torch.Tensor]):
    """Routing diagnostics computed on first read: `compute()` runs once, when a key is first looked up.

    Routers return this instead of a dict so that the ~15 small kernels of `routing_stats` (and the
    uncertainty of GW-MoE in eval mode) stay off the training hot path; only steps that read
    `RouterOutput.stats` (a `RouterStatsTracker.update`, GW-MoE calibration) pay for them. `compute`
    closes over the forward's detached tensors, so the values are those of that forward.
    """

    def __init__(self, compute: Callable[[], dict[str, torch.Tensor]]):
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute
        self._values: dict[str, torch.Tensor] | None = None

    @property
    def computed(self) -> bool:
        return self._values is not None

    def _materialize(self) -> dict[str, torch.Tensor]:
        if self._values is None:
            self._values = self._compute()
            self._compute = None  # drop the closure's references
        return self._values

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialize())

    def __len__(self) -> int:
        return len(self._materialize())

    def __repr__(self) -> str:
        return f"RoutingStats({self._values!r})" if self.computed else "RoutingStats(<not computed yet>)"


def lazy_routing_stats(
    probs: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    broadcast: torch.Tensor | None = None,
    uncertainty: torch.Tensor | None = None,
) -> RoutingStats:
    """`routing_stats` with the same arguments, deferred to the first read (see `RoutingStats`)."""
    detach = lambda t: None if t is None else t.detach()  # noqa: E731 - keep no autograd graph alive
    return RoutingStats(partial(routing_stats, probs.detach(), indices, mask, detach(broadcast), detach(uncertainty)))


def check_router_inputs(hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"router expects hidden states (T, D), got shape {tuple(hidden.shape)}")
    if mask is not None and mask.shape != hidden.shape[:1]:
        raise ValueError(f"router mask must have shape (T,)={tuple(hidden.shape[:1])}, got {tuple(mask.shape)}")


def _softmax(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Softmax in at least float32 (Switch "selective precision"); float64 stays float64 for the tests.
    compute = torch.promote_types(logits.dtype, torch.float32)
    return F.softmax(logits, dim=-1, dtype=compute).to(dtype)


def _softmax_exact(logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(p in at least float32, p in `dtype`): the first for routing decisions, the second for the outputs (the same
    tensor unless `dtype` is narrower, e.g. a bfloat16 model). Decisions such as a Tsallis / Shannon entropy against
    a threshold (1 - sum p^q cancels), a top-p cumulative sum or a mixture of distributions must not see bfloat16
    probabilities: a few percent of the tokens would be routed otherwise than their logits say (and than the fused
    kernels, which route in float32, route them)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    exact = F.softmax(logits, dim=-1, dtype=compute)
    return exact, exact.to(dtype)


# ----------------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------------


class TopKRouter(nn.Module):
    """Linear softmax router with optional top-k selection (MixLoRA / Switch style).

    p = softmax(W x) (Shazeer et al., 2017; Parrot, Sun et al., 2024, eq. 3). With `top_k=None` all
    experts are used with weights p (dense soft routing, as the Parrot projector does); otherwise the
    top-k probabilities are kept and, with `renormalize`, rescaled to sum to one (MixLoRA, Li et al.,
    2024, arXiv 2404.15159, Sec. 3: top-2 with renormalisation; official MoE-PEFT default aux
    coefficient 0.001, verified in `moe_peft/adapters/mixlora/config.py`).
    Aux losses: Switch load balance (`balance_coef`) and ST-MoE z-loss (`z_loss_coef`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int | None = None,
        renormalize: bool = True,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}] or None (dense)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        check_router_inputs(hidden, mask)
        return self.route(self.gate(hidden), mask, hidden.dtype)

    def route(self, logits: torch.Tensor, mask: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> RouterOutput:
        """The routing of gate logits (T, E) already computed (`forward` = route(gate(hidden))); dtype: of the
        probabilities, the hidden states' (default: the logits')."""
        probs = _softmax(logits, dtype or logits.dtype)
        weights, indices = topk_weights(probs, self.top_k, self.renormalize and self.top_k is not None, logits)
        tokens = token_weights(mask, probs.dtype)
        aux: dict[str, torch.Tensor] = {}
        if self.balance_coef:
            fixed_k = self.top_k if self.top_k is not None and self.top_k < self.num_experts else None
            aux["balance"] = _switch_balance(probs, weights, tokens, self.balance_coef, fixed_k)
        if self.z_loss_coef:
            aux["z"] = self.z_loss_coef * token_mean(_z_term(logits, probs.dtype), tokens)
        return RouterOutput(weights, indices, probs, logits, aux, lazy_routing_stats(probs, indices, mask))


class DynMoLERouter(nn.Module):
    """DynMoLE hybrid routing by Tsallis entropy (Li et al., 2025, arXiv 2504.00661, Sec. 3).

    Per token: p = softmax(W x); S = S_q(p) (normalised Tsallis entropy, see `tsallis_entropy`).
    - S > entropy_threshold  -> soft routing over all experts (router uncertain);
    - otherwise              -> top-p routing: experts sorted by p, keep those whose cumulative
                                probability is <= top_p, and always at least `keep_top_k` (top_p = 1:
                                every expert, though a cumulative sum may round past 1).
    Combine weights are the original probabilities of the active experts; the official code does not
    renormalise them (`renormalize=False` by default, flag to change it).
    Aux loss (official `_dynamic_load_balancing_loss_func`): c_dyn * mean_t S_q(p_t) + c_aux * L_lb with
    L_lb = E * sum_e mean_t(masked weights_te) * mean_t(p_te) -- f_e uses the masked (unrenormalised)
    weights and carries gradient, as in the official code.

    Defaults are the official `DynMoleConfig.from_config` values (verified in mikecovlee/DynMoLE,
    `moe_peft/adapters/dynmole/config.py`): q=1.1, threshold=0.9, eps=1e-5, keep_top_k=2, top_p=0.75,
    c_aux=0.001, c_dyn=0.01. Deviation: the official loss pools all layers' tokens and includes padding
    tokens; here each layer's loss is computed separately over non-padding tokens (average the layers).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        tsallis_q: float = 1.1,
        entropy_threshold: float = 0.9,
        top_p: float = 0.75,
        keep_top_k: int = 2,
        renormalize: bool = False,
        dyn_loss_coef: float = 0.01,
        balance_coef: float = 0.001,
        z_loss_coef: float = 0.0,
        entropy_eps: float = 1e-5,
        normalize_entropy: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        if not 1 <= keep_top_k <= num_experts:
            raise ValueError(f"keep_top_k={keep_top_k} must be in [1, num_experts={num_experts}]")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        self.num_experts = num_experts
        self.top_k = None  # variable number of experts per token
        self.tsallis_q = tsallis_q
        self.entropy_threshold = entropy_threshold
        self.top_p = top_p
        self.keep_top_k = keep_top_k
        self.renormalize = renormalize
        self.dyn_loss_coef = dyn_loss_coef
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.entropy_eps = entropy_eps
        self.normalize_entropy = normalize_entropy
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        check_router_inputs(hidden, mask)
        return self.route(self.gate(hidden), mask, hidden.dtype)

    def route(self, logits: torch.Tensor, mask: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> RouterOutput:
        """The routing of gate logits (T, E) already computed (see `TopKRouter.route`)."""
        # The routing decisions (top-p, Tsallis threshold) from p in at least float32 (`_softmax_exact`).
        exact, probs = _softmax_exact(logits, dtype or logits.dtype)
        # Experts in descending probability (ties: lower expert id first, as the fused kernels); no gradient flows
        # through the selection.
        sorted_p, order = exact.detach().sort(dim=-1, descending=True, stable=True)  # (T, E)
        # Top-p keeps a prefix of each sorted row (cumulative sums of probabilities only grow), at least
        # keep_top_k long; soft routing keeps the whole row, so the active set stays a prefix.
        if self.top_p >= 1.0:  # every expert: cumulative sums may round past 1.0 and drop the last ones
            active_sorted = torch.ones_like(sorted_p, dtype=torch.bool)  # (T, E)
        else:
            active_sorted = sorted_p.cumsum(-1) <= self.top_p  # (T, E), sorted order
        active_sorted[:, : self.keep_top_k] = True
        tsallis = tsallis_entropy(exact, self.tsallis_q, self.entropy_eps, self.normalize_entropy)  # (T,)
        soft = tsallis > self.entropy_threshold  # (T,)
        tsallis = tsallis.to(probs.dtype)  # the aux loss and the statistics in the probabilities' dtype
        active_sorted |= soft[:, None]
        selected = torch.zeros_like(active_sorted).scatter(-1, order, active_sorted)  # (T, E) bool, expert order
        masked = probs * selected  # (T, E) original probabilities of active experts
        weights = masked
        if self.renormalize:
            weights = masked / masked.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        # The active prefix in probability order, -1 after it (what `indices_from_selection` computes).
        indices = torch.where(active_sorted, order, -1)  # (T, E)
        tokens = token_weights(mask, probs.dtype)
        aux: dict[str, torch.Tensor] = {}
        if self.dyn_loss_coef:
            aux["tsallis"] = self.dyn_loss_coef * token_mean(tsallis, tokens)
        if self.balance_coef:
            num_experts = probs.shape[-1]
            aux["balance"] = self.balance_coef * num_experts * (token_mean(masked, tokens) @ token_mean(probs, tokens))
        if self.z_loss_coef:
            aux["z"] = self.z_loss_coef * token_mean(_z_term(logits, probs.dtype), tokens)
        stats = lazy_routing_stats(probs, indices, mask, broadcast=soft, uncertainty=tsallis)
        return RouterOutput(weights, indices, probs, logits, aux, stats)


_UNSET_THRESHOLD = ("GWMoERouter threshold is unset: give RouterConfig.gw_threshold, or run "
                     "parrot.moe.mole.calibrate_gwmoe / router.calibrate(entropies, quantile) before training")


class GWMoERouter(nn.Module):
    """GW-MoE: broadcast uncertain tokens to all experts during fine-tuning (Wu et al., 2024, arXiv 2406.12375).

    Uncertainty u(x) = H(p) = -sum_e p_e log(p_e + eps) (official `calc_entropy`, eps=1e-5, natural log,
    not normalised; verified in WaitHZ/GW-MoE `modeling_switch_transformers.py`; `normalize_entropy`
    divides by log E). In training, tokens with u >= threshold are broadcast: every expert processes
    them, combined with the full softmax p (`broadcast_weights="softmax"`, the official choice) or 1/E
    (`"uniform"`); other tokens use top-k (optionally renormalised). In eval mode routing is plain top-k,
    so inference costs nothing extra. The official scripts use threshold 1.6 nats for Switch-base-8
    (`run_glue.sh`); here it is set directly (`threshold`) or as a quantile of the entropies measured
    before fine-tuning (`calibrate(entropies, quantile)`; `parrot.moe.mole.calibrate_gwmoe` runs that pass).
    The threshold is a buffer, so it is saved with the adapter weights. It stays in at least float32 whatever
    dtype the module is cast to (`_apply`): a bfloat16 threshold (8 significant bits) would move the broadcast
    boundary by up to ~0.4% and route tokens near it otherwise than calibrated; the uncertainty it is compared with
    is computed in float32 as well (`_softmax_exact`). A saved state with a narrower threshold (adapters written
    before this rule) loads into it as its (already rounded) value.
    Balance loss (training and eval alike): the Switch loss over each token's top-k selection, broadcast tokens
    counted by their top-k experts, not as selecting every expert. This is the official rule: the official
    Switch-Transformers code returns each token's top-1 `expert_index` (`torch.argmax(router_mask)`) from the
    sparse MLP whether or not the token was broadcast, and `load_balancing_loss_func` counts only that index
    (WaitHZ/GW-MoE, `transformers/models/switch_transformers/modeling_switch_transformers.py`, verified); top-k
    is its generalisation to our k. The broadcast is an extra pass for uncertain tokens, so it does not push
    the router towards the experts that broadcast tokens happen to reach.
    Deviation: the official code also caps broadcast tokens per sequence (`max_num_slots`); we do not cap.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        renormalize: bool = True,
        threshold: float | None = None,
        quantile: float | None = None,
        broadcast_weights: Literal["softmax", "uniform"] = "softmax",
        normalize_entropy: bool = False,
        entropy_eps: float = 1e-5,
        balance_coef: float = 0.001,
        z_loss_coef: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if broadcast_weights not in ("softmax", "uniform"):
            raise ValueError(f"broadcast_weights must be 'softmax' or 'uniform', got {broadcast_weights!r}")
        if quantile is not None and not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile={quantile} must be in [0, 1]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.quantile = quantile
        self.broadcast_weights = broadcast_weights
        self.normalize_entropy = normalize_entropy
        self.entropy_eps = entropy_eps
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)
        self.threshold_setting = None if threshold is None else float(threshold)  # RouterConfig.gw_threshold
        self.register_buffer("threshold", torch.tensor(float("nan") if threshold is None else float(threshold),
                                                       dtype=torch.float32))
        # (the threshold tensor, its version counter) when last found set: the NaN check reads the
        # value on the host (a device sync on GPUs), so it runs again only after the buffer changed.
        self._threshold_checked: tuple[weakref.ref, int] | None = None

    def _apply(self, fn, recurse: bool = True):
        # A dtype cast of the module (`.to(torch.bfloat16)`, `.half()`) must not round the threshold: keep it in at
        # least float32 (the value before the cast, on the device after it). Widening casts (`.double()`) apply.
        before = self._buffers["threshold"]
        super()._apply(fn, recurse)
        self._keep_threshold_exact(before)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # `load_state_dict(assign=True)` installs the saved tensor itself: widen a narrower saved threshold.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_threshold_exact(self._buffers["threshold"])

    def _keep_threshold_exact(self, source: torch.Tensor) -> None:
        current = self._buffers["threshold"]
        wide = torch.promote_types(current.dtype, torch.float32)
        if current.dtype != wide:
            self._buffers["threshold"] = source.to(device=current.device, dtype=wide)

    def uncertainty(self, probs: torch.Tensor) -> torch.Tensor:
        entropy = -(probs * (probs + self.entropy_eps).log()).sum(-1)
        if self.normalize_entropy and self.num_experts > 1:
            entropy = entropy / math.log(self.num_experts)
        return entropy

    @torch.no_grad()
    def calibrate(self, entropies: torch.Tensor, quantile: float | None = None) -> float:
        """Set the threshold to the `quantile` of `entropies` (uncertainties of valid tokens, any shape); returns the
        stored threshold (the quantile in the buffer's dtype, float32 unless the router is float64)."""
        quantile = self.quantile if quantile is None else quantile
        if quantile is None:
            raise ValueError("GWMoERouter.calibrate needs a quantile (argument or RouterConfig.gw_quantile)")
        values = entropies.detach().reshape(-1).double()
        if values.numel() == 0:
            raise ValueError("GWMoERouter.calibrate got no entropies (empty calibration pass?)")
        self.threshold.fill_(torch.quantile(values, quantile).item())
        return self.threshold.item()  # the value routing compares with (float32 unless the router is float64)

    def _require_threshold(self) -> None:
        if torch.compiler.is_compiling():  # no host read inside a compiled graph: a device-side assert instead
            torch._assert_async(~torch.isnan(self.threshold), _UNSET_THRESHOLD)
            return
        current = self.threshold
        if self._threshold_checked is not None:
            checked, version = self._threshold_checked
            if checked() is current and version == current._version:
                return
        if torch.isnan(current):
            raise RuntimeError(_UNSET_THRESHOLD)
        self._threshold_checked = (weakref.ref(current), current._version)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        check_router_inputs(hidden, mask)
        return self.route(self.gate(hidden), mask, hidden.dtype)

    def route(self, logits: torch.Tensor, mask: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> RouterOutput:
        """The routing of gate logits (T, E) already computed (see `TopKRouter.route`)."""
        # The uncertainty (thresholded, and read by calibration) from p in at least float32 (`_softmax_exact`).
        exact, probs = _softmax_exact(logits, dtype or logits.dtype)
        weights, indices = topk_weights(probs, self.top_k, self.renormalize, logits)
        selection = weights  # the top-k selection, which the balance loss counts (see the class docstring)
        if self.training:
            self._require_threshold()
            uncertainty = self.uncertainty(exact.detach())  # (T,), no gradient (a decision and a statistic)
            # Not restricted by `mask`: routing must not depend on it (activation checkpointing may
            # recompute without it); padding is excluded from aux losses and stats instead.
            broadcast = uncertainty >= self.threshold
            full = probs if self.broadcast_weights == "softmax" else 1.0 / self.num_experts
            weights = torch.where(broadcast[:, None], full, weights)
            all_experts = torch.arange(self.num_experts, device=logits.device)  # (E,)
            padded = F.pad(indices, (0, self.num_experts - self.top_k), value=-1)  # (T, E)
            indices = torch.where(broadcast[:, None], all_experts, padded)  # (T, E)
            stats = lazy_routing_stats(probs, indices, mask, broadcast=broadcast,
                                       uncertainty=uncertainty.to(probs.dtype))
        else:  # plain top-k: the uncertainty is only a diagnostic (calibration reads it), computed lazily
            probs_now, exact_now, mask_now = probs.detach(), exact.detach(), mask
            stats = RoutingStats(lambda: routing_stats(probs_now, indices, mask_now,
                                                       uncertainty=self.uncertainty(exact_now).to(probs_now.dtype)))
        tokens = token_weights(mask, probs.dtype)
        aux: dict[str, torch.Tensor] = {}
        if self.balance_coef:  # broadcast tokens count as their top-k (the official rule): k experts per token
            aux["balance"] = _switch_balance(probs, selection, tokens, self.balance_coef, self.top_k)
        if self.z_loss_coef:
            aux["z"] = self.z_loss_coef * token_mean(_z_term(logits, probs.dtype), tokens)
        return RouterOutput(weights, indices, probs, logits, aux, stats)


class MixtureOfRoutersRouter(nn.Module):
    """Mixture of Routers (Zhang et al., 2025, arXiv 2503.23362, Sec. 3).

    M sub-routers give p^(j) = softmax(W_j x) over E experts; a main router gives w = softmax(W_m x) over
    the M sub-routers; the joint distribution p = sum_j w_j p^(j) is routed top-k (renormalised by
    default, as in the MixLoRA base it plugs into). `gate` stacks the sub-routers (D -> M*E),
    `main_gate` is the main router (D -> M). Aux: Switch balance on the joint p; z-loss on the
    sub-router logits. `RouterOutput.logits` is log p (the joint distribution has no single logit).
    Not verified against the paper/official code (the official code link is an anonymous mirror we
    could not read): that sub-router outputs are softmaxed before mixing, the default M, and which
    balance loss applies.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_routers: int = 3,
        top_k: int = 2,
        renormalize: bool = True,
        balance_coef: float = 0.001,
        z_loss_coef: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if num_routers < 1:
            raise ValueError(f"num_routers={num_routers} must be >= 1")
        self.num_experts = num_experts
        self.num_routers = num_routers
        self.top_k = top_k
        self.renormalize = renormalize
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(hidden_size, num_routers * num_experts, bias=bias)
        self.main_gate = nn.Linear(hidden_size, num_routers, bias=bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        check_router_inputs(hidden, mask)
        return self._route(self.gate(hidden), self.main_gate(hidden), mask, hidden.dtype)

    def route(self, logits: torch.Tensor, mask: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> RouterOutput:
        """The routing of gate logits already computed: (T, M*E + M), the sub-routers' then the main router's
        (see `TopKRouter.route`)."""
        sub, main = logits.split([self.num_routers * self.num_experts, self.num_routers], dim=-1)
        return self._route(sub, main, mask, dtype or logits.dtype)

    def _route(self, sub_logits: torch.Tensor, main_logits: torch.Tensor, mask: torch.Tensor | None,
               dtype: torch.dtype) -> RouterOutput:
        T = sub_logits.shape[0]
        sub_logits = sub_logits.reshape(T, self.num_routers, self.num_experts)  # (T, M, E)
        # The mixture and its top-k in at least float32 (as `_softmax_exact`): mixed in bfloat16, p of different
        # experts round to the same value or swap order, and ~1-3% of the tokens would pick another expert.
        compute = torch.promote_types(sub_logits.dtype, torch.float32)
        sub_probs = _softmax(sub_logits, compute)  # (T, M, E)
        router_weights = _softmax(main_logits, compute)  # (T, M)
        # A weighted sum, not einsum: autocast would run an einsum in bfloat16
        probs = (router_weights[:, :, None] * sub_probs).sum(1)  # (T, E)
        logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        # log p as the logits: the softmax of the top-k log-probabilities is the renormalised top-k p; the experts
        # are the top-k of p itself (as the fused kernels select), not of its rounded logarithm.
        weights, indices = topk_weights(probs, self.top_k, self.renormalize, logits, scores=probs)
        # The outputs in `dtype` (no-ops unless it is narrower than float32).
        probs, logits, weights, router_weights = (t.to(dtype) for t in (probs, logits, weights, router_weights))
        tokens = token_weights(mask, probs.dtype)
        aux: dict[str, torch.Tensor] = {}
        if self.balance_coef:
            aux["balance"] = _switch_balance(probs, weights, tokens, self.balance_coef, self.top_k)
        if self.z_loss_coef:
            z_per_token = _z_term(sub_logits, probs.dtype).mean(-1)  # (T,)
            aux["z"] = self.z_loss_coef * token_mean(z_per_token, tokens)
        probs_now, router_weights_now = probs.detach(), router_weights.detach()

        def stats() -> dict[str, torch.Tensor]:
            values = routing_stats(probs_now, indices, mask)
            values["router_weights"] = masked_mean(router_weights_now, mask)  # (M,)
            return values

        return RouterOutput(weights, indices, probs, logits, aux, RoutingStats(stats))


# ----------------------------------------------------------------------------------------------------
# Config + factory
# ----------------------------------------------------------------------------------------------------


@dataclass
class RouterConfig:
    """Which router to build and its hyper-parameters (one dataclass for all kinds).

    kind: "topk" | "dynmole" | "gwmoe" | "mor".
    Shared: top_k (topk/gwmoe/mor; None = dense soft routing, topk only), renormalize (None = the
    method's published choice: True for topk/gwmoe/mor, False for dynmole), balance_coef, z_loss_coef, bias.
    DynMoLE (official defaults): tsallis_q, entropy_threshold, top_p, keep_top_k, dyn_loss_coef,
    entropy_eps, normalize_entropy.
    GW-MoE: gw_threshold (direct) or gw_quantile (set by calibration), gw_broadcast_weights,
    gw_normalize_entropy.
    MoR: num_routers.
    """

    kind: str = "topk"
    top_k: int | None = 2
    renormalize: bool | None = None
    balance_coef: float = 0.001
    z_loss_coef: float = 0.0
    bias: bool = False
    # DynMoLE
    tsallis_q: float = 1.1
    entropy_threshold: float = 0.9
    top_p: float = 0.75
    keep_top_k: int = 2
    dyn_loss_coef: float = 0.01
    entropy_eps: float = 1e-5
    normalize_entropy: bool = True
    # GW-MoE
    gw_threshold: float | None = None
    gw_quantile: float | None = None
    gw_broadcast_weights: str = "softmax"
    gw_normalize_entropy: bool = False
    # Mixture of Routers
    num_routers: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"RouterConfig.kind={self.kind!r} must be one of {ROUTER_KINDS}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"RouterConfig.top_k={self.top_k} must be >= 1 or None")
        if self.top_k is None and self.kind in ("gwmoe", "mor"):
            raise ValueError(f"RouterConfig.top_k=None (dense) is only valid for kind='topk', not {self.kind!r}")
        if self.balance_coef < 0 or self.z_loss_coef < 0 or self.dyn_loss_coef < 0:
            raise ValueError("RouterConfig.balance_coef / z_loss_coef / dyn_loss_coef must be >= 0")
        if self.tsallis_q <= 0:
            raise ValueError(f"RouterConfig.tsallis_q={self.tsallis_q} must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"RouterConfig.top_p={self.top_p} must be in (0, 1]")
        if self.gw_broadcast_weights not in ("softmax", "uniform"):
            raise ValueError(f"RouterConfig.gw_broadcast_weights={self.gw_broadcast_weights!r} must be 'softmax' or 'uniform'")
        if self.gw_quantile is not None and not 0.0 <= self.gw_quantile <= 1.0:
            raise ValueError(f"RouterConfig.gw_quantile={self.gw_quantile} must be in [0, 1]")
        if self.kind == "gwmoe" and self.gw_threshold is None and self.gw_quantile is None:
            raise ValueError("RouterConfig(kind='gwmoe') needs gw_threshold or gw_quantile (for calibrate_gwmoe)")
        if self.num_routers < 1:
            raise ValueError(f"RouterConfig.num_routers={self.num_routers} must be >= 1")


def build_router(config: RouterConfig, hidden_size: int, num_experts: int) -> nn.Module:
    """RouterConfig -> router module. A top_k above the layer's expert count raises (clamping it would silently
    train another routing than the one asked for); DynMoLE ignores top_k (its keep_top_k is still clamped)."""
    if config.kind != "dynmole" and config.top_k is not None and config.top_k > num_experts:
        raise ValueError(f"RouterConfig.top_k={config.top_k} exceeds num_experts={num_experts} of this layer "
                         f"(router kind {config.kind!r}): top_k must be <= num_experts")
    k = config.top_k
    if config.kind == "topk":
        renorm = True if config.renormalize is None else config.renormalize
        return TopKRouter(hidden_size, num_experts, k, renorm, config.balance_coef, config.z_loss_coef, config.bias)
    if config.kind == "dynmole":
        return DynMoLERouter(
            hidden_size, num_experts, tsallis_q=config.tsallis_q, entropy_threshold=config.entropy_threshold,
            top_p=config.top_p, keep_top_k=min(config.keep_top_k, num_experts),
            renormalize=False if config.renormalize is None else config.renormalize,
            dyn_loss_coef=config.dyn_loss_coef, balance_coef=config.balance_coef, z_loss_coef=config.z_loss_coef,
            entropy_eps=config.entropy_eps, normalize_entropy=config.normalize_entropy, bias=config.bias,
        )
    if config.kind == "gwmoe":
        return GWMoERouter(
            hidden_size, num_experts, top_k=k, renormalize=True if config.renormalize is None else config.renormalize,
            threshold=config.gw_threshold, quantile=config.gw_quantile, broadcast_weights=config.gw_broadcast_weights,
            normalize_entropy=config.gw_normalize_entropy, entropy_eps=config.entropy_eps,
            balance_coef=config.balance_coef, z_loss_coef=config.z_loss_coef, bias=config.bias,
        )
    return MixtureOfRoutersRouter(
        hidden_size, num_experts, num_routers=config.num_routers, top_k=k,
        renormalize=True if config.renormalize is None else config.renormalize,
        balance_coef=config.balance_coef, z_loss_coef=config.z_loss_coef, bias=config.bias,
    )


_KINDS_OF = {TopKRouter: "topk", DynMoLERouter: "dynmole", GWMoERouter: "gwmoe", MixtureOfRoutersRouter: "mor"}


def router_settings(router: nn.Module) -> dict[str, object]:
    """The settings that decide `router`'s routing and aux losses, as the router holds them, by `RouterConfig` field
    name (defaults resolved as `build_router` resolves them, e.g. `renormalize`, DynMoLE's clamped `keep_top_k`).
    Only the fields the router's kind reads are present (DynMoLE has no `top_k`, top-k no `tsallis_q`). GW-MoE's
    `gw_threshold` is the configured value, not the threshold buffer (which calibration sets, and which the
    adapter weights carry). `load_mole` compares these between a saved adapter and an injected model."""
    kind = _KINDS_OF.get(type(router))
    if kind is None:
        raise TypeError(f"router_settings: {type(router).__name__} is not one of the library's routers")
    settings: dict[str, object] = {"kind": kind, "balance_coef": router.balance_coef,
                                   "z_loss_coef": router.z_loss_coef, "bias": router.gate.bias is not None,
                                   "renormalize": router.renormalize}
    if kind != "dynmole":
        settings["top_k"] = router.top_k
    if kind == "dynmole":
        settings.update(tsallis_q=router.tsallis_q, entropy_threshold=router.entropy_threshold, top_p=router.top_p,
                        keep_top_k=router.keep_top_k, dyn_loss_coef=router.dyn_loss_coef,
                        entropy_eps=router.entropy_eps, normalize_entropy=router.normalize_entropy)
    elif kind == "gwmoe":
        settings.update(gw_threshold=router.threshold_setting, gw_quantile=router.quantile,
                        gw_broadcast_weights=router.broadcast_weights, gw_normalize_entropy=router.normalize_entropy,
                        entropy_eps=router.entropy_eps)
    elif kind == "mor":
        settings["num_routers"] = router.num_routers
    return settings
