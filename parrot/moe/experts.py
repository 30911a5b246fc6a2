"""Expert executors: run E experts on routed inputs without a Python loop over samples or tokens.

Routing (which experts, with which weights) comes from `routers.py`; this module only computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLUExperts(nn.Module):
    """E SwiGLU MLPs, expert_e(x) = down_e(silu(gate_e x) * up_e x), D -> I -> D, no bias.

    Weights are stored stacked (one tensor per projection) so that all experts run as one matmul.
    Routing here is per *sample*: every token of sample b is combined with the same weights (B, E), as
    the Parrot projector routes a whole image by its prompt (Sun et al., 2024, eq. 4).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # (E, D, I)
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # (E, D, I)
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # (E, I, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default init, per expert.
        for weight, fan_in in ((self.gate_proj, self.hidden_size), (self.up_proj, self.hidden_size),
                               (self.down_proj, self.intermediate_size)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), weights (B, E) -> sum_e weights[b, e] * expert_e(x[b]), shape (B, N, D).

        With `indices` (B, K) only the K selected experts of each sample are computed (sparse path);
        without, all experts run as three fused matmuls (dense soft routing).
        """
        if indices is None:
            return self._dense(x, weights)
        return self._selected(x, weights, indices)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        E, I = self.num_experts, self.intermediate_size
        # sum_e w_e down_e(h_e) = [w_1 h_1, ..., w_E h_E] @ [down_1; ...; down_E]: one matmul over E*I.
        gate = self.gate_proj.permute(1, 0, 2).reshape(D, E * I)
        up = self.up_proj.permute(1, 0, 2).reshape(D, E * I)
        h = F.silu(x @ gate) * (x @ up)  # (B, N, E*I)
        h = h.view(B, N, E, I) * weights.to(h.dtype)[:, None, :, None]
        return h.view(B, N, E * I) @ self.down_proj.reshape(E * I, D)  # (B, N, D)

    def _selected(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        safe = indices.clamp_min(0)  # (B, K); -1 marks "no expert" and gets weight 0 below
        w = weights.gather(1, safe) * (indices >= 0)  # (B, K)
        gate, up, down = self.gate_proj[safe], self.up_proj[safe], self.down_proj[safe]  # (B, K, D, I) / (B, K, I, D)
        h = F.silu(torch.einsum("bnd,bkdi->bkni", x, gate)) * torch.einsum("bnd,bkdi->bkni", x, up)
        out = torch.einsum("bkni,bkid->bknd", h, down)  # (B, K, N, D)
        return torch.einsum("bknd,bk->bnd", out, w.to(out.dtype))


class LoRAExperts(nn.Module):
    """E LoRA experts on one linear map: delta_e(x) = (alpha / r) * B_e A_e x (Hu et al., 2021, eq. 3).

    A_e in R^{r x D_in} (Kaiming-uniform init, as peft), B_e in R^{D_out x r} (zero init), stacked as
    `lora_A` (E, r, D_in) and `lora_B` (E, D_out, r). `forward(x, weights, indices)` returns
    sum_k weights[t, e_k] * delta_{e_k}(x_t) over each token's selected experts (MixLoRA, Li et al.,
    2024, arXiv 2404.15159, eq. 4), computed without a loop over tokens:

    - dense path (every token selected every expert): one matmul through all experts' A stacked
      (D_in -> E*r), a per-expert weight, one matmul through all B stacked (E*r -> D_out);
    - sparse path: (token, expert) pairs are sorted by expert and each expert runs once on its
      contiguous group of rows (`run_expert`), results scattered back with index_add. Unselected
      (token, expert) pairs are never computed.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1 or num_experts < 1:
            raise ValueError(f"LoRAExperts needs rank >= 1 and num_experts >= 1, got rank={rank}, E={num_experts}")
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))  # (E, r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))  # (E, D_out, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in self.lora_A:  # per expert, exactly peft's init of lora_A (an (r, D_in) nn.Linear weight)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """delta_e on a group of rows x (n, D_in) -> (n, D_out), without the routing weight."""
        return (x @ self.lora_A[expert].t()) @ self.lora_B[expert].t() * self.scaling

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (T, D_in), weights (T, E), indices (T, K) with -1 padding -> (T, D_out)."""
        valid = indices >= 0  # (T, K)
        if indices.shape[1] == self.num_experts and bool(valid.all()):
            return self._dense(x, weights)
        return self._grouped(x, weights, indices, valid)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        E, r = self.num_experts, self.rank
        h = x @ self.lora_A.reshape(E * r, self.in_features).t()  # (T, E*r)
        h = (h.view(-1, E, r) * weights.to(h.dtype)[:, :, None]).reshape(-1, E * r)
        return h @ self.lora_B.transpose(1, 2).reshape(E * r, self.out_features) * self.scaling  # (T, D_out)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        token_ids = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(indices)[valid]  # (P,)
        expert_ids = indices[valid]  # (P,)
        order = expert_ids.argsort(stable=True)
        token_ids, expert_ids = token_ids[order], expert_ids[order]
        pair_weights = weights[token_ids, expert_ids].to(x.dtype)  # (P,)
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        out = x.new_zeros(x.shape[0], self.out_features)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = token_ids[start : start + count]
                delta = self.run_expert(expert, x[rows]) * pair_weights[start : start + count, None]
                out = out.index_add(0, rows, delta)
            start += count
        return out
