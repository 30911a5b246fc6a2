"""FactorLLM: factorise a trained dense SwiGLU FFN into experts (Zhao et al., 2024, arXiv 2408.11855).

Factorisation: the intermediate dimension I of FFN(x) = W_down (act(W_gate x) * W_up x)
is cut into E slices S_1..S_E (optionally after a permutation of the neurons); expert e owns rows S_e of
W_gate / W_up and columns S_e of W_down, so sum_e Expert_e(x) = FFN(x) exactly.

Routing (verified in the official code, zhenwuweihe/FactorLLM `new_model_KD.py`, `LlamaMLP_stu`): a linear
router D -> E picks the top-k experts per token; the selected experts' outputs are summed with HARD unit
weights (no probability weighting) and scaled by E/k (official: integer E // k), so that k = E gives the
dense FFN exactly. The router therefore learns only from the Prior-Approximate (PA) loss (the paper's
teacher-student Prior-Approximate Router loss; formula below as verified in the official code), whose prior comes from each
expert's contribution on the data:

    l_e(x)  = mean_d (Expert_e(x)_d - FFN(x)_d / (E/k))^2          (distance of expert e to its share)
    m(x)    = multi-hot of the k experts with the smallest l_e     (teacher pseudo-label)
    q(x)    = softmax(m(x))                                          (official: softmax of the multi-hot)
    L_PA    = mean_t KL(p(x_t) || q(x_t)),  p = softmax(router logits), both clipped to [1e-7, 1 - 1e-7]

(official `DistillLoss(input=p, target=q)` = sum p log(p / q), i.e. KL(p || q) in that argument order).
FFN is the ORIGINAL dense FFN, the teacher (official: the frozen dense `gate_proj` / `up_proj` / `down_proj` kept
beside the trainable expert lists). While the experts are frozen it equals the sum of the experts exactly, so no
copy is kept; when the experts train (`train_experts`, with pa_coef > 0) the layer keeps the dense weights as frozen
non-persistent buffers (the memory of the original FFN) so the prior keeps measuring the distance to the teacher
and not to the drifting sum of the trained experts. Deviation: the official teacher runs on the teacher model's
hidden states; here it runs on the layer's own input.
The router is a library router (`TopKRouter`, top_k = k, no renormalisation); its own aux losses (Switch
balance when `balance_coef` > 0) are added next to "prior_approx" in `RouterOutput.aux_losses`.
Deviation: the official code clusters neurons before splitting (MoEfication); here the split is
contiguous unless a `permutation` of the intermediate neurons is given.

Execution: `SwiGLUExperts` (parrot.moe.experts) stores the experts; with all experts active its fused
dense path runs (three matmuls, = the dense FFN); in eval with k < E only the selected (token, expert)
pairs run, grouped by expert; in training every expert runs once (the PA prior needs all of them).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...fileio import non_negative_int, positive_int
from ..experts import SwiGLUExperts
from ..mole import install_mask_hooks, match_target_modules, mole_aux_loss, routing_mask
from ..routers import RouterConfig, RouterOutput, build_router

logger = logging.getLogger(__name__)
PA_CLIP = 1e-7  # official DistillLoss epsilon


@dataclass
class FactorLLMConfig:
    """num_experts E; top_k k (official default E // 2); rescale: multiply the routed sum by E / k;
    pa_coef: weight of the Prior-Approximate loss; router: the library router settings (kind must be
    "topk"; `top_k` and `renormalize` are set from this config); target_modules: the dense MLPs to
    factorise, by the target rule of MoLE / LoRA (`parrot.moe.mole.target_matches`, e.g. "mlp");
    train_experts: let the factorised experts train on the task loss (paper: knowledge adaptation with little
    data) -- the routers always train; freeze_base: freeze everything else."""

    num_experts: int = 4
    top_k: int = 2
    rescale: bool = True
    pa_coef: float = 1.0
    router: RouterConfig = field(default_factory=lambda: RouterConfig(kind="topk", balance_coef=0.0))
    target_modules: tuple[str, ...] = ("mlp",)
    train_experts: bool = True
    freeze_base: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        self.target_modules = tuple(self.target_modules)
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"FactorLLMConfig needs 1 <= top_k={self.top_k} <= num_experts={self.num_experts}")
        if self.router.kind != "topk":
            raise ValueError(f"FactorLLMConfig.router.kind must be 'topk' (hard top-k routing), got {self.router.kind!r}")
        if self.pa_coef < 0:
            raise ValueError(f"FactorLLMConfig.pa_coef={self.pa_coef} must be >= 0")


def prior_approximate_loss(
    router_probs: torch.Tensor, expert_outputs: torch.Tensor, top_k: int, mask: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """FactorLLM PA loss (see the module docstring) for router_probs (T, E), expert_outputs (T, E, D).

    `dense` (T, D): the teacher, the original dense FFN's output; None: the sum of the experts (equal to it as long
    as the experts are the untrained slices of the dense FFN).
    """
    T, E, _ = expert_outputs.shape
    if dense is None:
        dense = expert_outputs.sum(1)  # (T, D) == the dense FFN output while the experts are untrained
    distance = (expert_outputs - dense[:, None].to(expert_outputs.dtype) / (E / top_k)).square().mean(-1)  # (T, E)
    chosen = (-distance.detach()).topk(top_k, dim=-1).indices  # (T, k)
    multi_hot = torch.zeros_like(distance).scatter(-1, chosen, 1.0)
    target = F.softmax(multi_hot, dim=-1).clamp(PA_CLIP, 1 - PA_CLIP)
    p = router_probs.clamp(PA_CLIP, 1 - PA_CLIP)
    kl = (p * (p / target).log()).sum(-1)  # (T,)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


class FactorizedMLP(nn.Module):
    """A dense SwiGLU MLP split into E experts plus a top-k router (see the module docstring).

    forward(x (B, S, D)) -> (B, S, D). `last_routing` holds the latest RouterOutput (weights are the hard
    0/1 selection; aux_losses include "prior_approx" in training); `token_mask` (B, S), set from the model call's
    2-D attention mask by the hooks `inject_factorllm` installs, excludes padding from the aux losses and statistics.
    """

    def __init__(self, dense: nn.Module, config: FactorLLMConfig, permutation: torch.Tensor | None = None):
        super().__init__()
        gate, up, down = dense.gate_proj, dense.up_proj, dense.down_proj
        if not all(isinstance(p, nn.Linear) and p.bias is None for p in (gate, up, down)):
            raise ValueError("FactorLLM needs a SwiGLU MLP with bias-free nn.Linear gate_proj / up_proj / down_proj")
        probe = torch.linspace(-6.0, 6.0, 49, dtype=torch.float64)
        if not torch.allclose(dense.act_fn(probe), F.silu(probe)):  # HF wraps SiLU in its own classes
            raise ValueError(f"FactorLLM supports SiLU-gated MLPs (SwiGLU); got act_fn={type(dense.act_fn).__name__}")
        D, I = gate.in_features, gate.out_features
        E = config.num_experts
        if I % E:
            raise ValueError(f"intermediate size {I} is not divisible by num_experts={E}")
        order = torch.arange(I) if permutation is None else permutation.to(torch.long).cpu()
        if sorted(order.tolist()) != list(range(I)):
            raise ValueError(f"permutation must be a permutation of range({I})")
        self.num_experts, self.top_k, self.rescale = E, config.top_k, config.rescale
        self.pa_coef = config.pa_coef
        self.experts = SwiGLUExperts(E, D, I // E)
        weight = gate.weight
        self.experts.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            order = order.to(weight.device)
            # expert e owns neurons order[e*I/E:(e+1)*I/E]: rows of gate/up, columns of down
            self.experts.gate_proj.copy_(gate.weight[order].view(E, I // E, D).transpose(1, 2))  # (E, D, I/E)
            self.experts.up_proj.copy_(up.weight[order].view(E, I // E, D).transpose(1, 2))  # (E, D, I/E)
            self.experts.down_proj.copy_(down.weight[:, order].t().reshape(E, I // E, D))  # (E, I/E, D)
        # The PA prior's teacher (the original dense FFN) only needs its own copy when the experts train.
        self.has_teacher = bool(config.train_experts and config.pa_coef > 0)
        for name, proj in (("teacher_gate", gate), ("teacher_up", up), ("teacher_down", down)):
            self.register_buffer(name, proj.weight.detach().clone() if self.has_teacher else None, persistent=False)
        router_cfg = replace(config.router, kind="topk", top_k=config.top_k, renormalize=False)
        self.router = build_router(router_cfg, D, E).to(device=weight.device, dtype=weight.dtype)
        self.last_routing: RouterOutput | None = None
        self.token_mask: torch.Tensor | None = None  # set by the model-level MaskCapture pre-hook
        self.token_seq: int | None = None

    def set_top_k(self, k: int) -> None:
        """Change k at inference (1 <= k <= E)."""
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k={k} must be in [1, {self.num_experts}]")
        self.top_k = k
        self.router.top_k = k

    def all_expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: x (T, D) -> (T, E, D)."""
        h = F.silu(torch.einsum("td,edi->tei", x, self.experts.gate_proj)) * torch.einsum("td,edi->tei", x, self.experts.up_proj)
        return torch.einsum("tei,eid->ted", h, self.experts.down_proj)

    @torch.no_grad()
    def teacher_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The original dense FFN on x (T, D) -> (T, D) (the PA prior's teacher); None when no copy is kept (the
        experts are frozen, their sum is the dense FFN)."""
        if not self.has_teacher:
            return None
        return F.linear(F.silu(F.linear(x, self.teacher_gate)) * F.linear(x, self.teacher_up), self.teacher_down)

    def _selected_outputs(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum over each token's selected experts, computing only the selected pairs (grouped by expert)."""
        token_ids = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(indices).reshape(-1)  # (T*k,)
        expert_ids = indices.reshape(-1)
        order = expert_ids.argsort(stable=True)
        token_ids, expert_ids = token_ids[order], expert_ids[order]
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        out = None  # allocated in the experts' output dtype (the autocast dtype under autocast, not x's)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token_ids[start : start + count]
                xe = x[rows]
                h = F.silu(xe @ self.experts.gate_proj[e]) * (xe @ self.experts.up_proj[e])
                y = h @ self.experts.down_proj[e]  # (count, D)
                out = (y.new_zeros(x.shape) if out is None else out).index_add(0, rows, y)
            start += count
        return torch.zeros_like(x) if out is None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, D)
        mask = routing_mask(self.token_mask, self.token_seq, x, "FactorLLM")
        routing: RouterOutput = self.router(flat, mask)
        E, k = self.num_experts, self.top_k
        selected = torch.zeros_like(routing.probs).scatter(-1, routing.indices, 1.0)  # (T, E) hard 0/1
        aux = dict(routing.aux_losses)
        if self.training:
            outputs = self.all_expert_outputs(flat)  # (T, E, D)
            out = (outputs * selected[:, :, None].to(outputs.dtype)).sum(1)
            if self.pa_coef:
                aux["prior_approx"] = self.pa_coef * prior_approximate_loss(routing.probs, outputs, k, mask,
                                                                            self.teacher_output(flat))
        elif k == E:
            out = self.experts(flat[None], flat.new_ones(1, E))[0]  # fused dense path == dense FFN
        else:
            out = self._selected_outputs(flat, routing.indices)
        if self.rescale and k < E:
            out = out * (E / k)
        self.last_routing = replace(routing, weights=selected, aux_losses=aux)
        return out.view(shape)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and hasattr(module, "act_fn")


def inject_factorllm(model: nn.Module, config: FactorLLMConfig, permutations: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Replace every dense SwiGLU MLP named in `config.target_modules` by a FactorizedMLP; return the names.

    Freezes the base model (`freeze_base`); routers train, experts train when `train_experts`. Installs the hooks
    that hand each model call's 2-D attention mask to the layers, so padding stays out of the aux losses.
    """
    # the target rule of MoLE and LoRA (peft's): a module whose name equals a target or ends with "." + target
    candidates = [n for n, m in model.named_modules() if n and _is_swiglu_mlp(m)]
    targets = match_target_modules(candidates, config.target_modules, "inject_factorllm: target_modules",
                                   f"SwiGLU MLP (gate/up/down_proj + act_fn) of {type(model).__name__}")
    if config.freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    permutations = permutations or {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = FactorizedMLP(getattr(parent, child), config, permutations.get(name))
        layer.experts.requires_grad_(config.train_experts)
        setattr(parent, child, layer)
    install_mask_hooks(model, factorized_layers(model))
    return targets


def factorized_layers(model: nn.Module) -> list[tuple[str, FactorizedMLP]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedMLP)]


def collect_factorllm_routing(model: nn.Module) -> dict[str, RouterOutput]:
    return {n: m.last_routing for n, m in factorized_layers(model) if m.last_routing is not None}


def set_factorllm_top_k(model: nn.Module, k: int) -> None:
    for _, layer in factorized_layers(model):
        layer.set_top_k(k)


# ----------------------------------------------------------------------------------------------------
# Speed / quality report against the dense model
# ----------------------------------------------------------------------------------------------------


@dataclass
class FactorLLMReportRow:
    k: int
    ffn_flops_fraction: float  # k / E of the dense FFN's matmul FLOPs
    loss: float  # LM loss of the factorised model (label tokens)
    dense_loss: float
    next_token_agreement: float  # share of label positions where argmax equals the dense model's argmax
    ms_per_batch: float
    dense_ms_per_batch: float

    @property
    def speedup(self) -> float:
        return self.dense_ms_per_batch / self.ms_per_batch if self.ms_per_batch else float("nan")


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]], repeats: int) -> tuple[float, list[torch.Tensor], float]:
    model.eval()
    losses, preds, times = [], [], []
    for batch in batches:
        out = model(**batch)
        losses.append(float(out.loss))
        preds.append(out.logits.argmax(-1))
        start = time.perf_counter()
        for _ in range(repeats):
            model(**batch)
        times.append((time.perf_counter() - start) / repeats * 1000.0)
    return sum(losses) / len(losses), preds, sum(times) / len(times)


def factorllm_report(dense_model: nn.Module, factor_model: nn.Module, batches: list[dict[str, torch.Tensor]],
                     ks: Iterable[int] | None = None, repeats: int = 3) -> list[FactorLLMReportRow]:
    """Loss, next-token agreement with the dense model and wall time per batch, for each k (default 1..E).

    `batches` hold input_ids / attention_mask / labels (labels -100 where ignored). Restores the models'
    original k afterwards.
    """
    layers = factorized_layers(factor_model)
    if not layers:
        raise ValueError("factorllm_report: factor_model has no FactorizedMLP (run inject_factorllm first)")
    E, original_k = layers[0][1].num_experts, layers[0][1].top_k
    dense_loss, dense_preds, dense_ms = _evaluate(dense_model, batches, repeats)
    rows = []
    try:
        for k in (ks or range(1, E + 1)):
            set_factorllm_top_k(factor_model, k)
            loss, preds, ms = _evaluate(factor_model, batches, repeats)
            agree = total = 0
            for batch, p, q in zip(batches, preds, dense_preds):
                valid = batch["labels"][:, 1:] != -100  # positions whose next token is scored
                agree += int(((p[:, :-1] == q[:, :-1]) & valid).sum())
                total += int(valid.sum())
            rows.append(FactorLLMReportRow(k, k / E, loss, dense_loss, agree / max(total, 1), ms, dense_ms))
    finally:
        set_factorllm_top_k(factor_model, original_k)
    return rows


def write_report(rows: list[FactorLLMReportRow], out_dir: str | Path) -> tuple[Path, Path]:
    """factorllm_report.csv + factorllm_report.md in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["k", "ffn_flops_fraction", "loss", "dense_loss", "next_token_agreement", "ms_per_batch", "dense_ms_per_batch", "speedup"]
    records = [{**asdict(r), "speedup": r.speedup} for r in rows]
    csv_path = out_dir / "factorllm_report.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rec in records:
        lines.append("| " + " | ".join(f"{rec[h]:.4g}" if isinstance(rec[h], float) else str(rec[h]) for h in header) + " |")
    md_path = out_dir / "factorllm_report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------------------------------
# Command: tiny end-to-end demo (dense pre-training -> factorise -> PA router training -> report)
# ----------------------------------------------------------------------------------------------------


def _synthetic_lm_batches(num: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """A learnable toy language: x_{t+1} = (a * x_t + b) mod vocab, with (a, b) per sequence from 4 rules."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    rules = torch.tensor([[1, 1], [3, 2], [5, 7], [7, 3]])
    for _ in range(num):
        rule = rules[torch.randint(0, len(rules), (batch_size,), generator=g)]
        ids = torch.empty(batch_size, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch_size,), generator=g)
        for t in range(1, seq_len):
            ids[:, t] = (rule[:, 0] * ids[:, t - 1] + rule[:, 1]) % vocab
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


_DEMO_HEADS = 4  # attention heads of the demo's tiny Llama (2 key/value heads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parrot.moe.methods.factorllm", description="FactorLLM on a tiny Llama: factorise, train routers (PA loss), report k=1..E")
    parser.add_argument("--out", required=True, help="output directory (report CSV/Markdown, training losses JSON)")
    parser.add_argument("--num-experts", type=positive_int, default=4, help="experts per MLP (divides --intermediate)")
    parser.add_argument("--top-k", type=positive_int, default=2, help="experts per token (<= --num-experts)")
    parser.add_argument("--hidden", type=positive_int, default=32,
                        help=f"hidden size (a multiple of {2 * _DEMO_HEADS})")
    parser.add_argument("--intermediate", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--vocab", type=positive_int, default=97)
    parser.add_argument("--dense-steps", type=positive_int, default=60)
    parser.add_argument("--router-steps", type=positive_int, default=40)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch intra-op threads (tiny models run fastest on 1)")
    args = parser.parse_args(argv)
    # checked before any training, each naming its flags (they would otherwise fail minutes later, unnamed)
    if args.top_k > args.num_experts:
        parser.error(f"--top-k {args.top_k} must be <= --num-experts {args.num_experts}")
    if args.intermediate % args.num_experts:
        parser.error(f"--intermediate {args.intermediate} must be divisible by --num-experts {args.num_experts} "
                     "(each expert takes an equal share of the MLP's neurons)")
    if args.hidden % (2 * _DEMO_HEADS):
        parser.error(f"--hidden {args.hidden} must be a multiple of {2 * _DEMO_HEADS} (the demo model's {_DEMO_HEADS} "
                     "attention heads, each of an even size for the rotary embedding)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tuning import train_steps

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=_DEMO_HEADS, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    dense = LlamaForCausalLM(config)
    train_batches = _synthetic_lm_batches(16, 8, 16, args.vocab, args.seed)
    eval_batches = _synthetic_lm_batches(4, 8, 16, args.vocab, args.seed + 1)
    dense_losses = train_steps(dense, train_batches, args.dense_steps, 3e-3, desc="dense")
    logger.info("dense model trained: loss %.3f -> %.3f", dense_losses[0], dense_losses[-1])
    factor = copy.deepcopy(dense)
    cfg = FactorLLMConfig(num_experts=args.num_experts, top_k=args.top_k)
    inject_factorllm(factor, cfg)

    def aux() -> torch.Tensor | float:
        return mole_aux_loss(collect_factorllm_routing(factor))

    router_losses = train_steps(factor, train_batches, args.router_steps, 1e-3, aux_loss=aux, desc="factorllm")
    logger.info("FactorLLM tuning: loss %.3f -> %.3f", router_losses[0], router_losses[-1])
    rows = factorllm_report(dense, factor, eval_batches)
    csv_path, md_path = write_report(rows, args.out)
    (Path(args.out) / "factorllm_training.json").write_text(json.dumps({"dense": dense_losses, "factorllm": router_losses}))
    print(md_path.read_text())
    logger.info("wrote %s and %s", csv_path, md_path)


if __name__ == "__main__":
    main()
