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

    def default_init_bounds(self) -> list[tuple[nn.Parameter, float]]:
        """(weight, b) pairs: nn.Linear's default init of each expert's projection is U(-b, b), b = 1/sqrt(fan_in)."""
        return [(self.gate_proj, 1.0 / math.sqrt(self.hidden_size)), (self.up_proj, 1.0 / math.sqrt(self.hidden_size)),
                (self.down_proj, 1.0 / math.sqrt(self.intermediate_size))]

    def reset_parameters(self) -> None:
        for weight, bound in self.default_init_bounds():
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

    - "stacked": one matmul through all experts' A stacked (D_in -> E*r), the routing weights (exactly
      zero for unselected experts) applied per rank block, one matmul through all B stacked
      (E*r -> D_out). It reads x and writes the output once, like a single rank-E*r LoRA: the fastest
      path whenever E*r is small next to the layer width (the LoRA FLOPs are then a rounding error next
      to the frozen base matmul, and memory traffic decides; see benchmarks/README.md).
    - "grouped": (token, expert) pairs are sorted by expert, x is gathered once, each expert runs once
      on its contiguous slice of rows (`run_expert`), results are scattered back with one index_add.
      Unselected (token, expert) pairs are never computed: FLOPs scale with k, not E.
    - "auto" (default): "stacked" when every token selected every expert, or when E*r <= min(D_in,
      D_out) / 8 (the whole stacked adapter costs under 1/4 of the base layer's FLOPs); else "grouped".

    Both fold alpha / r into the per-row routing weights (applied to the rank-r hidden, never to the
    (T, D_out) output) and, given the frozen layer's output as `base`, accumulate into it inside the
    last GEMM (`addmm`) or `index_add`, so `MoLELinear` needs no separate (T, D_out) addition.
    """

    EXECUTIONS = ("auto", "stacked", "grouped")

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float,
                 execution: str = "auto", activation: nn.Module | None = None):
        super().__init__()
        if rank < 1 or num_experts < 1:
            raise ValueError(f"LoRAExperts needs rank >= 1 and num_experts >= 1, got rank={rank}, E={num_experts}")
        if execution not in self.EXECUTIONS:
            raise ValueError(f"LoRAExperts execution={execution!r}; choose from {self.EXECUTIONS}")
        self.execution = execution
        # sigma between A and B: identity for LoRA; a nonlinearity turns the experts into bottleneck
        # adapters (Houlsby et al., 2019), as PERFT uses them.
        self.act = activation  # None: plain LoRA (no module call on the hot path)
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha  # the LoRA scaling numerator as configured (`load_mole` compares it)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))  # (E, r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))  # (E, D_out, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in self.lora_A:  # per expert, exactly peft's init of lora_A (an (r, D_in) nn.Linear weight)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _down(self, x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        """sigma(x A^T): x (n, D_in), A (k, D_in) -> (n, k); no activation module call for plain LoRA."""
        h = x @ lora_a.t()
        return h if self.act is None else self.act(h)

    def run_expert(self, expert: int, x: torch.Tensor, row_scale: torch.Tensor | None = None,
                   lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """delta_e on a group of rows x (n, D_in) -> (n, D_out).

        `row_scale` (n,) multiplies each row (routing weight times alpha / r); it is applied to the
        rank-r hidden, r/D_out of the work of scaling the output. Without it: the plain (alpha / r) delta.
        `lora` = (A_e, B_e) when the caller already split the stacked weights (one backward node for all
        experts instead of E zero-filled (E, r, D) gradients).
        """
        lora_a, lora_b = (self.lora_A[expert], self.lora_B[expert]) if lora is None else lora
        h = self._down(x, lora_a)  # (n, r)
        if row_scale is None:
            return h @ lora_b.t() * self.scaling
        return (h * row_scale[:, None]) @ lora_b.t()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, D_in), weights (T, E), indices (T, K) with -1 padding -> (T, D_out).

        With `base` (T, D_out) (the frozen layer's output) the result is base + delta, accumulated
        inside the last matmul / index_add instead of by a separate (T, D_out) addition.
        """
        if self._use_stacked(indices):
            return self._stacked(x, weights, base)
        return self._grouped(x, weights, indices, base)

    def always_stacked(self) -> bool:
        """Whether every call runs the stacked executor, whatever the routing (by setting or by size)."""
        if self.execution != "auto":
            return self.execution == "stacked"
        return self.num_experts * self.rank * 8 <= min(self.in_features, self.out_features)

    def _use_stacked(self, indices: torch.Tensor) -> bool:
        if self.execution != "auto" or self.always_stacked():
            return self.always_stacked()
        # auto, too large to stack unconditionally: still stacked when every token selected every expert
        return indices.shape[1] == self.num_experts and bool((indices >= 0).all())

    def _stacked(self, x: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        h = self._down(x, self.lora_A.reshape(self.num_experts * self.rank, self.in_features))  # (T, E*r)
        return self.stacked_from_hidden(h, weights, base)

    def stacked_from_hidden(self, h: torch.Tensor, weights: torch.Tensor,
                            base: torch.Tensor | None = None) -> torch.Tensor:
        """The stacked executor from the rank hidden h = sigma(x A^T) (T, E*r) already computed (a MoLE layer
        computes it in one GEMM with the router's logits) -> (base +) delta (T, D_out)."""
        E, r = self.num_experts, self.rank
        # alpha / r folds into the (T, E) weights, so the (T, D_out) output is never rescaled.
        scale = (weights * self.scaling).to(h.dtype)  # (T, E)
        h = (h.view(-1, E, r) * scale[:, :, None]).view(-1, E * r)
        lora_b = self.lora_B.transpose(1, 2).reshape(E * r, self.out_features)  # (E*r, D_out)
        if base is None:
            return h @ lora_b  # (T, D_out)
        if base.dtype == h.dtype:
            return torch.addmm(base, h, lora_b)  # base + h @ lora_b in one GEMM
        return base + (h @ lora_b).to(base.dtype)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 base: torch.Tensor | None = None) -> torch.Tensor:
        num_slots = indices.shape[1]
        flat = indices.reshape(-1)  # (T*K,)
        # A stable sort puts the empty slots (-1) first, then expert 0's pairs, 1's, ...: one host sync
        # (the split sizes) covers both the padding count and the groups.
        order = flat.argsort(stable=True)  # (T*K,)
        counts = torch.bincount(flat + 1, minlength=self.num_experts + 1).tolist()  # split sizes must be ints
        order = order[counts[0]:]  # (P,) drop empty slots
        token_ids, expert_ids = order // num_slots, flat[order]  # (P,), in expert order
        row_scale = (weights[token_ids, expert_ids] * self.scaling).to(x.dtype)  # (P,)
        # One gather (index_select: its backward is an index_add, not an accumulating index_put), then views.
        groups = zip(x.index_select(0, token_ids).split(counts[1:]), row_scale.split(counts[1:]),
                     zip(self.lora_A.unbind(0), self.lora_B.unbind(0)))
        deltas = [self.run_expert(e, rows, s, lora) for e, (rows, s, lora) in enumerate(groups) if rows.shape[0]]
        delta = torch.cat(deltas) if deltas else x.new_zeros(0, self.out_features)  # (P, D_out), expert order
        if base is not None and base.dtype == delta.dtype:
            return base.index_add(0, token_ids, delta)  # base + delta, no separate addition
        # delta's dtype, not x's: under autocast the experts' matmuls return the autocast dtype (index_add needs one)
        out = delta.new_zeros(x.shape[0], self.out_features).index_add(0, token_ids, delta)  # (T, D_out)
        return out if base is None else base + out.to(base.dtype)
