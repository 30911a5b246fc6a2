"""The batched Parrot MoE projector against a per-sample, per-expert float64 reference (paper eqs. 2-5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from parrot.model.parrot_moe import ParrotMoEProjector
from parrot.moe.routers import TopKRouter

from .conftest import tiny_parrot_config


def reference_parrot_moe(moe: ParrotMoEProjector, visual, text, mask, top_k=None):
    """Loop over samples and experts, exactly as the paper describes it."""
    outputs, probs = [], []
    for b in range(visual.shape[0]):
        v, x = visual[b], text[b][mask[b]]  # (N_v, D), (T_b, D)
        if x.shape[0] > 0:
            attn = torch.softmax(v[0] @ x.T / math.sqrt(x.shape[-1]), dim=-1)
            pooled = attn @ x
        else:
            pooled = torch.zeros_like(v[0])
        p = torch.softmax(moe.router.gate.weight @ pooled, dim=-1)
        weights = p.clone()
        if top_k is not None:
            keep = torch.topk(p, top_k).indices
            weights = torch.zeros_like(p)
            weights[keep] = p[keep] / p[keep].sum()
        out = torch.zeros_like(v)
        for e in range(p.shape[0]):
            if weights[e] == 0:
                continue
            gate, up, down = moe.experts.gate_proj[e], moe.experts.up_proj[e], moe.experts.down_proj[e]
            out = out + weights[e] * ((F.silu(v @ gate) * (v @ up)) @ down)
        if moe.use_residual:
            out = out + moe.moe_weight * v
        outputs.append(out)
        probs.append(p)
    return torch.stack(outputs), torch.stack(probs)


def random_inputs(B=5, N=7, T=9, D=32):
    visual = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    text = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T
    lengths[1] = 0  # a sample without prompt tokens
    mask = torch.arange(T)[None] < lengths[:, None]
    mask = mask[:, torch.randperm(T)]  # padding anywhere, not only at the end
    return visual, text, mask


@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("residual", [True, False])
def test_batched_moe_matches_per_sample_reference(top_k, residual):
    moe = ParrotMoEProjector(tiny_parrot_config(moe_top_k=top_k, use_moe_residual=residual)).double()
    visual, text, mask = random_inputs()
    out, routing = moe(visual, text, mask)
    ref_out, ref_probs = reference_parrot_moe(moe, visual, text, mask, top_k)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(routing.probs, ref_probs, rtol=1e-6, atol=1e-12)

    grad_out = torch.randn_like(out)
    params = [visual, text, *moe.parameters()]
    grads = torch.autograd.grad((out * grad_out).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum(), params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-10)


def test_sparse_path_computes_only_selected_experts():
    moe = ParrotMoEProjector(tiny_parrot_config(moe_top_k=1)).double()
    visual, text, mask = random_inputs()
    out, routing = moe(visual, text, mask)
    assert routing.indices.shape == (visual.shape[0], 1)
    # Poison the experts that no sample selected: the output must not change.
    unused = sorted(set(range(3)) - set(routing.indices.flatten().tolist()))
    with torch.no_grad():
        for e in unused:
            moe.experts.gate_proj[e].fill_(float("nan"))
    torch.testing.assert_close(moe(visual, text, mask)[0], out)


def test_padding_does_not_change_routing():
    moe = ParrotMoEProjector(tiny_parrot_config()).double()
    visual, text, mask = random_inputs()
    out, _ = moe(visual, text, mask)
    noisy = text.detach().clone()
    noisy[~mask] = 1e3 * torch.randn_like(noisy[~mask])  # garbage in padded slots
    torch.testing.assert_close(moe(visual, noisy, mask)[0], out)


def test_router_is_the_library_router():
    moe = ParrotMoEProjector(tiny_parrot_config())
    assert isinstance(moe.router, TopKRouter)
