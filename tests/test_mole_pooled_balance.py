"""MoLE's optional official load-balancing loss (`MoLEConfig.balance="pooled"`, `--mole-balance pooled`).

The official MoE-PEFT code (TUDB-Labs/MoE-PEFT `moe_peft/modules/mix_lora.py`, mikecovlee/DynMoLE) adds ONE term:
the router aux coefficient x transformers' `load_balancing_loss_func` applied to the tuple of every routed layer's
router logits, with the call's attention mask (softmax probabilities, each of a token's top-k picks counted, padding
excluded). The reference here is independent of `parrot.moe`: the gates' outputs recorded by forward hooks (the
grouped execution calls the gate; the stacked one computes the logits in a shared GEMM, whose logits are read from the
routing outputs instead), fed to transformers' own function; its value and gradients must be ours.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from parrot.moe import mole as mole_module
from parrot.moe.mole import (ADAPTER_CONFIG_NAME, MoLEConfig, MoLELinear, check_aux_loss_trains,
                             collect_router_outputs, inject_mole, load_mole, mole_aux_loss, mole_config_differences,
                             pooled_balance_loss, save_mole)
from parrot.moe.routers import RouterConfig

from .conftest import GateRecorder, padded_batch

E = 4
COEF = 0.01
LOSS_TOL = dict(rtol=1e-5, atol=1e-9)  # transformers sums in float32, the float64 model in float64
GRAD_TOL = dict(rtol=1e-4, atol=1e-9)
COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def _model(kind: str = "qwen2", router: RouterConfig | None = None, balance: str = "pooled",
           execution: str = "grouped", num_experts=E, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    build = (lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON))) if kind == "qwen2" else \
        (lambda: LlamaForCausalLM(LlamaConfig(**COMMON)))
    model = build().double().train()
    router = router or RouterConfig(kind="topk", top_k=2, balance_coef=COEF)
    inject_mole(model, MoLEConfig(num_experts=num_experts, rank=2, alpha=4.0, dropout=0.0, router=router,
                                  expert_execution=execution, balance=balance, **settings))
    with torch.no_grad():  # live experts (B starts at 0) and routers far from uniform
        for layer in _layers(model):
            layer.experts.lora_B.normal_(0.0, 0.5)
            for p in layer.router.parameters():
                p.normal_(0.0, 1.0)
    return model


def _layers(model) -> list[MoLELinear]:
    return [m for m in model.modules() if isinstance(m, MoLELinear)]


def _batch(padding: str) -> dict[str, torch.Tensor]:
    return padded_batch(padding, 64)


def _gates(model):
    return [layer.router.gate for layer in _layers(model)]


def _trained(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _grads(loss, params) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


def _check_against(model, ours, reference):
    torch.testing.assert_close(ours, reference.to(ours.dtype), **LOSS_TOL)
    params = _trained(model)
    got, want = _grads(ours, params), _grads(reference, params)
    gates = [n for n, _ in params if ".router.gate." in n]
    assert gates and all(want[n].abs().sum() > 0 for n in gates)
    assert any(want[n].abs().sum() > 0 for n, _ in params if ".experts." in n)  # through the hidden states
    for name, _ in params:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_pooled_loss_is_transformers_load_balancing_loss(kind, padding):
    model = _model(kind)
    batch = _batch(padding)
    with GateRecorder(_gates(model)) as rec:
        model(**batch)
    assert len(rec.logits) == 2 * 7 and all(t.shape == (21, E) for t in rec.logits)
    reference = COEF * load_balancing_loss_func(tuple(rec.logits), E, 2, batch.get("attention_mask"))
    routing = collect_router_outputs(model)
    ours = mole_aux_loss(routing)
    assert ours.requires_grad
    torch.testing.assert_close(pooled_balance_loss(routing), ours, rtol=0, atol=0)  # the only aux term
    _check_against(model, ours, reference)


def test_stacked_execution_gives_the_same_loss():
    """The stacked execution (router logits from the shared [W_gate; A] GEMM, no gate call) gives the same loss."""
    model = _model(execution="stacked")
    batch = _batch("left")
    model(**batch)
    routing = collect_router_outputs(model)
    reference = COEF * load_balancing_loss_func(tuple(r.logits for r in routing.values()), E, 2,
                                                batch["attention_mask"])
    _check_against(model, mole_aux_loss(routing), reference)


@pytest.mark.parametrize("top_k", [1, 3])
def test_every_top_k_pick_counts_as_transformers(top_k):
    model = _model(router=RouterConfig(kind="topk", top_k=top_k, balance_coef=COEF))
    batch = _batch("right")
    with GateRecorder(_gates(model)) as rec:
        model(**batch)
    reference = COEF * load_balancing_loss_func(tuple(rec.logits), E, top_k, batch["attention_mask"])
    torch.testing.assert_close(mole_aux_loss(collect_router_outputs(model)), reference.double(), **LOSS_TOL)


def test_gwmoe_counts_each_tokens_top_k_broadcast_or_not():
    """GW-MoE broadcasts uncertain tokens to every expert in training; they count as their top-k (its per-layer
    rule), so the loss is transformers' with the GW-MoE top-k."""
    model = _model(router=RouterConfig(kind="gwmoe", top_k=2, gw_threshold=0.8, balance_coef=COEF))
    batch = _batch("left")
    with GateRecorder(_gates(model)) as rec:
        model(**batch)
    routing = collect_router_outputs(model)
    assert any(bool((r.indices >= 0).all(-1).any()) for r in routing.values())  # some tokens were broadcast
    reference = COEF * load_balancing_loss_func(tuple(rec.logits), E, 2, batch["attention_mask"])
    _check_against(model, mole_aux_loss(routing), reference)


def test_mor_counts_the_top_k_of_its_mixture():
    """MoR's probabilities are its mixture p (logits log p): transformers' function on log p is the reference."""
    model = _model(router=RouterConfig(kind="mor", top_k=2, num_routers=2, balance_coef=COEF))
    batch = _batch("right")
    model(**batch)
    routing = collect_router_outputs(model)
    reference = COEF * load_balancing_loss_func(tuple(r.logits for r in routing.values()), E, 2,
                                                batch["attention_mask"])
    torch.testing.assert_close(mole_aux_loss(routing), reference.double(), **LOSS_TOL)


def test_dynmole_counts_the_experts_it_selected():
    """DynMoLE has no fixed k: f counts each token's selected experts (weights > 0; shares sum to the mean number
    selected), P its softmax; its Tsallis term stays per layer (mean over layers), its own balance term is gone."""
    router = RouterConfig(kind="dynmole", entropy_threshold=0.95, top_p=0.6, keep_top_k=1, balance_coef=COEF)
    model = _model(router=router)
    batch = _batch("left")
    model(**batch)
    routing = collect_router_outputs(model)
    assert all(set(r.aux_losses) == {"tsallis"} for r in routing.values())
    mask = batch["attention_mask"].reshape(-1).bool()
    picks, mass, rows = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64), 0
    counts = set()
    for r in routing.values():  # a naive per-token reference
        for t in range(r.probs.shape[0]):
            if mask[t]:
                chosen = [e for e in range(E) if r.weights[t, e] > 0]
                counts.add(len(chosen))
                for e in chosen:
                    picks[e] += 1
                mass = mass + r.probs[t]
                rows += 1
    assert len(counts) > 1  # a variable number of experts per token
    tsallis = sum(r.aux_losses["tsallis"] for r in routing.values()) / len(routing)
    reference = COEF * E * (picks / rows * mass / rows).sum() + tsallis
    torch.testing.assert_close(mole_aux_loss(routing), reference, rtol=1e-12, atol=1e-15)


def test_no_double_counting_and_other_aux_losses_stay_per_layer():
    """Under "pooled" the routers carry no balance term of their own (it would count twice); a z-loss stays, mean
    over layers."""
    model = _model(router=RouterConfig(kind="topk", top_k=2, balance_coef=COEF, z_loss_coef=0.1))
    assert all(layer.router.balance_coef == 0.0 and layer.pooled_balance_coef == COEF for layer in _layers(model))
    batch = _batch("right")
    with GateRecorder(_gates(model)) as rec:
        model(**batch)
    routing = collect_router_outputs(model)
    assert all(set(r.aux_losses) == {"z"} for r in routing.values())
    z = sum(r.aux_losses["z"] for r in routing.values()) / len(routing)
    balance = COEF * load_balancing_loss_func(tuple(rec.logits), E, 2, batch["attention_mask"])
    torch.testing.assert_close(mole_aux_loss(routing), balance.double() + z, **LOSS_TOL)


def test_layer_mode_is_the_default_and_unchanged():
    assert MoLEConfig().balance == "layer"
    model = _model(balance="layer")
    assert all(layer.router.balance_coef == COEF and layer.pooled_balance_coef is None for layer in _layers(model))
    model(**_batch("left"))
    routing = collect_router_outputs(model)
    assert all(set(r.aux_losses) == {"balance"} and r.pooled_balance is None for r in routing.values())
    assert pooled_balance_loss(routing) == 0.0
    per_layer = sum(r.aux_losses["balance"] for r in routing.values()) / len(routing)
    torch.testing.assert_close(mole_aux_loss(routing), per_layer, rtol=0, atol=0)


def test_all_padding_gives_zero_not_nan():
    model = _model()
    model(**_batch("left"))
    routing = collect_router_outputs(model)
    for r in routing.values():
        r.pooled_balance.mask = torch.zeros_like(r.pooled_balance.mask)
    loss = mole_aux_loss(routing)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for _, p in _trained(model) if p.grad is not None)


def test_float32_model_under_bfloat16_autocast():
    model = _model().float()
    batch = _batch("left")
    with GateRecorder(_gates(model)) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
        ours = mole_aux_loss(collect_router_outputs(model))
    assert rec.logits[0].dtype == torch.bfloat16 and ours.dtype == torch.float32
    reference = COEF * load_balancing_loss_func(tuple(t.float() for t in rec.logits), E, 2, batch["attention_mask"])
    torch.testing.assert_close(ours, reference, rtol=1e-2, atol=1e-6)  # probs rounded to bfloat16 by the routers


# --- refusals, the fused path, gradient ------------------------------------------------------------------------
def test_layers_with_different_expert_counts_are_refused_by_name():
    with pytest.raises(ValueError, match=r"one expert count for every MoLE layer, got 3 experts: "
                                         r"model\.layers\.0\..*; 4 experts: model\.layers\.1\.") as info:
        _model(num_experts=[3, 4])
    assert "balance='layer'" in str(info.value)
    _model(num_experts=[3, 4], balance="layer")  # per-layer losses: fine
    _model(num_experts=[3, 3])  # one count in a list: fine
    # the loss itself refuses a routing dict that mixes counts (layers changed after injection)
    model = _model()
    model(**_batch("none"))
    routing = collect_router_outputs(model)
    name = next(iter(routing))
    routing[name].probs = routing[name].probs[:, :3]
    with pytest.raises(ValueError, match=rf"pooled_balance_loss: .*3 experts: {name}"):
        mole_aux_loss(routing)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="balance"):
        MoLEConfig(balance="global")
    with pytest.raises(ValueError, match="needs the eager routers"):
        MoLEConfig(balance="pooled", fused="always")
    MoLEConfig(balance="pooled", fused="never")


def test_pooled_trains_with_the_eager_routers_and_infers_fused(monkeypatch, caplog):
    """The fused path returns the routing probabilities without gradient: under "pooled" a layer in training never
    asks for a fused plan (fused="auto" logged, "always" refused), while inference (eval, or no_grad) may use it."""
    with caplog.at_level(logging.INFO, logger="parrot.moe.mole"):
        model = _model(fused="auto")
    assert "train with the eager routers" in caplog.text
    asked = []

    def refuse(*args, **kwargs):
        asked.append(torch.is_grad_enabled())
        if torch.is_grad_enabled() and model.training:
            raise AssertionError("fused_plan called while the pooled balance trains")
        return None  # no fused plan on this CPU: the eager routers run

    monkeypatch.setattr(mole_module, "fused_plan", refuse)
    out = model(**_batch("left"), labels=_batch("left")["input_ids"])
    aux = mole_aux_loss(collect_router_outputs(model))
    assert aux.requires_grad and not asked
    check_aux_loss_trains(aux, out.loss)  # the check the trainer runs: passes
    aux.backward()
    assert all(layer.router.gate.weight.grad.abs().sum() > 0 for layer in _layers(model))
    with torch.no_grad():
        model(**_batch("left"))
    model.eval()
    model(**_batch("left"))
    assert asked and len(asked) == 2 * len(_layers(model))  # every layer, both inference calls
    with pytest.raises(ValueError, match="eager routers"):
        MoLELinear(torch.nn.Linear(4, 4), 2, 1, 1.0, 0.0, RouterConfig(), fused="always", pooled_balance_coef=0.1)


def test_the_pooled_term_is_logged_with_the_router_diagnostics():
    """The routers carry no balance loss of their own under "pooled": the tracker records the one pooled term as
    "router/aux_balance_pooled" (its value, the mean over layers of the same number)."""
    from parrot.moe import RouterStatsTracker

    model = _model()
    model(**_batch("right"))
    routing = collect_router_outputs(model)
    tracker = RouterStatsTracker()
    tracker.update(1, routing)
    scalars = tracker.scalars(1)
    assert scalars["router/aux_balance_pooled"] == pytest.approx(float(pooled_balance_loss(routing)), rel=1e-12)
    assert "router/aux_balance" not in scalars


# --- save / load ------------------------------------------------------------------------------------------------
def _config(**changes) -> MoLEConfig:
    settings = dict(target_modules=("q_proj", "v_proj"), num_experts=E, rank=2, alpha=4.0, dropout=0.0,
                    router=RouterConfig(kind="topk", top_k=2, balance_coef=COEF), balance="pooled")
    settings.update(changes)
    return MoLEConfig(**settings)


def _plain(kind: str = "qwen2"):
    torch.manual_seed(1)
    return (Qwen2ForCausalLM(Qwen2Config(**COMMON)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**COMMON))
            ).double().train()


def test_save_load_roundtrip(tmp_path):
    config = _config()
    model = _plain()
    inject_mole(model, config)
    save_mole(model, config, tmp_path / "a")
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text())["balance"] == "pooled"
    fresh = _plain()
    assert load_mole(fresh, tmp_path / "a") == config
    assert all(layer.pooled_balance_coef == COEF and layer.router.balance_coef == 0.0 for layer in _layers(fresh))
    assert mole_config_differences(fresh, config) == []

    same = _plain()
    inject_mole(same, config)
    load_mole(same, tmp_path / "a")  # an injected model with the same settings loads

    per_layer = _plain()
    inject_mole(per_layer, _config(balance="layer"))
    assert mole_config_differences(per_layer, config) == ["balance: saved 'pooled', model 'layer'"]
    with pytest.raises(ValueError, match=r"balance: saved 'pooled', model 'layer'"):
        load_mole(per_layer, tmp_path / "a")

    other_coef = _plain()
    inject_mole(other_coef, _config(router=RouterConfig(kind="topk", top_k=2, balance_coef=0.1)))
    assert mole_config_differences(other_coef, config) == ["router.balance_coef: saved 0.01, model 0.1"]


def test_adapter_saved_before_the_field_loads_as_layer(tmp_path):
    config = _config(balance="layer")
    model = _plain()
    inject_mole(model, config)
    save_mole(model, config, tmp_path / "old")
    path = tmp_path / "old" / ADAPTER_CONFIG_NAME
    raw = json.loads(path.read_text())
    del raw["balance"]  # as save_mole wrote it before the field existed
    path.write_text(json.dumps(raw))
    fresh = _plain()
    loaded = load_mole(fresh, tmp_path / "old")
    assert loaded.balance == "layer" and loaded == config
    assert all(layer.pooled_balance_coef is None and layer.router.balance_coef == COEF for layer in _layers(fresh))
    pooled = _plain()
    inject_mole(pooled, _config())
    with pytest.raises(ValueError, match=r"balance: saved 'layer', model 'pooled'"):
        load_mole(pooled, tmp_path / "old")


# --- the trainer ------------------------------------------------------------------------------------------------
def test_train_config_flag():
    from parrot.train import TrainConfig
    from parrot.train.config import STAGE2_FIELDS, parse_args
    from parrot.train.stages import mole_config_from

    assert "mole_balance" in STAGE2_FIELDS
    cfg = parse_args(["--stage", "2", "--tuning", "mole", "--mole-balance", "pooled"])
    assert cfg.mole_balance == "pooled" and mole_config_from(cfg).balance == "pooled"
    assert mole_config_from(TrainConfig(stage=2, tuning="mole")).balance == "layer"
    with pytest.raises(SystemExit):
        parse_args(["--stage", "2", "--tuning", "mole", "--mole-balance", "global"])
    with pytest.raises(ValueError, match="mole_balance"):
        TrainConfig(stage=2, tuning="mole", mole_balance="global")
    with pytest.raises(ValueError, match="stage-2 settings"):
        TrainConfig(stage=1, mole_balance="pooled")
    assert parse_args(["--stage", "2", "--tuning", "perft-r", "--perft-balance-coef", "None"]).perft_balance_coef is None
    assert parse_args(["--stage", "2", "--tuning", "mole", "--router", "gwmoe", "--mole-experts", "8",
                       "--gw-threshold", "1.6"]).gw_threshold == 1.6
    assert parse_args(["--stage", "2", "--gw-threshold", "null"]).gw_threshold is None
    with pytest.raises(SystemExit):
        parse_args(["--stage", "2", "--gw-threshold", "high"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from parrot.train import train
    from tests.test_train_pipeline import config, make_workspace

    ws = make_workspace(tmp_path_factory.mktemp("pooled_ws"), n_records=16)
    stage1 = tmp_path_factory.mktemp("pooled_stage1") / "run"
    train(config(ws, stage1))
    return ws, stage1


def test_training_run_with_pooled_balance(workspace, tmp_path, monkeypatch):
    """A tiny stage-2 MoLE run with --mole-balance pooled: the trainer's aux loss is the pooled term (no per-layer
    balance), it trains, the loss falls, and the setting travels with the saved adapter."""
    from parrot.train import load_trained, train
    from parrot.train import trainer as trainer_module
    from tests.test_train_pipeline import config

    ws, stage1 = workspace
    seen = []
    original = trainer_module.mole_aux_loss

    def recording(routing):
        seen.append((pooled_balance_loss(routing), routing))
        return original(routing)

    monkeypatch.setattr(trainer_module, "mole_aux_loss", recording)
    out = tmp_path / "pooled"
    result = train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="mole", router="topk",
                          lora_targets="q_proj,v_proj", mole_experts=3, max_steps=10, per_device_batch_size=8,
                          global_batch_size=8, learning_rate=5e-3, mole_balance="pooled"))
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0], losses
    assert seen
    for pooled, routing in seen:
        assert isinstance(pooled, torch.Tensor) and pooled.requires_grad and pooled > 0
        assert all("balance" not in r.aux_losses and r.pooled_balance.coef == 0.001 for r in routing.values())
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["balance"] == "pooled"
    model, _ = load_trained(out)
    layers = _layers(model)
    assert len(layers) == 4 and all(m.pooled_balance_coef == 0.001 and m.router.balance_coef == 0.0 for m in layers)
