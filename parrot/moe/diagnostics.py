"""Routing diagnostics: per layer, per step statistics, a JSON log and an expert-load heat map.

Trainer usage:

    tracker = RouterStatsTracker(num_bins=20)
    ...
    routing = collect_router_outputs(model)       # parrot.moe.mole, after each forward
    tracker.update(step, routing)
    logger.log(tracker.scalars(step))             # flat {"router/entropy_mean": ..., ...} for that step
    ...
    tracker.write_json(out_dir / "router_stats.json")
    plot_expert_load(tracker, out_dir / "expert_load.png")

Cost: routers return their statistics lazily (`parrot.moe.routers.RoutingStats`), computed on the first
read, i.e. by `update` here. Call `update` only at logging steps (or give `every`, which skips before
reading anything) and training steps in between pay nothing for diagnostics. `update` reads each
layer's stats once and moves them to the host (one sync per layer), so keep it off non-logging steps.

Per layer and step a record holds: entropy mean (nats, valid tokens), entropy histogram (`num_bins`
bins of the entropy normalised by log E, so layers with different E share bins), expert load fractions
(share of valid tokens that selected each expert), fraction of tokens broadcast / soft-routed
(DynMoLE soft routing, GW-MoE broadcast; 0 for plain top-k), mean number of active experts and the
(already coefficient-scaled) aux-loss values.

Layer-steps without real tokens: a routed layer that saw no real token at a step (every token masked as
padding, or no token at all) measured nothing, yet its load would read 0 for every expert. Such a
layer-step is not recorded as a measurement: `update` counts it in `skipped` (a `SkippedLayerStep`) and logs
a warning, so every aggregate (`mean_load`, the `scalars`, the heat map) covers measured layer-steps only
and `records` holds no fabricated zeros. router_stats.json lists them under "skipped" ({"step", "layer",
"num_experts"}) with their count "num_skipped", and "mean_load_steps" gives the number of measured steps
behind each layer's "mean_load"; "layers" maps every layer seen to its expert count (the heat map's rows).
`RouterStatsTracker.from_dict` reads the file back (a resumed run continues it). `scalars` reports
"router/skipped_layers" for a step that skipped any layer; a layer never measured has no mean_load entry and a
blank row in the heat map.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..fileio import atomic_write_text
from .routers import RouterOutput, selection_from_indices, shannon_entropy

logger = logging.getLogger(__name__)


@dataclass
class LayerStepStats:
    """One layer's routing statistics at one step."""

    step: int
    layer: str
    num_tokens: int
    entropy_mean: float
    entropy_hist: list[int]
    load: list[float]
    broadcast_fraction: float
    mean_active: float
    aux: dict[str, float]


@dataclass
class SkippedLayerStep:
    """A layer-step whose routed layer saw no real token: nothing was measured, so it is no `LayerStepStats`
    (its load would be all zeros) and stays out of every aggregate; kept so the JSON says which were left out."""

    step: int
    layer: str
    num_experts: int


def layer_stats(step: int, layer: str, routing: RouterOutput, num_bins: int) -> LayerStepStats:
    """Reduce one RouterOutput to a LayerStepStats (valid tokens only).

    Reading `routing.stats` computes a lazy `RoutingStats`; an output without statistics (a custom
    router that returned none) is an error naming the layer, not a record of zeros. Without a real token
    (num_tokens 0) every mean is NaN, the load included: the router's all-zero load measured nothing.
    """
    stats = routing.stats
    if not stats:
        raise ValueError(
            f"RouterStatsTracker: layer {layer!r} returned a RouterOutput without stats at step {step}; "
            "routers must fill RouterOutput.stats (e.g. parrot.moe.routers.lazy_routing_stats(probs, indices, mask))"
        )
    # Entropy and load from the routing itself (`probs`, the selected `indices`), in float64 like the other means:
    # the router's own statistics are in its dtype, and in a bfloat16 model their load (a masked mean of 0/1
    # selections over bfloat16 weights 1/n) is up to ~1% off the count of tokens that selected each expert.
    probs = routing.probs.detach().double()  # (T, E)
    num_experts = probs.shape[-1]
    entropy = shannon_entropy(probs)  # (T,)
    valid = stats["mask"].to(torch.bool) if "mask" in stats else torch.ones_like(entropy, dtype=torch.bool)
    entropy = entropy[valid]
    scale = math.log(num_experts) if num_experts > 1 else 1.0
    hist = torch.histc((entropy / scale).clamp(0.0, 1.0).cpu(), bins=num_bins, min=0.0, max=1.0) if entropy.numel() else torch.zeros(num_bins)
    count = int(valid.sum())
    load = selection_from_indices(routing.indices, num_experts)[valid].double().mean(0) if count else None  # (E,)
    return LayerStepStats(
        step=step,
        layer=layer,
        num_tokens=count,
        entropy_mean=float(entropy.mean()) if count else float("nan"),
        entropy_hist=[int(v) for v in hist.tolist()],
        load=[float(v) for v in load.cpu().tolist()] if count else [float("nan")] * num_experts,
        broadcast_fraction=float(stats["broadcast"].detach().double()[valid].mean()) if count else float("nan"),
        mean_active=float(stats["num_active"].detach().double()[valid].mean()) if count else float("nan"),
        aux={name: float(value.detach()) for name, value in routing.aux_losses.items()},
    )


class RouterStatsTracker:
    """Accumulates `LayerStepStats` over training and writes them as JSON.

    `every` keeps one step out of `every` (the trainer may call `update` each step regardless). Layer-steps
    without real tokens go to `skipped`, not `records` (see the module docstring).
    """

    def __init__(self, num_bins: int = 20, every: int = 1):
        if num_bins < 1 or every < 1:
            raise ValueError(f"RouterStatsTracker needs num_bins >= 1 and every >= 1, got {num_bins}, {every}")
        self.num_bins = num_bins
        self.every = every
        self.records: list[LayerStepStats] = []
        self.skipped: list[SkippedLayerStep] = []
        self._experts: dict[str, int] = {}  # every layer seen (measured or skipped) -> its expert count, in order
        self._last_step: int | None = None

    def update(self, step: int, routing: Mapping[str, RouterOutput]) -> list[LayerStepStats]:
        """Record every layer's statistics at `step` (computing their lazy stats); [] on skipped steps.

        Returns the measured records; layers without real tokens are counted in `skipped` and logged."""
        if step % self.every:
            return []
        new, empty = [], []
        pooled = None
        if any(getattr(out, "pooled_balance", None) is not None for out in routing.values()):
            from .mole import pooled_balance_loss  # lazy: mole imports this module's neighbours

            # one term over all layers (MoLEConfig.balance="pooled"): every layer's record carries it, so that the
            # step's mean over layers, "router/aux_balance_pooled", is its value
            pooled = float(pooled_balance_loss(routing))
        for name, out in routing.items():
            record = layer_stats(step, name, out, self.num_bins)
            if pooled is not None:
                record.aux["balance_pooled"] = pooled
            self._experts.setdefault(name, len(record.load))
            if record.num_tokens:
                new.append(record)
            else:
                empty.append(SkippedLayerStep(step, name, len(record.load)))
        self.records.extend(new)
        self._skip(step, empty)
        self._last_step = step
        return new

    def _skip(self, step: int, empty: list[SkippedLayerStep]) -> None:
        if not empty:
            return
        self.skipped.extend(empty)
        names = ", ".join(s.layer for s in empty[:3]) + (", ..." if len(empty) > 3 else "")
        logger.warning("router diagnostics, step %d: %d routed layer(s) saw no real tokens (all padding) and are not "
                       "recorded (%s); %d layer-steps skipped so far, listed in the JSON", step, len(empty), names,
                       len(self.skipped))

    def scalars(self, step: int | None = None) -> dict[str, float]:
        """Layer-averaged scalars of one step (the latest when `step` is None), for a metrics logger.

        Averages over the layers measured at that step; "router/skipped_layers" counts the layers without real
        tokens (present only when there were any)."""
        if step is None:
            step = self._last_step if self._last_step is not None else (self.records[-1].step if self.records else None)
        rows = [r for r in self.records if r.step == step]
        skipped = sum(s.step == step for s in self.skipped)
        out = self._step_scalars(rows) if rows else {}
        if skipped:
            out["router/skipped_layers"] = float(skipped)
        return out

    @staticmethod
    def _step_scalars(rows: list[LayerStepStats]) -> dict[str, float]:
        out = {
            "router/entropy_mean": sum(r.entropy_mean for r in rows) / len(rows),
            "router/broadcast_fraction": sum(r.broadcast_fraction for r in rows) / len(rows),
            "router/mean_active": sum(r.mean_active for r in rows) / len(rows),
            # max over layers of (max load / mean load): 1.0 is perfectly balanced (loads sum to the experts per
            # token, k, not to 1)
            "router/max_load_ratio": max(max(r.load) * len(r.load) / max(sum(r.load), 1e-12) for r in rows),
        }
        for name in sorted({k for r in rows for k in r.aux}):
            values = [r.aux[name] for r in rows if name in r.aux]
            out[f"router/aux_{name}"] = sum(values) / len(values)
        return out

    def mean_load(self) -> dict[str, list[float]]:
        """Per layer, the expert load averaged over its measured steps (layer order of first record); skipped
        layer-steps do not count, and a layer never measured is absent."""
        sums: dict[str, list[float]] = {}
        counts = self.mean_load_steps()
        for r in self.records:
            acc = sums.setdefault(r.layer, [0.0] * len(r.load))
            for i, v in enumerate(r.load):
                acc[i] += v
        return {layer: [v / counts[layer] for v in acc] for layer, acc in sums.items()}

    def mean_load_steps(self) -> dict[str, int]:
        """Per layer, the number of measured steps behind its `mean_load`."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.layer] = counts.get(r.layer, 0) + 1
        return counts

    def load_grid(self) -> dict[str, list[float]]:
        """`mean_load` of every layer seen, in order of first appearance, NaN for a layer never measured (a blank
        heat-map row rather than a row of zeros or a missing layer)."""
        mean = self.mean_load()
        return {layer: mean.get(layer, [float("nan")] * num) for layer, num in self._layers().items()}

    def to_dict(self) -> dict:
        return {"num_bins": self.num_bins, "records": [asdict(r) for r in self.records], "mean_load": self.mean_load(),
                "mean_load_steps": self.mean_load_steps(), "num_skipped": len(self.skipped),
                "skipped": [asdict(s) for s in self.skipped], "layers": self._layers()}

    def _layers(self) -> dict[str, int]:
        """Every layer seen, in order of first appearance -> its expert count (the heat map's rows)."""
        experts = dict(self._experts)
        for r in self.records:  # records appended by hand, not through `update`
            experts.setdefault(r.layer, len(r.load))
        return experts

    @classmethod
    def from_dict(cls, data: Mapping, up_to_step: int | None = None) -> "RouterStatsTracker":
        """The tracker that wrote `data` (`to_dict()`, router_stats.json), without the steps after `up_to_step`: a
        run resumed from its checkpoint at that step records the later ones again."""
        keep = lambda step: up_to_step is None or step <= up_to_step  # noqa: E731
        tracker = cls(num_bins=int(data["num_bins"]))
        tracker.records = [LayerStepStats(**r) for r in data["records"] if keep(r["step"])]
        tracker.skipped = [SkippedLayerStep(**s) for s in data["skipped"] if keep(s["step"])]
        kept = [(r.step, r.layer, len(r.load)) for r in tracker.records] + \
               [(s.step, s.layer, s.num_experts) for s in tracker.skipped]
        seen = {layer: num for _, layer, num in sorted(kept, key=lambda entry: entry[0])}
        order = [layer for layer in data.get("layers", {}) if layer in seen] + list(seen)  # saved order, if any
        tracker._experts = {layer: seen[layer] for layer in dict.fromkeys(order)}
        tracker._last_step = max((step for step, _, _ in kept), default=None)
        return tracker

    def write_json(self, path: str | Path) -> Path:
        """Write `to_dict()` all or nothing (`atomic_write_text`): a crash mid-write keeps the previous file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict()))


def plot_expert_load(stats: RouterStatsTracker | Mapping[str, list[float]], path: str | Path, title: str = "Expert load") -> Path:
    """Heat map layers x experts of load fractions, written as PNG (matplotlib Agg backend).

    `stats` is a tracker (its mean load over measured steps, `load_grid`) or {layer: load list}. Layers with
    fewer experts (per-layer expert counts) show blank cells beyond their last expert, and a layer the tracker
    never measured (no real tokens at any recorded step) a blank row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    load = stats.load_grid() if isinstance(stats, RouterStatsTracker) else dict(stats)
    if not load:
        raise ValueError("plot_expert_load: no routing statistics to plot")
    layers = list(load)
    width = max(len(v) for v in load.values())
    grid = np.full((len(layers), width), np.nan)
    for i, layer in enumerate(layers):
        grid[i, : len(load[layer])] = load[layer]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * width + 3), max(3.0, 0.22 * len(layers) + 1.5)))
    # The colour scale starts at 0: from the smallest load up, a balanced layer's 0.1% differences would span the
    # whole colour map and read as imbalance.
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0,
                      vmax=top if top > 0 else 1.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=max(4, 8 - len(layers) // 20))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
