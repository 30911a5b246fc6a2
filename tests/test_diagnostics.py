"""RouterStatsTracker numbers vs naive per-token counts; JSON output; expert-load heat map."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from parrot.moe.diagnostics import RouterStatsTracker, plot_expert_load
from parrot.moe.routers import DynMoLERouter, TopKRouter


def _outputs(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(30, 8, dtype=torch.float64) * torch.linspace(0.1, 3.0, 30, dtype=torch.float64)[:, None]
    mask = torch.ones(30, dtype=torch.bool)
    mask[-4:] = False
    dyn = DynMoLERouter(8, 6, entropy_threshold=0.5, keep_top_k=1, top_p=0.5).double()
    top = TopKRouter(8, 3, top_k=2, balance_coef=0.01, z_loss_coef=0.001).double()
    return {"layers.0.q_proj": dyn(x, mask), "layers.1.q_proj": top(x, mask)}, mask


def test_tracker_matches_naive_counts():
    routing, mask = _outputs()
    tracker = RouterStatsTracker(num_bins=5)
    tracker.update(0, routing)
    assert [r.layer for r in tracker.records] == list(routing)
    valid = [t for t in range(30) if mask[t]]
    for rec in tracker.records:
        out = routing[rec.layer]
        E = out.probs.shape[1]
        ent = [-sum(p * math.log(p) for p in out.probs[t].tolist() if p > 0) for t in valid]
        assert rec.num_tokens == len(valid)
        assert rec.entropy_mean == pytest.approx(sum(ent) / len(ent), rel=1e-9)
        hist = [0] * 5
        for h in ent:
            hist[min(int(h / math.log(E) * 5), 4)] += 1
        assert rec.entropy_hist == hist and sum(hist) == len(valid)
        sel = [{e for e in out.indices[t].tolist() if e >= 0} for t in valid]
        assert rec.load == pytest.approx([sum(e in s for s in sel) / len(valid) for e in range(E)])
        assert rec.mean_active == pytest.approx(sum(len(s) for s in sel) / len(valid))
        assert rec.aux == pytest.approx({k: v.item() for k, v in out.aux_losses.items()})
    dyn_rec = tracker.records[0]
    q, eps, E = 1.1, 1e-5, 6  # DynMoLE defaults; soft routing when normalised Tsallis > 0.5
    soft = []
    for t in valid:
        s_q = (1 - sum((p + eps) ** q for p in routing[dyn_rec.layer].probs[t].tolist())) / (q - 1)
        soft.append(s_q / ((1 - E ** (1 - q)) / (q - 1)) > 0.5)
    assert 0 < sum(soft) < len(valid)
    assert dyn_rec.broadcast_fraction == pytest.approx(sum(soft) / len(valid))
    assert tracker.records[1].broadcast_fraction == 0.0

    scalars = tracker.scalars()
    assert scalars["router/entropy_mean"] == pytest.approx(sum(r.entropy_mean for r in tracker.records) / 2)
    assert scalars["router/aux_z"] == pytest.approx(tracker.records[1].aux["z"])
    assert scalars["router/aux_balance"] == pytest.approx((tracker.records[0].aux["balance"] + tracker.records[1].aux["balance"]) / 2)


def test_tracker_every_mean_load_and_json(tmp_path):
    routing, _ = _outputs()
    tracker = RouterStatsTracker(num_bins=4, every=2)
    assert tracker.update(1, routing) == []
    tracker.update(2, routing)
    routing2, _ = _outputs(seed=1)
    tracker.update(4, routing2)
    assert sorted({r.step for r in tracker.records}) == [2, 4]
    mean = tracker.mean_load()
    for layer in routing:
        a = routing[layer].stats["load"].tolist()
        b = routing2[layer].stats["load"].tolist()
        assert mean[layer] == pytest.approx([(u + v) / 2 for u, v in zip(a, b)])
    path = tracker.write_json(tmp_path / "stats" / "router_stats.json")
    data = json.loads(path.read_text())
    assert len(data["records"]) == 4 and data["mean_load"].keys() == mean.keys()
    assert data["records"][0]["entropy_hist"] == tracker.records[0].entropy_hist


def test_plot_expert_load_writes_png(tmp_path):
    routing, _ = _outputs()
    tracker = RouterStatsTracker()
    tracker.update(0, routing)  # layers with 6 and 3 experts
    path = plot_expert_load(tracker, tmp_path / "plots" / "expert_load.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    path2 = plot_expert_load({"a": [0.5, 0.5], "b": [1.0]}, tmp_path / "x.png")
    assert path2.is_file()
    with pytest.raises(ValueError, match="no routing statistics"):
        plot_expert_load(RouterStatsTracker(), tmp_path / "empty.png")


def test_tracker_computes_lazy_stats_only_on_recorded_steps_and_rejects_missing_stats():
    routing, _ = _outputs()
    tracker = RouterStatsTracker(every=3)
    assert tracker.update(1, routing) == []
    assert not any(out.stats.computed for out in routing.values())  # a skipped step reads nothing
    tracker.update(3, routing)
    assert all(out.stats.computed for out in routing.values())
    bare = dataclasses.replace(routing["layers.1.q_proj"], stats={})
    with pytest.raises(ValueError, match=r"layers\.9\.v_proj.*without stats at step 6"):
        tracker.update(6, {"layers.9.v_proj": bare})


def test_max_load_ratio_is_max_over_mean_load():
    """A router that picks k experts per token has loads summing to k: max / mean, not max * E (1.0 = balanced)."""
    router = TopKRouter(8, 4, top_k=2).double()
    with torch.no_grad():
        router.gate.weight.zero_()
    # Four tokens, each pair of experts equally often: loads 0.5 each (sum 2), perfectly balanced.
    logits = torch.tensor([[2.0, 1.0, 0, 0], [0, 0, 2.0, 1.0], [1.0, 0, 0, 2.0], [0, 2.0, 1.0, 0]], dtype=torch.float64)
    routing = router.route(logits)
    tracker = RouterStatsTracker(num_bins=4)
    tracker.update(0, {"layer": routing})
    assert tracker.records[0].load == pytest.approx([0.5] * 4)
    assert tracker.scalars()["router/max_load_ratio"] == pytest.approx(1.0)
    skewed = router.route(torch.tensor([[2.0, 1.0, 0, 0]] * 3 + [[0, 0, 2.0, 1.0]], dtype=torch.float64))
    tracker.update(1, {"layer": skewed})
    load = tracker.records[-1].load  # [0.75, 0.75, 0.25, 0.25]
    assert tracker.scalars(1)["router/max_load_ratio"] == pytest.approx(max(load) / (sum(load) / len(load)))
    assert tracker.scalars(1)["router/max_load_ratio"] == pytest.approx(1.5)


def _naive_load(out, mask) -> list[float]:
    """Share of the valid tokens whose selection includes each expert, by a loop over tokens."""
    E = out.probs.shape[1]
    valid = [t for t in range(out.indices.shape[0]) if mask is None or bool(mask[t])]
    return [sum(e in out.indices[t].tolist() for t in valid) / len(valid) for e in range(E)]


def _empty_step_outputs():
    """Two layers over three steps: step 0 measured; step 1 every token is padding in layer A, layer B measured;
    step 2 a batch of padding only (layer A) and no tokens at all (layer B)."""
    torch.manual_seed(3)
    a = TopKRouter(8, 4, top_k=2).double()
    b = DynMoLERouter(8, 3, entropy_threshold=0.5, keep_top_k=1, top_p=0.5).double()
    x0, x1 = torch.randn(12, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    m0 = torch.arange(12) < 9  # 3 padding tokens
    m1 = torch.ones(10, dtype=torch.bool)
    pad = torch.zeros(10, dtype=torch.bool)
    none = torch.zeros(0, 8, dtype=torch.float64)
    steps = {0: {"A": (a(x0, m0), m0), "B": (b(x0, m0), m0)},
             1: {"A": (a(x1, pad), pad), "B": (b(x1, m1), m1)},
             2: {"A": (a(x1, pad), pad), "B": (b(none), None)}}
    return steps


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"router_stats.json holds {constant}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_steps_without_real_tokens_are_skipped_not_recorded_as_zero_load(tmp_path, caplog):
    steps = _empty_step_outputs()
    tracker = RouterStatsTracker(num_bins=4)
    with caplog.at_level("WARNING", logger="parrot.moe.diagnostics"):
        for step, layers in steps.items():
            tracker.update(step, {name: out for name, (out, _) in layers.items()})
    assert [(r.step, r.layer) for r in tracker.records] == [(0, "A"), (0, "B"), (1, "B")]
    assert [(s.step, s.layer, s.num_experts) for s in tracker.skipped] == [(1, "A", 4), (2, "A", 4), (2, "B", 3)]
    assert "step 1: 1 routed layer(s) saw no real tokens" in caplog.text and "3 layer-steps skipped" in caplog.text

    # mean load: over the measured steps only, from per-token counts (A: step 0 alone; B: steps 0 and 1)
    load_a = _naive_load(steps[0]["A"][0], steps[0]["A"][1])
    load_b = [(u + v) / 2 for u, v in zip(_naive_load(*steps[0]["B"]), _naive_load(*steps[1]["B"]))]
    mean = tracker.mean_load()
    assert mean["A"] == pytest.approx(load_a, rel=1e-12) and mean["B"] == pytest.approx(load_b, rel=1e-12)
    assert tracker.mean_load_steps() == {"A": 1, "B": 2}

    # scalars: the step-1 max-load ratio is layer B's alone; a step with no measured layer only counts them
    b1 = _naive_load(*steps[1]["B"])
    step1 = tracker.scalars(1)
    assert step1["router/max_load_ratio"] == pytest.approx(max(b1) / (sum(b1) / len(b1)), rel=1e-12)
    assert step1["router/skipped_layers"] == 1.0
    assert tracker.scalars() == tracker.scalars(2) == {"router/skipped_layers": 2.0}
    assert "router/skipped_layers" not in tracker.scalars(0)

    # the JSON: strict (no NaN), skipped layer-steps listed and counted, means as above
    data = _strict_json(tracker.write_json(tmp_path / "router_stats.json").read_text())
    assert [(r["step"], r["layer"]) for r in data["records"]] == [(0, "A"), (0, "B"), (1, "B")]
    assert all(r["num_tokens"] > 0 for r in data["records"])
    assert data["num_skipped"] == 3
    assert data["skipped"] == [{"step": 1, "layer": "A", "num_experts": 4}, {"step": 2, "layer": "A", "num_experts": 4},
                               {"step": 2, "layer": "B", "num_experts": 3}]
    assert data["mean_load"]["A"] == pytest.approx(load_a, rel=1e-12)
    assert data["mean_load"]["B"] == pytest.approx(load_b, rel=1e-12)
    assert data["mean_load_steps"] == {"A": 1, "B": 2}


def test_layer_stats_of_an_empty_layer_measure_nothing_and_the_heat_map_leaves_it_blank(tmp_path):
    steps = _empty_step_outputs()
    out, mask = steps[2]["A"]
    from parrot.moe.diagnostics import layer_stats

    record = layer_stats(2, "A", out, 4)
    assert record.num_tokens == 0 and all(math.isnan(v) for v in record.load)  # not a load of 0 per expert
    tracker = RouterStatsTracker(num_bins=4)
    tracker.update(1, {"A": steps[1]["A"][0], "B": steps[1]["B"][0]})
    assert list(tracker.mean_load()) == ["B"]
    grid = tracker.load_grid()
    assert list(grid) == ["A", "B"] and all(math.isnan(v) for v in grid["A"])
    assert grid["B"] == pytest.approx(_naive_load(*steps[1]["B"]), rel=1e-12)
    assert plot_expert_load(tracker, tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    only_empty = RouterStatsTracker()
    only_empty.update(2, {"A": out})  # nothing measured at all: a blank map, not an error at the end of a run
    assert plot_expert_load(only_empty, tmp_path / "blank.png").is_file()
    assert only_empty.to_dict()["mean_load"] == {} and only_empty.to_dict()["num_skipped"] == 1


def test_bfloat16_routing_statistics_match_a_float64_count():
    """A bfloat16 model's routers report their statistics in bfloat16: a load computed there (a masked mean of 0/1
    selections with bfloat16 weights 1/n) is up to ~1% off the share of tokens that selected each expert. The
    tracker's load and entropy match a float64 count over the valid tokens (padding masked) of the same routing."""
    from parrot.moe.diagnostics import layer_stats

    torch.manual_seed(0)
    x = torch.randn(3001, 16) * 2
    mask = torch.ones(3001, dtype=torch.bool)
    mask[-700:] = False
    for router in (TopKRouter(16, 6, top_k=2), DynMoLERouter(16, 6, entropy_threshold=0.5, keep_top_k=1, top_p=0.5)):
        out = router.to(torch.bfloat16).eval()(x.to(torch.bfloat16), mask)
        record = layer_stats(0, "layer", out, 10)
        valid = mask.nonzero().flatten().tolist()
        chosen = [set(out.indices[t].tolist()) - {-1} for t in valid]
        assert record.load == pytest.approx([sum(e in c for c in chosen) / len(valid) for e in range(6)], abs=1e-12)
        p = out.probs.detach().double()[mask]
        assert record.entropy_mean == pytest.approx(float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean()), abs=1e-12)


def test_the_heat_map_colour_scale_starts_at_zero(tmp_path, monkeypatch):
    """Loads are fractions of tokens: a balanced layer (0.1% apart) must not span the colour map from its smallest
    load to its largest, which reads as a strongly imbalanced router."""
    import matplotlib.axes

    images = []
    real_imshow = matplotlib.axes.Axes.imshow

    def spy(self, *args, **kwargs):
        images.append(real_imshow(self, *args, **kwargs))
        return images[-1]

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    plot_expert_load({"layers.0.q_proj": [0.1668, 0.1666, 0.1667, 0.1667, 0.1666, 0.1666],
                      "layers.1.q_proj": [0.34, 0.33, 0.33]}, tmp_path / "load.png")
    (image,) = images
    assert image.norm.vmin == 0.0 and image.norm.vmax == pytest.approx(0.34)
    colours = image.to_rgba(image.get_array())[0, :6]  # the balanced layer's cells: one colour, to 1%
    assert float(abs(colours - colours[0]).max()) < 0.01


def test_a_resumed_run_keeps_the_router_statistics_of_its_earlier_steps(tmp_path):
    """Logging every 3 steps, a checkpoint at step 6, a crash at step 7, --resume from checkpoint-6: router_stats.json
    and the heat map cover steps 1, 3, 6 and 9 (as the uninterrupted run), not only the steps after the resume."""
    from types import SimpleNamespace

    from parrot.train.callbacks import EXPERT_LOAD_PNG, ROUTER_STATS_JSON, RouterDiagnosticsCallback

    routing_by_step = {step: _outputs(seed=step)[0] for step in (1, 3, 6, 9)}  # layers with 6 and 3 experts
    args = SimpleNamespace(logging_steps=3)

    def session(out, first, last, save_at=(), crash_after=None):
        current = {}
        callback = RouterDiagnosticsCallback(out, routing_fn=lambda: routing_by_step[current["step"]])
        state = SimpleNamespace(global_step=first - 1, is_world_process_zero=True)
        callback.on_train_begin(args, state, None)
        for step in range(first, last + 1):
            state.global_step = current["step"] = step
            callback.on_step_end(args, state, None)
            if step in save_at:
                callback.on_save(args, state, None)
            if step == crash_after:
                return
        callback.on_train_end(args, state, None)

    session(tmp_path / "full", 1, 9, save_at=(6,))
    session(tmp_path / "cut", 1, 9, save_at=(6,), crash_after=7)
    session(tmp_path / "cut", 7, 9)
    full, resumed = (json.loads((tmp_path / run / ROUTER_STATS_JSON).read_text()) for run in ("full", "cut"))
    assert sorted({r["step"] for r in resumed["records"]}) == [1, 3, 6, 9]
    assert resumed == full
    assert (tmp_path / "cut" / EXPERT_LOAD_PNG).is_file()
    reloaded = RouterStatsTracker.from_dict(full, up_to_step=6)  # what a resume from checkpoint-6 starts from
    assert sorted({r.step for r in reloaded.records}) == [1, 3, 6]
    assert list(reloaded.load_grid()) == list(routing_by_step[1])
