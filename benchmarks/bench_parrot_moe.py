"""Parrot MoE projector, forward + backward: batched (`ParrotMoEProjector`) vs the official per-sample loop.

Reference: the official Parrot code (AIDC-AI/Parrot, `parrot/model/moe_model/moe.py::MultilingualMoE.forward`)
runs the MoE once per image from the per-sample loop of `parrot_arch.py::prepare_inputs_labels_for_multimodal`,
with the prompt tokens selected by boolean indexing, one `nn.Linear` triple per expert and the expert outputs
stacked and summed with the routing weights. `OfficialStyleMoE` below re-implements exactly that control flow
(written here, not copied) with our projector's weights, and the benchmark first checks that both give the
same output and gradients.

    python -m benchmarks.bench_parrot_moe [--device cuda] [--dtype bfloat16] [--batch 16] [--out results/]

Issue 8 sizes (defaults): B=16, 577 visual tokens (CLS + 24x24), 64 text tokens, D=1024, E=6, I=1024.
Target: >= 10x faster than the reference.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from parrot.fileio import positive_int
from parrot.model import ParrotConfig
from parrot.model.parrot_moe import ParrotMoEProjector

from .harness import BenchSettings, Ratio, add_common_args, check_same, finish, grads_of, profile_cases, settings_from_args, time_cases

TARGET_SPEEDUP = 10.0
QUICK_SIZES = dict(batch=4, visual_tokens=145, text_tokens=32, hidden=256, experts=6, intermediate=256)


class OfficialStyleExpert(nn.Module):
    """One SwiGLU expert as three bias-free nn.Linear layers (official `Expert`)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OfficialStyleMoE(nn.Module):
    """The official per-image MoE, called in a Python loop over the batch, with weights copied from ours."""

    def __init__(self, ours: ParrotMoEProjector):
        super().__init__()
        experts = ours.experts
        self.use_residual = ours.use_residual
        self.moe_weight = ours.moe_weight
        self.gate = nn.Linear(experts.hidden_size, experts.num_experts, bias=False)
        self.experts = nn.ModuleList(
            OfficialStyleExpert(experts.hidden_size, experts.intermediate_size) for _ in range(experts.num_experts)
        )
        with torch.no_grad():
            self.gate.weight.copy_(ours.router.gate.weight)
            for e, expert in enumerate(self.experts):
                expert.gate_proj.weight.copy_(experts.gate_proj[e].t())  # ours (D, I) -> nn.Linear (I, D)
                expert.up_proj.weight.copy_(experts.up_proj[e].t())
                expert.down_proj.weight.copy_(experts.down_proj[e].t())
        self.to(device=experts.gate_proj.device, dtype=experts.gate_proj.dtype)

    def forward_one(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text (T_b, D) prompt embeddings of one sample, image (N_v, D) -> (N_v, D)."""
        cls_token = image[0:1]  # (1, D)
        scores = cls_token @ text.t() / math.sqrt(cls_token.shape[-1])  # (1, T_b)
        pooled = F.softmax(scores, dim=-1) @ text  # (1, D)
        weights = F.softmax(self.gate(pooled), dim=-1, dtype=image.dtype)  # (1, E)
        expert_out = torch.stack([expert(image) for expert in self.experts], dim=0)  # (E, N_v, D)
        out = (weights[0][:, None, None] * expert_out).sum(0)
        if self.use_residual:
            out = out + self.moe_weight * image
        return out

    def forward(self, visual: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        outputs = [self.forward_one(text_embeds[b][text_mask[b]], visual[b]) for b in range(visual.shape[0])]
        return torch.stack(outputs)  # (B, N_v, D)

    def stacked_expert_weights(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-expert nn.Linear gradients [g_0, u_0, d_0, g_1, ...] -> our stacked (E, D, I)/(E, I, D) layout."""
        per_expert = [grads[i::3] for i in range(3)]
        return [torch.stack([g.t() for g in group]) for group in per_expert]


def make_config(hidden: int, experts: int, intermediate: int) -> ParrotConfig:
    # Only the projector is built: the LM/vision configs just carry the sizes the projector reads.
    text_config = dict(model_type="qwen2", vocab_size=64, hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    vision_config = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, image_size=32, patch_size=8)
    return ParrotConfig(text_config=text_config, vision_config=vision_config, image_token_id=5, use_moe=True,
                        moe_num_experts=experts, moe_intermediate_size=intermediate)


def run(args: argparse.Namespace, settings: BenchSettings):
    sizes = dict(QUICK_SIZES) if settings.quick else dict(
        batch=args.batch, visual_tokens=args.visual_tokens, text_tokens=args.text_tokens, hidden=args.hidden,
        experts=args.experts, intermediate=args.intermediate)
    B, N, T, D = sizes["batch"], sizes["visual_tokens"], sizes["text_tokens"], sizes["hidden"]
    device, dtype = settings.device, settings.dtype

    ours = ParrotMoEProjector(make_config(D, sizes["experts"], sizes["intermediate"])).to(device=device, dtype=dtype)
    reference = OfficialStyleMoE(ours)
    visual = torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True)
    text = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    # Prompt lengths vary per sample; the rest of each row is padding / answer tokens the router must not see.
    prompt_len = torch.randint(T // 2, T + 1, (B,), device=device)
    text_mask = torch.arange(T, device=device)[None, :] < prompt_len[:, None]  # (B, T)
    grad_out = torch.randn(B, N, D, device=device, dtype=dtype)

    ours_params = [ours.router.gate.weight, ours.experts.gate_proj, ours.experts.up_proj, ours.experts.down_proj]
    ref_params = [reference.gate.weight] + [
        p for expert in reference.experts for p in (expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight)
    ]

    def run_ours() -> list[torch.Tensor]:
        out, _ = ours(visual, text, text_mask)
        return grads_of(out, [visual, text, *ours_params], grad_out)

    def run_reference() -> list[torch.Tensor]:
        out = reference(visual, text, text_mask)
        return grads_of(out, [visual, text, *ref_params], grad_out)

    # The check doubles as the first warm-up call of each implementation.
    got, want = run_ours(), run_reference()
    want = want[:4] + reference.stacked_expert_weights(want[4:])
    labels = ["output", "grad visual", "grad text", "grad router", "grad gate_proj", "grad up_proj", "grad down_proj"]
    checks = [check_same("projector fwd+bwd vs official-style loop", got, want, dtype, labels)]
    del got, want

    cases = {"ours: ParrotMoEProjector (batched)": run_ours, "reference: per-sample, per-expert loop": run_reference}
    times = time_cases(cases, settings, "parrot_moe")
    if settings.profile:
        profile_cases(cases, settings, "parrot_moe")
    ours_name, ref_name = list(cases)
    ratios = [Ratio("speedup over the official-style loop", ref_name, ours_name, TARGET_SPEEDUP, "at_least")]
    flops = 3 * 2 * B * N * D * sizes["intermediate"] * sizes["experts"] * 3  # expert matmuls, fwd + 2x bwd
    notes = [f"fwd+bwd w.r.t. inputs and all projector weights; dense routing over all experts (moe_top_k=None), "
             f"about {flops / 1e9:.0f} GFLOP of expert matmuls per call in both implementations"]
    return finish("parrot_moe", sizes, times, ratios, checks, settings, ours_name, notes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_parrot_moe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--visual-tokens", type=positive_int, default=577)
    parser.add_argument("--text-tokens", type=positive_int, default=64)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--experts", type=positive_int, default=6)
    parser.add_argument("--intermediate", type=positive_int, default=1024)
    add_common_args(parser, warmup=(0, 2), repeats=(3, 10))
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    return run(args, settings_from_args(args))


if __name__ == "__main__":
    main()
