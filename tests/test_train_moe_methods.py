"""Stage 2 with the MoE tuning methods of `parrot.moe.methods` (`--tuning perft-r | factorllm | ceft`):
only the method's parameters (+ projector and Parrot MoE) train, the loss falls, and the saved output reloads
with the trained model's logits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from parrot.data.datasets import DataCollator
from parrot.model.builder import TINY_RECIPE, build_tiny, load_recipe, save_pretrained
from parrot.moe.methods import find_moe_blocks, rank_experts, write_router_lens_outputs
from parrot.moe.methods.router_lens import RouterLensResult
from parrot.train import TrainConfig, load_trained, train
from parrot.train.config import build_parser, parse_args
from parrot.train.run import build_train_dataset
from tests.test_train_pipeline import make_workspace

TINY_MOE_TEXT = dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True)
STEPS = 20


class Snapshot(TrainerCallback):
    """Parameters at the start of training (after the stage surgery) and the trained model at the end."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def make_moe_workspace(root: Path, n_records: int):
    """`make_workspace` plus a saved tiny model whose LLM is a Qwen2-MoE (ws["moe_init"]); also returns the model."""
    ws = make_workspace(root, n_records=n_records)
    model, processor = build_tiny(dataclasses.replace(load_recipe(TINY_RECIPE), text_config=TINY_MOE_TEXT), seed=0)
    save_pretrained(model, processor, root / "moe_init")
    ws["moe_init"] = root / "moe_init"
    return ws, model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_moe_workspace(tmp_path_factory.mktemp("moe_methods_ws"), n_records=8)[0]


def run_stage2(ws, model_dir: Path, out: Path, **overrides):
    """20 steps on one repeated batch of 4 (constant lr), returning (cfg, result, snapshot)."""
    settings = dict(stage=2, model=str(model_dir), data="qa", data_registry=str(ws["registry"]), output_dir=str(out),
                    per_device_batch_size=4, global_batch_size=4, max_samples=4, max_steps=STEPS,
                    learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1,
                    progress_bar=False, seed=0)
    settings.update(overrides)
    cfg = TrainConfig(**settings)
    snap = Snapshot()
    result = train(cfg, callbacks=[snap])
    return cfg, result, snap


def changed(snap: Snapshot) -> set[str]:
    after = dict(snap.model.named_parameters())
    return {n for n, before in snap.before.items() if not torch.equal(before, after[n].detach())}


def check_common(snap: Snapshot, result, intended_lm: set[str]) -> None:
    """Stage-2 preset + the method: projector and Parrot MoE train, vision frozen, in the LLM only `intended_lm`."""
    moved = changed(snap)
    names = set(snap.before)
    projector = {n for n in names if n.startswith("mm_projector.")}
    moe = {n for n in names if n.startswith("moe.")}
    assert projector <= moved and projector <= snap.trainable
    assert moe <= snap.trainable and moe & moved
    assert not {n for n in moved if n.startswith("vision_tower.")}
    lm_moved = {n for n in moved if n.startswith("language_model.")}
    lm_trainable = {n for n in snap.trainable if n.startswith("language_model.")}
    assert lm_trainable == intended_lm
    assert lm_moved <= intended_lm and lm_moved
    losses = [loss for _, loss in result.losses]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # nats, on one repeated batch


def check_reload(cfg: TrainConfig, snap: Snapshot) -> None:
    trained = snap.model.eval()
    reloaded, processor = load_trained(cfg.output_dir)
    dataset, _ = build_train_dataset(cfg, processor, Path(cfg.output_dir))
    batch = DataCollator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = trained(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- PERFT-R on an MoE backbone -----------------------------------------------------------------------------
def test_perft_r_on_moe_backbone_trains_only_adapters_and_reloads(ws, tmp_path):
    cfg, result, snap = run_stage2(ws, ws["moe_init"], tmp_path / "perft", tuning="perft-r", perft_experts=3,
                                   perft_rank=4, perft_top_k=2, perft_balance_coef=0.05)
    intended = {n for n in snap.before if n.startswith("language_model.") and ".perft." in n}
    blocks = [n for n, _ in find_moe_blocks(snap.model.language_model)]
    assert blocks == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert intended == {f"language_model.{b}.perft.{p}" for b in blocks
                        for p in ("experts.lora_A", "experts.lora_B", "router.gate.weight")}
    check_common(snap, result, intended)
    assert all(f"language_model.{b}.perft.experts.lora_B" in changed(snap) for b in blocks)  # zero init moved
    # base weights unchanged on disk; the adapter file holds exactly the PERFT tensors
    base, out = load_file(str(ws["moe_init"] / "model.safetensors")), load_file(str(tmp_path / "perft" / "model.safetensors"))
    assert all(torch.equal(base[k], out[k]) for k in base if k.startswith("language_model."))
    adapter = load_file(str(tmp_path / "perft" / "perft_adapter.safetensors"))
    assert {f"language_model.{k}" for k in adapter} == intended
    saved_config = json.loads((tmp_path / "perft" / "perft_config.json").read_text())
    assert saved_config["variant"] == "perft-r" and saved_config["balance_coef"] == 0.05  # --perft-balance-coef
    assert all(m.balance_coef == 0.05 for m in snap.model.modules() if hasattr(m, "last_mask"))
    check_reload(cfg, snap)


@pytest.mark.parametrize("variant", ["perft-e", "perft-d", "perft-s"])
def test_other_perft_variants_train_end_to_end_and_reload(ws, tmp_path, variant):
    """PERFT-E (the block's own frozen router), -D (dense, no router), -S (one shared adapter) through the trainer."""
    cfg, result, snap = run_stage2(ws, ws["moe_init"], tmp_path / variant, tuning=variant, perft_experts=3,
                                   perft_rank=4, perft_top_k=2)
    blocks = [n for n, _ in find_moe_blocks(snap.model.language_model)]
    intended = {n for n in snap.before if n.startswith("language_model.") and ".perft." in n}
    # no router of their own (only PERFT-R has one): just the adapter experts train
    assert intended == {f"language_model.{b}.perft.{p}" for b in blocks for p in ("experts.lora_A", "experts.lora_B")}
    expected_experts = {"perft-e": TINY_MOE_TEXT["num_experts"], "perft-d": 3, "perft-s": 1}[variant]
    assert all(snap.before[f"language_model.{b}.perft.experts.lora_A"].shape[0] == expected_experts for b in blocks)
    check_common(snap, result, intended)
    adapter = load_file(str(tmp_path / variant / "perft_adapter.safetensors"))
    assert {f"language_model.{k}" for k in adapter} == intended
    assert json.loads((tmp_path / variant / "perft_config.json").read_text())["variant"] == variant
    check_reload(cfg, snap)


# --- FactorLLM on the dense tiny Qwen2 -------------------------------------------------------------------------
def test_factorllm_on_dense_backbone_trains_experts_and_routers_and_reloads(ws, tmp_path):
    cfg, result, snap = run_stage2(ws, ws["init"], tmp_path / "factor", tuning="factorllm", factorllm_experts=4,
                                   factorllm_top_k=2)
    intended = {n for n in snap.before if n.startswith("language_model.") and ".mlp." in n}
    assert intended == {f"language_model.model.layers.{i}.mlp.{p}" for i in range(2)
                        for p in ("experts.gate_proj", "experts.up_proj", "experts.down_proj", "router.gate.weight")}
    check_common(snap, result, intended)
    # on disk: the dense MLPs (folded experts) moved, attention / embeddings did not
    base, out = load_file(str(ws["init"] / "model.safetensors")), load_file(str(tmp_path / "factor" / "model.safetensors"))
    assert base.keys() == out.keys()
    for key in base:
        if key.startswith("language_model."):
            assert torch.equal(base[key], out[key]) != (".mlp." in key), key
    check_reload(cfg, snap)


# --- CEFT on an MoE backbone, ranking from Router Lens helpers --------------------------------------------------
def test_ceft_tunes_only_the_ranked_experts_and_saves_a_plain_model(ws, tmp_path):
    model, _ = load_trained(ws["moe_init"])
    blocks = [n for n, _ in find_moe_blocks(model.language_model)]
    base_freq = torch.zeros(len(blocks), 4)
    tuned_freq = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.5, 0.2, 0.0, 0.3]])  # top-1 per layer: experts 2 and 0
    ranking = rank_experts(blocks, base_freq, tuned_freq)
    paths = write_router_lens_outputs(RouterLensResult(blocks, base_freq, tuned_freq, ranking, []), tmp_path / "lens")
    selected = {blocks[0]: 2, blocks[1]: 0}

    cfg, result, snap = run_stage2(ws, ws["moe_init"], tmp_path / "ceft", tuning="ceft",
                                   ceft_ranking=str(paths["csv"]), ceft_top_n=1)
    intended = {n for n in snap.before if n.startswith("language_model.") and ".experts.tuned_" in n}
    assert intended == {f"language_model.{b}.experts.tuned_{p}" for b in blocks for p in ("gate_up_proj", "down_proj")}
    check_common(snap, result, intended)
    # the output is a plain model: only the selected expert rows of the stacked tensors moved
    # (compared as loaded: transformers stores stacked experts per expert on disk)
    base = model.state_dict()
    out = load_trained(tmp_path / "ceft")[0].state_dict()
    assert base.keys() == out.keys()
    for key in base:
        if not key.startswith("language_model."):
            continue
        block = next((b for b in blocks if key.startswith(f"language_model.{b}.experts.")), None)
        if block is None:
            assert torch.equal(base[key], out[key]), key
        else:
            rows_moved = [not torch.equal(base[key][e], out[key][e]) for e in range(4)]
            assert rows_moved == [e == selected[block] for e in range(4)], key
    check_reload(cfg, snap)


# --- configuration ----------------------------------------------------------------------------------------------
def test_cli_accepts_the_methods_and_documents_their_flags():
    text = build_parser().format_help()
    for flag in ("--perft-experts", "--perft-rank", "--perft-top-k", "--factorllm-experts", "--factorllm-top-k",
                 "--ceft-ranking", "--ceft-top-n", "--ceft-per-layer"):
        assert flag in text, flag
    for method in ("perft-r", "perft-e", "perft-d", "perft-s", "factorllm"):
        assert parse_args(["--stage", "2", "--tuning", method]).tuning == method
    cfg = parse_args(["--stage", "2", "--tuning", "ceft", "--ceft-ranking", "r.csv", "--ceft-top-n", "3",
                      "--no-ceft-per-layer"])
    assert (cfg.ceft_ranking, cfg.ceft_top_n, cfg.ceft_per_layer) == ("r.csv", 3, False)
    with pytest.raises(ValueError, match="--ceft-ranking"):
        TrainConfig(stage=2, tuning="ceft")
    with pytest.raises(ValueError, match="perft_rank"):
        TrainConfig(stage=2, tuning="perft-r", perft_rank=0)


def test_a_negative_perft_balance_coef_is_refused_by_name(ws, tmp_path):
    with pytest.raises(ValueError, match=r"perft_balance_coef must be a finite number >= 0 \(or null\), got -0.01"):
        TrainConfig(stage=2, model=str(ws["moe_init"]), data="qa", data_registry=str(ws["registry"]),
                    output_dir=str(tmp_path / "out"), tuning="perft-r", perft_balance_coef=-0.01)
