"""Router Lens (routing frequency on context tokens, router-only tuning, ranking) and CEFT on a tiny OLMoE."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from parrot.moe.methods import (CEFTExperts, ContextTaskConfig, load_ranking_csv, make_context_copy_batches, merge_ceft,
                                prepare_ceft, prepare_for_tuning, rank_experts, router_tune, routing_frequency,
                                select_context_experts, write_router_lens_outputs)
from parrot.moe.methods.router_lens import ANS, RouterLensResult, _tiny_olmoe, run_router_lens
from parrot.moe.methods.router_lens import main as router_lens_main
from parrot.moe.methods.tuning import train_steps

TASK = ContextTaskConfig(vocab_size=40, num_keys=8, num_pairs=3, value_length=3, batch_size=4, num_batches=3)


def _olmoe(seed: int = 0, dtype=torch.float64) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    config = OlmoeConfig(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0, experts_implementation="eager")
    return OlmoeForCausalLM(config).to(dtype)


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def test_context_copy_task_answers_are_copied_from_the_passage():
    for batch in make_context_copy_batches(TASK):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["context_mask"]
        m = TASK.value_length
        for row in range(ids.shape[0]):
            seq = ids[row].tolist()
            key, answer = seq[-m - 2], seq[-m:]
            passage = seq[1 : 1 + TASK.num_pairs * (m + 1)]
            spans = {passage[i]: passage[i + 1 : i + 1 + m] for i in range(0, len(passage), m + 1)}
            assert spans[key] == answer
            assert labels[row].tolist() == [-100] * (len(seq) - m) + answer
            # context-dependent positions: those whose next token is an answer token
            assert mask[row].nonzero().squeeze(-1).tolist() == list(range(len(seq) - m - 1, len(seq) - 1))
            assert seq[-m - 1] == ANS


def _naive_frequency(model, batches) -> tuple[torch.Tensor, int]:
    """Reference: per token that is context AND real (attention 1), the top-2 of softmax(W_gate x) in float64,
    counted in a Python loop over layers x tokens -> (counts (layers, E), number of counted tokens)."""
    inputs = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, _i=i: inputs.__setitem__(_i, a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    counts = torch.zeros(2, 4, dtype=torch.float64)
    total = 0
    for batch in batches:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        B, S = batch["input_ids"].shape
        for b in range(B):
            for s in range(S):
                if not (batch["context_mask"][b, s] and batch["attention_mask"][b, s]):
                    continue
                total += 1
                for i, layer in enumerate(model.model.layers):
                    x = inputs[i].reshape(B, S, 16)[b, s].double()
                    counts[i, torch.topk(torch.softmax(layer.mlp.gate.weight.double() @ x, -1), 2).indices] += 1
    for hook in hooks:
        hook.remove()
    return counts, total


def test_routing_frequency_matches_naive_float64_count():
    model = _olmoe()
    batches = make_context_copy_batches(TASK)
    counts, total = _naive_frequency(model, batches)
    assert total == sum(int(b["context_mask"].sum()) for b in batches)  # no padding marked as context here
    blocks, freq = routing_frequency(model, batches)
    assert blocks == ["model.layers.0.mlp", "model.layers.1.mlp"]
    torch.testing.assert_close(freq, counts / total)
    torch.testing.assert_close(freq.sum(1), torch.full((2,), 2.0, dtype=torch.float64))  # k experts per token


def _padded_batches(extra: int = 3) -> list[dict[str, torch.Tensor]]:
    """The task's batches with `extra` more positions: real filler tokens in even rows, padding (attention 0) in
    odd rows; the caller's context mask marks all of them, padding included (the mistake routing_frequency must
    survive). The second batch's context mask is a 0/1 integer tensor."""
    g = torch.Generator().manual_seed(7)
    out = []
    for n, batch in enumerate(make_context_copy_batches(TASK)):
        B = batch["input_ids"].shape[0]
        padded = (torch.arange(B) % 2 == 1)[:, None].expand(B, extra)
        filler = torch.randint(4, TASK.vocab_size, (B, extra), generator=g)
        ids = torch.cat([batch["input_ids"], torch.where(padded, torch.zeros_like(filler), filler)], 1)
        attention = torch.cat([batch["attention_mask"], (~padded).long()], 1)
        context = torch.cat([batch["context_mask"], torch.ones(B, extra, dtype=torch.bool)], 1)
        out.append({"input_ids": ids, "attention_mask": attention, "context_mask": context.long() if n == 1 else context})
    return out


def test_routing_frequency_never_counts_padding_marked_as_context():
    """Reference: a per-token loop over the positions that are context AND real (attention 1), float64."""
    model = _olmoe()
    batches = _padded_batches()
    counts, total = _naive_frequency(model, batches)
    assert total < sum(int(b["context_mask"].bool().sum()) for b in batches)  # padding was marked as context
    _, freq = routing_frequency(model, batches)
    torch.testing.assert_close(freq, counts / total)
    # without a context mask: every real token, never the padding
    _, everything = routing_frequency(model, [{k: v for k, v in b.items() if k != "context_mask"} for b in batches])
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    torch.testing.assert_close(everything.sum(1) * real, torch.full((2,), 2.0 * real, dtype=torch.float64))


def test_routing_frequency_refuses_masks_of_another_shape_before_any_forward():
    model = _olmoe()
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(1))
    good = _padded_batches()
    short_context = [good[0], {**good[1], "context_mask": good[1]["context_mask"][:, :-1]}]
    with pytest.raises(ValueError, match=r"batch 1: 'context_mask' has shape \(4, 21\), input_ids \(4, 22\)"):
        routing_frequency(model, short_context)
    flat_attention = [{**good[0], "attention_mask": good[0]["attention_mask"].reshape(-1)}]
    with pytest.raises(ValueError, match=r"batch 0: 'attention_mask' has shape \(88,\)"):
        routing_frequency(model, flat_attention)
    with pytest.raises(ValueError, match=r"batch 0: 'answer_mask'"):
        routing_frequency(model, [{**good[0], "answer_mask": good[0]["context_mask"][:1]}], mask_key="answer_mask")
    assert not calls


def test_ranking_recovers_planted_context_sensitive_expert(tmp_path):
    model = _olmoe()
    batches = make_context_copy_batches(TASK)
    blocks, base = routing_frequency(model, batches)
    planted_layer = 1
    planted = int(base[planted_layer].argmin())  # rarely routed before: its rise is what the lens must find
    # Plant: the tuned router of layer 1 sends context-dependent tokens to `planted` (what router tuning does
    # for a context-faithful expert); it is steered by the mean gate input of exactly those tokens.
    gate_inputs = []
    hook = model.model.layers[planted_layer].mlp.gate.register_forward_hook(lambda m, a, o: gate_inputs.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    context_x = torch.cat([x.reshape(-1, 16)[b["context_mask"].reshape(-1)] for x, b in zip(gate_inputs, batches)])
    direction = context_x.mean(0)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.model.layers[planted_layer].mlp.gate.weight[planted] += 200.0 * direction / direction.square().sum()
    _, after = routing_frequency(tuned, batches)
    ranking = rank_experts(blocks, base, after)
    top = ranking[0]
    assert (top.layer, top.expert) == (planted_layer, planted)
    assert top.rise == pytest.approx(float(after[1, planted] - base[1, planted])) and top.rise > 0.5
    assert [r.rise for r in ranking] == sorted((r.rise for r in ranking), reverse=True)
    assert select_context_experts(ranking, 1)["model.layers.1.mlp"] == [planted]
    # the written table reads back in the same order; the heat map and load map exist
    result = RouterLensResult(blocks, base, after, ranking, [1.0, 0.5])
    paths = write_router_lens_outputs(result, tmp_path)
    assert [(r.layer, r.expert) for r in load_ranking_csv(paths["csv"])] == [(r.layer, r.expert) for r in ranking]
    assert paths["markdown"].read_text().count("\n") == len(ranking) + 2
    assert paths["heatmap"].stat().st_size > 0 and paths["tuned_load"].stat().st_size > 0


def test_outputs_are_replaced_whole_when_a_rewrite_fails(tmp_path, monkeypatch):
    """A failure while rewriting the outputs (disk full, a crash in the plotting) keeps the previous files whole: a
    truncated ranking CSV would read back as a shorter ranking and CEFT would tune other experts without a word."""
    import csv as csv_module

    from parrot.moe.methods import router_lens as lens

    model = _olmoe()
    batches = make_context_copy_batches(TASK)
    blocks, base = routing_frequency(model, batches)
    tuned = base.clone()
    tuned[1, 0] += 0.25
    result = RouterLensResult(blocks, base, tuned, rank_experts(blocks, base, tuned), [1.0])
    paths = write_router_lens_outputs(result, tmp_path)
    before = {kind: path.read_bytes() for kind, path in paths.items()}
    real_writer = csv_module.writer

    class DiesMidTable:  # writes the header and a few rows, then the disk is full
        def __init__(self, fh):
            self.writer = real_writer(fh)

        def writerow(self, row):
            self.writer.writerow(row)

        def writerows(self, rows):
            self.writer.writerows(list(rows)[:3])
            raise OSError("No space left on device")

    monkeypatch.setattr(lens.csv, "writer", DiesMidTable)
    with pytest.raises(OSError, match="No space left"):
        write_router_lens_outputs(result, tmp_path)
    monkeypatch.setattr(lens.csv, "writer", real_writer)
    assert paths["csv"].read_bytes() == before["csv"]
    assert len(load_ranking_csv(paths["csv"])) == len(result.ranking)

    def dies_mid_plot(stats, path, title=""):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(lens, "plot_expert_load", dies_mid_plot)
    with pytest.raises(OSError, match="No space left"):
        write_router_lens_outputs(result, tmp_path)
    assert {kind: path.read_bytes() for kind, path in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no staged leftovers


@pytest.mark.parametrize("seed", [0, 5])
def test_router_tuning_end_to_end_recovers_planted_context_faithful_expert(seed):
    """A layer-1 expert is planted to help the context task: router tuning must route more to it.

    Every other expert outputs zero; the planted expert writes +u into the residual stream (its SwiGLU
    intermediate silu(z) * z >= 0, gate = up) and the LM head scores the answer vocabulary along u, so the
    answer tokens gain probability with the planted expert's routing weight. Only the task loss drives it.
    """
    task = ContextTaskConfig(vocab_size=48, num_keys=40, num_pairs=3, value_length=4, batch_size=8, num_batches=4)
    batches = make_context_copy_batches(task)  # answer vocabulary: ids 44..47
    torch.manual_seed(seed)
    config = OlmoeConfig(vocab_size=48, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0, experts_implementation="eager")
    model = OlmoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj.zero_()
    planted = int(routing_frequency(model, batches)[1][1].argmin())  # the least-routed expert of layer 1
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        experts = model.model.layers[1].mlp.experts
        g = 0.3 * torch.randn(16, 32)
        experts.gate_up_proj[planted] = torch.cat([g, g], 0)
        experts.down_proj[planted] = 0.1 * u[:, None].expand(32, 16) / 16
        model.lm_head.weight[44:] += 3.0 * u
    result = run_router_lens(model, batches, steps=100, lr=5e-3)
    top = result.ranking[0]
    assert (top.layer, top.expert) == (1, planted)
    assert top.rise > 0.3
    assert sum(result.losses[-4:]) < sum(result.losses[:4]) - 1.0


def test_router_tuning_trains_only_the_routers():
    model = _olmoe(dtype=torch.float32).eval()
    batch = make_context_copy_batches(TASK)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = router_tune(model, [batch], steps=20, lr=3e-2)
    assert not any(m.training for m in model.modules())  # the caller's eval mode is back
    assert sum(losses[-3:]) / 3 < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_run_router_lens_restores_routers_and_ranks_every_expert():
    model = _olmoe(dtype=torch.float32)
    gates = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    result = run_router_lens(model, make_context_copy_batches(TASK), steps=3, lr=1e-2)
    assert len(result.ranking) == 8 and len(result.losses) == 3
    assert all(torch.equal(layer.mlp.gate.weight, g) for layer, g in zip(model.model.layers, gates))


def test_run_router_lens_restores_routers_when_tuning_fails_part_way():
    """CEFT starts from the original routers: a failure after some tuning steps (here a batch with an id outside
    the vocabulary at step 3; in practice an OOM or an interrupt) must not leave the routers tuned."""
    model = _olmoe(dtype=torch.float32)
    gates = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    batches = make_context_copy_batches(TASK)
    bad = {**batches[0], "input_ids": batches[0]["input_ids"].clone()}
    bad["input_ids"][0, 0] = 10_000
    with pytest.raises(IndexError):
        run_router_lens(model, batches[:2] + [bad], eval_batches=batches[:2], steps=5, lr=1e-2)
    assert all(torch.equal(layer.mlp.gate.weight, g) for layer, g in zip(model.model.layers, gates))


def test_ceft_tunes_only_the_selected_experts(tmp_path):
    model = _olmoe(dtype=torch.float32)
    original = copy.deepcopy(model)
    batch = make_context_copy_batches(TASK)[0]
    selection = {"model.layers.0.mlp": [1], "model.layers.1.mlp": [0, 3]}
    setup = prepare_for_tuning(model, "ceft", selection=selection)
    assert setup.trainable == ["model.layers.0.mlp.experts.tuned_gate_up_proj", "model.layers.0.mlp.experts.tuned_down_proj",
                               "model.layers.1.mlp.experts.tuned_gate_up_proj", "model.layers.1.mlp.experts.tuned_down_proj"]
    with torch.no_grad():  # unchanged function before training
        torch.testing.assert_close(model(**_inputs(batch)).logits, original(**_inputs(batch)).logits)
    out = model(**_inputs(batch))
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(setup.trainable)
    model.zero_grad()
    losses = train_steps(model, [_inputs(batch)], 20, 1e-2)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05
    assert set(setup.state_dict()) == {f"{b}.experts.{k}" for b in selection for k in ("expert_ids", "tuned_gate_up_proj", "tuned_down_proj")}
    merged = merge_ceft(model)
    assert merged == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not any(isinstance(m, CEFTExperts) for m in model.modules())
    new, old = dict(model.named_parameters()), dict(original.named_parameters())
    assert set(new) == set(old)  # original parameter names after merging
    changed = {n for n in new if not torch.equal(new[n], old[n])}
    assert changed == {f"{b}.experts.{p}" for b in selection for p in ("gate_up_proj", "down_proj")}
    for block, ids in selection.items():
        for p in ("gate_up_proj", "down_proj"):
            frozen = [e for e in range(4) if e not in ids]
            assert torch.equal(new[f"{block}.experts.{p}"][frozen], old[f"{block}.experts.{p}"][frozen])
            assert not torch.equal(new[f"{block}.experts.{p}"][ids], old[f"{block}.experts.{p}"][ids])


def test_ceft_expert_ids_live_on_the_experts_device():
    """prepare_ceft on a model already on an accelerator: the expert ids index the experts' weights, so they must
    be on the weights' device ("meta" stands in for a GPU here: any device other than the CPU)."""
    experts = _olmoe().model.layers[0].mlp.experts.to("meta")
    ceft = CEFTExperts(experts, [1, 3])
    assert ceft.expert_ids.device.type == "meta"
    merged = ceft.merged_parameters()  # index_copy with ids and weights on one device
    assert all(t.device.type == "meta" for t in merged.values())


def test_command_writes_table_heatmap_and_ceft(tmp_path):
    router_lens_main(["--out", str(tmp_path), "--steps", "2", "--batches", "2", "--batch-size", "2",
                      "--ceft-top-n", "1", "--ceft-steps", "2"])
    for name in ("router_lens_ranking.csv", "router_lens_ranking.md", "router_lens_rise.png", "router_lens_tuned_load.png", "ceft.json"):
        assert (tmp_path / name).stat().st_size > 0
    setup = prepare_for_tuning(_tiny_olmoe(64, 0), "ceft", ranking_path=tmp_path / "router_lens_ranking.csv", top_n=2)
    assert len(setup.trainable) == 4 * 2  # 4 layers x (gate_up, down) slices of their top-2 experts


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_pairs"):
        ContextTaskConfig(num_pairs=20, num_keys=4)
    with pytest.raises(ValueError, match="ranking_path"):
        prepare_for_tuning(_olmoe(), "ceft")
    with pytest.raises(ValueError, match="not MoE blocks"):
        prepare_ceft(_olmoe(), {"model.layers.9.mlp": [0]})
    bad = tmp_path / "bad.csv"
    bad.write_text("rank,block\n1,x\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_ranking_csv(bad)


def test_ceft_refuses_a_ranking_of_another_model_before_changing_anything(tmp_path):
    """A ranking CSV written for another model (the command's default: 4 layers x 8 experts) given to CEFT on a
    2-layer x 4-expert model: the error names each block and expert id that does not fit and the model's expert
    count, and the model is left as it was (not half-wrapped and all frozen)."""
    big = _tiny_olmoe(64, 0)
    blocks, base = routing_frequency(big, make_context_copy_batches(TASK))
    tuned = base.clone()
    tuned[:, 6] += 0.5  # expert 6 (absent from the small model) rises in every layer
    csv_path = write_router_lens_outputs(RouterLensResult(blocks, base, tuned, rank_experts(blocks, base, tuned), [1.0]),
                                         tmp_path)["csv"]
    small = _olmoe()
    ranking = [r for r in load_ranking_csv(csv_path) if r.layer < 2]  # layers that exist in the small model
    with pytest.raises(ValueError, match=r"model.layers.0.mlp has 4 experts \(ids 0..3\), the selection asks for \[6\]") as err:
        prepare_for_tuning(small, "ceft", ranking=ranking, top_n=2)
    assert "model.layers.1.mlp has 4 experts" in str(err.value)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.*not MoE blocks.*its 2 MoE blocks"):
        prepare_for_tuning(small, "ceft", ranking_path=csv_path, top_n=2)
    # only the second block's ids do not fit: the first block must not be wrapped, nothing frozen
    with pytest.raises(ValueError, match=r"model.layers.1.mlp has 4 experts.*\[7\]"):
        prepare_ceft(small, {"model.layers.0.mlp": [1], "model.layers.1.mlp": [0, 7]})
    assert not any(isinstance(m, CEFTExperts) for m in small.modules())
    assert all(p.requires_grad for p in small.parameters())


def test_router_tuning_leaves_the_routers_gradients_as_it_found_them():
    """No gradient of the router tuning may leak into a later optimizer step of the same model (CEFT, full
    fine-tuning): a fresh model's routers end without .grad, and a caller's accumulated gradients survive as they were."""
    model = _olmoe(dtype=torch.float32)
    batch = make_context_copy_batches(TASK)[0]
    router_tune(model, [batch], steps=2, lr=1e-2)
    assert all(p.grad is None for p in model.parameters())
    model(**_inputs(batch)).loss.backward()  # the caller's own accumulated gradients
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"} <= set(before)
    router_tune(model, [batch], steps=2, lr=1e-2)
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(after) == set(before)
    for n, g in before.items():
        assert torch.equal(after[n], g), n
