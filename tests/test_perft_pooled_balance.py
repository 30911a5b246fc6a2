"""PERFT-R's router loss is the official one: `shared_routing_adapter_router_aux_loss_coef` (0.01) x transformers'
`load_balancing_loss_func` applied ONCE to the tuple of every layer's PERFT-R router logits, with the call's
attention mask (liuyilun2000/PERFUME, `math/olmoe_modification/modeling_olmoe.py`, `OlmoeAdapterForCausalLM.forward`;
the coefficient's default in `math/olmoe_modification/configuration_olmoe.py`).

The reference is independent of `parrot.moe`: the PERFT-R gates' outputs (pre-softmax logits) recorded by forward
hooks, fed to the model family's own transformers `load_balancing_loss_func` (which pools all layers' tokens and
skips padding), times the official coefficient; its value and its gradients (PERFT-R router weights, and the PEFT
experts of earlier layers, which move the hidden states later routers score) must be ours.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)
from transformers.models.mixtral import modeling_mixtral
from transformers.models.olmoe import modeling_olmoe
from transformers.models.qwen2_moe import modeling_qwen2_moe

from parrot.moe import RouterConfig, mole_aux_loss
from parrot.moe.methods import PerftConfig, inject_perft, load_perft, perft_adapters, prepare_for_tuning, save_perft
from parrot.moe.methods.perft import (PERFT_CONFIG_NAME, collect_perft_routing, perft_aux_loss, perft_balance_loss,
                                      perft_config_differences)

from .conftest import GateRecorder, padded_batch

OFFICIAL_COEF = 0.01  # configuration_olmoe.py: `shared_routing_adapter_router_aux_loss_coef=0.01`
COMMON = dict(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              experts_implementation="eager")  # grouped_mm has no float64 kernel
BUILDERS = {
    "olmoe": (lambda: OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2)),
              modeling_olmoe.load_balancing_loss_func),
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
                modeling_mixtral.load_balancing_loss_func),
    "qwen2_moe": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=8,
                                                             shared_expert_intermediate_size=12)),
                  modeling_qwen2_moe.load_balancing_loss_func),
}
NUM_EXPERTS = 4  # PERFT-R experts per block
LOSS_TOL = dict(rtol=1e-5, atol=1e-9)  # transformers sums in float32, the float64 model in float64
GRAD_TOL = dict(rtol=1e-4, atol=1e-9)


def _model(kind: str, top_k: int = 2, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[kind][0]().double().train()
    inject_perft(model, PerftConfig(variant="perft-r", num_experts=NUM_EXPERTS, rank=2, alpha=4.0,
                                    router=RouterConfig(kind="topk", top_k=top_k), **settings))
    with torch.no_grad():  # a live PEFT branch (W_up starts at 0) and routers far from uniform
        for _, adapter in perft_adapters(model):
            adapter.experts.lora_B.normal_(0.0, 0.5)
            adapter.router.gate.weight.normal_(0.0, 1.0)
    return model


def _batch(padding: str) -> dict[str, torch.Tensor]:
    return padded_batch(padding, 40)


def _perft_gates(model):
    """Every PERFT-R router's gate, in layer order."""
    return [adapter.router.gate for _, adapter in perft_adapters(model) if adapter.router is not None]


def _trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _grads(loss: torch.Tensor, params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_aux_loss_is_the_official_pooled_load_balancing_loss(kind, padding):
    model = _model(kind)
    batch = _batch(padding)
    with GateRecorder(_perft_gates(model)) as rec:
        model(**batch)
    assert len(rec.logits) == 3 and all(t.shape == (21, NUM_EXPERTS) for t in rec.logits)
    hf_loss = BUILDERS[kind][1]
    reference = OFFICIAL_COEF * hf_loss(tuple(rec.logits), NUM_EXPERTS, 2, batch.get("attention_mask"))
    ours = perft_aux_loss(model)
    torch.testing.assert_close(ours, reference.to(ours.dtype), **LOSS_TOL)
    assert perft_balance_loss(model) is not None and torch.equal(perft_balance_loss(model), ours)
    params = _trained(model)
    got, want = _grads(ours, params), _grads(reference, params)
    routers = [n for n, _ in params if ".perft.router." in n]
    assert len(routers) == 3 and all(want[n].abs().sum() > 0 for n in routers)
    assert any(want[n].abs().sum() > 0 for n, _ in params if ".perft.experts." in n)  # through the hidden states
    for name, _ in params:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("top_k", [1, 3])
def test_pooled_loss_counts_every_top_k_pick_as_transformers(top_k):
    """transformers' f_e is the mean number of top-k picks of e per token (it sums to k, not 1)."""
    model = _model("olmoe", top_k=top_k)
    batch = _batch("left")
    with GateRecorder(_perft_gates(model)) as rec:
        model(**batch)
    reference = OFFICIAL_COEF * modeling_olmoe.load_balancing_loss_func(tuple(rec.logits), NUM_EXPERTS, top_k,
                                                                        batch["attention_mask"])
    torch.testing.assert_close(perft_aux_loss(model), reference.double(), **LOSS_TOL)


def test_float32_model_under_bfloat16_autocast():
    """Under bfloat16 autocast (HF Trainer without DeepSpeed) the gates' logits are bfloat16; the loss is the
    reference's on those logits up to float32 rounding (no bfloat16 matmul in the pooled sums)."""
    model = _model("olmoe").float()
    batch = _batch("left")
    with GateRecorder(_perft_gates(model)) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
        ours = perft_aux_loss(model)
    assert rec.logits[0].dtype == torch.bfloat16 and ours.dtype == torch.float32
    logits = tuple(t.float() for t in rec.logits)
    reference = OFFICIAL_COEF * modeling_olmoe.load_balancing_loss_func(logits, NUM_EXPERTS, 2, batch["attention_mask"])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-8)


def test_padding_tokens_do_not_change_the_loss():
    model = _model("mixtral")
    losses = []
    for pad_id in (0, 5, 17):
        for padding in ("left", "right"):
            batch = _batch(padding)
            batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad_id)
            model(**batch)
            losses.append((padding, perft_aux_loss(model).item()))
    for padding in ("left", "right"):
        values = [v for p, v in losses if p == padding]
        assert values == pytest.approx([values[0]] * 3, rel=1e-12)


def test_all_padding_gives_zero_not_nan():
    model = _model("olmoe")
    model(**_batch("left"))
    for _, adapter in perft_adapters(model):
        adapter.last_mask = torch.zeros_like(adapter.last_mask)
    loss = perft_aux_loss(model)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for _, p in _trained(model) if p.grad is not None)


def test_default_coefficient_and_no_double_counting():
    """The default is the official coefficient; the routers then carry no per-layer balance loss of their own (it
    would count twice); their other aux losses (a z-loss) stay, mean over layers."""
    assert PerftConfig().balance_coef == OFFICIAL_COEF
    torch.manual_seed(0)
    model = BUILDERS["olmoe"][0]().double().train()
    inject_perft(model, PerftConfig(variant="perft-r", num_experts=NUM_EXPERTS, rank=2,
                                    router=RouterConfig(kind="topk", top_k=2, balance_coef=0.5, z_loss_coef=0.1)))
    batch = _batch("right")
    with GateRecorder(_perft_gates(model)) as rec:
        model(**batch)
    routing = collect_perft_routing(model)
    assert all(set(r.aux_losses) == {"z"} for r in routing.values())
    z = sum(r.aux_losses["z"] for r in routing.values()) / len(routing)
    balance = OFFICIAL_COEF * modeling_olmoe.load_balancing_loss_func(tuple(rec.logits), NUM_EXPERTS, 2,
                                                                      batch["attention_mask"])
    torch.testing.assert_close(perft_aux_loss(model), balance.double() + z, **LOSS_TOL)


def test_balance_coef_none_keeps_the_per_layer_router_losses():
    model = _model("olmoe", balance_coef=None)
    assert model.get_submodule("model.layers.0.mlp.perft.router").balance_coef == 0.001  # RouterConfig's default
    model(**_batch("left"))
    routing = collect_perft_routing(model)
    assert all(set(r.aux_losses) == {"balance"} for r in routing.values())
    assert perft_balance_loss(model) == 0.0
    torch.testing.assert_close(perft_aux_loss(model), mole_aux_loss(routing), rtol=0, atol=0)


def test_other_variants_have_no_router_loss():
    for variant in ("perft-e", "perft-d", "perft-s"):
        torch.manual_seed(0)
        model = BUILDERS["mixtral"][0]().double()
        inject_perft(model, PerftConfig(variant=variant, rank=2))
        model(**_batch("left"))
        assert perft_aux_loss(model) == 0.0


def test_routing_dict_is_refused():
    model = _model("olmoe")
    model(**_batch("left"))
    with pytest.raises(TypeError, match="takes the model"):
        perft_aux_loss(collect_perft_routing(model))


# A perft_config.json as save_perft wrote it before `balance_coef` existed (PerftConfig without it, the
# RouterConfig fields of that version).
OLD_CONFIG = {
    "variant": "perft-r", "num_experts": 4, "rank": 2, "alpha": 4.0, "activation": "identity", "dropout": 0.0,
    "router": {"kind": "topk", "top_k": 2, "renormalize": None, "balance_coef": 0.001, "z_loss_coef": 0.0,
               "bias": False, "tsallis_q": 1.1, "entropy_threshold": 0.9, "top_p": 0.75, "keep_top_k": 2,
               "dyn_loss_coef": 0.01, "entropy_eps": 1e-05, "normalize_entropy": True, "gw_threshold": None,
               "gw_quantile": None, "gw_broadcast_weights": "softmax", "gw_normalize_entropy": False,
               "num_routers": 3},
    "freeze_base": True,
}


def test_config_saved_before_the_change_still_loads(tmp_path):
    """A perft_config.json without balance_coef was trained with each router's own per-layer balance loss: it loads
    as balance_coef=None (that loss), not as the pooled default."""
    trained = _model("olmoe")
    save_perft(trained, PerftConfig(variant="perft-r", num_experts=4, rank=2, alpha=4.0), tmp_path / "perft")
    (tmp_path / "perft" / PERFT_CONFIG_NAME).write_text(json.dumps(OLD_CONFIG))
    ids = _batch("none")["input_ids"]
    expected = trained(input_ids=ids).logits

    torch.manual_seed(0)
    fresh = BUILDERS["olmoe"][0]().double()
    config = load_perft(fresh, tmp_path / "perft")  # injects from the saved config
    assert config.balance_coef is None and config.router.balance_coef == 0.001
    assert all(adapter.balance_coef is None and adapter.router.balance_coef == 0.001
               for _, adapter in perft_adapters(fresh))
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected)

    torch.manual_seed(0)
    per_layer = BUILDERS["olmoe"][0]().double()  # injected with the old (per-layer) rule, then loaded
    inject_perft(per_layer, PerftConfig(variant="perft-r", num_experts=4, rank=2, alpha=4.0, balance_coef=None))
    assert perft_config_differences(per_layer, config) == []
    load_perft(per_layer, tmp_path / "perft")
    torch.testing.assert_close(per_layer(input_ids=ids).logits, expected)

    torch.manual_seed(0)
    pooled = BUILDERS["olmoe"][0]().double()  # injected with today's default: the saved rule differs, named
    inject_perft(pooled, PerftConfig(variant="perft-r", num_experts=4, rank=2, alpha=4.0))
    with pytest.raises(ValueError, match="balance_coef: saved None, model 0.01"):
        load_perft(pooled, tmp_path / "perft")
    other = PerftConfig(**{**OLD_CONFIG, "balance_coef": None, "router": {**OLD_CONFIG["router"], "balance_coef": 0.1}})
    assert perft_config_differences(per_layer, other) == ["router.balance_coef: saved 0.1, model 0.001"]
    for bad in (float("inf"), float("nan"), True, -0.5):
        with pytest.raises(ValueError, match="balance_coef=.* must be a finite number >= 0 or None"):
            PerftConfig(variant="perft-r", balance_coef=bad)


def test_new_config_roundtrip(tmp_path):
    model = _model("mixtral", balance_coef=0.02)
    config = PerftConfig(variant="perft-r", num_experts=4, rank=2, alpha=4.0, balance_coef=0.02)
    save_perft(model, config, tmp_path / "perft")
    assert json.loads((tmp_path / "perft" / PERFT_CONFIG_NAME).read_text())["balance_coef"] == 0.02
    torch.manual_seed(0)
    fresh = BUILDERS["mixtral"][0]().double()
    assert load_perft(fresh, tmp_path / "perft") == config
    assert perft_adapters(fresh)[0][1].balance_coef == 0.02
    with pytest.raises(ValueError, match="balance_coef"):
        PerftConfig(balance_coef=-1.0)


def test_tuning_setup_aux_loss_is_the_pooled_loss():
    """What the trainer adds (`TuningSetup.aux_loss`, through `AuxLossHook`), with the settings `parrot.train` passes
    (a router dict without a balance coefficient): the official pooled loss."""
    torch.manual_seed(0)
    model = BUILDERS["qwen2_moe"][0]().double().train()
    setup = prepare_for_tuning(model, "perft-r", num_experts=NUM_EXPERTS, rank=2, router={"kind": "topk", "top_k": 2})
    with torch.no_grad():
        for _, adapter in perft_adapters(model):
            adapter.router.gate.weight.normal_(0.0, 1.0)
    batch = _batch("left")
    with GateRecorder(_perft_gates(model)) as rec:
        model(**batch, **setup.forward_kwargs)
    reference = OFFICIAL_COEF * modeling_qwen2_moe.load_balancing_loss_func(tuple(rec.logits), NUM_EXPERTS, 2,
                                                                            batch["attention_mask"])
    torch.testing.assert_close(setup.aux_loss(), reference.double(), **LOSS_TOL)
