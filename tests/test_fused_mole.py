"""Fused MoLE path (parrot.moe.fused, Triton kernels) vs the eager router + stacked executor, values and gradients.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU machine
`TRITON_INTERPRET=0 pytest tests/test_fused_mole.py` checks the compiled kernels on CUDA as well. The eager
path is the reference (itself tested against per-token float64 loops in test_routers / test_mole); the fused
kernels compute the routing in float32, hence the tolerances.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from parrot.moe import fused
from parrot.moe.mole import MoLEConfig, MoLELinear, collect_router_outputs, inject_mole, mole_aux_loss
from parrot.moe.routers import RouterConfig, selection_from_indices

pytestmark = pytest.mark.skipif(fused.kernels is None, reason="Triton is not installed")
INTERPRETED = fused.kernels is not None and fused.kernels.INTERPRETED
on_cpu = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 (set by conftest)")

D_IN, D_OUT, E, R, ALPHA = 24, 20, 6, 3, 6.0  # E and r not powers of two: padded lanes are exercised
T = 150  # more than one token block (64): partial sums across programs

CONFIGS = {
    "topk": dict(kind="topk", top_k=2, z_loss_coef=0.01),
    "topk-k1-no-renorm": dict(kind="topk", top_k=1, renormalize=False, balance_coef=0.01),
    "topk-dense": dict(kind="topk", top_k=None, z_loss_coef=0.01),
    "gwmoe": dict(kind="gwmoe", top_k=2, gw_threshold=1.2, balance_coef=0.01, z_loss_coef=0.01),
    "gwmoe-uniform-normalized": dict(kind="gwmoe", top_k=2, gw_threshold=0.6, gw_broadcast_weights="uniform",
                                     gw_normalize_entropy=True, renormalize=False),
    "dynmole": dict(kind="dynmole", z_loss_coef=0.01),
    "dynmole-renorm-raw-entropy": dict(kind="dynmole", renormalize=True, normalize_entropy=False, tsallis_q=1.5,
                                       entropy_threshold=0.5, top_p=0.6, keep_top_k=1),
    "mor": dict(kind="mor", top_k=2, num_routers=3, z_loss_coef=0.01),
    "mor-no-renorm": dict(kind="mor", top_k=3, num_routers=2, renormalize=False, balance_coef=0.01),
}

DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])


def _pair(config: dict, device: str, dtype=torch.float64, dropout: float = 0.0,
          num_experts: int = E) -> tuple[MoLELinear, MoLELinear]:
    """(eager, fused) layers with identical weights; routers sharpened so that routing is not uniform."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    eager = MoLELinear(base, num_experts, R, ALPHA, dropout, RouterConfig(**config), expert_execution="stacked",
                       fused="never")
    eager.to(device=device, dtype=dtype)
    with torch.no_grad():
        eager.experts.lora_B.normal_(0, 0.5)
        for p in eager.router.parameters():
            p.mul_(4.0)
    twin = copy.deepcopy(eager)
    twin.fused = "always"
    return eager, twin


def _run(layer: MoLELinear, x: torch.Tensor, mask, weight_out: torch.Tensor, aux: str = "with"):
    """aux: "with" (output + aux losses), "only" (aux losses alone), "without" (the output alone)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # the same dropout draw in both paths
    out = layer.adapter(x, mask, base=layer.base(x))
    routing = layer.last_routing
    aux_loss = sum(routing.aux_losses.values()) if routing.aux_losses else out.new_zeros(())
    loss = {"with": (out * weight_out).sum() + aux_loss, "only": aux_loss, "without": (out * weight_out).sum()}[aux]
    params = [p for name, p in layer.named_parameters() if p.requires_grad and not name.startswith("base.")]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return out.detach(), routing, grads


def _close(actual, expected, tol, what, atol=0.0):
    if expected is None:
        assert actual is None or actual.abs().max() <= atol, what
        return
    scale = expected.double().abs().max().clamp_min(1e-12)
    diff = (actual.double() - expected.double()).abs().max()
    err = diff / scale
    assert err < tol or diff <= atol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def _check(eager, twin, device, dtype, masked, tol, aux="with", atol=0.0):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(T, D_IN, generator=g) * torch.linspace(0.1, 2.0, T)[:, None]).to(device=device, dtype=dtype)
    mask = (torch.rand(T, generator=g) > 0.25).to(device) if masked else None
    weight_out = torch.randn(T, D_OUT, generator=g).to(device=device, dtype=dtype)
    assert fused.fused_applies(twin.fused, twin.router, twin.experts, x)
    assert not fused.fused_applies(eager.fused, eager.router, eager.experts, x)
    out_e, route_e, grads_e = _run(eager, x, mask, weight_out, aux)
    out_f, route_f, grads_f = _run(twin, x, mask, weight_out, aux)
    names = ["x"] + [n for n, p in eager.named_parameters() if p.requires_grad and not n.startswith("base.")]
    _close(out_f, out_e, tol, "output")
    for name, ge, gf in zip(names, grads_e, grads_f):
        _close(gf, ge, tol, f"grad {name}", atol)
    assert set(route_f.aux_losses) == set(route_e.aux_losses)
    for key in route_e.aux_losses:
        _close(route_f.aux_losses[key], route_e.aux_losses[key].detach(), tol, f"aux {key}")
    _close(route_f.weights, route_e.weights.detach(), tol, "weights")
    _close(route_f.probs, route_e.probs.detach(), tol, "probs")
    _close(route_f.logits, route_e.logits.detach(), tol, "logits")
    num_experts = eager.experts.num_experts
    assert torch.equal(selection_from_indices(route_f.indices, num_experts),
                       selection_from_indices(route_e.indices, num_experts))
    return route_e, route_f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_eager(name, masked, device):
    eager, twin = _pair(CONFIGS[name], device)
    route_e, route_f = _check(eager, twin, device, torch.float64, masked, 2e-6)
    stats_e, stats_f = route_e.stats, route_f.stats
    assert set(stats_f) == set(stats_e)
    for key in stats_e:
        if key != "mask":
            _close(stats_f[key], stats_e[key], 2e-6, f"stats {key}")
    if CONFIGS[name]["kind"] in ("gwmoe", "dynmole"):  # both branches of the hybrid routing are exercised
        assert 0.05 < stats_e["broadcast"].mean() < 0.95, stats_e["broadcast"].mean()


@on_cpu
@pytest.mark.parametrize("name", ["topk", "gwmoe", "dynmole", "mor"])
def test_fused_aux_loss_gradients(name):
    """The aux losses' gradients alone (they are 1e-3 of the output's, so check them separately)."""
    eager, twin = _pair(dict(CONFIGS[name], balance_coef=1.0, z_loss_coef=0.1), "cpu")
    _check(eager, twin, "cpu", torch.float64, True, 2e-6, aux="only")


@on_cpu
@pytest.mark.parametrize("name, num_experts", [("topk", 1), ("gwmoe", 1), ("dynmole", 1), ("topk", 2), ("gwmoe", 2),
                                               ("dynmole", 2), ("mor", 2)])
def test_fused_one_or_two_experts(name, num_experts):
    """E < 3: a partial-sum row of the kernels' work buffer is padded to 4 lanes, since it also carries three
    per-block scalars (with 2 lanes the valid-token count was lost: aux losses and their gradients x T).
    (MoR with one expert is left out: its p is 1 whatever the main router says, so its exact main-router gradient
    and log p are 0, which the float32 kernels reproduce only to rounding.)"""
    config = dict(CONFIGS[name], balance_coef=1.0, z_loss_coef=0.1)
    if config.get("top_k"):
        config["top_k"] = 1  # k < E where possible: with k = E the balance loss is a constant
    eager, twin = _pair(config, "cpu", num_experts=num_experts)
    tol = 5e-5 if name == "mor" else 2e-6  # MoR's main-router gradient at k=1 of 2 cancels down to ~1e-5
    route_e, _ = _check(eager, twin, "cpu", torch.float64, True, tol)
    assert route_e.aux_losses  # the losses are compared, not absent
    _check(eager, twin, "cpu", torch.float64, True, tol, aux="only")


@on_cpu
@pytest.mark.parametrize("name", ["topk", "dynmole"])
def test_fused_strided_mask(name):
    """A mask that is a strided view (e.g. the last column of a (B, S) attention mask at a decoding step) reads
    each token's own entry."""
    eager, twin = _pair(dict(CONFIGS[name], balance_coef=1.0, z_loss_coef=0.1), "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D_IN, generator=g, dtype=torch.float64)
    mask = (torch.rand(T, 3, generator=g) > 0.4)[:, 1]  # stride 3
    assert mask.stride(0) == 3 and not mask.is_contiguous()
    weight_out = torch.randn(T, D_OUT, generator=g, dtype=torch.float64)
    out_e, route_e, grads_e = _run(eager, x, mask, weight_out)
    out_f, route_f, grads_f = _run(twin, x, mask, weight_out)
    for key in route_e.aux_losses:
        _close(route_f.aux_losses[key], route_e.aux_losses[key].detach(), 2e-6, f"aux {key}")
    for i, (ge, gf) in enumerate(zip(grads_e, grads_f)):
        _close(gf, ge, 2e-6, f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["topk", "dynmole", "mor"])
def test_fused_empty_sequence(name, device):
    """No tokens: the kernels launch no program, the aux losses are 0 (as on the eager path), backward runs."""
    eager, twin = _pair(CONFIGS[name], device)
    x = torch.zeros(2, 0, D_IN, device=device, dtype=torch.float64, requires_grad=True)
    assert fused.fused_applies(twin.fused, twin.router, twin.experts, x.view(0, D_IN))
    out = twin(x)
    assert out.shape == (2, 0, D_OUT)
    losses = twin.last_routing.aux_losses
    assert losses and all(float(v.detach()) == 0.0 for v in losses.values()), losses
    (out.sum() + sum(losses.values())).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_fused_dynmole_top_p_one_keeps_every_expert(device):
    """top_p = 1: every expert of every token, as on the eager path, though float32 cumulative sums round past 1."""
    eager, twin = _pair(dict(kind="dynmole", top_p=1.0, keep_top_k=1, entropy_threshold=1.0), device,
                        dtype=torch.float32)
    x = torch.randn(T, D_IN, generator=torch.Generator().manual_seed(5)).to(device) * 2.0
    with torch.no_grad():
        twin.adapter(x)
    routing = twin.last_routing
    assert torch.equal(routing.weights, routing.probs)
    assert (routing.indices >= 0).all()
    _check(eager, twin, device, torch.float32, True, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["topk", "dynmole", "mor"])
def test_fused_output_only_gradients(name, device):
    """A loss without the aux losses: the kernels get no loss gradient (a separately compiled branch)."""
    eager, twin = _pair(CONFIGS[name], device)
    _check(eager, twin, device, torch.float64, True, 2e-6, aux="without")


@on_cpu
@pytest.mark.parametrize("name", ["topk", "dynmole"])
def test_fused_dropout_and_eval(name):
    """With dropout the experts see the dropped input (two GEMMs), the router the clean one; eval mode too."""
    eager, twin = _pair(CONFIGS[name], "cpu", dropout=0.3)
    eager.train(), twin.train()
    _check(eager, twin, "cpu", torch.float64, True, 2e-6)
    eager.eval(), twin.eval()
    _check(eager, twin, "cpu", torch.float64, False, 2e-6)


@on_cpu
def test_gwmoe_eval_is_plain_topk_and_float32():
    eager, twin = _pair(CONFIGS["gwmoe"], "cpu", dtype=torch.float32)
    eager.eval(), twin.eval()
    route_e, route_f = _check(eager, twin, "cpu", torch.float32, True, 1e-5)
    assert route_f.indices.shape[1] == 2 and bool((route_f.indices >= 0).all())


@on_cpu
def test_fused_unset_gwmoe_threshold_raises():
    _, twin = _pair(dict(kind="gwmoe", top_k=2, gw_quantile=0.5), "cpu")
    with pytest.raises(RuntimeError, match="threshold is unset"):
        twin.adapter(torch.randn(4, D_IN, dtype=torch.float64))


@on_cpu
def test_fused_applies_only_where_it_can():
    layer = MoLELinear(nn.Linear(D_IN, D_OUT, bias=False), E, R, ALPHA, 0.0, RouterConfig(kind="topk"),
                       expert_execution="stacked", fused="always")
    x = torch.randn(3, D_IN)
    assert fused.fused_applies("always", layer.router, layer.experts, x)
    assert not fused.fused_applies("auto", layer.router, layer.experts, x)  # auto: CUDA only
    assert not fused.fused_applies("never", layer.router, layer.experts, x)
    grouped = MoLELinear(nn.Linear(D_IN, D_OUT), E, R, ALPHA, 0.0, RouterConfig(kind="topk"),
                           expert_execution="grouped", fused="always")
    assert not fused.fused_applies("always", grouped.router, grouped.experts, x)
    biased = MoLELinear(nn.Linear(D_IN, D_OUT), E, R, ALPHA, 0.0, RouterConfig(kind="topk", bias=True),
                        expert_execution="stacked", fused="always")
    assert not fused.fused_applies("always", biased.router, biased.experts, x)
    shannon = MoLELinear(nn.Linear(D_IN, D_OUT), E, R, ALPHA, 0.0, RouterConfig(kind="dynmole", tsallis_q=1.0),
                         expert_execution="stacked", fused="always")
    assert not fused.fused_applies("always", shannon.router, shannon.experts, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.fused_applies("always", layer.router, layer.experts, x)
    with pytest.raises(ValueError, match="fused"):
        MoLEConfig(fused="sometimes")


@on_cpu
def test_fused_inside_a_model_matches_eager():
    """inject_mole(fused="always") on a tiny LM: loss, aux loss and every gradient as with fused="never"."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).double()
    inject_mole(model, MoLEConfig(num_experts=3, rank=2, dropout=0.0, expert_execution="stacked", fused="never",
                                  router=RouterConfig(kind="dynmole")))
    for layer in [mod for mod in model.modules() if isinstance(mod, MoLELinear)]:
        with torch.no_grad():
            layer.experts.lora_B.normal_(0, 0.3)
    ids = torch.randint(0, 50, (2, 9))
    attention = torch.ones(2, 9, dtype=torch.long)
    attention[1, :3] = 0  # left padding: the routers' masks exclude it from the aux losses
    results = []
    for mode in ("never", "always"):
        m = copy.deepcopy(model)
        layers = [mod for mod in m.modules() if isinstance(mod, MoLELinear)]
        for layer in layers:
            layer.fused = mode
        assert fused.fused_applies(mode, layers[0].router, layers[0].experts, torch.zeros(1, 32, dtype=torch.float64)) \
            == (mode == "always")
        out = m(input_ids=ids, attention_mask=attention, labels=ids)
        loss = out.loss + mole_aux_loss(collect_router_outputs(m))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_e, grads_e), (loss_f, grads_f) = results
    _close(loss_f, loss_e, 1e-6, "loss")
    assert set(grads_f) == set(grads_e) and grads_e
    for name in grads_e:
        _close(grads_f[name], grads_e[name], 1e-5, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["topk", "gwmoe", "dynmole", "mor"])
def test_fused_bfloat16_on_cuda(name):
    """bfloat16 on the GPU: the fused routing (float32 inside) agrees with the eager float32 layer's output
    wherever both picked the same experts (bfloat16 near-ties may flip a selection)."""
    eager, twin = _pair(CONFIGS[name], "cuda", dtype=torch.float32)
    twin.to(torch.bfloat16)
    x = torch.randn(4096, D_IN, device="cuda")
    out_e = eager.adapter(x, None, base=eager.base(x))
    sel_e = selection_from_indices(eager.last_routing.indices, E)
    out_f = twin.adapter(x.bfloat16(), None, base=twin.base(x.bfloat16())).float()
    sel_f = selection_from_indices(twin.last_routing.indices, E)
    same = (sel_e == sel_f).all(-1)
    assert same.float().mean() > 0.95
    err = (out_f[same] - out_e[same]).abs().max() / out_e.abs().max()
    assert err < 3e-2, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["topk", "mor"])
def test_fused_under_autocast_on_cuda(name):
    """float32 weights under bfloat16 autocast (HF Trainer without DeepSpeed): the fused path casts as autocast
    does for the eager matmuls; gradients reach the float32 parameters."""
    eager, twin = _pair(CONFIGS[name], "cuda", dtype=torch.float32)
    x = torch.randn(2048, D_IN, device="cuda")
    results = []
    for layer in (eager, twin):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer.adapter(xx, None, base=layer.base(xx))
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        sel = selection_from_indices(layer.last_routing.indices, E)
        results.append((out.float(), sel, layer.experts.lora_A.grad, xx.grad))
    (out_e, sel_e, ga_e, gx_e), (out_f, sel_f, ga_f, gx_f) = results
    assert ga_f is not None and ga_f.dtype == torch.float32 and gx_f.dtype == torch.float32
    same = (sel_e == sel_f).all(-1)
    assert same.float().mean() > 0.95
    assert (out_f[same] - out_e[same]).abs().max() / out_e.abs().max() < 3e-2


@on_cpu
def test_fused_under_activation_checkpointing():
    """HF gradient checkpointing recomputes the forward during backward: same gradients as without it."""
    from torch.utils.checkpoint import checkpoint

    _, twin = _pair(CONFIGS["dynmole"], "cpu")
    x = torch.randn(T, D_IN, dtype=torch.float64)
    params = [p for name, p in twin.named_parameters() if p.requires_grad and not name.startswith("base.")]
    grads = []
    for use_checkpoint in (False, True):
        xx = x.clone().requires_grad_(True)

        def run(inp):
            out = twin.adapter(inp, None, base=twin.base(inp))
            return out, twin.last_routing.aux_loss

        out, aux = checkpoint(run, xx, use_reentrant=False) if use_checkpoint else run(xx)
        grads.append(torch.autograd.grad(out.square().sum() + aux, [xx, *params]))
    for plain, recomputed in zip(*grads):
        _close(recomputed, plain, 1e-12, "checkpointed gradient")


@pytest.mark.slow  # ~35 s: 48 kernel compilations
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter runs the kernels' math on CPU; this compiles them with Triton's real compiler for sm_90
    (every router kind, the option branches alternated, float32 and bfloat16; non-power-of-two E and r)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_fused_kernels.py"
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, str(script), "--arch", "90", "--experts", "6", "--rank", "3"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("sm_90 ")]
    assert len(compiled) == 16, result.stdout


@on_cpu
def test_zero3_partitioning_after_a_fused_forward_turns_the_fused_path_off():
    """The plan is memoised per mode, but ZeRO-3 can partition the weights after the first forward (e.g. GW-MoE
    calibration before DeepSpeed starts): its marker is checked on every call."""
    _, twin = _pair(CONFIGS["topk"], "cpu")
    x = torch.randn(4, D_IN, dtype=torch.float64)
    assert fused.fused_plan(twin.fused, twin.router, twin.experts, x, twin._fused_plans) is not None
    twin.experts.lora_A.ds_id = 0  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    assert fused.fused_plan(twin.fused, twin.router, twin.experts, x, twin._fused_plans) is None


# ---------------------------------------------------------------------------------------------------------
# Under torch.compile: the kernels as the parrot::mole_route ops (registration, tracing, values, gradients)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_survives_the_op_encoding(name):
    """The compiled path passes the plan to the ops as two lists: decoding them gives the same plan."""
    _, twin = _pair(CONFIGS[name], "cpu")
    for training in (True, False):
        twin.train(training)
        plan = fused.build_plan(twin.router, twin.experts)
        assert fused.plan_from_op_args(plan.op_ints, plan.op_floats) == plan


@on_cpu
@pytest.mark.parametrize("name", ["topk", "gwmoe", "dynmole-renorm-raw-entropy", "mor"])
def test_route_ops_pass_torch_opcheck(name):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT dispatch with
    dynamic shapes for the forward op; schema and fake implementation for the backward op."""
    _, twin = _pair(CONFIGS[name], "cpu")
    plan = fused.build_plan(twin.router, twin.experts)
    G = plan.gate_width
    z = torch.randn(T, G + E * R, dtype=torch.float64)
    mask = torch.rand(T) > 0.3
    threshold = twin.router.threshold if CONFIGS[name]["kind"] == "gwmoe" else None
    op_args = [list(plan.op_ints), list(plan.op_floats)]
    gate, h = z[:, :G].clone().requires_grad_(True), z[:, G:].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.parrot.mole_route.default, (gate, h, mask, threshold, *op_args))
    hs, routed, indices, work = torch.ops.parrot.mole_route(gate, h, mask, threshold, *op_args)
    d_work = torch.zeros_like(work)
    d_work[-(3 + 2 * plan.experts_pow2 + 1):][:3] = torch.tensor([1.0, 0.5, 2.0])
    # The backward op has no autograd formula of its own (no double backward): schema and fake implementation.
    torch.library.opcheck(torch.ops.parrot.mole_route_backward.default,
                          (gate.detach(), h.detach(), torch.randn_like(hs), mask, threshold, work, d_work, *op_args),
                          test_utils=("test_schema", "test_faketensor"))


def _compiled_run(layer: MoLELinear, backend, **options):
    def run(x, mask):
        out = layer.adapter(x, mask, base=layer.base(x))
        routing = layer.last_routing
        return out, routing.aux_losses, routing.weights, routing.probs, routing.logits, routing.indices
    return torch.compile(run, fullgraph=True, backend=backend, **options)


def _check_compiled(name: str, backend, masked: bool = True, device: str = "cpu", cuda_graphs: bool = False):
    """The compiled fused layer (one graph, with the parrot ops) against the eager modules: output, gradients
    of x and every trainable parameter, aux losses, routing tensors. backend: a torch.compile backend name, or
    "inductor" with `cuda_graphs` for what mode="reduce-overhead" does."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if cuda_graphs:
        from torch._inductor.compile_fx import compile_fx

        def backend(gm, example_inputs):  # noqa: F811 - mode="reduce-overhead" as a backend callable
            return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})

    eager, twin = _pair(CONFIGS[name], device)
    counter = CompileCounterWithBackend(backend)
    compiled = _compiled_run(twin, counter)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, D_IN, generator=g, dtype=torch.float64).to(device)
    mask = (torch.rand(T, generator=g) > 0.25).to(device) if masked else None
    weight_out = torch.randn(T, D_OUT, generator=g, dtype=torch.float64).to(device)
    params = {n: p for n, p in eager.named_parameters() if p.requires_grad}
    results = []
    for layer, fn in ((eager, None), (twin, compiled)):
        xx = x.clone().requires_grad_(True)
        if fn is None:
            out = layer.adapter(xx, mask, base=layer.base(xx))
            r = layer.last_routing
            aux, weights, probs, logits, indices = r.aux_losses, r.weights, r.probs, r.logits, r.indices
        else:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out, aux, weights, probs, logits, indices = fn(xx, mask)
        loss = (out * weight_out).sum() + sum(aux.values())
        layer_params = [dict(layer.named_parameters())[n] for n in params]
        grads = torch.autograd.grad(loss, [xx, *layer_params])
        results.append((out.detach().clone(), {k: v.detach().clone() for k, v in aux.items()}, weights.clone(),
                        probs.clone(), logits.clone(), indices.clone(), [g.clone() for g in grads]))
    (out_e, aux_e, w_e, p_e, l_e, i_e, g_e), (out_c, aux_c, w_c, p_c, l_c, i_c, g_c) = results
    _close(out_c, out_e, 2e-6, "output")
    for what, ge, gc in zip(["x", *params], g_e, g_c):
        _close(gc, ge, 2e-6, f"grad {what}")
    assert set(aux_c) == set(aux_e)
    for key in aux_e:
        _close(aux_c[key], aux_e[key], 2e-6, f"aux {key}")
    for what, a, b in (("weights", w_c, w_e), ("probs", p_c, p_e), ("logits", l_c, l_e)):
        _close(a, b, 2e-6, what)
    assert torch.equal(selection_from_indices(i_c, E), selection_from_indices(i_e, E))
    # fullgraph=True: one graph or an error (Dynamo may restart its analysis once, hence the last graph); it holds
    # the fused op, not the eager routers.
    targets = [node.target for node in counter.graphs[-1].graph.nodes]
    assert torch.ops.parrot.mole_route in targets or torch.ops.parrot.mole_route.default in targets
    torch._dynamo.reset()


@on_cpu
@pytest.mark.parametrize("name", ["topk", "gwmoe", "dynmole", "mor"])
def test_compiled_fused_layer_matches_eager(name):
    """torch.compile (fullgraph; aot_eager: AOTAutograd with the ops' fake implementations and autograd
    formulas, no C++ compiler) keeps the fused path, with the eager modules' values and gradients."""
    _check_compiled(name, "aot_eager")


@on_cpu
@pytest.mark.slow  # ~10 s of Inductor C++ compilation
def test_compiled_fused_layer_matches_eager_with_inductor():
    _check_compiled("mor", "inductor", masked=True)
    _check_compiled("dynmole", "inductor", masked=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["topk", "gwmoe", "dynmole", "mor"])
def test_compiled_fused_layer_on_cuda_with_cuda_graphs(name):
    """Inductor with CUDA graphs (what mode="reduce-overhead" compiles): the fused ops are captured and replayed
    with the eager values and gradients."""
    _check_compiled(name, "inductor", masked=name != "topk", device="cuda", cuda_graphs=True)


@on_cpu
@pytest.mark.parametrize("dropout", [False, True], ids=["one-gemm", "dropout-two-gemms"])
def test_traced_path_matches_the_autograd_function(dropout):
    """`_traced_mole` (what compilation sees) against `_FusedMoLE` (eager), incl. the experts' separate input
    that LoRA dropout gives, and a loss gradient on every aux loss."""
    _, twin = _pair(dict(CONFIGS["mor"], balance_coef=0.5), "cpu")
    plan = fused.build_plan(twin.router, twin.experts)
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(T, D_IN, generator=g, dtype=torch.float64),
              torch.randn(T, D_IN, generator=g, dtype=torch.float64) if dropout else None,
              torch.randn(T, D_OUT, generator=g, dtype=torch.float64), twin.router.gate.weight.detach(),
              twin.router.main_gate.weight.detach(), twin.experts.lora_A.detach(), twin.experts.lora_B.detach()]
    mask = torch.rand(T, generator=g) > 0.2
    results = []
    for traced in (False, True):
        inputs = [None if t is None else t.clone().requires_grad_(True) for t in leaves]
        if traced:
            out, losses, routed, indices, _ = torch.compile(fused._traced_mole, fullgraph=True, backend="aot_eager")(
                *inputs, mask, None, plan)
        else:
            sink: list = []
            out, losses = fused._FusedMoLE.apply(*inputs, mask, None, plan, sink)
            routed, indices, _ = sink[0]
        loss = (out * torch.linspace(-1, 1, D_OUT, dtype=torch.float64)).sum() + losses.double() @ torch.tensor(
            [1.0, 2.0, 3.0], dtype=torch.float64)
        grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
        results.append((out.detach(), losses.detach(), routed, indices, grads))
    for a, b in zip(results[0][:4], results[1][:4]):
        _close(b, a, 1e-12, "forward")
    for a, b in zip(results[0][4], results[1][4]):
        _close(b, a, 1e-12, "gradient")
    torch._dynamo.reset()


@on_cpu
def test_compiled_fused_layer_with_dynamic_token_count():
    """Sequence lengths change between batches: with dynamic shapes one compiled graph serves every token count
    (the ops' fake implementations size their outputs symbolically), each matching the eager modules."""
    from torch._dynamo.testing import CompileCounterWithBackend

    eager, twin = _pair(CONFIGS["dynmole"], "cpu")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = _compiled_run(twin, counter, dynamic=True)
    compiles = None
    for tokens in (T, 97, 130):
        x = torch.randn(tokens, D_IN, dtype=torch.float64)
        mask = torch.rand(tokens) > 0.2
        out_c, aux_c, *_ = compiled(x, mask)
        out_e = eager.adapter(x, mask, base=eager.base(x))
        _close(out_c.detach(), out_e.detach(), 2e-6, f"output, {tokens} tokens")
        for key, value in eager.last_routing.aux_losses.items():
            _close(aux_c[key].detach(), value.detach(), 2e-6, f"aux {key}, {tokens} tokens")
        compiles = compiles or counter.frame_count
        assert counter.frame_count == compiles, "recompiled for a new token count"
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["topk", "dynmole"])
def test_compiled_fused_layer_under_autocast_on_cuda(name):
    """float32 weights under bfloat16 autocast, compiled with Inductor: the same output and gradients as the
    uncompiled fused layer (both route in float32, so they pick the same experts)."""
    _, twin = _pair(CONFIGS[name], "cuda", dtype=torch.float32)
    compiled = torch.compile(lambda v: twin.adapter(v, None, base=twin.base(v)), fullgraph=True)
    x = torch.randn(2048, D_IN, device="cuda")
    results = []
    for fn in (lambda v: twin.adapter(v, None, base=twin.base(v)), compiled):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xx)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(), [xx, twin.experts.lora_A, twin.router.gate.weight])
        results.append((out.float(), grads))
    (out_e, grads_e), (out_c, grads_c) = results
    _close(out_c, out_e, 2e-2, "output")
    for what, ge, gc in zip(("x", "lora_A", "gate"), grads_e, grads_c):
        assert gc.dtype == ge.dtype
        _close(gc, ge, 5e-2, f"grad {what}")
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["topk", "topk-dense", "gwmoe", "dynmole", "mor"])
def test_fused_ties_and_fully_padded_batches_match_eager(name, device):
    """Two cases the comparisons above miss. Ties: a zero-initialised gate gives every token equal scores; both paths
    must then pick the lowest expert ids (the kernels do; torch.topk picked arbitrary ones). A batch whose tokens
    are all padding: aux losses 0 with zero, finite gradients on both paths (the eager balance loss of dense top-k /
    GW-MoE training divided by a clamped 0 and gave NaN gradients)."""
    config = dict(CONFIGS[name], balance_coef=1.0, z_loss_coef=0.1)
    if name == "gwmoe":
        config["gw_threshold"] = 10.0  # equal logits are maximally uncertain: keep them on the top-k branch
    if name == "dynmole":
        config["entropy_threshold"] = 2.0  # top-p over equal probabilities: the 4 lowest ids (cumulative 4/6 <= 0.75)
    eager, twin = _pair(config, device)
    with torch.no_grad():
        for layer in (eager, twin):
            for p in layer.router.parameters():
                p.zero_()
    # (MoR: equal sub-routers make the main router's exact gradient 0; the eager one is ~1e-18 of rounding)
    route_e, route_f = _check(eager, twin, device, torch.float64, True, 2e-6, atol=1e-15)
    kept = {"topk": 2, "topk-dense": E, "gwmoe": 2, "dynmole": 4, "mor": 2}[name]
    lowest = torch.zeros(T, E, dtype=torch.bool, device=device)
    lowest[:, :kept] = True
    for route in (route_e, route_f):
        assert torch.equal(selection_from_indices(route.indices, E), lowest)

    eager, twin = _pair(config, device)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, D_IN, generator=g, dtype=torch.float64).to(device)
    weight_out = torch.randn(T, D_OUT, generator=g, dtype=torch.float64).to(device)
    padded = torch.zeros(T, dtype=torch.bool, device=device)
    (out_e, route_e, grads_e), (out_f, route_f, grads_f) = (_run(layer, x, padded, weight_out) for layer in (eager, twin))
    _close(out_f, out_e, 2e-6, "output")
    for key, value in route_e.aux_losses.items():
        assert float(value.detach()) == 0.0 and float(route_f.aux_losses[key].detach()) == 0.0, key
    for i, (ge, gf) in enumerate(zip(grads_e, grads_f)):
        assert ge is None or torch.isfinite(ge).all(), f"eager grad {i}"
        _close(gf, ge, 2e-6, f"grad {i}")


@pytest.mark.parametrize("kind", ["dynmole", "gwmoe"])
def test_fused_statistics_decide_from_float32_gate_logits(kind):
    """The fused path returns p in the input's dtype (bfloat16 in a bfloat16 model) but decides in float32: its lazy
    statistics must recompute the DynMoLE Tsallis entropy / GW-MoE entropy (and so the soft-routed / broadcast
    flags) from the float32 softmax of the gate logits, as the kernels do. From the bfloat16 p, ~6% of DynMoLE's
    tokens were reported with the branch they did not take. Reference: float64 from the bfloat16 logits."""
    torch.manual_seed(0)
    num_tokens, num_experts = 4000, 8
    router = (fused.DynMoLERouter(64, num_experts) if kind == "dynmole"
              else fused.GWMoERouter(64, num_experts, top_k=2, threshold=1.8).train())
    logits = (torch.randn(num_tokens, num_experts) * (0.8 if kind == "dynmole" else 1.2)).to(torch.bfloat16)
    probs = torch.softmax(logits.float(), dim=-1).to(torch.bfloat16)  # what the kernels return in a bfloat16 layer
    indices = torch.arange(num_experts).expand(num_tokens, num_experts)  # (not what the statistics check here)
    stats = fused._stats(router, fused.routing_spec(router), probs, indices, None, None, logits)
    p = torch.softmax(logits.double(), dim=-1)
    if kind == "dynmole":
        q, eps = router.tsallis_q, router.entropy_eps
        value = (1 - (p + eps).pow(q).sum(-1)) / (1 - num_experts ** (1 - q))
        flag, threshold = value > router.entropy_threshold, router.entropy_threshold
    else:
        value = -(p * (p + router.entropy_eps).log()).sum(-1)
        flag, threshold = value >= 1.8, 1.8
    clear = (value - threshold).abs() > 1e-4
    assert clear.float().mean() > 0.95 and 0.1 < flag.float().mean() < 0.9
    assert torch.equal(stats["broadcast"].bool()[clear], flag[clear])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["topk", "gwmoe", "dynmole", "mor"])
def test_fused_and_eager_bfloat16_layers_route_alike_on_cuda(name):
    """Both layers in bfloat16 (the same gate logits from the same GEMM): the eager routers decide from float32
    probabilities and break ties by expert id, as the kernels do, so both pick the same experts and report the
    same broadcast flags, bar float32 rounding at a boundary (before: DynMoLE's bfloat16 Tsallis entropy flipped
    ~6% of the tokens, MoR's bfloat16 mixture ~2%, torch.topk's ties ~0.5%)."""
    eager, twin = _pair(CONFIGS[name], "cuda", dtype=torch.bfloat16)
    x = (torch.randn(8192, D_IN, device="cuda") * torch.linspace(0.1, 2.0, 8192, device="cuda")[:, None]).bfloat16()
    outs, routes = [], []
    for layer in (eager, twin):
        outs.append(layer.adapter(x, None, base=layer.base(x)).float())
        routes.append(layer.last_routing)
    sel_e, sel_f = (selection_from_indices(r.indices, E) for r in routes)
    same = (sel_e == sel_f).all(-1)
    assert same.float().mean() > 0.999, same.float().mean()
    if name in ("gwmoe", "dynmole"):
        flags_e, flags_f = (r.stats["broadcast"].bool() for r in routes)
        assert 0.02 < flags_e.float().mean() < 0.98
        assert (flags_e == flags_f).float().mean() > 0.999
    assert (outs[1][same] - outs[0][same]).abs().max() / outs[0].abs().max() < 3e-2


# ---------------------------------------------------------------------------------------------------------
# Router settings changed after a first forward; GW-MoE's balance loss against a naive reference
# ---------------------------------------------------------------------------------------------------------

SETTINGS_CHANGES = {  # (config, the change applied to both layers' routers after a first fused forward)
    "topk-top_k": ("topk", lambda router: setattr(router, "top_k", 3)),
    "dynmole-entropy_threshold": ("dynmole", lambda router: setattr(router, "entropy_threshold", 0.6)),
    "gwmoe-eval": ("gwmoe", lambda router: router.eval()),
    "gwmoe-uniform": ("gwmoe", lambda router: setattr(router, "broadcast_weights", "uniform")),
    "mor-balance_coef": ("mor", lambda router: setattr(router, "balance_coef", 0.5)),
}


@on_cpu
@pytest.mark.parametrize("change", list(SETTINGS_CHANGES))
def test_fused_path_follows_router_settings_changed_after_a_forward(change):
    """The fused layer builds its plan (the kernels' compile-time settings) at its first forward and memoises it;
    a router setting changed afterwards (top_k, a threshold, the broadcast weights, a loss coefficient, the
    training mode) must take effect as in the eager router: values, gradients, aux losses and routing equal."""
    name, apply = SETTINGS_CHANGES[change]
    eager, twin = _pair(CONFIGS[name], "cpu")
    x = torch.randn(T, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = twin.adapter(x, None, base=twin.base(x)).detach()  # the first forward builds and memoises the plan
    aux_before = {k: float(v.detach()) for k, v in twin.last_routing.aux_losses.items()}
    for layer in (eager, twin):
        apply(layer.router)
    _check(eager, twin, "cpu", torch.float64, True, 2e-6)
    after = eager.adapter(x, None, base=eager.base(x)).detach()
    aux_after = {k: float(v.detach()) for k, v in eager.last_routing.aux_losses.items()}
    assert not torch.equal(after, before) or aux_after != aux_before  # the change changes the result


@on_cpu
def test_fused_plan_memo_builds_once_per_settings(monkeypatch):
    """The memo is still a memo: one plan per distinct settings (the host cost per forward matters), kept when the
    settings return to an earlier state."""
    _, twin = _pair(CONFIGS["topk"], "cpu")
    built = []
    real = fused.build_plan
    monkeypatch.setattr(fused, "build_plan",
                        lambda router, experts: built.append(router.top_k) or real(router, experts))
    x = torch.randn(4, D_IN, dtype=torch.float64)
    plans = []
    for top_k in (2, 2, 3, 3, 2, 3):
        twin.router.top_k = top_k
        plans.append(fused.fused_plan(twin.fused, twin.router, twin.experts, x, twin._fused_plans))
    assert built == [2, 3]
    assert [p.spec.top_k for p in plans] == [2, 2, 3, 3, 2, 3]
    assert plans[0] is plans[4] and plans[2] is plans[5]


def _naive_gwmoe_balance(logits: torch.Tensor, mask: torch.Tensor, top_k: int, coef: float) -> torch.Tensor:
    """Switch balance loss, one token at a time in float64, counting every valid token's top-k experts (also of
    broadcast tokens: the official GW-MoE rule): coef * E * sum_e f_e P_e, f from the counts, P the mean p."""
    num_experts = logits.shape[1]
    counts, prob_sums, valid = [0.0] * num_experts, [0.0] * num_experts, 0
    for t in range(logits.shape[0]):
        if not bool(mask[t]):
            continue
        valid += 1
        z = [float(v) for v in logits[t]]
        top = max(z)
        ex = [math.exp(v - top) for v in z]
        p = [v / sum(ex) for v in ex]
        for e in sorted(range(num_experts), key=lambda e: (-z[e], e))[:top_k]:
            counts[e] += 1.0
        for e in range(num_experts):
            prob_sums[e] += p[e]
    total = sum(counts)
    return torch.tensor(coef * num_experts * sum(counts[e] / total * prob_sums[e] / valid for e in range(num_experts)),
                        dtype=torch.float64)


@on_cpu
@pytest.mark.parametrize("name", ["gwmoe", "gwmoe-uniform-normalized"])
def test_fused_gwmoe_balance_counts_broadcast_tokens_by_their_top_k(name):
    """GW-MoE in training with a mask, broadcast tokens among the valid and the padded ones: the fused and the eager
    balance loss equal a per-token float64 reference that counts each valid token's top-k experts."""
    config = dict(CONFIGS[name], balance_coef=0.25)
    eager, twin = _pair(config, "cpu")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, D_IN, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.1, 2.0, T, dtype=torch.float64)[:, None]
    mask = torch.rand(T, generator=g) > 0.25
    _check(eager, twin, "cpu", torch.float64, True, 2e-6)  # values and gradients (on its own inputs)
    for layer in (eager, twin):
        layer.adapter(x, mask, base=layer.base(x))
    broadcast = twin.last_routing.stats["broadcast"].bool()
    assert broadcast[mask].any() and (~broadcast[mask]).any() and broadcast[~mask].any()
    logits = x @ eager.router.gate.weight.detach().t()
    expected = _naive_gwmoe_balance(logits, mask, 2, 0.25)
    for layer in (eager, twin):
        torch.testing.assert_close(layer.last_routing.aux_losses["balance"].detach().double(), expected,
                                   rtol=1e-6, atol=0)
