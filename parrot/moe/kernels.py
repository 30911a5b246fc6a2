"""Triton kernels of the fused MoLE path (`parrot.moe.fused`): routing + per-expert scaling in one pass.

Imported only where Triton is installed. Each program handles BLOCK_T tokens and keeps everything of a token
in registers: the router distribution, the expert selection, the routing weights, the scaled rank hidden and
(backward) the gradient of the gate logits. One kernel launch replaces the ~15 small kernels (softmax, top-k,
scatter, scaling, balance-loss sums, and their backward) that the eager routers issue per layer.

Router kinds (constexpr KIND): 0 top-k softmax, 1 GW-MoE, 2 DynMoLE, 3 Mixture of Routers. The math of each is
the eager router's in `routers.py` (the tests check values and gradients against it); here everything is
computed in float32. Shapes: T tokens, E experts (EP = next power of two, at least 4), rank R (RP), MoR
sub-routers M (MP).

Layout: the gate logits (G per token: E; MoR: M*E sub-router logits then M main-router logits) and the experts'
rank hidden x A^T (E*R per token) are usually the two column ranges of one (T, G + E*R) GEMM output (the hidden at
column H_OFFSET = G), or two tensors (H_OFFSET = 0) when LoRA dropout gives the experts another input. The float32
`work` buffer starts with each program's partial sums (NB, 4, EP): [sum m*counted, sum m*p, sum m*p*sel, (sum m*S,
sum m*z^2, sum m)], m = token mask, sel = the selection, counted = the selection the balance loss counts (GW-MoE:
the top-k, also of broadcast tokens); `_mole_route_finalize` reduces them to the three aux losses stored after
them, then the vectors the backward reads. `_route_tile` is the routing of one token block, shared by the forward and
backward kernels so that the backward recomputes exactly the forward's selection.
"""

from __future__ import annotations

import triton
import triton.language as tl

TOPK, GWMOE, DYNMOLE, MOR = 0, 1, 2, 3
INTERPRETED = bool(triton.knobs.runtime.interpret)  # TRITON_INTERPRET=1: kernels run in NumPy on any device


@triton.jit
def _distribution(gate_rows, rows_ok, cols, cols_ok, KIND: tl.constexpr, E: tl.constexpr, M: tl.constexpr,
                  MP: tl.constexpr):
    """-> p (BT, EP), score (BT, EP) to rank experts by (-inf on padding), zsq (BT,), lse, sub (BT, MP, EP), wm (BT, MP).

    zsq is the z-loss term: the logsumexp `lse` (BT,) of the logits, squared; MoR: the mean over sub-routers of
    their lse (BT, MP) squared. For MoR `sub` are the sub-router distributions and `wm` the main router's
    weights; for the others they are placeholders.
    """
    if KIND == 3:
        ms = tl.arange(0, MP)
        ms_ok = ms < M
        ptrs = gate_rows[:, None, None] + ms[None, :, None] * E + cols[None, None, :]
        sub = tl.load(ptrs, mask=rows_ok[:, None, None] & ms_ok[None, :, None] & cols_ok[None, None, :],
                      other=0.0).to(tl.float32)
        sub = tl.where(cols_ok[None, None, :], sub, float("-inf"))  # padded sub-routers stay finite (weight 0)
        sub_max = tl.max(sub, 2)
        sub_exp = tl.exp(sub - sub_max[:, :, None])
        sub_sum = tl.sum(sub_exp, 2)
        sub = sub_exp / sub_sum[:, :, None]  # (BT, MP, EP)
        sub_lse = sub_max + tl.log(sub_sum)  # (BT, MP)
        zsq = tl.sum(tl.where(ms_ok[None, :], sub_lse * sub_lse, 0.0), 1) / M
        main = tl.load(gate_rows[:, None] + M * E + ms[None, :], mask=rows_ok[:, None] & ms_ok[None, :],
                       other=0.0).to(tl.float32)
        main = tl.where(ms_ok[None, :], main, float("-inf"))
        main_exp = tl.exp(main - tl.max(main, 1)[:, None])
        wm = main_exp / tl.sum(main_exp, 1)[:, None]  # (BT, MP)
        p = tl.sum(wm[:, :, None] * sub, 1)  # (BT, EP)
        score = tl.where(cols_ok[None, :], p, float("-inf"))
    else:
        z = tl.load(gate_rows[:, None] + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :],
                    other=0.0).to(tl.float32)
        z = tl.where(cols_ok[None, :], z, float("-inf"))
        z_max = tl.max(z, 1)
        z_exp = tl.exp(z - z_max[:, None])
        z_sum = tl.sum(z_exp, 1)
        p = z_exp / z_sum[:, None]
        lse = z_max + tl.log(z_sum)
        zsq = lse * lse
        score = z
        sub = p[:, None, :]
        wm = zsq[:, None]
        sub_lse = lse
    return p, score, zsq, sub_lse, sub, wm


@triton.jit
def _select(p, score, cols, cols_ok, thr_ptr, top_p, dyn_threshold, eps, tsallis_scale, q, entropy_scale,
            KIND: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr, KEEP: tl.constexpr,
            BROADCAST: tl.constexpr, BLOCK_T: tl.constexpr):
    """-> selected (BT, EP) bool, slots (BT, EP) expert id per slot (-1 empty), broadcast (BT,) bool, S (BT,),
    counted (BT, EP) bool: the selection the Switch balance loss counts (GW-MoE: the top-k, also for broadcast tokens,
    the official rule, see `GWMoERouter`; the others: `selected`).

    Slots are in descending score order, as the eager routers' indices. S is DynMoLE's normalised Tsallis
    entropy (0 for the others).
    """
    slots = tl.full([BLOCK_T, EP], -1, tl.int32)
    selected = tl.zeros([BLOCK_T, EP], tl.int1)
    tsallis = tl.zeros([BLOCK_T], tl.float32)
    broadcast = tl.zeros([BLOCK_T], tl.int1)
    if KIND == 2:
        power = tl.where(cols_ok[None, :], tl.exp(q * tl.log(p + eps)), 0.0)
        tsallis = (1.0 - tl.sum(power, 1)) * tsallis_scale
        broadcast = tsallis > dyn_threshold  # soft routing over every expert
        remaining = tl.where(cols_ok[None, :], p, -1.0)
        cumulative = tl.zeros([BLOCK_T], tl.float32)
        for i in tl.static_range(E):  # experts in descending probability: the active set is a prefix
            top = tl.max(remaining, 1)
            idx = tl.min(tl.where(remaining == top[:, None], cols[None, :], EP), 1)
            hit = cols[None, :] == idx[:, None]
            cumulative += top
            if i < KEEP:
                active = tl.full([BLOCK_T], 1, tl.int1)
            elif top_p >= 1.0:  # every expert, as in routers.py (the cumulative sum may round past 1)
                active = tl.full([BLOCK_T], 1, tl.int1)
            else:
                active = (cumulative <= top_p) | broadcast
            selected = selected | (hit & active[:, None])
            slots = tl.where(cols[None, :] == i, tl.where(active, idx, -1)[:, None], slots)
            remaining = tl.where(hit, -2.0, remaining)
        counted = selected
    else:
        remaining = score
        for i in tl.static_range(K):
            top = tl.max(remaining, 1)
            idx = tl.min(tl.where(remaining == top[:, None], cols[None, :], EP), 1)
            hit = cols[None, :] == idx[:, None]
            selected = selected | hit
            slots = tl.where(cols[None, :] == i, idx[:, None], slots)
            remaining = tl.where(hit, float("-inf"), remaining)
        counted = selected
        if BROADCAST:  # GW-MoE training: uncertain tokens go to every expert
            entropy = -tl.sum(tl.where(cols_ok[None, :], p * tl.log(p + eps), 0.0), 1) * entropy_scale
            broadcast = entropy >= tl.load(thr_ptr).to(tl.float32)
            selected = selected | (broadcast[:, None] & cols_ok[None, :])
            slots = tl.where(broadcast[:, None], cols[None, :], slots)
    return selected, slots, broadcast, tsallis, counted


@triton.jit
def _weights(p, selected, broadcast, KIND: tl.constexpr, E: tl.constexpr, RENORM: tl.constexpr,
             BROADCAST: tl.constexpr, UNIFORM: tl.constexpr):
    """Routing weights (BT, EP): selected probabilities, renormalised over the selection with RENORM
    (= the softmax of the selected logits); GW-MoE broadcast rows get p (or 1/E with UNIFORM)."""
    w = tl.where(selected, p, 0.0)
    if RENORM:
        w = w / tl.maximum(tl.sum(w, 1), 1.1754943508222875e-38)[:, None]
    if BROADCAST:
        if UNIFORM:
            w = tl.where(broadcast[:, None], tl.where(selected, 1.0 / E, 0.0), w)
        else:
            w = tl.where(broadcast[:, None], p, w)
    return w


@triton.jit
def _route_tile(gate_ptr, stride_gate, thr_ptr, T, top_p, dyn_threshold, eps, tsallis_scale, q, entropy_scale,
                KIND: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                K: tl.constexpr, KEEP: tl.constexpr, RENORM: tl.constexpr, BROADCAST: tl.constexpr,
                UNIFORM: tl.constexpr, BLOCK_T: tl.constexpr):
    """The routing of this program's block of tokens, from its gate logits. One function for the forward and the
    backward kernel, so that the backward recomputes exactly the forward's selection and weights."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, EP)
    cols_ok = cols < E
    p, score, zsq, lse, sub, wm = _distribution(gate_ptr + rows64 * stride_gate, rows_ok, cols, cols_ok, KIND, E, M, MP)
    selected, slots, broadcast, tsallis, counted = _select(p, score, cols, cols_ok, thr_ptr, top_p, dyn_threshold,
                                                           eps, tsallis_scale, q, entropy_scale, KIND, E, EP, K, KEEP,
                                                           BROADCAST, BLOCK_T)
    selected = selected & cols_ok[None, :]
    counted = counted & cols_ok[None, :]
    w = _weights(p, selected, broadcast, KIND, E, RENORM, BROADCAST, UNIFORM)
    return (pid, rows, rows_ok, rows64, cols, cols_ok, p, zsq, lse, sub, wm, selected, slots, broadcast, tsallis, w,
            counted)


@triton.jit
def _mole_route_fwd(
    gate_ptr, stride_gate, h_ptr, stride_h, mask_ptr, thr_ptr, hs_ptr, routed_ptr, idx_ptr, work_ptr, T,
    scaling: tl.constexpr, top_p: tl.constexpr, dyn_threshold: tl.constexpr, eps: tl.constexpr,
    tsallis_scale: tl.constexpr, q: tl.constexpr, entropy_scale: tl.constexpr,
    KIND: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    M: tl.constexpr, MP: tl.constexpr, K: tl.constexpr, KEEP: tl.constexpr, KI: tl.constexpr,
    RENORM: tl.constexpr, BROADCAST: tl.constexpr, UNIFORM: tl.constexpr, HAS_MASK: tl.constexpr,
    H_OFFSET: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """routed = [weights; probs; (MoR) log p] (2 or 3, T, E); work starts with the (NB, 4, EP) partial sums.
    The experts' hidden of token t is at h_ptr + t * stride_h + H_OFFSET (H_OFFSET = G when it shares the
    gate logits' GEMM output)."""
    (pid, rows, rows_ok, rows64, cols, cols_ok, p, zsq, lse, sub, wm, selected, slots, broadcast, tsallis, w,
     counted) = _route_tile(gate_ptr, stride_gate, thr_ptr, T, top_p, dyn_threshold, eps, tsallis_scale, q,
                            entropy_scale, KIND, E, EP, M, MP, K, KEEP, RENORM, BROADCAST, UNIFORM, BLOCK_T)

    # The experts' rank hidden times (routing weight * alpha / r), per rank block.
    js = tl.arange(0, RP)
    hmask = rows_ok[:, None, None] & cols_ok[None, :, None] & (js < R)[None, None, :]
    hcols = cols[None, :, None] * R + js[None, None, :]
    h = tl.load(h_ptr + H_OFFSET + rows64[:, None, None] * stride_h + hcols, mask=hmask, other=0.0)
    hs = h.to(tl.float32) * (w * scaling)[:, :, None]
    tl.store(hs_ptr + rows64[:, None, None] * (E * R) + hcols, hs.to(h.dtype), mask=hmask)

    out_mask = rows_ok[:, None] & cols_ok[None, :]
    out_offsets = rows64[:, None] * E + cols[None, :]
    out_ty = routed_ptr.dtype.element_ty
    tl.store(routed_ptr + out_offsets, w.to(out_ty), mask=out_mask)
    tl.store(routed_ptr + T * E + out_offsets, p.to(out_ty), mask=out_mask)
    if KIND == 3:  # MoR has no single logit: log p, as the eager router reports
        logp = tl.log(tl.maximum(p, 1.1754943508222875e-38))
        tl.store(routed_ptr + 2 * T * E + out_offsets, logp.to(out_ty), mask=out_mask)
    tl.store(idx_ptr + rows64[:, None] * KI + cols[None, :], slots.to(tl.int64),
             mask=rows_ok[:, None] & (cols < KI)[None, :])

    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=rows_ok, other=0).to(tl.float32)
    else:
        m = rows_ok.to(tl.float32)
    tl.static_assert(EP >= 3, "a partial-sum row holds three scalars: EP must be at least 3")
    part = work_ptr + pid * (4 * EP) + cols
    tl.store(part, tl.sum(m[:, None] * counted.to(tl.float32), 0))
    tl.store(part + EP, tl.sum(m[:, None] * p, 0))
    tl.store(part + 2 * EP, tl.sum(m[:, None] * selected.to(tl.float32) * p, 0))
    scalars = tl.where(cols == 0, tl.sum(m * tsallis, 0), tl.where(cols == 1, tl.sum(m * zsq, 0),
                                                                    tl.where(cols == 2, tl.sum(m, 0), 0.0)))
    tl.store(part + 3 * EP, scalars)


@triton.jit
def _mole_route_finalize(work_ptr, NB, balance_coef: tl.constexpr, dyn_coef: tl.constexpr, z_coef: tl.constexpr,
                         KIND: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, BLOCK_NB: tl.constexpr):
    """Aux losses from the partial sums (one program). work = [partials (NB, 4, EP) | losses (balance, tsallis, z)
    | saved]; saved = [u (EP), v (EP), 1 / n_valid]: the balance loss's gradient w.r.t. each token's p is
    g * m / n * (u + selected * v) (v only for DynMoLE)."""
    part_ptr = work_ptr
    losses_ptr = work_ptr + NB * 4 * EP
    saved_ptr = losses_ptr + 3
    cols = tl.arange(0, EP)
    cols_ok = cols < E
    sel_sum = tl.zeros([EP], tl.float32)
    p_sum = tl.zeros([EP], tl.float32)
    selp_sum = tl.zeros([EP], tl.float32)
    scalars = tl.zeros([EP], tl.float32)
    for start in range(0, NB, BLOCK_NB):
        blocks = start + tl.arange(0, BLOCK_NB)
        ptrs = part_ptr + blocks[:, None] * (4 * EP) + cols[None, :]
        ok = (blocks < NB)[:, None]
        sel_sum += tl.sum(tl.load(ptrs, mask=ok, other=0.0), 0)
        p_sum += tl.sum(tl.load(ptrs + EP, mask=ok, other=0.0), 0)
        selp_sum += tl.sum(tl.load(ptrs + 2 * EP, mask=ok, other=0.0), 0)
        scalars += tl.sum(tl.load(ptrs + 3 * EP, mask=ok, other=0.0), 0)
    inv_n = 1.0 / tl.maximum(tl.sum(tl.where(cols == 2, scalars, 0.0), 0), 1.0)
    share = sel_sum * inv_n  # f_e (unnormalised): share of valid tokens that selected e
    mean_p = p_sum * inv_n  # P_e
    if KIND == 2:  # DynMoLE: E * sum_e mean(masked p)_e * mean(p)_e, gradient through both factors
        u = balance_coef * E * selp_sum * inv_n
        v = balance_coef * E * mean_p
        balance = tl.sum(u * mean_p, 0)
    else:  # Switch: E * sum_e f_e P_e with f = share / sum(share); f carries no gradient
        u = balance_coef * E * share / tl.maximum(tl.sum(share, 0), 1.1754943508222875e-38)
        v = tl.zeros([EP], tl.float32)
        balance = tl.sum(u * mean_p, 0)
    tl.store(losses_ptr, balance)
    tl.store(losses_ptr + 1, dyn_coef * tl.sum(tl.where(cols == 0, scalars, 0.0), 0) * inv_n)
    tl.store(losses_ptr + 2, z_coef * tl.sum(tl.where(cols == 1, scalars, 0.0), 0) * inv_n)
    tl.store(saved_ptr + cols, tl.where(cols_ok, u, 0.0))
    tl.store(saved_ptr + EP + cols, tl.where(cols_ok, v, 0.0))
    tl.store(saved_ptr + 2 * EP, inv_n)


@triton.jit
def _mole_route_bwd(
    gate_ptr, stride_gate, h_ptr, stride_h, dhs_ptr, mask_ptr, thr_ptr, work_ptr, NB, g_losses_ptr,
    dgate_ptr, stride_dgate, dh_ptr, stride_dh, T,
    scaling: tl.constexpr, top_p: tl.constexpr, dyn_threshold: tl.constexpr, eps: tl.constexpr,
    tsallis_scale: tl.constexpr, q: tl.constexpr, entropy_scale: tl.constexpr, dyn_coef: tl.constexpr,
    z_coef: tl.constexpr, KIND: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    M: tl.constexpr, MP: tl.constexpr, K: tl.constexpr, KEEP: tl.constexpr,
    RENORM: tl.constexpr, BROADCAST: tl.constexpr, UNIFORM: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_G_LOSSES: tl.constexpr, H_OFFSET: tl.constexpr, DH_OFFSET: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """d(gate logits) and d(rank hidden) from d(scaled hidden) and the losses' gradient (3,); the routing is
    recomputed (same code, same result). Offsets as in the forward kernel."""
    saved_ptr = work_ptr + NB * 4 * EP + 3
    (pid, rows, rows_ok, rows64, cols, cols_ok, p, zsq, lse, sub, wm, selected, slots, broadcast, tsallis, w,
     counted) = _route_tile(gate_ptr, stride_gate, thr_ptr, T, top_p, dyn_threshold, eps, tsallis_scale, q,
                            entropy_scale, KIND, E, EP, M, MP, K, KEEP, RENORM, BROADCAST, UNIFORM, BLOCK_T)

    js = tl.arange(0, RP)
    hmask = rows_ok[:, None, None] & cols_ok[None, :, None] & (js < R)[None, None, :]
    hcols = cols[None, :, None] * R + js[None, None, :]
    h = tl.load(h_ptr + H_OFFSET + rows64[:, None, None] * stride_h + hcols, mask=hmask, other=0.0).to(tl.float32)
    dhs = tl.load(dhs_ptr + rows64[:, None, None] * (E * R) + hcols, mask=hmask, other=0.0).to(tl.float32)
    dh = dhs * (w * scaling)[:, :, None]
    tl.store(dh_ptr + DH_OFFSET + rows64[:, None, None] * stride_dh + hcols, dh.to(dh_ptr.dtype.element_ty),
             mask=hmask)
    dw = tl.sum(dhs * h, 2) * scaling  # (BT, EP) d loss / d routing weight

    # d loss / d p, then through the softmax(es) to the logits.
    if RENORM:
        selected_mass = tl.maximum(tl.sum(tl.where(selected, p, 0.0), 1), 1.1754943508222875e-38)
        dp = tl.where(selected, (dw - tl.sum(w * dw, 1)[:, None]) / selected_mass[:, None], 0.0)
    else:
        dp = tl.where(selected, dw, 0.0)
    if BROADCAST:
        if UNIFORM:
            dp = tl.where(broadcast[:, None], 0.0, dp)
        else:
            dp = tl.where(broadcast[:, None], dw, dp)
    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=rows_ok, other=0).to(tl.float32)
    else:
        m = rows_ok.to(tl.float32)
    inv_n = tl.load(saved_ptr + 2 * EP)
    token_scale = m * inv_n  # (BT,) this token's weight in every masked mean
    if HAS_G_LOSSES:
        g = tl.load(g_losses_ptr).to(tl.float32)
        u = tl.load(saved_ptr + cols)
        dp += (g * token_scale)[:, None] * u[None, :]
        if KIND == 2:
            v = tl.load(saved_ptr + EP + cols)
            dp += (g * token_scale)[:, None] * tl.where(selected, v[None, :], 0.0)
    if KIND == 2:
        if HAS_G_LOSSES:  # d S_q / d p_e = -q (p_e + eps)^(q - 1) * tsallis_scale
            g_ts = tl.load(g_losses_ptr + 1).to(tl.float32) * dyn_coef
            dtsallis = -q * tl.exp((q - 1.0) * tl.log(p + eps)) * tsallis_scale
            dp += (g_ts * token_scale)[:, None] * tl.where(cols_ok[None, :], dtsallis, 0.0)
    if KIND == 3:
        ms = tl.arange(0, MP)
        ms_ok = ms < M
        dwm = tl.sum(sub * dp[:, None, :], 2)  # (BT, MP)
        dsub = sub * wm[:, :, None] * (dp[:, None, :] - dwm[:, :, None])  # (BT, MP, EP)
        if HAS_G_LOSSES:  # d/dz_m mean_m lse_m^2 = (2 / M) lse_m softmax(z_m)
            g_z = tl.load(g_losses_ptr + 2).to(tl.float32) * z_coef
            dsub += (g_z * token_scale * (2.0 / M))[:, None, None] * lse[:, :, None] * sub
        dmain = wm * (dwm - tl.sum(wm * dwm, 1)[:, None])
        dsub_mask = rows_ok[:, None, None] & ms_ok[None, :, None] & cols_ok[None, None, :]
        tl.store(dgate_ptr + rows64[:, None, None] * stride_dgate + ms[None, :, None] * E + cols[None, None, :],
                 dsub.to(dgate_ptr.dtype.element_ty), mask=dsub_mask)
        tl.store(dgate_ptr + rows64[:, None] * stride_dgate + M * E + ms[None, :],
                 dmain.to(dgate_ptr.dtype.element_ty), mask=rows_ok[:, None] & ms_ok[None, :])
    else:
        dz = p * (dp - tl.sum(p * dp, 1)[:, None])
        if HAS_G_LOSSES:  # d/dz lse^2 = 2 lse softmax(z)
            g_z = tl.load(g_losses_ptr + 2).to(tl.float32) * z_coef
            dz += (g_z * token_scale * 2.0 * lse)[:, None] * p
        tl.store(dgate_ptr + rows64[:, None] * stride_dgate + cols[None, :], dz.to(dgate_ptr.dtype.element_ty),
                 mask=rows_ok[:, None] & cols_ok[None, :])
