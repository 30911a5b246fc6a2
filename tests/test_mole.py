"""MoLE layer vs a naive per-token float64 reference; sparse execution; peft equivalence; injection; save/load."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from parrot.moe import mole as mole_module
from parrot.moe.experts import LoRAExperts
from parrot.moe.fused import shared_gemm_applies, shared_gemm_mole
from parrot.moe.mole import (
    MoLEConfig,
    MoLELinear,
    calibrate_gwmoe,
    collect_router_outputs,
    inject_mole,
    load_mole,
    load_mole_state_dict,
    mole_aux_loss,
    mole_parameters,
    mole_state_dict,
    save_mole,
)
from parrot.moe.routers import RouterConfig

D_IN, D_OUT, E, R, ALPHA = 10, 7, 4, 3, 6.0


def _layer(router: RouterConfig, seed: int = 0, execution: str = "auto") -> MoLELinear:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).double()
    layer = MoLELinear(base, E, R, ALPHA, 0.0, router, execution).double()
    with torch.no_grad():  # B is zero-initialised; make every expert contribute
        layer.experts.lora_B.normal_(0, 0.3)
        for p in layer.router.parameters():
            p.normal_(0, 0.5)
    return layer


ROUTERS = {
    "topk": RouterConfig(kind="topk", top_k=2, z_loss_coef=0.001),
    "dense": RouterConfig(kind="topk", top_k=None),
    "dynmole": RouterConfig(kind="dynmole", entropy_threshold=0.8, top_p=0.6, keep_top_k=1),
    "gwmoe": RouterConfig(kind="gwmoe", top_k=2, gw_threshold=1.0),
    "mor": RouterConfig(kind="mor", top_k=2, num_routers=2),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_mole_linear_matches_naive_per_token(name):
    layer = _layer(ROUTERS[name])
    layer.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, D_IN, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 5, dtype=torch.float64)[:, None]
    y = layer(x)
    routing = layer.last_routing
    weights = routing.weights.detach()  # routing is checked in test_routers; here the expert mixture
    A = layer.experts.lora_A.detach().clone().requires_grad_(True)
    B = layer.experts.lora_B.detach().clone().requires_grad_(True)
    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    flat = x.reshape(-1, D_IN)
    rows = []
    for t in range(flat.shape[0]):
        out = W @ flat[t] + b
        for k in routing.indices[t].tolist():
            if k >= 0:
                out = out + weights[t, k] * (ALPHA / R) * (B[k] @ (A[k] @ flat[t]))
        rows.append(out)
    ref = torch.stack(rows).view(3, 5, D_OUT)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    # gradients into the experts (weights held fixed on both sides)
    cot = torch.randn(y.shape, generator=g, dtype=torch.float64)
    delta = layer.experts(flat, weights, routing.indices)
    gA, gB = torch.autograd.grad((delta.view_as(y) * cot).sum(), [layer.experts.lora_A, layer.experts.lora_B])
    rA, rB = torch.autograd.grad((ref * cot).sum(), [A, B])
    torch.testing.assert_close(gA, rA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gB, rB, rtol=1e-10, atol=1e-12)
    # full gradient into the router through the combine weights
    gate_grad = torch.autograd.grad((y * cot).sum(), layer.router.gate.weight)[0]
    assert torch.isfinite(gate_grad).all() and gate_grad.abs().sum() > 0
    assert layer.base.weight.requires_grad is False


def test_mole_router_gradient_matches_naive():
    """d output / d router through the weights: reference recomputes softmax + top-2 per token."""
    layer = _layer(RouterConfig(kind="topk", top_k=2))
    x = torch.randn(6, D_IN, dtype=torch.float64)
    Wg = layer.router.gate.weight.detach().clone().requires_grad_(True)
    A, B = layer.experts.lora_A.detach(), layer.experts.lora_B.detach()
    cot = torch.randn(6, D_OUT, dtype=torch.float64)
    y = layer(x)
    g = torch.autograd.grad((y * cot).sum(), layer.router.gate.weight)[0]
    ref = torch.zeros((), dtype=torch.float64)
    for t in range(6):
        p = torch.softmax(Wg @ x[t], 0)
        top = sorted(range(E), key=lambda e: -p[e].item())[:2]
        for e in top:
            ref = ref + (p[e] / (p[top[0]] + p[top[1]])) * (ALPHA / R) * (B[e] @ (A[e] @ x[t])) @ cot[t]
    torch.testing.assert_close(g, torch.autograd.grad(ref, Wg)[0], rtol=1e-10, atol=1e-12)


class _RowCounter:
    def __init__(self, experts: LoRAExperts):
        self.calls: dict[int, int] = {}
        self._run = experts.run_expert
        experts.run_expert = self  # instance attribute shadows the method

    def __call__(self, expert, x, *args):
        self.calls[expert] = self.calls.get(expert, 0) + x.shape[0]
        return self._run(expert, x, *args)


@pytest.mark.parametrize("name", ["topk", "dynmole", "mor"])
def test_sparse_routing_runs_only_selected_experts(name):
    layer = _layer(ROUTERS[name], execution="grouped")
    counter = _RowCounter(layer.experts)
    x = torch.randn(40, D_IN, dtype=torch.float64) * torch.linspace(0.1, 3.0, 40, dtype=torch.float64)[:, None]
    layer(x)
    idx = layer.last_routing.indices
    expected = {e: int((idx == e).sum()) for e in range(E) if int((idx == e).sum())}
    assert counter.calls == expected  # each expert once, exactly on the tokens that selected it
    assert sum(counter.calls.values()) < 40 * E


def test_dense_routing_uses_fused_path():
    layer = _layer(ROUTERS["dense"])  # auto: every token selected every expert -> stacked
    counter = _RowCounter(layer.experts)
    layer(torch.randn(8, D_IN, dtype=torch.float64))
    assert counter.calls == {}  # one fused matmul over all experts, no per-expert group calls


# ---------------------------------------------------------------- HF models


def _tiny(kind: str = "qwen2", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _randomize_adapters(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mole_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def test_single_expert_top1_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(_tiny("qwen2").double(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)).eval()
    mole_model = _tiny("qwen2").double()
    cfg = MoLEConfig(target_modules=tuple(targets), num_experts=1, rank=4, alpha=8, dropout=0.0,
                     router=RouterConfig(kind="topk", top_k=1))
    replaced = inject_mole(mole_model, cfg)
    assert len(replaced) == 2 * len(targets)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in replaced:
            lora = peft_model.base_model.model.get_submodule(name)
            lora.lora_B["default"].weight.copy_(torch.randn(lora.lora_B["default"].weight.shape, generator=g, dtype=torch.float64) * 0.3)
            mole = mole_model.get_submodule(name)
            mole.experts.lora_A[0].copy_(lora.lora_A["default"].weight)
            mole.experts.lora_B[0].copy_(lora.lora_B["default"].weight)
    ref = peft_model(input_ids=ids).logits
    got = mole_model(input_ids=ids).logits
    base_logits = _tiny("qwen2").double()(input_ids=ids).logits
    assert (ref - base_logits).abs().max() > 1e-3  # the adapters matter, so the comparison is not vacuous
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_injection_per_layer_experts_collection_and_training():
    model = _tiny("llama")
    cfg = MoLEConfig(num_experts=[2, 4], rank=4, alpha=8, dropout=0.0,
                     router=RouterConfig(kind="dynmole", keep_top_k=1))
    replaced = inject_mole(model, cfg)
    assert len(replaced) == 2 * 7
    assert all(isinstance(model.get_submodule(n), MoLELinear) for n in replaced)
    assert {model.get_submodule(n).num_experts for n in replaced if ".layers.0." in n} == {2}
    assert {model.get_submodule(n).num_experts for n in replaced if ".layers.1." in n} == {4}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n or ".router." in n for n in trainable)
    assert not model.lm_head.weight.requires_grad

    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    attn = torch.ones(2, 6, dtype=torch.long)
    attn[1, :2] = 0  # left padding
    model.train()
    out = model(input_ids=ids, attention_mask=attn, labels=ids)
    routing = collect_router_outputs(model)
    assert set(routing) == set(replaced)
    first = routing[replaced[0]]
    assert first.weights.shape == (12, 2) and first.stats["mask"].tolist() == attn.reshape(-1).bool().tolist()
    aux = mole_aux_loss(routing)
    expected = sum(r.aux_loss for r in routing.values()) / len(routing)
    torch.testing.assert_close(aux, expected)
    (out.loss + aux).backward()
    assert all(p.grad is not None for p in mole_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if ".base." in n)
    # routing outputs belong to one forward: a shorter call replaces them
    with torch.no_grad():
        model(input_ids=ids[:, :3])
    assert collect_router_outputs(model)[replaced[0]].weights.shape[0] == 6
    assert "mask" not in collect_router_outputs(model)[replaced[0]].stats


@pytest.mark.parametrize("kind", ["topk", "dynmole", "gwmoe", "mor"])
def test_tiny_mole_training_reduces_loss(kind):
    model = _tiny("qwen2", seed=2)
    cfg = MoLEConfig(num_experts=3, rank=4, alpha=8, dropout=0.0,
                     router=RouterConfig(kind=kind, gw_quantile=0.7, keep_top_k=1))
    inject_mole(model, cfg)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(3))
    if kind == "gwmoe":
        thresholds = calibrate_gwmoe(model, [{"input_ids": ids}])
        assert len(thresholds) == 14 and all(v > 0 for v in thresholds.values())
    opt = torch.optim.AdamW(mole_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(12):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + mole_aux_loss(collect_router_outputs(model))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_calibrate_gwmoe_sets_quantile_threshold():
    model = _tiny("qwen2", seed=4)
    inject_mole(model, MoLEConfig(target_modules=("q_proj",), num_experts=4, dropout=0.0,
                                  router=RouterConfig(kind="gwmoe", gw_quantile=0.75)))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[0, :3] = 0
    thresholds = calibrate_gwmoe(model, [{"input_ids": ids, "attention_mask": attn}])
    assert model.training is False  # restored (the tiny model was built in eval mode)
    model.train()
    model(input_ids=ids, attention_mask=attn)
    for name, routing in collect_router_outputs(model).items():
        valid = routing.stats["mask"]
        unc = routing.stats["uncertainty"][valid]
        # quantile check against a naive count: ~25% of valid tokens at or above the threshold
        frac = float((unc >= thresholds[name]).double().mean())
        assert 0.15 <= frac <= 0.35, (name, frac)
        assert torch.equal(routing.stats["broadcast"][valid].bool(), unc >= thresholds[name])


def test_save_load_roundtrip(tmp_path):
    cfg = MoLEConfig(num_experts=[3, 2], rank=4, alpha=8, dropout=0.0,
                     router=RouterConfig(kind="gwmoe", gw_threshold=0.9))
    model = _tiny("qwen2", seed=7)
    inject_mole(model, cfg)
    _randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = model(input_ids=ids).logits
    state = mole_state_dict(model)
    assert state and not any(".base." in k for k in state)
    assert all(".experts." in k or ".router." in k for k in state)
    save_mole(model, cfg, tmp_path / "adapter")

    fresh = _tiny("qwen2", seed=7)  # same base weights, fresh adapters
    loaded_cfg = load_mole(fresh, tmp_path / "adapter")
    assert loaded_cfg == cfg
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)
    for k, v in mole_state_dict(fresh).items():
        assert torch.equal(v, state[k]), k

    with pytest.raises(KeyError, match="missing"):
        load_mole_state_dict(fresh, {k: v for k, v in state.items() if "layers.0" not in k})
    bad = dict(state)
    key = next(k for k in bad if k.endswith("lora_A"))
    bad[key] = bad[key][:, :1]
    with pytest.raises(ValueError, match="shape"):
        load_mole_state_dict(fresh, bad)


def test_inject_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_mole(_tiny("qwen2"), MoLEConfig(target_modules=("query",)))
    model = _tiny("qwen2")
    with pytest.raises(ValueError, match=r"\['nonexistent_proj', 'lm_head'\] match no nn.Linear"):  # typo; excluded
        inject_mole(model, MoLEConfig(target_modules=("q_proj", "nonexistent_proj", "lm_head")))
    assert not any(isinstance(m, MoLELinear) for m in model.modules())  # refused before any layer was replaced
    with pytest.raises(ValueError, match="lists 1 layers"):
        inject_mole(_tiny("qwen2"), MoLEConfig(num_experts=[2]))
    with pytest.raises(ValueError, match="num_experts"):
        MoLEConfig(num_experts=0)


class _PrefixWrapper(nn.Module):
    """A LLaVA-like outer model: prepends 3 'image' embeddings and gives the LM the merged mask."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.prefix = nn.Parameter(torch.randn(3, lm.config.hidden_size))

    def forward(self, input_ids, attention_mask):
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, S, D)
        batch = embeds.shape[0]
        embeds = torch.cat([self.prefix.expand(batch, -1, -1), embeds], 1)
        merged = torch.cat([attention_mask.new_ones(batch, 3), attention_mask], 1)
        return self.lm(inputs_embeds=embeds, attention_mask=merged)


def test_nested_model_uses_inner_merged_mask():
    model = _PrefixWrapper(_tiny("qwen2"))
    names = inject_mole(model, MoLEConfig(target_modules=("q_proj", "down_proj"), num_experts=2,
                                          router=RouterConfig(kind="topk", top_k=1)))
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(6))
    attn = torch.ones(2, 5, dtype=torch.long)
    attn[1, :2] = 0
    model(input_ids=ids, attention_mask=attn)
    merged = torch.cat([torch.ones(2, 3, dtype=torch.long), attn], 1).reshape(-1).bool()
    routing = collect_router_outputs(model)
    assert set(routing) == set(names)
    for out in routing.values():
        assert torch.equal(out.stats["mask"], merged)
        torch.testing.assert_close(out.stats["load"].sum(), torch.tensor(1.0))  # top-1 over the 14 valid tokens


@pytest.mark.parametrize("name", ["topk", "dynmole", "mor", "dense"])
def test_stacked_and_grouped_executions_agree(name):
    """The stacked executor (zero weights for unselected experts) equals the sparse grouped one exactly."""
    x = torch.randn(30, D_IN, dtype=torch.float64, requires_grad=True)
    results = []
    for execution in ("grouped", "stacked"):
        layer = _layer(ROUTERS[name], execution=execution)
        out = layer(x)
        params = [x, layer.experts.lora_A, layer.experts.lora_B, *layer.router.parameters()]
        grads = torch.autograd.grad(out.square().sum(), params)
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for g_grouped, g_stacked in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_grouped, g_stacked, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base+delta"])
def test_grouped_execution_under_bfloat16_autocast_equals_stacked(with_base):
    """float32 experts under bfloat16 autocast (the Trainer's --bf16 without DeepSpeed): the grouped executor
    scatters the experts' bfloat16 outputs into a buffer of their dtype (a float32 buffer crashed index_add when no
    base output was given: PERFT's case), and both executors agree."""
    torch.manual_seed(0)
    x = torch.randn(40, D_IN)
    weights = torch.softmax(torch.randn(40, E), -1)
    indices = torch.topk(weights, 2, -1).indices
    weights = torch.zeros_like(weights).scatter(1, indices, weights.gather(1, indices))
    base = torch.randn(40, D_OUT) if with_base else None
    outs, reference_state = [], None
    for execution in ("grouped", "stacked"):
        experts = LoRAExperts(E, D_IN, D_OUT, R, ALPHA, execution=execution)
        with torch.no_grad():
            experts.lora_B.normal_(0, 0.3)
        if reference_state is not None:  # the same weights for both executors
            experts.load_state_dict(reference_state)
        reference_state = experts.state_dict()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(experts(x, weights, indices, base=base).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_shared_gemm_path_equals_router_then_experts(name, masked):
    """A stacked layer computes the router's logits and the experts' rank hidden in one GEMM (`shared_gemm_mole`):
    output, every gradient, aux losses, routing tensors and statistics as calling the router, then the experts."""
    layer = _layer(ROUTERS[name], execution="stacked").train()
    assert shared_gemm_applies(layer.router, layer.experts)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, D_IN, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 40, dtype=torch.float64)[:, None]
    mask = torch.rand(40, generator=g) > 0.3 if masked else None
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for shared in (True, False):
        xx = x.clone().requires_grad_(True)
        base = layer.base(xx)
        if shared:
            out, routing = shared_gemm_mole(layer.router, layer.experts, xx, mask, base)
        else:
            routing = layer.router(xx, mask)
            out = layer.experts(xx, routing.weights, routing.indices, base=base)
        loss = out.square().sum() + sum(routing.aux_losses.values(), out.new_zeros(()))
        results.append((out, routing, torch.autograd.grad(loss, [xx, *params])))
    (out_s, r_s, g_s), (out_m, r_m, g_m) = results
    torch.testing.assert_close(out_s, out_m, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_s, g_m):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(r_s.aux_losses) == set(r_m.aux_losses)
    for key in r_m.aux_losses:
        torch.testing.assert_close(r_s.aux_losses[key], r_m.aux_losses[key], rtol=1e-12, atol=1e-14)
    for field in ("weights", "indices", "probs", "logits"):
        torch.testing.assert_close(getattr(r_s, field), getattr(r_m, field), rtol=1e-12, atol=1e-14)
    assert set(r_s.stats) == set(r_m.stats)
    for key in r_m.stats:
        torch.testing.assert_close(r_s.stats[key], r_m.stats[key])


@pytest.mark.parametrize("execution", ["stacked", "grouped"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_empty_sequence_like_nn_linear(name, execution):
    """No tokens (B, 0, D): nn.Linear's output shape, aux losses 0 as for a fully masked batch (not NaN), and a
    backward that runs."""
    layer = _layer(ROUTERS[name], execution=execution).train()
    x = torch.zeros(2, 0, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == layer.base(x).shape == (2, 0, D_OUT)
    losses = layer.last_routing.aux_losses
    assert losses and all(float(v.detach()) == 0.0 for v in losses.values()), losses
    (out.sum() + sum(losses.values())).backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


def test_shared_gemm_path_only_where_it_applies(monkeypatch):
    """LoRA dropout in training (the experts see another input), gate bias, grouped or bottleneck experts and
    weights that module hooks materialise (ZeRO-3 partitions, offloaded "meta" weights) keep the router and expert
    modules."""
    stacked = _layer(ROUTERS["topk"], execution="stacked")
    assert shared_gemm_applies(stacked.router, stacked.experts)
    assert not shared_gemm_applies(_layer(ROUTERS["topk"], execution="grouped").router,
                                   _layer(ROUTERS["topk"], execution="grouped").experts)
    biased = _layer(RouterConfig(kind="mor", top_k=2, num_routers=2, bias=True), execution="stacked")
    assert not shared_gemm_applies(biased.router, biased.experts)
    bottleneck = LoRAExperts(E, D_IN, D_OUT, R, ALPHA, "stacked", activation=nn.ReLU())
    assert not shared_gemm_applies(stacked.router, bottleneck)
    offloaded = _layer(ROUTERS["mor"], execution="stacked")
    offloaded.router.main_gate.to("meta")  # accelerate's offloading hooks load such weights at the module call
    assert not shared_gemm_applies(offloaded.router, offloaded.experts)
    stacked.experts.lora_A.ds_id = 3  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    assert not shared_gemm_applies(stacked.router, stacked.experts)

    def refuse(*args, **kwargs):
        raise AssertionError("shared_gemm_mole used with LoRA dropout in training")
    monkeypatch.setattr(mole_module, "shared_gemm_mole", refuse)
    torch.manual_seed(0)
    dropping = MoLELinear(nn.Linear(D_IN, D_OUT), E, R, ALPHA, 0.2, ROUTERS["topk"], "stacked").train()
    dropping(torch.randn(6, D_IN))  # the modules, not the shared GEMM
    with pytest.raises(AssertionError, match="dropout"):
        dropping.eval()(torch.randn(6, D_IN))  # no dropout in eval mode: the shared GEMM serves it


def test_auto_execution_picks_stacked_only_for_small_adapters():
    small = LoRAExperts(4, 256, 256, 8, 16.0)  # E*r = 32 <= 256 / 8
    large = LoRAExperts(4, 64, 64, 8, 16.0)  # E*r = 32 > 64 / 8
    indices = torch.tensor([[0, 1], [2, 3]])
    assert small._use_stacked(indices) and not large._use_stacked(indices)
    assert large._use_stacked(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))  # every token uses every expert
    assert not large._use_stacked(torch.tensor([[0, 1, 2, 3], [3, 2, 1, -1]]))
    with pytest.raises(ValueError, match="execution"):
        LoRAExperts(4, 64, 64, 8, 16.0, execution="dense")


@pytest.mark.parametrize("execution", ["stacked", "grouped"])
def test_experts_accumulate_into_base_output(execution):
    """forward(..., base=b) == b + forward(...) for both executors, in values and gradients."""
    experts = LoRAExperts(E, D_IN, D_OUT, R, ALPHA, execution=execution).double()
    with torch.no_grad():
        experts.lora_B.normal_()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(10, D_IN, dtype=torch.float64, generator=g)
    base = torch.randn(10, D_OUT, dtype=torch.float64, generator=g, requires_grad=True)
    probs = torch.softmax(torch.randn(10, E, dtype=torch.float64, generator=g), -1)
    indices = torch.tensor([[0, 1], [1, -1], [2, 0]] * 3 + [[-1, -1]])
    safe = indices.clamp_min(0)
    weights = torch.zeros_like(probs).scatter(1, safe, probs.gather(1, safe) * (indices >= 0))  # 0 if unselected
    fused = experts(x, weights, indices, base=base)
    separate = base + experts(x, weights, indices)
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)
    cot = torch.randn(10, D_OUT, dtype=torch.float64, generator=g)
    params = [base, experts.lora_A, experts.lora_B]
    for a, b in zip(torch.autograd.grad((fused * cot).sum(), params), torch.autograd.grad((separate * cot).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the token with no expert (row 9) gets exactly the base output
    assert torch.equal(fused[9], base[9])
    # a base of another dtype is added after the delta is cast (no silent dtype change)
    mixed = experts(x, weights, indices, base=base.detach().float())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, separate.detach().float())


@pytest.mark.parametrize("kind", ["topk", "dynmole", "gwmoe", "mor"])
def test_stacked_mole_layer_compiles_to_one_graph(kind):
    """With the stacked executor a MoLE layer traces as one graph (no host syncs, no data-dependent branches), so
    `torch.compile(model)` can fuse it; same output and gradients as eager. backend="eager" checks the tracing
    without needing a C++ compiler."""
    torch.manual_seed(0)
    router = RouterConfig(kind=kind, gw_threshold=1.0 if kind == "gwmoe" else None)
    layer = MoLELinear(nn.Linear(64, 64, bias=False), 4, 2, 4.0, 0.0, router, expert_execution="stacked").train()
    nn.init.normal_(layer.experts.lora_B, std=0.1)
    x = torch.randn(2, 7, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    got = compiled(x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    want = layer(x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)
    torch._dynamo.reset()


def test_compiled_gwmoe_still_refuses_an_unset_threshold():
    layer = MoLELinear(nn.Linear(64, 64, bias=False), 4, 2, 4.0, 0.0, RouterConfig(kind="gwmoe", gw_quantile=0.5),
                       expert_execution="stacked").train()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="threshold is unset"):
        compiled(torch.randn(2, 3, 64))
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["topk", "gwmoe"])
def test_injected_and_loaded_layers_take_the_model_mode(tmp_path, kind):
    """A MoLE layer starts in the mode of the nn.Linear it replaces: injected into (or loaded by `load_mole` into) an
    eval-mode model it must not apply LoRA dropout or GW-MoE's training-only broadcast, so `load_mole` on a fresh
    eval model reproduces the saved model's eval outputs without another `.eval()` call."""
    cfg = MoLEConfig(num_experts=3, rank=4, alpha=8, dropout=0.5,
                     router=RouterConfig(kind=kind, top_k=1, gw_threshold=0.0))  # GW-MoE training: every token broadcast
    model = _tiny("qwen2", seed=7)  # eval mode, as models are loaded for inference
    inject_mole(model, cfg)
    assert not any(m.training for m in model.modules())
    _randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = model.eval()(input_ids=ids).logits  # eval outputs of the saved model
    for routing in collect_router_outputs(model).values():
        assert routing.indices.shape[1] == 1  # plain top-1, no broadcast
    save_mole(model, cfg, tmp_path / "adapter")

    fresh = _tiny("qwen2", seed=7)
    load_mole(fresh, tmp_path / "adapter")
    assert not any(m.training for m in fresh.modules())
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)

    trained = _tiny("qwen2", seed=7).train()  # and a training-mode model gets training-mode layers
    inject_mole(trained, cfg)
    assert all(m.training for m in trained.modules())


# ---------------------------------------------------------------------------------------------------------
# load_mole into a model that already has MoLE layers: the saved settings must be the layers' settings
# ---------------------------------------------------------------------------------------------------------

_SAVED = dict(target_modules=("q_proj", "v_proj"), num_experts=[3, 4], rank=4, alpha=8.0, dropout=0.0)
_DYN = RouterConfig(kind="dynmole", entropy_threshold=0.8, top_p=0.6, keep_top_k=1)
_GW = RouterConfig(kind="gwmoe", top_k=2, gw_quantile=0.8)
_TOPK = RouterConfig(kind="topk", top_k=2)

LOAD_MISMATCHES = {  # (saved router, model's settings that differ, the lines the error must hold)
    # same tensors (names and shapes) on both sides: the earlier load_mole loaded these silently
    "kind": (_TOPK, dict(router=RouterConfig(kind="dynmole")),  # (the resolved renormalize defaults differ too)
             [r"router\.kind: saved 'topk', model 'dynmole'", r"router\.renormalize: saved True, model False"]),
    "top_k": (_TOPK, dict(router=RouterConfig(kind="topk", top_k=1)), [r"router\.top_k: saved 2, model 1"]),
    "renormalize": (_TOPK, dict(router=RouterConfig(kind="topk", top_k=2, renormalize=False)),
                    [r"router\.renormalize: saved True, model False"]),
    "dynmole": (_DYN, dict(router=RouterConfig(kind="dynmole", entropy_threshold=0.9, top_p=0.6, keep_top_k=2)),
                [r"router\.entropy_threshold: saved 0\.8, model 0\.9", r"router\.keep_top_k: saved 1, model 2"]),
    "gw_quantile": (_GW, dict(router=RouterConfig(kind="gwmoe", top_k=2, gw_quantile=0.6)),
                    [r"router\.gw_quantile: saved 0\.8, model 0\.6"]),
    "gw_threshold": (RouterConfig(kind="gwmoe", top_k=2, gw_threshold=1.0),
                     dict(router=RouterConfig(kind="gwmoe", top_k=2, gw_threshold=1.5)),
                     [r"router\.gw_threshold: saved 1\.0, model 1\.5"]),
    "coefficients": (_TOPK, dict(router=RouterConfig(kind="topk", top_k=2, balance_coef=0.01, z_loss_coef=0.1)),
                     [r"router\.balance_coef: saved 0\.001, model 0\.01",
                      r"router\.z_loss_coef: saved 0\.0, model 0\.1"]),
    "alpha": (_TOPK, dict(router=_TOPK, alpha=16.0), [r"alpha: saved 8\.0, model 16\.0"]),
    "dropout": (_TOPK, dict(router=_TOPK, dropout=0.1), [r"dropout: saved 0\.0, model 0\.1"]),
    # other tensors: the earlier load_mole failed with a key / shape error that named no setting
    "num_experts": (_TOPK, dict(router=_TOPK, num_experts=3),
                    [r"num_experts: saved 4, model 3 \(layers model\.layers\.1\.self_attn\.q_proj, "
                     r"model\.layers\.1\.self_attn\.v_proj\)"]),
    "rank": (_TOPK, dict(router=_TOPK, rank=2), [r"rank: saved 4, model 2"]),
    "bias": (_TOPK, dict(router=RouterConfig(kind="topk", top_k=2, bias=True)),
             [r"router\.bias: saved False, model True"]),
    "target_modules": (_TOPK, dict(router=_TOPK, target_modules=("q_proj", "k_proj")),
                       [r"target_modules: saved \['q_proj', 'v_proj'\] .*select 4 layers, the model has 4 MoLE layers; "
                        r"saved only: model\.layers\.0\.self_attn\.v_proj, model\.layers\.1\.self_attn\.v_proj; "
                        r"model only: model\.layers\.0\.self_attn\.k_proj, model\.layers\.1\.self_attn\.k_proj"]),
    "kind-and-experts": (_GW, dict(router=_TOPK, num_experts=[3, 3], rank=2),
                         [r"router\.kind: saved 'gwmoe', model 'topk'", r"rank: saved 4, model 2",
                          r"num_experts: saved 4, model 3 \(layers"]),
}


@pytest.mark.parametrize("case", list(LOAD_MISMATCHES))
def test_load_mole_into_an_injected_model_names_every_differing_setting(tmp_path, case):
    """An adapter saved with other settings than the MoLE layers a model already has: a ValueError listing each
    differing field with its saved and model value, and no weight loaded (the model's adapters unchanged)."""
    router, changes, lines = LOAD_MISMATCHES[case]
    saved_cfg = MoLEConfig(**_SAVED, router=router)
    model = _tiny("qwen2", seed=7)
    inject_mole(model, saved_cfg)
    _randomize_adapters(model)
    save_mole(model, saved_cfg, tmp_path / "adapter")

    target = _tiny("qwen2", seed=7)
    inject_mole(target, MoLEConfig(**{**_SAVED, **changes}))
    before = mole_state_dict(target)
    with pytest.raises(ValueError, match=r"was saved with other settings than the model's MoLE layers") as info:
        load_mole(target, tmp_path / "adapter")
    message = str(info.value)
    for line in lines:
        assert re.search(r"^  " + line, message, flags=re.M), (line, message)
    assert len(message.splitlines()) == 1 + len(lines), message  # nothing else reported
    after = mole_state_dict(target)
    assert after.keys() == before.keys()
    for key in before:  # (an uncalibrated GW-MoE threshold is NaN)
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True)


def test_load_mole_into_an_injected_model_with_the_same_settings(tmp_path):
    """The same settings load (the saved model's outputs reproduced), also when only what does not change the
    outputs differs: the execution, the fused path, another spelling of the same targets; a GW-MoE adapter's
    calibrated threshold comes from the adapter weights (the model's is unset before)."""
    cfg = MoLEConfig(**_SAVED, router=_GW)
    model = _tiny("qwen2", seed=7)
    inject_mole(model, cfg)
    _randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    calibrate_gwmoe(model, [{"input_ids": ids}])
    model.train()
    ref = model(input_ids=ids).logits  # training mode: the threshold decides the broadcast
    save_mole(model, cfg, tmp_path / "adapter")

    target = _tiny("qwen2", seed=7).train()
    inject_mole(target, MoLEConfig(**{**_SAVED, "target_modules": ("self_attn.v_proj", "self_attn.q_proj")},
                                   router=_GW, expert_execution="grouped", fused="never"))
    assert load_mole(target, tmp_path / "adapter") == cfg
    torch.testing.assert_close(target(input_ids=ids).logits, ref, rtol=1e-12, atol=1e-12)


def test_mole_config_differences_follow_live_router_settings():
    """A setting changed on a layer's router after injection is the layer's setting (what it routes with)."""
    cfg = MoLEConfig(**_SAVED, router=_TOPK)
    model = _tiny("qwen2", seed=7)
    inject_mole(model, cfg)
    assert mole_module.mole_config_differences(model, cfg) == []
    model.get_submodule("model.layers.0.self_attn.q_proj").router.top_k = 1
    assert mole_module.mole_config_differences(model, cfg) == [
        "router.top_k: saved 2, model 1 (layers model.layers.0.self_attn.q_proj)"]


# ---------------------------------------------------------------------------------------------------------
# GW-MoE thresholds in bfloat16 models and adapter files
# ---------------------------------------------------------------------------------------------------------


def test_gwmoe_threshold_survives_bfloat16_models_and_adapter_files(tmp_path):
    """A bfloat16 model keeps each GW-MoE threshold in float32 (not rounded to bfloat16's ~3 digits), saves it so
    and loads it back exactly; an adapter written before (thresholds stored in bfloat16) still loads, with its
    stored value."""
    from safetensors.torch import load_file, save_file

    value = 1.2345678
    exact = torch.tensor(value, dtype=torch.float32)
    assert exact.to(torch.bfloat16).float() != exact
    cfg = MoLEConfig(target_modules=("q_proj",), num_experts=3, rank=2, dropout=0.0,
                     router=RouterConfig(kind="gwmoe", top_k=1, gw_threshold=value))
    model = _tiny("qwen2", seed=7)
    inject_mole(model, cfg)
    model.to(torch.bfloat16)
    routers = [m.router for m in model.modules() if isinstance(m, MoLELinear)]
    assert routers and all(r.gate.weight.dtype == torch.bfloat16 for r in routers)
    assert all(r.threshold.dtype == torch.float32 and torch.equal(r.threshold, exact) for r in routers)
    save_mole(model, cfg, tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / mole_module.ADAPTER_WEIGHTS_NAME))
    thresholds = [k for k in stored if k.endswith("router.threshold")]
    assert len(thresholds) == 2 and all(torch.equal(stored[k], exact) for k in thresholds)

    fresh = _tiny("qwen2", seed=7).to(torch.bfloat16)
    load_mole(fresh, tmp_path / "adapter")  # injects into the bfloat16 model, then loads
    assert all(torch.equal(m.router.threshold, exact) for m in fresh.modules() if isinstance(m, MoLELinear))

    old = {k: (v.to(torch.bfloat16) if k in thresholds else v) for k, v in stored.items()}  # the earlier files
    save_file(old, str(tmp_path / "adapter" / mole_module.ADAPTER_WEIGHTS_NAME))
    older = _tiny("qwen2", seed=7).to(torch.bfloat16)
    load_mole(older, tmp_path / "adapter")
    for m in older.modules():
        if isinstance(m, MoLELinear):
            assert m.router.threshold.dtype == torch.float32
            assert m.router.threshold.item() == exact.to(torch.bfloat16).item()


def test_load_mole_names_a_per_layer_expert_list_without_a_layer(tmp_path):
    """A saved per-layer `num_experts` list (e.g. edited by hand) that has no entry for one of the model's MoLE layers
    is reported as that field's difference, not as an error of another function."""
    import json

    cfg = MoLEConfig(**_SAVED, router=_TOPK)
    model = _tiny("qwen2", seed=7)
    inject_mole(model, cfg)
    save_mole(model, cfg, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / mole_module.ADAPTER_CONFIG_NAME
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), num_experts=[3])))
    expected = (r"(?m)^  num_experts: saved \[3\] \(no entry for this layer\), model 4 "
                r"\(layers model\.layers\.1\.self_attn\.q_proj, model\.layers\.1\.self_attn\.v_proj\)$")
    with pytest.raises(ValueError, match=expected):
        load_mole(model, tmp_path / "adapter")


def _tiny_qwen2_moe_with_mole():
    import transformers as tf

    from parrot.moe.mole import MoLEConfig, inject_mole, mole_parameters

    torch.manual_seed(0)
    model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    inject_mole(model, MoLEConfig(num_experts=4, rank=2, dropout=0.0,
                                  router=RouterConfig(kind="topk", top_k=2, balance_coef=1.0)))
    with torch.no_grad():
        for p in mole_parameters(model):
            p.normal_(0, 0.1)  # large enough to route unevenly; a top-k weight must not underflow to 0 (the
            # reference below reads the selection from the weights)
    return model.train()


def test_flattened_token_inputs_route_with_the_padding_mask():
    """Qwen2-MoE's shared-expert MLP gets the call's tokens flattened (B*S, D): its MoLE layers' balance loss must
    leave padding out, as the 3-D layers' does (reference: the loss over the real tokens' router outputs)."""
    from parrot.moe.mole import collect_router_outputs
    from parrot.moe.routers import load_balance_loss

    model = _tiny_qwen2_moe_with_mole()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[1, :4] = 0
    model(input_ids=ids, attention_mask=attention_mask)
    real = attention_mask.bool().reshape(-1)
    routing = collect_router_outputs(model)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.shared_expert.gate_proj",
                 "model.layers.1.mlp.shared_expert.down_proj"):
        r = routing[name]
        expected = load_balance_loss(r.probs[real], r.weights[real], None)
        torch.testing.assert_close(r.aux_losses["balance"], expected, msg=name)

