"""The Parrot text-guided MoE projector (Sun et al., 2024, "Parrot: Multilingual Visual Instruction Tuning",
arXiv 2406.02539, sec. 3.2, eqs. 2-5).

For each image, the CLS visual token queries the embeddings of its prompt text:

    a = softmax(q X^T / sqrt(D))        q = V[0] (CLS), X = prompt-token embeddings (padding/answers masked)
    g = a X                             pooled text vector, (D,)
    p = softmax(W_g g)                  router over E experts (`parrot.moe.routers.TopKRouter`)
    V' = sum_e p_e Expert_e(V) + lambda V     (residual with lambda = moe_weight when use_moe_residual)

Experts are SwiGLU MLPs in the LLM hidden size (`parrot.moe.experts.SwiGLUExperts`). The official code routes
densely (all experts, `moe_top_k` unused); `moe_top_k=k` here keeps the top k and renormalises. Everything is
batched: one attention over the padded batch, one router call, experts as fused matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..moe.experts import SwiGLUExperts
from ..moe.routers import RouterOutput, TopKRouter
from .configuration import ParrotConfig


class ParrotMoEProjector(nn.Module):
    def __init__(self, config: ParrotConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.use_residual = config.use_moe_residual
        self.moe_weight = config.moe_weight
        self.router = TopKRouter(hidden, config.moe_num_experts, top_k=config.moe_top_k, renormalize=True)
        self.experts = SwiGLUExperts(config.moe_num_experts, hidden, config.moe_intermediate_size or hidden)

    def pool_text(self, cls_token: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """cls_token (B, D), text_embeds (B, T, D), text_mask (B, T) bool -> pooled text (B, D).

        A sample without any prompt token pools to the zero vector (its router then sees only the bias-free
        zero input, i.e. uniform routing) instead of producing NaNs.
        """
        scale = 1.0 / math.sqrt(text_embeds.shape[-1])
        scores = torch.einsum("bd,btd->bt", cls_token, text_embeds) * scale  # (B, T)
        scores = scores.masked_fill(~text_mask, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * text_mask.any(-1, keepdim=True)  # (B, T)
        return torch.einsum("bt,btd->bd", attn, text_embeds)  # (B, D)

    def forward(
        self, visual: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, RouterOutput]:
        """visual (B, N_v, D) with CLS first, text_embeds (B, T, D), text_mask (B, T) -> (B, N_v, D), routing.

        Computed in the dtype of the MoE's weights (the projector or the LLM's embeddings may be kept in another)."""
        dtype = self.router.gate.weight.dtype
        visual, text_embeds = visual.to(dtype), text_embeds.to(dtype)
        pooled = self.pool_text(visual[:, 0], text_embeds, text_mask)  # (B, D)
        routing = self.router(pooled)
        dense = self.router.top_k is None
        out = self.experts(visual, routing.weights, None if dense else routing.indices)  # (B, N_v, D)
        if self.use_residual:
            out = out + self.moe_weight * visual
        return out, routing
