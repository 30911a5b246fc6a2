"""Which loss CEFT and PERFT train on when the base MoE LLM can add its own load-balancing loss to `.loss`.

transformers adds `router_aux_loss_coef` x the Switch load-balancing loss of the LLM's routers to `.loss` when
`output_router_logits` is on (the config's value or the call's keyword). The official trainers differ:

- CEFT / Router Lens (bigai-nlco/RouterLens, `utils_train.CustomTrainer.compute_loss`) compute the LM cross-entropy
  from the logits themselves: no load-balancing term, whatever the checkpoint's config says. The base routers are
  frozen, but the term still reaches the tuned experts: their output moves the hidden states that the LATER
  layers' routers score (checked below), so it must be switched off, not merely ignored.
- PERFT (the first author's code, liuyilun2000/PERFUME `math/finetune.py`) builds the config with
  `output_router_logits=True` for every variant: the frozen base routers' load-balancing loss is in the loss (its
  gradient reaches the PEFT experts of earlier layers the same way), whatever the checkpoint's config says; PERFT-R
  adds `shared_routing_adapter_router_aux_loss_coef` (0.01) x the same loss over its own routers' logits, all layers
  pooled (`math/olmoe_modification/modeling_olmoe.py`, `OlmoeAdapterForCausalLM.forward`).

The expected losses here are computed independently: `F.cross_entropy` on the shifted logits and a token-by-token
float64 load-balancing loss over the routers' recorded logits (all layers pooled, padding excluded, as
transformers' `load_balancing_loss_func`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, TrainerCallback)

from parrot.data.datasets import DataCollator
from parrot.model.builder import TINY_RECIPE, build_tiny, load_recipe, save_pretrained
from parrot.moe.methods import (ContextTaskConfig, find_moe_blocks, make_context_copy_batches, perft_adapters,
                                prepare_for_tuning, rank_experts, write_router_lens_outputs)
from parrot.moe.methods.router_lens import RouterLensResult
from parrot.moe.methods.router_lens import main as router_lens_main
from parrot.moe.methods.tuning import train_steps
from parrot.train import TrainConfig, load_trained, train
from parrot.train.run import build_train_dataset
from parrot.train.stages import apply_stage, describe_trainable
from tests.test_train_moe_methods import TINY_MOE_TEXT
from tests.test_train_pipeline import make_workspace

from .conftest import GateRecorder

COEF = 0.5  # a large router_aux_loss_coef: the load-balancing term is then ~1 nat, far above every tolerance
PERFT_R_COEF = 0.01  # the official shared_routing_adapter_router_aux_loss_coef (configuration_olmoe.py default)
COMMON = dict(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=None, pad_token_id=0,
              experts_implementation="eager", router_aux_loss_coef=COEF)  # grouped_mm has no float64 kernel
BUILDERS = {
    "olmoe": lambda **kw: OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, **kw)),
    "mixtral": lambda **kw: MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                             **kw)),
    "qwen2_moe": lambda **kw: Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=8,
                                                                 shared_expert_intermediate_size=12, **kw)),
}
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)  # float64 models: transformers computes its losses in float32
GRAD_TOL = dict(rtol=1e-5, atol=1e-8)
TASK = ContextTaskConfig(vocab_size=40, num_keys=8, num_pairs=3, value_length=3, batch_size=4, num_batches=2)


def _build(kind: str, output_router_logits: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind](output_router_logits=output_router_logits).double().train()


def _batch() -> dict[str, torch.Tensor]:
    batch = make_context_copy_batches(TASK)[0]
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][0, -2:] = 0  # some padding, which the load-balancing loss must skip
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised positions, in float64."""
    return F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _naive_balance(gate_logits: list[torch.Tensor], mask: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """N * sum_e f_e P_e over all layers' real tokens (f_e: share of the top-k picks, P_e: mean probability),
    token by token in float64."""
    num_experts = gate_logits[0].shape[-1]
    picks = torch.zeros(num_experts, dtype=torch.float64)
    prob_sum = torch.zeros(num_experts, dtype=torch.float64)
    rows = 0.0
    for logits in gate_logits:
        keep = mask.reshape(-1).tolist() if mask is not None else [1] * logits.shape[0]
        for t, row in enumerate(logits.double()):
            if not keep[t]:
                continue
            probs = torch.softmax(row, dim=-1)
            for e in torch.topk(probs, top_k).indices.tolist():
                picks[e] += 1.0
            prob_sum = prob_sum + probs
            rows += 1.0
    return num_experts * torch.sum(picks / rows * (prob_sum / rows))


class BaseGateRecorder:
    """Records the router logits (the first output of every MoE block's `gate`) of the forwards inside `with`."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = [block for _, block in find_moe_blocks(model)]
        self.logits: list[torch.Tensor] = []

    def __enter__(self):
        self.handles = [b.gate.register_forward_hook(lambda m, a, out: self.logits.append(out[0])) for b in self.blocks]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _grads(model: torch.nn.Module, names: list[str], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    model.zero_grad()
    loss.backward()
    grads = {n: params[n].grad.detach().clone() for n in names}
    model.zero_grad()
    return grads


# --- the methods' model-call keywords ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_ceft_loss_is_the_cross_entropy_alone_when_the_config_adds_the_balance_loss(kind):
    model = _build(kind, output_router_logits=True)
    batch = _batch()
    selection = {"model.layers.0.mlp": [1], "model.layers.1.mlp": [0, 3]}
    setup = prepare_for_tuning(model, "ceft", selection=selection)
    assert setup.forward_kwargs == {"output_router_logits": False}

    out = model(**batch, **setup.forward_kwargs)
    ce = _cross_entropy(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss.double(), ce, **LOSS_TOL)  # transformers' loss runs in float32
    got = _grads(model, setup.trainable, out.loss)
    want = _grads(model, setup.trainable, _cross_entropy(model(**batch, output_router_logits=False).logits,
                                                         batch["labels"]))
    for name in setup.trainable:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL)

    # what the keyword removes: the config's coef x balance loss, whose gradient reaches the experts tuned in
    # layer 0 through the hidden states that layer 1's (frozen) router scores
    with BaseGateRecorder(model) as rec:
        plain = model(**batch)
    balance = _naive_balance(rec.logits, batch["attention_mask"], 2)
    torch.testing.assert_close(plain.loss.double(), _cross_entropy(plain.logits, batch["labels"]) + COEF * balance,
                               **LOSS_TOL)
    extra = _grads(model, setup.trainable, plain.loss)
    share = {n: float((extra[n] - want[n]).abs().max() / want[n].abs().max()) for n in setup.trainable}
    assert all(share[n] > 1e-2 for n in share if n.startswith("model.layers.0.")), share  # a few % to ~10 %
    assert all(share[n] < 1e-6 for n in share if n.startswith("model.layers.1.")), share  # no later router: none


def test_ceft_passes_no_keyword_where_the_config_adds_no_balance_loss():
    model = _build("olmoe", output_router_logits=False)
    setup = prepare_for_tuning(model, "ceft", selection={"model.layers.0.mlp": [1]})
    assert setup.forward_kwargs == {}
    batch = _batch()
    out = model(**batch, **setup.forward_kwargs)
    torch.testing.assert_close(out.loss.double(), _cross_entropy(out.logits, batch["labels"]), **LOSS_TOL)


@pytest.mark.parametrize("variant", ["perft-r", "perft-e", "perft-d", "perft-s"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_perft_loss_adds_the_base_balance_loss_as_the_official_code(kind, variant):
    """The config says output_router_logits=False (as OLMoE / Mixtral / Qwen-MoE checkpoints do): PERFT's call
    still adds coef x the base routers' balance loss, as the official finetune.py; PERFT-R's own router losses stay
    in `setup.aux_loss()`."""
    model = _build(kind, output_router_logits=False)
    batch = _batch()
    setup = prepare_for_tuning(model, variant, num_experts=3, rank=4, router={"kind": "topk", "top_k": 2})
    assert setup.forward_kwargs == {"output_router_logits": True}
    with torch.no_grad():
        for _, adapter in perft_adapters(model):
            adapter.experts.lora_B.normal_(0.0, 0.5)
    with BaseGateRecorder(model) as rec:
        out = model(**batch, **setup.forward_kwargs)
    assert len(rec.logits) == 2  # the base routers only (PERFT-E reads the gate's output, it does not call it again)
    mask = batch["attention_mask"]
    expected = _cross_entropy(out.logits, batch["labels"]) + COEF * _naive_balance(rec.logits, mask, 2)
    torch.testing.assert_close(out.loss.double(), expected, **LOSS_TOL)
    got = _grads(model, setup.trainable, out.loss + setup.aux_loss())
    with BaseGateRecorder(model) as rec:
        again = model(**batch, output_router_logits=False)
    reference = (_cross_entropy(again.logits, batch["labels"]) + COEF * _naive_balance(rec.logits, mask, 2)
                 + setup.aux_loss())
    want = _grads(model, setup.trainable, reference)
    for name in setup.trainable:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL)


def test_factorllm_passes_no_keyword():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert prepare_for_tuning(dense, "factorllm", num_experts=2, top_k=1).forward_kwargs == {}


def test_train_steps_passes_the_keywords():
    model = _build("olmoe", output_router_logits=True)
    setup = prepare_for_tuning(model, "ceft", selection={"model.layers.0.mlp": [1]})
    batch = _batch()
    with torch.no_grad():
        ce = _cross_entropy(model(**batch).logits, batch["labels"]).item()
    losses = train_steps(model, [batch], 1, 1e-3, forward_kwargs=setup.forward_kwargs)
    assert losses == pytest.approx([ce], rel=1e-6)


def test_router_lens_command_tunes_ceft_on_the_cross_entropy_alone(tmp_path):
    """`--ceft-top-n` on a checkpoint whose config adds the balance loss: the logged CEFT losses are the LM
    cross-entropy (the first one, before any update, checked against the untouched checkpoint)."""
    torch.manual_seed(0)
    base = OlmoeForCausalLM(OlmoeConfig(**{**COMMON, "vocab_size": 64}, num_experts=4, num_experts_per_tok=2,
                                        output_router_logits=True))
    base.save_pretrained(tmp_path / "ckpt")
    router_lens_main(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "ckpt"), "--steps", "1",
                      "--batches", "1", "--batch-size", "2", "--ceft-top-n", "1", "--ceft-steps", "1"])
    losses = json.loads((tmp_path / "out" / "ceft.json").read_text())["losses"]
    batch = make_context_copy_batches(ContextTaskConfig(vocab_size=64, batch_size=2, num_batches=1, seed=0))[0]
    reloaded = OlmoeForCausalLM.from_pretrained(tmp_path / "ckpt").train()
    with torch.no_grad():
        out = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ce = _cross_entropy(out.logits, batch["labels"]).item()
    assert out.loss.item() > ce + 0.1  # the checkpoint's own .loss carries the balance term
    assert losses == pytest.approx([ce], rel=1e-5)


# --- through parrot.train (stage 2, a Parrot model whose LLM is a tiny Qwen2-MoE) -----------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with two saved tiny Parrot models whose LLM is a Qwen2-MoE (coef 0.5): `lb_on` sets
    output_router_logits in its config, `lb_off` does not."""
    root = tmp_path_factory.mktemp("base_balance_ws")
    ws = make_workspace(root, n_records=8)
    for name, flag in (("lb_on", True), ("lb_off", False)):
        text = {**TINY_MOE_TEXT, "output_router_logits": flag, "router_aux_loss_coef": COEF}
        model, processor = build_tiny(dataclasses.replace(load_recipe(TINY_RECIPE), text_config=text), seed=0)
        save_pretrained(model, processor, root / name)
        ws[name] = root / name
    return ws


class StepReference(TrainerCallback):
    """At the first optimizer step (before the update): keeps the trainer's gradients, then recomputes the step's
    expected loss and gradients from the same parameters with `expected(model, batch) -> loss`, and puts the
    trainer's gradients back."""

    def __init__(self, batch: dict[str, torch.Tensor], expected):
        self.batch, self.expected = batch, expected

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step != 0:
            return
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.got = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        model.zero_grad()
        loss = self.expected(model, self.batch)
        loss.backward()
        self.want = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        self.loss = loss.item()
        for n, p in params.items():
            p.grad = self.got.get(n)


def _train_one_step(ws, model_dir: Path, out: Path, expected, **overrides):
    cfg = TrainConfig(stage=2, model=str(model_dir), data="qa", data_registry=str(ws["registry"]), output_dir=str(out),
                      per_device_batch_size=4, global_batch_size=4, max_samples=4, max_steps=1, learning_rate=1e-3,
                      warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1, max_grad_norm=0.0,
                      progress_bar=False, seed=0, **overrides)
    _, processor = load_trained(model_dir)
    dataset, _ = build_train_dataset(cfg, processor, out.parent / f"{out.name}_data_check")
    batch = DataCollator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    reference = StepReference(batch, expected)
    result = train(cfg, callbacks=[reference])
    assert result.global_step == 1 and len(result.losses) == 1
    return result.losses[0][1], reference


def _merged_cross_entropy(model, batch):
    """The step's LM cross-entropy from the logits, with the labels spliced as the model splices them."""
    out = model(**batch)
    with torch.no_grad():
        labels = model.prepare_multimodal_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                                 batch["labels"]).labels
    return _cross_entropy(out.logits, labels), out


def _check_step(logged: float, ref: StepReference) -> None:
    assert logged == pytest.approx(ref.loss, rel=1e-5, abs=1e-6)
    assert ref.got.keys() == ref.want.keys() and any(n.startswith("language_model.") for n in ref.got)
    for name in ref.got:
        torch.testing.assert_close(ref.got[name], ref.want[name], rtol=1e-4, atol=1e-7, msg=name)


def _ranking(ws, tmp_path: Path) -> Path:
    model, _ = load_trained(ws["lb_on"])
    blocks = [n for n, _ in find_moe_blocks(model.language_model)]
    base_freq = torch.zeros(len(blocks), 4)
    tuned_freq = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.5, 0.2, 0.0, 0.3]])
    ranking = rank_experts(blocks, base_freq, tuned_freq)
    result = RouterLensResult(blocks, base_freq, tuned_freq, ranking, [])
    return write_router_lens_outputs(result, tmp_path / "lens")["csv"]


def test_ceft_step_through_the_trainer_uses_the_cross_entropy_alone(ws, tmp_path):
    """The LLM config sets output_router_logits (its `.loss` would carry coef x the balance loss): the trained
    loss and every trained gradient (projector, Parrot MoE, tuned experts) are those of the cross-entropy."""
    assert load_trained(ws["lb_on"])[0].language_model.config.output_router_logits is True

    def expected(model, batch):
        return _merged_cross_entropy(model, batch)[0]

    logged, ref = _train_one_step(ws, ws["lb_on"], tmp_path / "ceft", expected, tuning="ceft",
                                  ceft_ranking=str(_ranking(ws, tmp_path)), ceft_top_n=1)
    assert any(".experts.tuned_" in n for n in ref.got)
    _check_step(logged, ref)


@pytest.mark.parametrize("variant", ["perft-r", "perft-e"])
def test_perft_step_through_the_trainer_adds_the_base_balance_loss(ws, tmp_path, variant):
    """The LLM config does not set output_router_logits: the trained loss is still cross-entropy + coef x the base
    routers' balance loss (+ for PERFT-R, 0.01 x the same loss over the PERFT-R routers of all layers pooled), as the
    official PERFT code."""

    def expected(model, batch):
        perft_gates = [a.router.gate for _, a in perft_adapters(model.language_model) if a.router is not None]
        with BaseGateRecorder(model.language_model) as rec, GateRecorder(perft_gates) as perft:
            ce, out = _merged_cross_entropy(model, batch)
        balance = _naive_balance(rec.logits, out.attention_mask, TINY_MOE_TEXT["num_experts_per_tok"])
        assert len(perft.logits) == (2 if variant == "perft-r" else 0)
        if variant == "perft-r":  # the PERFT-R routers' own loss (3 experts, top-2), padding excluded
            balance_r = _naive_balance(perft.logits, out.attention_mask, 2)
            assert balance_r.requires_grad
            return ce + COEF * balance + PERFT_R_COEF * balance_r
        return ce + COEF * balance

    logged, ref = _train_one_step(ws, ws["lb_off"], tmp_path / variant, expected, tuning=variant, perft_experts=3,
                                  perft_rank=4, perft_top_k=2)
    assert any(".perft." in n for n in ref.got)
    _check_step(logged, ref)


def test_stage_table_says_whether_the_balance_loss_is_in(ws, tmp_path):
    lines = {}
    for tuning, extra in (("ceft", dict(ceft_ranking=str(_ranking(ws, tmp_path)), ceft_top_n=1)),
                          ("perft-r", {})):
        model, _ = load_trained(ws["lb_on"])
        cfg = TrainConfig(stage=2, model=str(ws["lb_on"]), tuning=tuning, output_dir=str(tmp_path / tuning), **extra)
        lines[tuning] = describe_trainable(model, apply_stage(model, cfg)).splitlines()[0]
    assert "load-balancing loss not in the loss (as the official ceft trainer)" in lines["ceft"]
    assert "load-balancing loss in the loss (as the official perft-r trainer)" in lines["perft-r"]
