"""Routers vs naive per-token float64 references: weights, indices, aux losses and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._python_dispatch

from parrot.moe.routers import (
    DynMoLERouter,
    GWMoERouter,
    MixtureOfRoutersRouter,
    RouterConfig,
    RoutingStats,
    TopKRouter,
    build_router,
    indices_from_selection,
    lazy_routing_stats,
    routing_stats,
    tsallis_entropy,
)

T, D, E = 24, 12, 5


def _inputs(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[[3, 10, 17]] = False
    combine = torch.randn(T, E, generator=g, dtype=torch.float64)  # random downstream use of the weights
    return x, mask, combine


def _randomize(router: torch.nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# ---------------------------------------------------------------- naive per-token pieces (no batching)


def softmax_list(z: list[float]) -> list[float]:
    m = max(z)
    ex = [math.exp(v - m) for v in z]
    s = sum(ex)
    return [v / s for v in ex]


def softmax_t(z: torch.Tensor) -> torch.Tensor:  # one token, differentiable
    ex = torch.exp(z - z.max())
    return ex / ex.sum()


def order_desc(p: torch.Tensor) -> list[int]:
    vals = p.detach().tolist()
    return sorted(range(len(vals)), key=lambda e: -vals[e])


def valid_tokens(mask: torch.Tensor) -> list[int]:
    return [t for t in range(T) if bool(mask[t])]


def switch_balance(probs: list[torch.Tensor], chosen: list[list[int]], toks: list[int]) -> torch.Tensor:
    counts = [0.0] * E
    for t in toks:
        for e in chosen[t]:
            counts[e] += 1.0
    total = sum(counts)
    loss = torch.zeros((), dtype=torch.float64)
    for e in range(E):
        p_mean = sum(probs[t][e] for t in toks) / len(toks)
        loss = loss + (counts[e] / total) * p_mean
    return E * loss


def z_loss(logits: list[torch.Tensor], toks: list[int]) -> torch.Tensor:
    return sum(torch.logsumexp(logits[t], 0) ** 2 for t in toks) / len(toks)


def check_against_reference(router, ref_weights, ref_indices, ref_aux, x, mask, combine, ref_params):
    out = router(x, mask)
    torch.testing.assert_close(out.weights, torch.stack(ref_weights), rtol=1e-10, atol=1e-12)
    assert out.indices.shape[1] >= max(len(i) for i in ref_indices)
    for t, idx in enumerate(ref_indices):
        row = out.indices[t].tolist()
        assert row[: len(idx)] == idx and all(v == -1 for v in row[len(idx):]), (t, row, idx)
    assert set(out.aux_losses) == set(ref_aux)
    for name, value in ref_aux.items():
        torch.testing.assert_close(out.aux_losses[name], value, rtol=1e-10, atol=1e-12)
    # gradients of a downstream use of the weights plus all aux losses
    loss = (out.weights * combine).sum() + sum(out.aux_losses.values())
    ref_loss = (torch.stack(ref_weights) * combine).sum() + sum(ref_aux.values())
    grads = torch.autograd.grad(loss, list(router.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)
    return out


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("top_k,renormalize", [(2, True), (3, False), (None, True)])
def test_topk_router_matches_naive(top_k, renormalize):
    x, mask, combine = _inputs(1)
    router = TopKRouter(D, E, top_k=top_k, renormalize=renormalize, balance_coef=0.01, z_loss_coef=0.001).double()
    _randomize(router, 11, 0.5)
    W = router.gate.weight.detach().clone().requires_grad_(True)
    toks = valid_tokens(mask)
    logits, probs, weights, indices = [], [], [], []
    for t in range(T):
        z = W @ x[t]
        p = softmax_t(z)
        k = E if top_k is None else top_k
        sel = order_desc(p)[:k]
        denom = sum(p[e] for e in sel) if (renormalize and top_k is not None) else 1.0
        w = torch.stack([p[e] / denom if e in sel else p[e] * 0 for e in range(E)])
        logits.append(z), probs.append(p), weights.append(w)
        indices.append(sel if top_k is not None else list(range(E)))
    aux = {"balance": 0.01 * switch_balance(probs, indices, toks), "z": 0.001 * z_loss(logits, toks)}
    out = check_against_reference(router, weights, indices if top_k else [list(range(E))] * T, aux, x, mask, combine, [W])
    # stats: load over valid tokens, entropy per token
    load = torch.tensor([sum(1.0 for t in toks if e in indices[t]) / len(toks) for e in range(E)], dtype=torch.float64)
    torch.testing.assert_close(out.stats["load"], load)
    ent = torch.tensor([-sum(v * math.log(v) for v in p.tolist()) for p in probs], dtype=torch.float64)
    torch.testing.assert_close(out.stats["entropy"], ent)


# ---------------------------------------------------------------- DynMoLE


def naive_tsallis(p: torch.Tensor, q: float, eps: float) -> torch.Tensor:
    s = sum((p[e] + eps) ** q for e in range(len(p)))
    return ((1 - s) / (q - 1)) / ((1 - len(p) ** (1 - q)) / (q - 1))


@pytest.mark.parametrize("renormalize", [False, True])
def test_dynmole_router_matches_naive(renormalize):
    q, top_p, keep, eps = 1.1, 0.9, 1, 1e-5
    x, mask, combine = _inputs(2)
    scale = torch.linspace(0.2, 3.0, T, dtype=torch.float64)[:, None]  # spread of router confidence
    x = x * scale
    router = DynMoLERouter(D, E, tsallis_q=q, top_p=top_p, keep_top_k=keep, renormalize=renormalize,
                           dyn_loss_coef=0.01, balance_coef=0.001, z_loss_coef=0.002, entropy_eps=eps).double()
    _randomize(router, 12, 0.6)
    W = router.gate.weight.detach().clone().requires_grad_(True)
    # threshold between observed entropies so that both branches occur
    with torch.no_grad():
        ents = sorted(float(naive_tsallis(softmax_t(W @ x[t]), q, eps)) for t in range(T))
    router.entropy_threshold = (ents[3 * T // 4] + ents[3 * T // 4 + 1]) / 2
    toks = valid_tokens(mask)
    logits, probs, tsallis, masked, weights, indices = [], [], [], [], [], []
    n_soft = n_top_p = 0
    for t in range(T):
        z = W @ x[t]
        p = softmax_t(z)
        s = naive_tsallis(p, q, eps)
        order = order_desc(p)
        if float(s.detach()) > router.entropy_threshold:
            sel = order
            n_soft += 1
        else:
            sel, cum = [], 0.0
            for i, e in enumerate(order):
                cum += p[e].item()
                if cum <= top_p or i < keep:
                    sel.append(e)
            n_top_p += keep < len(sel) < E  # the cumulative-probability cut decided, not keep_top_k
        m = torch.stack([p[e] if e in sel else p[e] * 0 for e in range(E)])
        w = m / m.sum() if renormalize else m
        logits.append(z), probs.append(p), tsallis.append(s), masked.append(m), weights.append(w), indices.append(sel)
    assert 0 < n_soft < T and n_top_p > 0
    f = [sum(masked[t][e] for t in toks) / len(toks) for e in range(E)]
    P = [sum(probs[t][e] for t in toks) / len(toks) for e in range(E)]
    aux = {
        "tsallis": 0.01 * sum(tsallis[t] for t in toks) / len(toks),
        "balance": 0.001 * E * sum(f[e] * P[e] for e in range(E)),
        "z": 0.002 * z_loss(logits, toks),
    }
    out = check_against_reference(router, weights, indices, aux, x, mask, combine, [W])
    soft = torch.tensor([float(tsallis[t]) > router.entropy_threshold for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(out.stats["broadcast"], soft)
    torch.testing.assert_close(out.stats["num_active"], torch.tensor([float(len(i)) for i in indices], dtype=torch.float64))


def test_tsallis_entropy_limits():
    p = torch.softmax(torch.randn(7, 6, dtype=torch.float64), -1)
    shannon = -(p * p.log()).sum(-1)
    torch.testing.assert_close(tsallis_entropy(p, 1.0), shannon)
    torch.testing.assert_close(tsallis_entropy(p, 1.0 + 1e-7), shannon, rtol=1e-5, atol=1e-6)
    uniform = torch.full((1, 6), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(tsallis_entropy(uniform, 1.5, normalize=True), torch.ones(1, dtype=torch.float64))
    one_hot = torch.tensor([[1.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(tsallis_entropy(one_hot, 2.0), torch.zeros(1, dtype=torch.float64))
    # q = 2: Gini impurity 1 - sum p^2
    torch.testing.assert_close(tsallis_entropy(p, 2.0), 1 - (p**2).sum(-1))


# ---------------------------------------------------------------- GW-MoE


@pytest.mark.parametrize("broadcast_weights", ["softmax", "uniform"])
def test_gwmoe_router_matches_naive(broadcast_weights):
    k, eps = 2, 1e-5
    x, mask, combine = _inputs(3)
    x = x * torch.linspace(0.1, 2.5, T, dtype=torch.float64)[:, None]
    router = GWMoERouter(D, E, top_k=k, renormalize=True, broadcast_weights=broadcast_weights,
                         balance_coef=0.01, z_loss_coef=0.001).double()
    _randomize(router, 13, 0.6)
    W = router.gate.weight.detach().clone().requires_grad_(True)

    def uncertainty(p):
        return -sum(p[e] * math.log(p[e] + eps) for e in range(E))

    with torch.no_grad():
        unc = sorted(float(uncertainty(softmax_t(W @ x[t]).tolist())) for t in range(T))
    threshold = (unc[T // 3] + unc[T // 3 + 1]) / 2
    router.threshold.fill_(threshold)
    toks = valid_tokens(mask)

    def reference(training: bool):
        logits, probs, weights, indices, top = [], [], [], [], []
        for t in range(T):
            z = W @ x[t]
            p = softmax_t(z)
            top.append(order_desc(p)[:k])
            if training and uncertainty(p.tolist()) >= threshold:
                sel = list(range(E))
                w = p if broadcast_weights == "softmax" else torch.full((E,), 1 / E, dtype=torch.float64) + 0 * p
            else:
                sel = top[t]
                denom = sum(p[e] for e in sel)
                w = torch.stack([p[e] / denom if e in sel else p[e] * 0 for e in range(E)])
            logits.append(z), probs.append(p), weights.append(w), indices.append(sel)
        # The balance loss counts each token's top-k, broadcast or not (the official GW-MoE code counts the Switch
        # top-1 index of every token): not the experts a broadcast token reaches.
        aux = {"balance": 0.01 * switch_balance(probs, top, toks), "z": 0.001 * z_loss(logits, toks)}
        return weights, indices, aux

    router.train()
    weights, indices, aux = reference(True)
    n_broadcast = sum(len(i) == E for i in indices)
    assert 0 < n_broadcast < T
    assert any(len(indices[t]) == E for t in toks) and any(len(indices[t]) == E for t in range(T) if not mask[t])
    out = check_against_reference(router, weights, indices, aux, x, mask, combine, [W])
    assert out.stats["broadcast"].sum().item() == n_broadcast
    ref_unc = torch.tensor([float(uncertainty(softmax_t(W @ x[t]).tolist())) for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(out.stats["uncertainty"], ref_unc, rtol=1e-12, atol=1e-12)

    router.eval()  # inference: plain top-k, no broadcast
    weights, indices, aux = reference(False)
    out = check_against_reference(router, weights, indices, aux, x, mask, combine, [W])
    assert out.indices.shape[1] == k and out.stats["broadcast"].sum().item() == 0


def test_gwmoe_threshold_unset_and_calibration():
    router = GWMoERouter(D, E, top_k=2, quantile=0.75).double()
    router.train()
    x, mask, _ = _inputs(4)
    with pytest.raises(RuntimeError, match="threshold is unset"):
        router(x, mask)
    router.eval()
    out = router(x, mask)  # eval needs no threshold
    values = out.stats["uncertainty"][mask]
    got = router.calibrate(values)
    # naive linear-interpolation quantile
    s = sorted(values.tolist())
    pos = 0.75 * (len(s) - 1)
    lo = int(math.floor(pos))
    expected = s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)
    assert got == pytest.approx(expected, rel=1e-12)
    assert router.threshold.item() == pytest.approx(expected, rel=1e-12)
    router.train()
    out = router(x, mask)
    n_above = sum(v >= router.threshold.item() for v in out.stats["uncertainty"].tolist())
    assert out.stats["broadcast"].sum().item() == n_above
    with pytest.raises(ValueError, match="quantile"):
        GWMoERouter(D, E).calibrate(values)


# ---------------------------------------------------------------- Mixture of Routers


def test_mixture_of_routers_matches_naive():
    M, k = 3, 2
    x, mask, combine = _inputs(5)
    router = MixtureOfRoutersRouter(D, E, num_routers=M, top_k=k, balance_coef=0.01, z_loss_coef=0.001).double()
    _randomize(router, 14, 0.5)
    W = router.gate.weight.detach().clone().requires_grad_(True)  # (M*E, D)
    Wm = router.main_gate.weight.detach().clone().requires_grad_(True)  # (M, D)
    toks = valid_tokens(mask)
    probs, weights, indices, sub_logits = [], [], [], []
    for t in range(T):
        mix = softmax_t(Wm @ x[t])
        p = torch.zeros(E, dtype=torch.float64)
        zs = []
        for j in range(M):
            zj = W[j * E : (j + 1) * E] @ x[t]
            zs.append(zj)
            p = p + mix[j] * softmax_t(zj)
        sel = order_desc(p)[:k]
        denom = sum(p[e] for e in sel)
        weights.append(torch.stack([p[e] / denom if e in sel else p[e] * 0 for e in range(E)]))
        probs.append(p), indices.append(sel), sub_logits.append(zs)
    z = sum(sum(torch.logsumexp(zj, 0) ** 2 for zj in sub_logits[t]) / M for t in toks) / len(toks)
    aux = {"balance": 0.01 * switch_balance(probs, indices, toks), "z": 0.001 * z}
    out = check_against_reference(router, weights, indices, aux, x, mask, combine, [W, Wm])
    torch.testing.assert_close(out.probs, torch.stack(probs).detach())
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(T, dtype=torch.float64))


# ---------------------------------------------------------------- config / factory


def test_build_router_kinds_and_defaults():
    kinds = {"topk": TopKRouter, "dynmole": DynMoLERouter, "gwmoe": GWMoERouter, "mor": MixtureOfRoutersRouter}
    for kind, cls in kinds.items():
        r = build_router(RouterConfig(kind=kind, gw_threshold=1.0), D, E)
        assert isinstance(r, cls) and isinstance(r.gate, torch.nn.Linear)
    dyn = build_router(RouterConfig(kind="dynmole"), D, E)
    assert dyn.renormalize is False  # official DynMoLE does not renormalise
    assert (dyn.tsallis_q, dyn.entropy_threshold, dyn.top_p, dyn.keep_top_k) == (1.1, 0.9, 0.75, 2)
    assert build_router(RouterConfig(kind="topk"), D, E).renormalize is True
    for kind in ("topk", "gwmoe", "mor"):  # k above the expert count is refused, never silently capped
        with pytest.raises(ValueError, match=r"top_k=8 exceeds num_experts=3"):
            build_router(RouterConfig(kind=kind, top_k=8, gw_threshold=1.0), D, 3)
    assert build_router(RouterConfig(kind="topk", top_k=3), D, 3).top_k == 3
    assert build_router(RouterConfig(kind="dynmole", top_k=8), D, 3).top_k is None  # DynMoLE does not use top_k
    dense = build_router(RouterConfig(kind="topk", top_k=None), D, E)
    assert dense.top_k is None


@pytest.mark.parametrize("kwargs,field", [
    ({"kind": "switch"}, "kind"),
    ({"kind": "gwmoe"}, "gw_threshold"),
    ({"kind": "mor", "top_k": None}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"gw_broadcast_weights": "max"}, "gw_broadcast_weights"),
])
def test_router_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RouterConfig(**kwargs)


def test_router_rejects_bad_shapes():
    router = TopKRouter(D, E, top_k=2)
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        router(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="mask"):
        router(torch.randn(4, D), torch.ones(5, dtype=torch.bool))


# ---------------------------------------------------------------- lazy statistics, host syncs


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["topk", "dynmole", "gwmoe", "mor"])
def test_stats_are_computed_on_first_read_only(kind):
    x, mask, _ = _inputs(6)
    router = build_router(RouterConfig(kind=kind, gw_threshold=1.0), D, E).double().train()
    _randomize(router, 15, 0.7)
    with _OpCounter() as forward_ops:
        out = router(x, mask)
    assert isinstance(out.stats, RoutingStats) and not out.stats.computed
    with _OpCounter() as stats_ops:
        loads = out.stats["load"]
    assert out.stats.computed and stats_ops.count >= 5  # the diagnostics ran now, not in the forward
    with _OpCounter() as again:
        loads_again, keys = out.stats["load"], set(out.stats)
    assert again.count == 0 and loads_again is loads  # computed once
    assert keys >= {"entropy", "load", "num_active", "broadcast", "uncertainty", "mask"}
    assert forward_ops.count > 0
    # values are those of THAT forward, and equal the eager computation from its probs / indices
    router(x * 3.0, mask)
    eager = routing_stats(out.probs, out.indices, mask, out.stats["broadcast"], out.stats["uncertainty"])
    for key, value in eager.items():
        torch.testing.assert_close(out.stats[key], value, rtol=0, atol=0)
    valid = [t for t in range(T) if mask[t]]
    naive_load = [sum(e in out.indices[t].tolist() for t in valid) / len(valid) for e in range(E)]
    torch.testing.assert_close(out.stats["load"], torch.tensor(naive_load, dtype=torch.float64))


def test_lazy_routing_stats_equals_routing_stats():
    p = torch.softmax(torch.randn(9, 4, dtype=torch.float64), -1)
    idx = torch.tensor([[0, 1]] * 5 + [[2, -1]] * 4)
    mask = torch.tensor([True] * 7 + [False] * 2)
    lazy, eager = lazy_routing_stats(p, idx, mask), routing_stats(p, idx, mask)
    assert repr(lazy) == "RoutingStats(<not computed yet>)"
    assert dict(lazy).keys() == eager.keys() and len(lazy) == len(eager)
    for key in eager:
        assert torch.equal(lazy[key], eager[key])
    torch.testing.assert_close(lazy["load"], torch.tensor([5 / 7, 5 / 7, 2 / 7, 0.0], dtype=torch.float64))


def test_gwmoe_threshold_is_checked_again_after_it_changes():
    x, mask, _ = _inputs(7)
    router = GWMoERouter(D, E, top_k=2, threshold=1.0).double().train()
    router(x, mask)  # set: checked once
    router.threshold.fill_(float("nan"))  # in-place change bumps the version counter
    with pytest.raises(RuntimeError, match="threshold is unset"):
        router(x, mask)
    router.load_state_dict({**router.state_dict(), "threshold": torch.tensor(0.5, dtype=torch.float64)})
    router(x, mask)
    router.threshold = torch.tensor(float("nan"), dtype=torch.float64)  # a new tensor object
    with pytest.raises(RuntimeError, match="threshold is unset"):
        router(x, mask)


def test_dynmole_indices_match_indices_from_selection():
    """The sort-prefix indices of DynMoLE equal the generic selection -> indices helper (two argsorts)."""
    x, mask, _ = _inputs(8)
    x = x * torch.linspace(0.2, 4.0, T, dtype=torch.float64)[:, None]
    router = DynMoLERouter(D, E, top_p=0.6, keep_top_k=1, entropy_threshold=0.8).double()
    _randomize(router, 16, 0.8)
    out = router(x, mask)
    selected = out.weights > 0
    assert len(set(selected.sum(-1).tolist())) > 1  # variable number of active experts
    assert torch.equal(out.indices, indices_from_selection(out.probs, selected))


@pytest.mark.parametrize("kind", ["topk", "gwmoe", "dynmole", "mor"])
def test_z_loss_with_a_mask_under_bfloat16_autocast(kind):
    """Autocast makes the gate's logits bfloat16 while the probabilities and token weights stay float32: the masked
    z-loss runs and equals the float32 formula on those logits (valid tokens only)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    mask = torch.rand(T, generator=g) > 0.3
    config = RouterConfig(kind=kind, top_k=2, z_loss_coef=0.01, gw_threshold=1.0, num_routers=2)
    router = build_router(config, D, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x, mask)
        gate_logits = router.gate(x)  # (T, G): what the router saw
    assert gate_logits.dtype == torch.bfloat16 and out.aux_losses["z"].dtype == torch.float32
    logits = gate_logits.float()
    if kind == "mor":  # the sub-routers' logits, z averaged over them
        z = torch.logsumexp(logits[:, : 2 * E].reshape(T, 2, E), dim=-1).square().mean(-1)
    else:
        z = torch.logsumexp(logits, dim=-1).square()
    expected = 0.01 * z[mask].mean()
    torch.testing.assert_close(out.aux_losses["z"].detach(), expected, rtol=1e-5, atol=0)


def test_dynmole_top_p_one_keeps_every_expert():
    """top_p = 1 keeps all experts of every token, also where the float32 cumulative sum rounds past 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, D, generator=g) * 3.0
    router = DynMoLERouter(D, E, top_p=1.0, keep_top_k=1, entropy_threshold=1.0)  # S <= 1: never soft-routed
    probs = torch.softmax(router.gate(x).float(), -1)
    assert (probs.sort(-1, descending=True).values.cumsum(-1) > 1.0).any()  # the rounding case occurs here
    out = router(x)
    assert torch.equal(out.weights, out.probs)
    assert (out.indices >= 0).all()


@pytest.mark.parametrize("kind", ["topk2", "topk_dense", "gwmoe_train", "gwmoe_eval", "mor"])
def test_balance_loss_without_mask_matches_reference(kind):
    """No mask: the balance loss takes the count path (counts, sums, the known k) -- same value and gradient as
    the per-token reference over all tokens."""
    x, _, _ = _inputs(5)
    if kind.startswith("topk"):
        router = TopKRouter(D, E, top_k=2 if kind == "topk2" else None, balance_coef=0.01).double()
    elif kind.startswith("gwmoe"):
        router = GWMoERouter(D, E, top_k=2, threshold=0.0, balance_coef=0.01).double()
        router.train(kind == "gwmoe_train")
    else:
        router = MixtureOfRoutersRouter(D, E, num_routers=3, top_k=2, balance_coef=0.01).double()
    _randomize(router, 17, 0.5)
    out = router(x)
    probs = list(out.probs)
    chosen = [[int(e) for e in row if e >= 0] for row in out.indices]
    if kind == "gwmoe_train":
        router.threshold.fill_(sorted(router.uncertainty(out.probs).tolist())[T // 2])  # half the tokens broadcast
        out = router(x)
        probs = list(out.probs)
        assert 0 < sum(int(e) >= 0 for e in out.indices[:, -1]) < T  # some tokens broadcast to all E experts
        chosen = [order_desc(p)[:2] for p in probs]  # counted by their top-k all the same (GWMoERouter docstring)
    expected = 0.01 * switch_balance(probs, chosen, list(range(T)))
    torch.testing.assert_close(out.aux_losses["balance"], expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.aux_losses["balance"], list(router.parameters()), retain_graph=True)
    ref_grads = torch.autograd.grad(expected, list(router.parameters()))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- ties, fully padded batches, bfloat16


@pytest.mark.parametrize("kind", ["topk", "topk_no_renorm", "gwmoe_train", "gwmoe_eval", "mor", "dynmole"])
def test_ties_go_to_the_lower_expert_id(kind):
    """Equal scores (a zero-initialised gate gives every token equal logits; bfloat16 logits often round to the
    same value) select the lower expert ids, as a stable per-token sort and the fused kernels do: the choice of
    expert must not depend on torch.topk's / an unstable sort's backend-specific tie-breaking."""
    num_experts, k = 40, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    if kind.startswith("topk"):
        router = TopKRouter(D, num_experts, top_k=k, renormalize=kind == "topk")
    elif kind.startswith("gwmoe"):
        router = GWMoERouter(D, num_experts, top_k=k, threshold=100.0)  # nothing broadcast: plain top-k
        router.train(kind == "gwmoe_train")
    elif kind == "mor":
        router = MixtureOfRoutersRouter(D, num_experts, num_routers=2, top_k=k)
    else:  # soft routing never triggers (S <= 1); top-p keeps 3 of the 40 equal probabilities
        router = DynMoLERouter(D, num_experts, top_p=3.5 / num_experts, keep_top_k=1, entropy_threshold=2.0)
    router = router.double()
    torch.nn.init.zeros_(router.gate.weight)
    if kind != "mor":  # two rows with ties inside the top-k and at its boundary (logits 2, 2, 1, 1, 1, 0, ...)
        with torch.no_grad():
            router.gate.weight[[7, 30], 0] = 2.0
            router.gate.weight[[3, 11, 25], 0] = 1.0
        x[:2, 0] = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = router(x)
    for t in range(x.shape[0]):
        p = softmax_t(out.logits[t].detach()) if kind != "mor" else out.probs[t]
        chosen = order_desc(p)[:k]  # Python's sort is stable: equal values keep the lower expert id first
        if kind == "dynmole":  # top-p: the prefix whose cumulative probability is <= top_p, at least keep_top_k
            cumulative = [float(v) for v in p[order_desc(p)].cumsum(0)]
            chosen = [e for i, e in enumerate(order_desc(p)) if i < router.keep_top_k or cumulative[i] <= router.top_p]
        assert [e for e in out.indices[t].tolist() if e >= 0] == chosen, (t, out.indices[t].tolist(), chosen)
        expected = torch.zeros(num_experts, dtype=torch.float64)
        expected[chosen] = p[chosen] / (p[chosen].sum() if kind in ("topk", "gwmoe_train", "gwmoe_eval", "mor") else 1)
        torch.testing.assert_close(out.weights[t], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["topk_dense", "topk2", "gwmoe_train", "mor", "dynmole"])
def test_aux_losses_and_gradients_with_every_token_padded(kind, dtype):
    """A batch whose tokens are all padding: every aux loss is 0 with a zero (finite) gradient, and real-token
    routing is as without a mask. The Switch balance loss of a variable number of experts per token (dense top-k,
    GW-MoE in training) used to divide by a clamped 0, whose backward overflowed to inf and gave NaN gradients."""
    num_experts = 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    coefs = dict(balance_coef=1.0, z_loss_coef=0.1)
    if kind.startswith("topk"):
        router = TopKRouter(D, num_experts, top_k=None if kind == "topk_dense" else 2, **coefs)
    elif kind == "gwmoe_train":
        router = GWMoERouter(D, num_experts, top_k=2, threshold=1.5, **coefs).train()
    elif kind == "mor":
        router = MixtureOfRoutersRouter(D, num_experts, num_routers=2, top_k=2, **coefs)
    else:
        router = DynMoLERouter(D, num_experts, dyn_loss_coef=0.1, **coefs)
    router = router.to(dtype)
    padded = router(x, torch.zeros(T, dtype=torch.bool))
    plain = router(x)
    torch.testing.assert_close(padded.weights, plain.weights, rtol=0, atol=0)
    assert set(padded.aux_losses) >= {"balance", "z"}
    for name, value in padded.aux_losses.items():
        assert float(value.detach()) == 0.0, name
    grads = torch.autograd.grad(sum(padded.aux_losses.values()), list(router.parameters()))
    for grad in grads:
        assert torch.isfinite(grad).all() and not grad.any()


def _bf16_reference(kind: str, router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the router's bfloat16 gate logits, in float64 (the spec's formulas, vectorised): (selected (T, E) bool,
    broadcast / soft flag (T,) bool, distance (T,) of each token's deciding quantity to its decision boundary)."""
    T_, E_ = x.shape[0], router.num_experts
    if kind == "mor":
        sub = router.gate(x).double().view(T_, router.num_routers, E_)
        p = (torch.softmax(router.main_gate(x).double(), -1)[:, :, None] * torch.softmax(sub, -1)).sum(1)
        top = p.sort(-1, descending=True).values
        margin = (top[:, router.top_k - 1] - top[:, router.top_k]) / top[:, 0]
        selected = torch.zeros(T_, E_, dtype=torch.bool).scatter(1, p.topk(router.top_k).indices, True)
        return selected, torch.zeros(T_, dtype=torch.bool), margin
    p = torch.softmax(router.gate(x).double(), -1)
    if kind == "dynmole":
        q, eps = router.tsallis_q, router.entropy_eps
        s = (1 - (p + eps).pow(q).sum(-1)) / (q - 1) / ((1 - E_ ** (1 - q)) / (q - 1))
        soft = s > router.entropy_threshold
        sorted_p = p.sort(-1, descending=True).values
        cum = sorted_p.cumsum(-1)
        keep = (cum <= router.top_p) | (torch.arange(E_) < router.keep_top_k)
        keep |= soft[:, None]
        # top-p decided by the cumulative sums: distance of the nearest one to top_p
        margin = torch.minimum((s - router.entropy_threshold).abs(), (cum - router.top_p).abs().min(-1).values)
        selected = torch.zeros(T_, E_, dtype=torch.bool).scatter(1, p.sort(-1, descending=True).indices, keep)
        return selected, soft, margin
    u = -(p * (p + router.entropy_eps).log()).sum(-1)
    threshold = float(router.threshold)
    broadcast = u >= threshold
    order = p.sort(dim=-1, descending=True, stable=True).indices  # ties (equal bfloat16 logits): lower expert id
    selected = torch.zeros(T_, E_, dtype=torch.bool).scatter(1, order[:, : router.top_k], True)
    selected |= broadcast[:, None]
    return selected, broadcast, (u - threshold).abs()


@pytest.mark.parametrize("kind", ["dynmole", "gwmoe", "mor"])
def test_bfloat16_routing_decides_in_float32(kind):
    """A bfloat16 router (a bfloat16 model's MoLE layer) decides as its logits say: the Tsallis / Shannon entropy
    against the threshold, the top-p cumulative sums and the MoR mixture's top-k come from float32 probabilities
    (as in the fused kernels), not from bfloat16 ones -- there 1 - sum p^q cancels (DynMoLE: ~6% of the tokens
    flipped between soft and top-p routing) and mixed probabilities round together (MoR: ~2% picked another expert).
    Reference: float64 from the same bfloat16 logits; tokens within 1e-4 of a decision boundary are left out."""
    torch.manual_seed(0)
    num_tokens, num_experts = 4000, 8
    if kind == "dynmole":
        router, scale = DynMoLERouter(64, num_experts), 0.1
    elif kind == "gwmoe":
        router, scale = GWMoERouter(64, num_experts, top_k=2, threshold=1.8).train(), 0.15
    else:
        router, scale = MixtureOfRoutersRouter(64, num_experts, num_routers=3, top_k=2), 0.05
    router = router.to(torch.bfloat16)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, scale)
    x = torch.randn(num_tokens, 64).to(torch.bfloat16)
    out = router(x)
    selected, broadcast, margin = _bf16_reference(kind, router, x)
    clear = margin > 1e-4
    assert clear.float().mean() > 0.95
    if kind != "mor":
        assert 0.1 < broadcast[clear].float().mean() < 0.9  # both branches occur
        assert torch.equal(out.stats["broadcast"].bool()[clear], broadcast[clear])
    assert torch.equal((out.weights > 0)[clear], selected[clear])


# ---------------------------------------------------------------- GW-MoE threshold precision


def test_gwmoe_threshold_stays_float32_when_the_router_is_cast_to_bfloat16():
    """Calibrated in float32, then `.to(torch.bfloat16)` (what a bfloat16 model does): the threshold keeps the
    calibrated float32 value (a bfloat16 buffer rounds it to ~3 digits), and the bfloat16 router's broadcast
    decisions compare with it: equal to a float64 reference from the same bfloat16 gate logits, on data where the
    bfloat16-rounded threshold would route some tokens otherwise."""
    num_tokens, eps = 4000, 1e-5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, D, generator=g)
    router = GWMoERouter(D, E, top_k=2, quantile=0.437)
    _randomize(router, 5, 0.35)
    router.eval()
    uncertainty = router(x).stats["uncertainty"]
    value = router.calibrate(uncertainty)
    calibrated = torch.tensor(torch.quantile(uncertainty.double(), 0.437).item(), dtype=torch.float32)
    assert router.threshold.dtype == torch.float32 and value == calibrated.item()

    router.to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.bfloat16
    assert router.threshold.dtype == torch.float32 and router.threshold.item() == calibrated.item()
    rounded = calibrated.to(torch.bfloat16).double()
    assert rounded != calibrated.double()  # the value a bfloat16 buffer would hold

    router.train()
    xb = x.to(torch.bfloat16)
    out = router(xb)
    with torch.no_grad():
        logits = router.gate(xb).double()  # the router's bfloat16 logits, then float64
    reference = []
    for t in range(num_tokens):
        p = softmax_list(logits[t].tolist())
        reference.append(-sum(pe * math.log(pe + eps) for pe in p))
    reference = torch.tensor(reference, dtype=torch.float64)
    threshold = calibrated.double()
    assert (reference - threshold).abs().min() > 1e-5  # no token within float32 rounding of the boundary
    low, high = min(threshold, rounded), max(threshold, rounded)
    assert ((reference >= low) & (reference < high)).any()  # tokens a bfloat16 threshold would route otherwise
    expected = reference >= threshold
    assert 0.3 < expected.double().mean() < 0.8
    assert torch.equal(out.stats["broadcast"].bool(), expected)
    assert torch.equal(out.indices[:, -1] >= 0, expected)  # broadcast rows hold all E experts

    router.float()
    assert router.threshold.item() == calibrated.item()
    router.double()  # widening casts apply
    assert router.threshold.dtype == torch.float64 and router.threshold.item() == calibrated.item()


def test_gwmoe_threshold_loads_from_older_narrower_states():
    """State dicts keep working both ways: the float32 threshold saves as float32, and a state saved before (the
    threshold in the model's dtype, e.g. bfloat16) loads as its value, kept float32, also with assign=True."""
    router = GWMoERouter(D, E, top_k=2, threshold=1.2345678).to(torch.bfloat16)
    state = router.state_dict()
    assert state["threshold"].dtype == torch.float32
    assert state["threshold"].item() == torch.tensor(1.2345678, dtype=torch.float32).item()
    old = dict(state, threshold=torch.tensor(1.2345678, dtype=torch.bfloat16))  # what the earlier code saved
    for assign in (False, True):
        fresh = GWMoERouter(D, E, top_k=2, quantile=0.5).to(torch.bfloat16)
        fresh.load_state_dict(old, assign=assign)
        assert fresh.threshold.dtype == torch.float32
        assert fresh.threshold.item() == old["threshold"].float().item()
