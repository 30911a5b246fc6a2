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
