"""PERFT on tiny OLMoE / Mixtral / Qwen2-MoE: forward = base MoE + hand-computed PEFT branch (float64)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)

from parrot.moe import RouterConfig, RouterStatsTracker, plot_expert_load
from parrot.moe.methods import PERFT_VARIANTS, PerftConfig, inject_perft, load_perft, perft_adapters, prepare_for_tuning, save_perft
from parrot.moe.methods.tuning import train_steps

COMMON = dict(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              experts_implementation="eager")  # grouped_mm has no float64 kernel
BUILDERS = {
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                            moe_intermediate_size=8, shared_expert_intermediate_size=12)),
}


def _build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind]().double()


def _randomize_adapters(model) -> None:
    # W_up starts at zero (the branch is 0 at init); give it values so the test sees the branch.
    with torch.no_grad():
        for _, adapter in perft_adapters(model):
            adapter.experts.lora_B.normal_(0.0, 0.5)
            if adapter.router is not None:
                adapter.router.gate.weight.normal_(0.0, 1.0)


def _naive_branch(adapter, block, x: torch.Tensor, config: PerftConfig) -> torch.Tensor:
    """Token by token, float64: sum_j g_j (alpha/r) W_up,j act(W_down,j x)."""
    act = {"identity": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[config.activation]
    A, B = adapter.experts.lora_A, adapter.experts.lora_B
    scale = config.alpha / config.rank
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        xt = x[t]
        if config.variant == "perft-r":
            p = torch.softmax(adapter.router.gate.weight @ xt, -1)
            top = torch.topk(p, config.router.top_k).indices
            gates = {int(j): p[j] / p[top].sum() for j in top}
        elif config.variant == "perft-e":
            # HF routers take the softmax in float32 (selective precision); the PEFT experts reuse those scores
            p = torch.softmax((block.gate.weight @ xt).float(), -1)
            top = torch.topk(p, block.gate.top_k).indices
            renorm = getattr(block.gate, "norm_topk_prob", True)  # Mixtral always renormalises
            gates = {int(j): (p[j] / (p[top].sum() if renorm else 1.0)).double() for j in top}
        else:
            gates = {j: 1.0 for j in range(A.shape[0])}
        for j, g in gates.items():
            out[t] += g * scale * (B[j] @ act(A[j] @ xt))
    return out


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("variant", PERFT_VARIANTS)
def test_forward_equals_base_moe_plus_hand_computed_branch(kind, variant):
    model = _build(kind)
    activation = "gelu" if variant == "perft-d" else "identity"  # one variant checks the bottleneck activation
    config = PerftConfig(variant=variant, num_experts=3, rank=2, alpha=4.0, activation=activation,
                         router=RouterConfig(kind="topk", top_k=2))
    ids = torch.randint(3, 40, (2, 5))
    reference_logits = model(input_ids=ids).logits
    names = inject_perft(model, config)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    # injected branch starts at zero: the model is unchanged
    torch.testing.assert_close(model(input_ids=ids).logits, reference_logits)
    _randomize_adapters(model)
    seen = {}
    for name, block in ((n, model.get_submodule(n)) for n in names):
        block.register_forward_hook(lambda m, a, o, _n=name: seen.__setitem__(_n, (a[0].detach(), o.detach())))
    logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, reference_logits)
    for name in names:
        block = model.get_submodule(name)
        x, actual = seen[name]
        with torch.no_grad():
            base_out = type(block).forward(block, x.clone())  # the frozen MoE block alone (no hooks)
            flat = x.reshape(-1, x.shape[-1])
            expected = base_out + _naive_branch(block.perft, block, flat, config).view_as(x)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("variant", PERFT_VARIANTS)
def test_branch_gradient_wrt_block_input_matches_hand_computed_branch(kind, variant):
    """d(branch)/d(block input) includes the routing's dependence on the input: PERFT-E's gates are the frozen
    router's scores g_j(h), so the gradient reaching h (and every trainable parameter upstream: earlier layers'
    PEFT experts) carries dg_j/dh * E_j(h) as the base experts' outputs do. Reference: the float64 naive branch,
    differentiated by autograd; the branch gradient of the model is the block's input gradient minus the base
    block's."""
    model = _build(kind)
    config = PerftConfig(variant=variant, num_experts=3, rank=2, alpha=4.0, router=RouterConfig(kind="topk", top_k=2))
    names = inject_perft(model, config)
    _randomize_adapters(model)
    block = model.get_submodule(names[0])
    torch.manual_seed(4)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 16, dtype=torch.float64)
    base_grad, = torch.autograd.grad((type(block).forward(block, x) * w).sum(), x)  # the frozen block alone
    naive = _naive_branch(block.perft, block, x.reshape(-1, 16), config).view_as(x)
    expected, = torch.autograd.grad((naive * w).sum(), x)
    total_grad, = torch.autograd.grad((block(x) * w).sum(), x)  # block + PERFT branch (hooks)
    torch.testing.assert_close(total_grad - base_grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", PERFT_VARIANTS)
def test_only_peft_parameters_receive_gradients(variant):
    model = _build("qwen2_moe")
    setup = prepare_for_tuning(model, variant, num_experts=3, rank=2, router={"kind": "topk", "top_k": 2, "balance_coef": 0.01})
    _randomize_adapters(model)
    ids = torch.randint(3, 40, (2, 6))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    (out.loss + setup.aux_loss()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n in setup.trainable}
    assert with_grad == expected
    assert all(".perft." in n for n in expected)
    assert any(".perft.router." in n for n in expected) == (variant == "perft-r")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_state_dict_save_load_roundtrip(tmp_path):
    model = _build("olmoe")
    config = PerftConfig(variant="perft-r", num_experts=3, rank=2)
    inject_perft(model, config)
    _randomize_adapters(model)
    ids = torch.randint(3, 40, (2, 5))
    expected = model(input_ids=ids).logits
    save_perft(model, config, tmp_path / "perft")
    fresh = _build("olmoe")
    loaded = load_perft(fresh, tmp_path / "perft")
    assert loaded == config
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected)
    # base parameter names are unchanged by injection (the adapter lives under `<block>.perft`)
    assert set(_build("olmoe").state_dict()) <= set(fresh.state_dict())


def test_load_into_adapters_injected_with_other_settings_is_refused(tmp_path):
    """load_perft on a model that already has PERFT adapters: weights whose shapes fit but were trained under another
    activation / alpha / router top-k would run silently wrong; every differing setting must be named instead, before
    any weight is loaded. The same settings load (and reproduce the saved model)."""
    model = _build("olmoe")
    config = PerftConfig(variant="perft-r", num_experts=3, rank=2, alpha=8.0, activation="silu",
                         router=RouterConfig(kind="topk", top_k=2))
    inject_perft(model, config)
    _randomize_adapters(model)
    save_perft(model, config, tmp_path / "perft")
    other = _build("olmoe")
    inject_perft(other, PerftConfig(variant="perft-r", num_experts=3, rank=2, router=RouterConfig(kind="topk", top_k=1)))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="saved with other settings") as err:
        load_perft(other, tmp_path / "perft")
    message = str(err.value)
    for line in ("alpha: saved 8.0, model 16.0", "activation: saved 'silu', model 'identity'", "router.top_k: saved 2, model 1"):
        assert line in message
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing loaded
    dense = _build("olmoe")
    inject_perft(dense, PerftConfig(variant="perft-e", rank=2, alpha=8.0, activation="silu"))
    with pytest.raises(ValueError, match="variant: saved 'perft-r', model 'perft-e'"):
        load_perft(dense, tmp_path / "perft")
    same = _build("olmoe")
    inject_perft(same, config)
    load_perft(same, tmp_path / "perft")
    ids = torch.randint(3, 40, (2, 5))
    torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("variant", ["perft-e", "perft-s"])
def test_blocks_returning_tuples(variant):
    """An MoE block that returns (hidden, router_logits) (transformers 4.x style, kept by some 5.x blocks) gets the
    branch added to the hidden states, the rest passed through; one whose output is not the input's (B, S, D)
    shape (Ernie-4.5-VL's block returns the tokens flattened) is refused by name, not with an AttributeError."""
    model = _build("olmoe")
    inject_perft(model, PerftConfig(variant=variant, rank=2))
    _randomize_adapters(model)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = block(x)  # the tensor-returning block + branch
    plain = type(block)

    class TupleBlock(plain):
        def forward(self, hidden_states):
            return plain.forward(self, hidden_states), torch.arange(3)

    class FlatBlock(plain):
        def forward(self, hidden_states):
            return plain.forward(self, hidden_states).flatten(), torch.arange(3)

    block.__class__ = TupleBlock
    out, logits = block(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(logits, torch.arange(3))
    block.__class__ = FlatBlock
    with pytest.raises(TypeError, match=r"FlatBlock maps hidden states \(2, 5, 16\) to \(160,\).*needs an MoE block"):
        block(x)


def test_padding_is_excluded_from_routing_statistics():
    model = _build("mixtral")
    inject_perft(model, PerftConfig(variant="perft-e"))
    ids = torch.randint(3, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    model(input_ids=ids, attention_mask=mask)
    routing = perft_adapters(model)[0][1].last_routing
    assert routing.stats["mask"].tolist() == mask.reshape(-1).bool().tolist()


@pytest.mark.parametrize("variant", PERFT_VARIANTS)
def test_tiny_run_trains_and_writes_diagnostics(variant, tmp_path):
    model = _build("olmoe").float()
    setup = prepare_for_tuning(model, variant, num_experts=4, rank=4, alpha=8.0)
    torch.manual_seed(1)
    ids = torch.randint(3, 40, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tracker = RouterStatsTracker()
    losses = train_steps(model, [batch], 25, 1e-2, aux_loss=setup.aux_loss,
                         on_step=lambda step: tracker.update(step, setup.routing()))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    if variant in ("perft-r", "perft-e"):
        assert tracker.records and len(tracker.mean_load()) == 2
        tracker.write_json(tmp_path / "router_stats.json")
        plot_expert_load(tracker, tmp_path / "expert_load.png")
        assert (tmp_path / "router_stats.json").stat().st_size > 0 and (tmp_path / "expert_load.png").stat().st_size > 0
    else:
        assert setup.routing() == {}  # dense / single PEFT experts have no router


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        PerftConfig(variant="perft-x")
    with pytest.raises(ValueError, match="activation"):
        PerftConfig(activation="tanh")
    with pytest.raises(ValueError, match="no sparse MoE block"):
        from transformers import LlamaConfig, LlamaForCausalLM

        inject_perft(LlamaForCausalLM(LlamaConfig(**COMMON)), PerftConfig())


@pytest.mark.parametrize("variant", PERFT_VARIANTS)
def test_float32_model_under_bfloat16_autocast(variant):
    """float32 weights under bfloat16 autocast (HF Trainer without DeepSpeed): PERFT-R / -E route each token to
    k < N experts, so the (larger than 1/8 of D) adapter runs the grouped executor; forward and backward must
    work and match the float32 model up to bfloat16 rounding."""
    model = _build("olmoe").float()
    setup = prepare_for_tuning(model, variant, num_experts=3, rank=2, alpha=4.0,
                               router=RouterConfig(kind="topk", top_k=2, balance_coef=0.01))
    _randomize_adapters(model)
    ids = torch.randint(3, 40, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        loss = out.loss + setup.aux_loss()
    loss.backward()
    torch.testing.assert_close(out.logits.float(), reference, rtol=0.05, atol=0.05)
    assert all(model.get_parameter(n).grad is not None for n in setup.trainable)
