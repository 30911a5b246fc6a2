"""Router Lens ranking CSV (write -> read round trip, order by rank, refusals naming file:line), router tuning on the
LM loss alone, and CEFT gradients / routing counts against independent float64 references (OLMoE, Qwen2-MoE)."""

import copy
import random
import re

import numpy as np
import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from parrot.moe.methods import (ContextTaskConfig, ExpertScore, load_ranking_csv, make_context_copy_batches,
                                prepare_ceft, prepare_for_tuning, rank_experts, router_tune, routing_frequency,
                                select_context_experts, write_router_lens_outputs)
from parrot.moe.methods.router_lens import RouterLensResult, find_moe_blocks

TASK = ContextTaskConfig(vocab_size=40, num_keys=8, num_pairs=3, value_length=3, batch_size=4, num_batches=2)
HEADER = "rank,block,layer,expert,base_frequency,tuned_frequency,rise"
BLOCKS = ["model.layers.0.mlp", "model.layers.2.mlp"]  # a Qwen2-MoE with a dense layer 1


def _frequencies(seed=0, dtype=torch.float64, experts=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, experts, generator=g, dtype=torch.float64).to(dtype),
            torch.rand(2, experts, generator=g, dtype=torch.float64).to(dtype))


def _write(tmp_path, base, tuned, score="rise"):
    ranking = rank_experts(BLOCKS, base, tuned, score)
    return ranking, write_router_lens_outputs(RouterLensResult(BLOCKS, base, tuned, ranking, [1.0]), tmp_path)["csv"]


@pytest.mark.parametrize("score", ["rise", "tuned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranking_csv_reads_back_what_the_writer_wrote(tmp_path, score, dtype):
    base, tuned = _frequencies(dtype=dtype)
    base[1, 2], tuned[1, 2] = base[0, 1], tuned[0, 1]  # an exact tie in both scores
    tuned[0, 3] = base[0, 3]  # a zero rise
    ranking, path = _write(tmp_path, base, tuned, score)
    back = load_ranking_csv(path)
    assert back == ranking  # block, layer, expert and both frequencies bit-equal
    assert [r.rise for r in back] == [r.rise for r in ranking]


def test_ranking_csv_is_read_in_rank_order_whatever_the_line_order(tmp_path):
    """A table sorted by layer in a spreadsheet (rank column kept): CEFT must still tune the top-ranked experts."""
    base, tuned = _frequencies()
    ranking, path = _write(tmp_path, base, tuned)
    header, *rows = path.read_text().splitlines()
    by_layer = sorted(rows, key=lambda row: (int(row.split(",")[2]), int(row.split(",")[3])))
    assert by_layer != rows
    shuffled = tmp_path / "by_layer.csv"
    shuffled.write_text("\n".join([header, *by_layer]) + "\n")
    assert load_ranking_csv(shuffled) == ranking
    rows.reverse()
    shuffled.write_text("\n".join([header, *rows]) + "\n")
    assert load_ranking_csv(shuffled) == ranking
    assert select_context_experts(load_ranking_csv(shuffled), 1) == select_context_experts(ranking, 1)


def test_ranking_csv_accepts_a_bom_blank_lines_and_columns_in_another_order(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"\xef\xbb\xbfexpert,rank,block,layer,rise,tuned_frequency,base_frequency\r\n"
                     b"1,1,model.layers.0.mlp,0,0.5,0.75,0.25\r\n\r\n0,2,model.layers.0.mlp,0,0.25,0.5,0.25\r\n")
    assert load_ranking_csv(path) == [ExpertScore("model.layers.0.mlp", 0, 1, 0.25, 0.75),
                                      ExpertScore("model.layers.0.mlp", 0, 0, 0.25, 0.5)]


ROW_A = "1,model.layers.0.mlp,0,1,0.25,0.75,0.5"
ROW_B = "2,model.layers.0.mlp,0,0,0.25,0.5,0.25"
BAD_FILES = {
    "nan base": ([HEADER, "1,model.layers.0.mlp,0,1,nan,0.75,0.5", ROW_B], 2, r"base_frequency 'nan' is not a finite"),
    "inf tuned": ([HEADER, ROW_A, "2,model.layers.0.mlp,0,0,0.25,inf,inf"], 3, r"tuned_frequency 'inf' is not a finite"),
    "nan rise": ([HEADER, ROW_A, "2,model.layers.0.mlp,0,0,0.25,0.5,NaN"], 3, r"rise 'NaN' is not a finite"),
    "not a number": ([HEADER, "1,model.layers.0.mlp,0,1,0.25,high,0.5"], 2, r"tuned_frequency 'high' is not a finite"),
    "duplicate expert": ([HEADER, ROW_A, "2,model.layers.0.mlp,0,1,0.25,0.75,0.5"], 3,
                         r"model.layers.0.mlp expert 1 repeats line 2"),
    "duplicate rank": ([HEADER, ROW_A, "1,model.layers.0.mlp,0,0,0.25,0.5,0.25"], 3, r"rank 1 repeats line 2"),
    "rank 0": ([HEADER, "0,model.layers.0.mlp,0,1,0.25,0.75,0.5"], 2, r"rank 0"),
    "rank gap": ([HEADER, ROW_A, "3,model.layers.0.mlp,0,0,0.25,0.5,0.25"], 3, r"rank 3 is outside 1..2"),
    "float expert": ([HEADER, "1,model.layers.0.mlp,0,1.0,0.25,0.75,0.5"], 2, r"expert '1.0' is not a non-negative integer"),
    "negative expert": ([HEADER, "1,model.layers.0.mlp,0,-1,0.25,0.75,0.5"], 2, r"expert '-1' is not"),
    "blank in layer": ([HEADER, "1,model.layers.0.mlp, 0,1,0.25,0.75,0.5"], 2, r"layer ' 0' is not"),
    "non-ascii digit": ([HEADER, "1,model.layers.0.mlp,0,\u0661,0.25,0.75,0.5"], 2, "expert '\u0661' is not"),
    "float rank": ([HEADER, "1.5,model.layers.0.mlp,0,1,0.25,0.75,0.5"], 2, r"rank '1.5' is not"),
    "layer of another block": ([HEADER, "1,model.layers.0.mlp,3,1,0.25,0.75,0.5"], 2,
                               r"layer 3 is not the layer of block 'model.layers.0.mlp' \(0\)"),
    "block without a layer": ([HEADER, "1,mlp,0,1,0.25,0.75,0.5"], 2, r"block: module name 'mlp'"),
    "rise contradicts": ([HEADER, "1,model.layers.0.mlp,0,1,0.25,0.75,0.9"], 2, r"rise 0.9 is not tuned_frequency"),
    "rank contradicts both scores": ([HEADER, "1,model.layers.0.mlp,0,0,0.25,0.5,0.25", "2,model.layers.0.mlp,0,1,0.25,0.75,0.5"],
                                     3, r"rank 2 .* is ranked below rank 1 \(line 2.*neither the rise order nor"),
    "short row": ([HEADER, "1,model.layers.0.mlp,0,1,0.25"], 2, r"the row has 5 fields, the header 7"),
    "long row": ([HEADER, ROW_A + ",x"], 2, r"the row has 8 fields, the header 7"),
    "unknown column": ([HEADER + ",note", ROW_A + ",x"], 1, r"has unknown columns \['note'\]"),
    "missing column": (["rank,block,layer,expert,base_frequency,tuned_frequency", "1,model.layers.0.mlp,0,1,0.25,0.75"], 1,
                       r"lacks columns \['rise'\]"),
    "repeated column": ([HEADER + ",rise", ROW_A + ",0.5"], 1, r"repeats columns \['rise'\]"),
    "header only": ([HEADER], 1, r"has a header but no rows"),
    "empty": ([], 1, r"empty ranking CSV"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_ranking_csv_refuses_bad_files_naming_file_and_line(tmp_path, case):
    lines, line, message = BAD_FILES[case]
    path = tmp_path / "ranking.csv"
    path.write_text("".join(f"{text}\n" for text in lines), encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:{line}: (ranking CSV |the ranking CSV )?{message}"):
        load_ranking_csv(path)


def test_ranking_csv_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(f"{HEADER}\n{ROW_A}\n2,model.layers.0.mlp\xe9,0,0,0.25,0.5,0.25\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3: not UTF-8 text \\(byte 0xe9"):
        load_ranking_csv(path)


def test_ranking_writer_refuses_what_the_reader_would_refuse(tmp_path):
    base, tuned = _frequencies()
    nan = tuned.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rank_experts: tuned frequency is not finite at \(block row, expert\) \[\[1, 1\]\]"):
        rank_experts(BLOCKS, base, nan)
    ranking = rank_experts(BLOCKS, base, tuned)
    for bad, message in (([], "the ranking is empty"),
                         (ranking + ranking[:1], r"ranking row 9 .*: repeats ranking row 1"),
                         (ranking[::-1], r"ranking row 2 .* neither the rise nor the tuned order"),
                         ([ExpertScore(BLOCKS[0], 1, 0, 0.1, 0.2)], r"layer 1 is not its block's \(0\)"),
                         ([ExpertScore(BLOCKS[0], 0, 0, 0.1, float("inf"))], r"base 0.1 / tuned inf / rise inf must be finite")):
        with pytest.raises(ValueError, match=f"^write_router_lens_outputs: (ranking row 1 \\(.*\\): )?{message}"):
            write_router_lens_outputs(RouterLensResult(BLOCKS, base, tuned, bad, []), tmp_path)
        assert not list(tmp_path.iterdir())  # refused before anything is written
    # numpy scalars (a hand-built ranking) are written as plain numbers and read back equal
    numpy_rows = [ExpertScore(r.block, np.int64(r.layer), np.int64(r.expert), np.float64(r.base_frequency),
                              np.float64(r.tuned_frequency)) for r in ranking]
    path = write_router_lens_outputs(RouterLensResult(BLOCKS, base, tuned, numpy_rows, []), tmp_path)["csv"]
    assert load_ranking_csv(path) == ranking


def test_ceft_from_a_shuffled_ranking_csv_tunes_the_top_ranked_experts(tmp_path):
    model = _qwen()
    blocks = [n for n, _ in find_moe_blocks(model)]
    assert blocks == BLOCKS
    base = torch.zeros(2, 6, dtype=torch.float64)
    tuned = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.5, 0.5], [0.5, 0.2, 0.0, 0.3, 0.4, 0.6]], dtype=torch.float64)
    ranking, path = _write(tmp_path, base, tuned)
    header, *rows = path.read_text().splitlines()
    random.Random(0).shuffle(rows)
    path.write_text("\n".join([header, *rows]) + "\n")
    prepare_for_tuning(model, "ceft", ranking_path=path, top_n=2)
    assert {n: m.experts.expert_ids.tolist() for n, m in find_moe_blocks(model)} == {BLOCKS[0]: [2, 4], BLOCKS[1]: [0, 5]}


# --- router tuning: the LM loss alone ----------------------------------------------------------------------------


def test_router_tuning_trains_on_the_lm_loss_without_the_load_balancing_loss():
    """A checkpoint whose config sets output_router_logits makes transformers add the load-balancing loss to `.loss`;
    router tuning must not optimise it (the official trainer computes the cross-entropy itself). Reference: Adam on
    the routers with the model's own loss computed with output_router_logits=False."""
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0, experts_implementation="eager",
                         output_router_logits=True, router_aux_loss_coef=1.0)
    model = OlmoeForCausalLM(config).double()
    batch = make_context_copy_batches(TASK)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        with_aux, lm = model(**inputs).loss.item(), model(**inputs, output_router_logits=False).loss.item()
    assert with_aux > lm + 0.5  # the aux loss is there to leak
    reference = copy.deepcopy(model).train()
    reference.requires_grad_(False)
    gates = [layer.mlp.gate.weight for layer in reference.model.layers]
    for w in gates:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(gates, lr=5e-2)
    ref_losses = []
    for _ in range(4):
        loss = reference(**inputs, output_router_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ref_losses.append(loss.item())
    losses = router_tune(model, [batch], steps=4, lr=5e-2)
    assert losses[0] == pytest.approx(lm, abs=1e-12)
    assert losses == pytest.approx(ref_losses, abs=1e-12)
    for ours, ref in zip(model.model.layers, reference.model.layers):
        torch.testing.assert_close(ours.mlp.gate.weight, ref.mlp.gate.weight, rtol=0, atol=1e-12)
    assert model.config.output_router_logits  # the config is left as it was


# --- independent float64 references on Qwen2-MoE (shared expert, a dense layer) -----------------------------------


def _qwen(seed=0):
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(vocab_size=40, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            shared_expert_intermediate_size=16, num_experts=6, num_experts_per_tok=2, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mlp_only_layers=[1],
                            experts_implementation="eager", bos_token_id=1, pad_token_id=0, eos_token_id=None)
    return Qwen2MoeForCausalLM(config).double()


def test_qwen2_moe_routing_frequency_matches_a_per_token_float64_count_with_left_padding():
    """Reference: the block inputs (hooked on the block, not the gate), per real context token a float64
    softmax(W x) and its top-k by a Python sort (no near ties: margin > 1e-6), counted per layer. Left padding
    marked as context must not count."""
    model = _qwen()
    blocks = find_moe_blocks(model)
    batches = []
    for batch in make_context_copy_batches(TASK):
        B = batch["input_ids"].shape[0]
        pad = (torch.arange(B) % 2 == 1)[:, None].expand(B, 2)
        batches.append({"input_ids": torch.cat([torch.where(pad, 0, 5), batch["input_ids"]], 1),
                        "attention_mask": torch.cat([(~pad).long(), batch["attention_mask"]], 1),
                        "context_mask": torch.cat([torch.ones(B, 2, dtype=torch.bool), batch["context_mask"]], 1)})
    inputs = {}
    hooks = [block.register_forward_hook(lambda m, a, o, _n=name: inputs.__setitem__(_n, a[0].detach()))
             for name, block in blocks]
    counts = torch.zeros(len(blocks), 6, dtype=torch.float64)
    total = 0
    for batch in batches:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for b, s in (batch["context_mask"] & batch["attention_mask"].bool()).nonzero().tolist():
            total += 1
            for i, (name, block) in enumerate(blocks):
                probs = torch.softmax(block.gate.weight.double() @ inputs[name][b, s].double(), -1).tolist()
                order = sorted(range(6), key=lambda e: -probs[e])
                assert probs[order[1]] - probs[order[2]] > 1e-6
                counts[i, order[:2]] += 1
    for hook in hooks:
        hook.remove()
    names, freq = routing_frequency(model, batches)
    assert names == BLOCKS
    torch.testing.assert_close(freq, counts / total, rtol=0, atol=1e-15)


@pytest.mark.parametrize("build", ["olmoe", "qwen2_moe"])
def test_ceft_gradients_equal_the_full_models_gradients_at_the_selected_experts(build):
    """CEFT's trainable slices get exactly the gradient the full model's stacked expert weights get at those rows
    (float64), and the CEFT model computes the same loss."""
    if build == "olmoe":
        torch.manual_seed(0)
        full = OlmoeForCausalLM(OlmoeConfig(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                            num_experts_per_tok=2, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                                            experts_implementation="eager")).double()
    else:
        full = _qwen()
    model = copy.deepcopy(full)
    batch = make_context_copy_batches(TASK)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    full_loss = full(**inputs).loss
    full_loss.backward()
    names = [n for n, _ in find_moe_blocks(model)]
    selection = {names[0]: [1, 3], names[-1]: [0]}
    trainable = prepare_ceft(model, selection)
    loss = model(**inputs).loss
    loss.backward()
    assert loss.item() == pytest.approx(full_loss.item(), abs=1e-12)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(trainable)
    for name, ids in selection.items():
        for p in ("gate_up_proj", "down_proj"):
            torch.testing.assert_close(getattr(model.get_submodule(name).experts, f"tuned_{p}").grad,
                                       getattr(full.get_submodule(name).experts, p).grad[ids], rtol=0, atol=1e-12)


def test_ceft_selection_settings_are_checked(caplog):
    """A fractional top_n (1.5 selected 2), several selection sources at once (the first silently won) are refused;
    a top_n that selects every expert of a layer is allowed (an ablation) but logged."""
    ranking = [ExpertScore(BLOCKS[0], 0, e, 0.25, 0.25 + 0.1 * (3 - e)) for e in range(4)] + \
              [ExpertScore(BLOCKS[1], 2, e, 0.25, 0.25 + 0.1 * e) for e in (3, 2, 1, 0)]
    for bad in (1.5, 0, True, "2"):
        with pytest.raises(ValueError, match="top_n"):
            select_context_experts(ranking, bad)
    assert select_context_experts(ranking, 2) == {BLOCKS[0]: [0, 1], BLOCKS[1]: [2, 3]}  # rank order, not ids
    with caplog.at_level("WARNING", logger="parrot.moe.methods.router_lens"):
        assert select_context_experts(ranking, 2) and not caplog.records
        assert select_context_experts(ranking, 4) == {BLOCKS[0]: [0, 1, 2, 3], BLOCKS[1]: [0, 1, 2, 3]}
        assert "selects every ranked expert of 2 of 2 layers" in caplog.text
    with pytest.raises(ValueError, match=r"give one of selection=, ranking=, ranking_path=; got \['selection', 'ranking_path'\]"):
        prepare_for_tuning(torch.nn.Linear(2, 2), "ceft", selection={BLOCKS[0]: [0]}, ranking_path="ranking.csv")
