"""MoLE layer, forward + backward: `MoLELinear` vs a LoRA floor and two naive expert loops.

For every router (topk, dynmole, gwmoe, mor) the same `MoLELinear` is timed four ways on T tokens:

- ours: `MoLELinear.forward` as configured by default: on CUDA the fused path (`parrot.moe.fused`: one autograd
  node, the routing of every router in one Triton kernel per direction); elsewhere the eager path: `LoRAExperts`
  with its default `execution="auto"` (the stacked rank-E*r executor at these sizes), the router's logits and the
  experts' rank hidden from one GEMM (`shared_gemm_mole`); router statistics are lazy, so not computed;
- eager (when ours is fused): the same layer with `fused="never"`, i.e. the eager path;
- masked: the issue's reference (b), a naive per-expert masked loop as the official MixLoRA executor
  (TUDB-Labs/MixLoRA, `mixlora/model.py`, `MixLoraSparseMoe.forward`, verified) and HF Mixtral's
  `MixtralSparseMoeBlock` write it: for each expert, `torch.where` finds its tokens, they are gathered, run
  through that expert's LoRA, scaled by their routing weight and `index_add`ed into the output;
- dense: the official DynMoLE / MoE-PEFT executor (mikecovlee/DynMoLE, `moe_peft/adapters/dynmole/model.py`,
  `DynMoleSparseMoe.forward`): every expert's LoRA runs on all tokens and is multiplied by its routing weight
  (zero when unselected). Both loops use the layer's own weights and router and are checked equal first;
- floor: the frozen base linear plus ONE peft LoRA of rank K*r (top-2 x r=8 = 16: the same active adapter
  parameters per token), i.e. what a dense adapter costs.

    python -m benchmarks.bench_mole [--device cuda] [--routers topk dynmole] [--tokens 4096] [--out results/]

Issue 8 sizes (defaults): E=8, top-2, r=8, D=1024, 4096 tokens. Targets: ours <= 1.5x the floor, and >= 3x
faster than the naive per-expert masked loop, for every router (the speedup over the dense loop is reported
too, without a target). The frozen base weight gets no gradient; the input does (as inside a network), so backward includes the
base's input gradient in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from parrot.fileio import positive_int
from parrot.moe import MoLELinear, RouterConfig
from parrot.moe.fused import fused_applies, shared_gemm_applies
from parrot.moe.routers import ROUTER_KINDS

from .harness import (BenchSettings, Ratio, add_common_args, check_same, cuda_graphed, finish, grads_of,
                      on_side_stream, profile_cases, settings_from_args, synchronize, time_cases)

TARGET_VS_FLOOR = 1.5
TARGET_VS_NAIVE = 3.0  # the masked loop only: the issue sets no target for the dense loop (reported, target None)
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # Inductor modes that replay CUDA graphs
QUICK_SIZES = dict(tokens=512, hidden=256, experts=8, top_k=2, rank=8)


def routed(layer: MoLELinear, x: torch.Tensor):
    flat = x.reshape(-1, x.shape[-1])  # (T, D)
    return flat, layer.router(flat)


def mole_delta(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter part of `MoLELinear.forward` (router + `LoRAExperts`, or the fused path), without the frozen base."""
    return layer.adapter(x.reshape(-1, x.shape[-1]))  # (T, D)


def dense_loop_delta(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """sum_e w_e(x) * delta_e(x) with every expert on every token (official DynMoLE executor style)."""
    flat, routing = routed(layer, x)
    experts = layer.experts
    out = 0
    for e in range(experts.num_experts):
        delta = F.linear(F.linear(flat, experts.lora_A[e]), experts.lora_B[e]) * experts.scaling  # (T, D_out)
        out = out + routing.weights[:, e : e + 1] * delta
    return out


def masked_loop_delta(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """Per-expert masked loop (MixLoRA / HF Mixtral executor): each expert gathers its tokens, scatters back."""
    flat, routing = routed(layer, x)
    experts = layer.experts
    out = flat.new_zeros(flat.shape[0], experts.out_features)  # (T, D_out)
    for e in range(experts.num_experts):
        token_ids, _ = torch.where(routing.indices == e)  # tokens that selected expert e (a host sync on GPUs)
        rows = flat[token_ids]  # (n_e, D_in)
        delta = F.linear(F.linear(rows, experts.lora_A[e]), experts.lora_B[e])  # (n_e, D_out)
        out.index_add_(0, token_ids, delta * (experts.scaling * routing.weights[token_ids, e, None]))
    return out


def grouped_candidate_delta(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """The other executor: only the selected (token, expert) pairs, grouped by expert (LoRAExperts._grouped);
    same result as the stacked path (checked)."""
    flat, routing = routed(layer, x)
    return layer.experts._grouped(flat, routing.weights, routing.indices)


def ours_executor(layer: MoLELinear, is_fused: bool) -> str:
    """Which executor `MoLELinear.adapter` ran for the last forward (the same branches, in the same order)."""
    if is_fused:
        return "fused (Triton kernels, stacked layout)"
    if shared_gemm_applies(layer.router, layer.experts):  # no LoRA dropout here (dropout=0.0)
        return "stacked (shared [W_gate; A] GEMM)"
    stacked = layer.experts._use_stacked(layer.last_routing.indices)  # auto, too large to stack: per call
    return "stacked" if stacked else "grouped"


def plus_base(delta: Callable[[MoLELinear, torch.Tensor], torch.Tensor]):
    """W x + delta(layer, x): the whole layer as a reference loop computes it (frozen base, then the loop)."""

    def forward(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
        out = layer.base(x)
        return out + delta(layer, x).view_as(out).to(out.dtype)

    return forward


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj


def peft_lora_floor(hidden: int, rank: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A bias-free linear with one peft LoRA adapter of `rank` (frozen base, dropout 0)."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = _Holder(nn.Linear(hidden, hidden, bias=False))
    holder = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"]), holder)
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return holder.proj.to(device=device, dtype=dtype).train()


def compiled_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor],
                  grad_output: torch.Tensor, mode: str, backend: str = "inductor") -> Callable[[], list[torch.Tensor]]:
    """fwd+bwd of `torch.compile(forward, mode=mode)` on x, as `grads_of` computes it for the eager cases."""
    compiled = torch.compile(forward, mode=mode, backend=backend) if backend == "inductor" else torch.compile(
        forward, backend=backend)  # modes are Inductor's
    graphs = mode in GRAPHED_COMPILE_MODES  # Inductor replays CUDA graphs: each step must be marked

    def step() -> list[torch.Tensor]:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous step's outputs may be reused
        return grads_of(compiled(x), [x, *params], grad_output)

    return step


def make_layer(kind: str, sizes: dict, x: torch.Tensor, router_scale: float, gw_quantile: float,
               fused: str = "auto") -> MoLELinear:
    D, E, k, r = sizes["hidden"], sizes["experts"], sizes["top_k"], sizes["rank"]
    base = nn.Linear(D, D, bias=False, device=x.device, dtype=x.dtype)
    router = RouterConfig(kind=kind, top_k=k, gw_quantile=gw_quantile if kind == "gwmoe" else None)
    layer = MoLELinear(base, E, r, alpha=2 * r, dropout=0.0, router=router, fused=fused)
    with torch.no_grad():
        layer.experts.lora_B.normal_(std=0.02)  # zero-init B would make every delta (and the check) trivial
        for name, p in layer.router.named_parameters():
            if name.endswith("weight"):
                p.mul_(router_scale)
    layer.train()
    if kind == "gwmoe":  # threshold = quantile of this input's token entropies (what calibrate_gwmoe does)
        layer.router.eval()
        with torch.no_grad():
            uncertainty = layer.router(x.reshape(-1, D)).stats["uncertainty"]
        layer.router.calibrate(uncertainty)
        layer.router.train()
    return layer


def run(args: argparse.Namespace, settings: BenchSettings):
    sizes = dict(QUICK_SIZES) if settings.quick else dict(
        tokens=args.tokens, hidden=args.hidden, experts=args.experts, top_k=args.top_k, rank=args.rank)
    T, D, k, r = sizes["tokens"], sizes["hidden"], sizes["top_k"], sizes["rank"]
    device, dtype = settings.device, settings.dtype
    x = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, T, D, device=device, dtype=dtype)
    grad_delta = grad_out.view(T, D)

    floor = peft_lora_floor(D, k * r, device, dtype)
    floor_params = [p for p in floor.parameters() if p.requires_grad]
    lora_a, lora_b, floor_scale = floor.lora_A["default"], floor.lora_B["default"], floor.scaling["default"]
    floor_names = {"adapter": f"adapter floor: peft LoRA r={k * r}", "layer": f"layer floor: linear + peft LoRA r={k * r}"}
    floor_cases = {
        "adapter": lambda: grads_of(lora_b(lora_a(x.view(T, D))) * floor_scale, [x, *floor_params], grad_delta),
        "layer": lambda: grads_of(floor(x), [x, *floor_params], grad_out),
    }
    cases, ratios, checks, routing, executors = {}, [], [], {}, {}
    for scope in args.scopes:
        cases[floor_names[scope]] = floor_cases[scope]
    if args.compile:
        floor_fns = {"adapter": lambda v: lora_b(lora_a(v.view(T, D))) * floor_scale, "layer": floor}
        floor_targets = {"adapter": grad_delta, "layer": grad_out}
        for scope in args.scopes:
            cases[f"{floor_names[scope]} [compiled]"] = compiled_step(floor_fns[scope], x, floor_params,
                                                                      floor_targets[scope], args.compile,
                                                                      args.compile_backend)
    for kind in args.routers:
        layer = make_layer(kind, sizes, x, args.router_scale, args.gw_quantile, args.fused)
        named = [(name, p) for name, p in layer.named_parameters() if not name.startswith("base.")]
        params = [p for _, p in named]
        labels = ["output", "grad x"] + [f"grad {name}" for name, _ in named]

        is_fused = fused_applies(layer.fused, layer.router, layer.experts, x.view(T, D))
        eager_layer = copy.deepcopy(layer)
        eager_layer.fused = "never"
        # Half precision: the checks run the same code on float32 copies (weights and input). The fused path routes
        # in float32 while the eager routers round probabilities to bfloat16 first, so a near-tie may pick another
        # expert for a token; tests/test_fused_mole.py checks bfloat16 on CUDA separately.
        check_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        check_x = x.detach().to(check_dtype).requires_grad_(True)

        def step(fn, target, layer=layer, params=params):
            return lambda: grads_of(fn(layer, x), [x, *params], target)

        def checked(fn, target, layer=layer):
            twin = copy.deepcopy(layer).to(check_dtype)
            twin_params = [p for name, p in twin.named_parameters() if not name.startswith("base.")]
            return grads_of(fn(twin, check_x), [check_x, *twin_params], target.to(check_dtype))

        fns = {
            "adapter": {"ours": mole_delta, "masked": masked_loop_delta, "dense": dense_loop_delta},
            "layer": {"ours": lambda m, v: m(v), "masked": plus_base(masked_loop_delta), "dense": plus_base(dense_loop_delta)},
        }
        if args.candidate:
            fns["adapter"]["grouped"] = grouped_candidate_delta
        targets = {"adapter": grad_delta, "layer": grad_out}
        eager_params = [p for name, p in eager_layer.named_parameters() if not name.startswith("base.")]
        implementations = {scope: {v: step(fn, targets[scope]) for v, fn in fns[scope].items()} for scope in fns}
        if is_fused:
            for scope in fns:
                implementations[scope]["eager"] = step(fns[scope]["ours"], targets[scope], eager_layer, eager_params)
        for scope in args.scopes:
            impl = implementations[scope]
            reference = checked(fns[scope]["dense"], targets[scope])  # the simplest formula: every expert on every token
            for variant in [v for v in impl if v != "dense"]:
                layer_of = eager_layer if variant == "eager" else layer
                ours = checked(fns[scope]["ours" if variant == "eager" else variant], targets[scope], layer_of)
                checks.append(check_same(f"{scope} {variant} [{kind}] vs dense loop", ours, reference, check_dtype,
                                         labels))
            names = {variant: f"{scope} {variant}: {kind}" for variant in impl}
            for variant, fn in impl.items():
                cases[names[variant]] = fn
            ratios.append(Ratio(f"{scope} {kind}: ours / floor", names["ours"], floor_names[scope], TARGET_VS_FLOOR,
                                "at_most"))
            if "eager" in names:
                ratios.append(Ratio(f"{scope} {kind}: eager (unfused) / floor", names["eager"], floor_names[scope],
                                    TARGET_VS_FLOOR, "at_most"))
                ratios.append(Ratio(f"{scope} {kind}: fused speedup over eager", names["eager"], names["ours"], 1.0))
            ratios.append(Ratio(f"{scope} {kind}: speedup over masked loop", names["masked"], names["ours"],
                                TARGET_VS_NAIVE))
            ratios.append(Ratio(f"{scope} {kind}: speedup over dense loop", names["dense"], names["ours"]))
            if args.compile:
                compiled = compiled_step(functools.partial(fns[scope]["ours"], layer), x, params, targets[scope],
                                         args.compile, args.compile_backend)
                got = [t.detach().clone() for t in compiled()]  # cloned: CUDA-graph outputs are overwritten
                checks.append(check_same(f"{scope} ours compiled [{kind}] vs ours", got, impl["ours"](), dtype, labels))
                object.__setattr__(layer, "last_routing", None)  # holds graph tensors, which deepcopy refuses
                cases[f"{names['ours']} [compiled]"] = compiled
                ratios.append(Ratio(f"{scope} {kind}: ours / floor [both compiled]", f"{names['ours']} [compiled]",
                                    f"{floor_names[scope]} [compiled]", TARGET_VS_FLOOR, "at_most"))
                ratios.append(Ratio(f"{scope} {kind}: ours compiled / floor eager", f"{names['ours']} [compiled]",
                                    floor_names[scope], TARGET_VS_FLOOR, "at_most"))
            if "grouped" in names:
                ratios.append(Ratio(f"{scope} {kind}: grouped / floor", names["grouped"],
                                    floor_names[scope], TARGET_VS_FLOOR, "at_most"))
                ratios.append(Ratio(f"{scope} {kind}: grouped speedup over masked loop", names["masked"],
                                    names["grouped"], TARGET_VS_NAIVE))
        layer(x)
        stats = layer.last_routing.stats
        routing[kind] = {
            "mean_active_experts": round(stats["num_active"].float().mean().item(), 3),
            "broadcast_fraction": round(stats["broadcast"].float().mean().item(), 3),
            "fused": is_fused,
        }
        executors[kind] = ours_executor(layer, is_fused)

    if settings.cuda_graphs:  # the loops with host syncs (masked: torch.where; grouped: split sizes) cannot be captured
        for name in [n for n in cases if " masked: " not in n and " grouped: " not in n]:
            replay, captured = cuda_graphed(cases[name])
            replay()  # one replay, then its results (written into the captured outputs) against a plain call
            synchronize(device)
            got = [t.detach().clone() for t in captured]
            checks.append(check_same(f"{name} [graph] replay vs plain call", got, cases[name](), dtype))
            cases[f"{name} [graph]"] = replay
        for scope in args.scopes:
            for kind in args.routers:
                ours, floor_name = f"{scope} ours: {kind} [graph]", f"{floor_names[scope]} [graph]"
                ratios.append(Ratio(f"{scope} {kind}: ours / floor [CUDA graph]", ours, floor_name, TARGET_VS_FLOOR,
                                    "at_most"))
                ratios.append(Ratio(f"{scope} {kind}: speedup over dense loop [CUDA graph]",
                                    f"{scope} dense: {kind} [graph]", ours))
    times = time_cases(cases, settings, "mole")
    if settings.profile:
        profile_cases(cases, settings, "mole")
    notes = [
        "scope 'adapter' = router + LoRA experts only (what differs between the implementations); scope 'layer' = "
        "frozen base linear + adapter (what a model sees; the base matmul is common to all of them, so it caps the "
        "layer-level speedup over the loops)",
        "'masked' = the issue's naive per-expert masked loop (MixLoRA / HF Mixtral executor, the >= 3x target); "
        "'dense' = every expert on every token times its routing weight (official DynMoLE executor; its speedup is "
        "reported without a target)",
        f"router weights scaled by {args.router_scale} after init (1.0 = as initialised); GW-MoE threshold = "
        f"{args.gw_quantile} quantile of the input's token entropies, training mode (broadcast on)",
        "DynMoLE and GW-MoE activate more than top-k experts for uncertain tokens (extra.routing), so their floor "
        "ratio compares more active adapter parameters than the floor has",
        "'eager' (CUDA) = the same layer with fused='never' (router and LoRAExperts modules, ~30-50 kernels); 'ours' "
        "is then the fused path (parrot.moe.fused); in half precision the equality checks run on float32 copies",
        "'grouped' = LoRAExperts._grouped (only selected (token, expert) pairs), the executor auto picks when "
        "E*r > min(D_in, D_out) / 8 (unless every token selected every expert); 'ours' ran: "
        + ", ".join(f"{kind} {executor}" for kind, executor in executors.items()) + " (extra.ours_executor)",
    ]
    if args.compile:
        notes.append(f"'[compiled]' cases run torch.compile(mode={args.compile!r}) of the forward (ours: the whole "
                     "adapter / layer; with the fused path the routing kernels are the parrot::mole_route ops) and "
                     "its compiled backward; checked equal to the uncompiled ours in the run's dtype")
    if settings.cuda_graphs:
        notes.append("'[graph]' cases replay a CUDA graph of the whole fwd+bwd: GPU work only, no per-kernel launch "
                     "cost (what a captured training step would pay), each checked after one replay against a plain "
                     "call of the same case; the masked and grouped loops sync with the host and cannot be captured")
    first_ours = next(name for name in cases if " ours: " in name)
    return finish("mole", dict(sizes, routers=list(args.routers)), times, ratios, checks, settings, first_ours,
                  notes, extra={"routing": routing, "ours_executor": executors})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_mole", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, default=4096)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--top-k", type=positive_int, default=2)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--routers", nargs="+", default=list(ROUTER_KINDS), choices=ROUTER_KINDS)
    parser.add_argument("--router-scale", type=float, default=1.0,
                        help="multiply router weights after init (>1 = sharper, more trained-like routing)")
    parser.add_argument("--gw-quantile", type=float, default=0.9, help="GW-MoE threshold quantile")
    parser.add_argument("--fused", default="auto", choices=["auto", "always", "never"],
                        help="MoLELinear.fused for 'ours' (auto: the fused Triton path on CUDA)")
    parser.add_argument("--compile", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="also time ours and the floor under torch.compile(mode=...) ('[compiled]' cases); "
                             "reduce-overhead and max-autotune replay CUDA graphs themselves, so they are rejected "
                             "with --cuda-graphs (a graph cannot be captured inside another)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for --compile (aot_eager: tracing only, for tests)")
    parser.add_argument("--scopes", nargs="+", default=["adapter", "layer"], choices=["adapter", "layer"])
    parser.add_argument("--no-candidate", dest="candidate", action="store_false",
                        help="skip timing the grouped executor (adapter scope)")
    add_common_args(parser, warmup=(1, 3), repeats=(5, 20), cuda_graphs=True)
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.cuda_graphs and args.compile in GRAPHED_COMPILE_MODES:
        raise SystemExit(f"--cuda-graphs with --compile {args.compile}: that mode replays CUDA graphs itself, which "
                         "cannot be captured inside another graph; use --compile default or "
                         "max-autotune-no-cudagraphs with --cuda-graphs")
    settings = settings_from_args(args)
    # --compile: one compiled function per router and scope, all from the same code, so allow the recompiles, and
    # never time a silent fallback to eager.
    dynamo_config = torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True) \
        if args.compile else contextlib.nullcontext()
    stream = on_side_stream(settings.device) if settings.cuda_graphs else contextlib.nullcontext()
    with dynamo_config, stream:  # CUDA graphs: every tensor on the capturing stream (see harness.cuda_graphed)
        return run(args, settings)


if __name__ == "__main__":
    main()
