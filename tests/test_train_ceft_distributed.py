"""CEFT (`--tuning ceft`, Router Lens ranking) under DeepSpeed ZeRO-2 / ZeRO-3 on CPU: 2 processes (torchrun + gloo).

Only the selected experts' rows of the stacked expert tensors may move; every other LLM tensor and expert row must
come out bit-identical. Under ZeRO-3, `CEFTExperts.merged_parameters` reads the frozen stacked tensors of its `base`
outside that module's own forward; DeepSpeed gathers such parameters on access while the engine's forward runs.
"""

from __future__ import annotations

import pytest
import torch

from parrot.moe.methods import find_moe_blocks, rank_experts, write_router_lens_outputs
from parrot.moe.methods.router_lens import RouterLensResult
from parrot.train import load_trained, train

from .test_train_distributed import REPO, assert_same_weights, cli_args, torchrun
from .test_train_moe_methods import TINY_MOE_TEXT, make_moe_workspace
from .test_train_pipeline import config, weights

pytestmark = pytest.mark.slow
SELECTED = {"model.layers.0.mlp": 2, "model.layers.1.mlp": 0}  # the top-1 expert of each layer in the ranking


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceft_dist_ws")
    ws, model = make_moe_workspace(root, n_records=16)
    blocks = [n for n, _ in find_moe_blocks(model.language_model)]
    assert blocks == list(SELECTED)
    base = torch.zeros(len(blocks), TINY_MOE_TEXT["num_experts"])
    tuned = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.5, 0.2, 0.0, 0.3]])
    paths = write_router_lens_outputs(RouterLensResult(blocks, base, tuned, rank_experts(blocks, base, tuned), []),
                                      root / "lens")
    ws["ranking"] = paths["csv"]
    return ws


def settings(ws) -> dict:
    return dict(stage=2, model=str(ws["moe_init"]), data="qa", tuning="ceft", ceft_ranking=str(ws["ranking"]),
                ceft_top_n=1, max_steps=2, per_device_batch_size=4, global_batch_size=8, learning_rate=1e-2)


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("ceft_single") / "run"
    train(config(ws, out, **settings(ws)))  # 1 process x 4 x accumulation 2
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ceft_under_deepspeed_tunes_only_the_selected_experts(ws, reference, tmp_path, zero):
    out = tmp_path / zero
    torchrun(cli_args(ws, out, deepspeed=str(REPO / f"configs/deepspeed/{zero}.json"), **settings(ws)))
    # a plain Parrot model (tuned slices folded back), full-size, equal to the single-process run up to round-off
    assert not list(out.glob("*adapter*"))
    assert_same_weights(weights(reference), weights(out), atol=2e-4)  # Adam on near-zero gradients: see zero3 test
    # compared as loaded (transformers stores stacked experts per expert on disk)
    before = load_trained(ws["moe_init"])[0].state_dict()
    trained, _ = load_trained(out)
    after = trained.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if not key.startswith("language_model."):
            continue
        block = next((b for b in SELECTED if key.startswith(f"language_model.{b}.experts.")), None)
        if block is None:  # attention, norms, routers, shared experts, embeddings: untouched
            assert torch.equal(before[key], after[key]), key
            continue
        for expert in range(TINY_MOE_TEXT["num_experts"]):
            assert torch.equal(before[key][expert], after[key][expert]) == (expert != SELECTED[block]), (key, expert)
    # the reloaded model computes what the single-process model computes (tuned rows loaded back in place)
    single = load_trained(reference)[0]
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids).logits, single(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
