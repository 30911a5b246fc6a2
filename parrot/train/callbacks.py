"""Trainer callbacks: a readable progress line (loss, lr, tokens/s, ETA) and the loss-curve plot."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from ..fileio import atomic_file, atomic_write_text

logger = logging.getLogger("parrot.train")

LOSS_CURVE_PNG = "loss_curve.png"
LOSS_HISTORY_JSON = "loss_history.json"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLogCallback(TrainerCallback):
    """Logs `step s/N | loss | lr | tokens/s | ETA` on the main process at every logging step (runs with routers:
    `| router H <mean entropy>, max load <max/mean expert load>` before the ETA, from RouterDiagnosticsCallback).

    tokens/s counts every non-padding position the LLM processed (text + visual tokens, all processes); the
    trainer puts it in the logs as `tokens_per_s`. ETA extrapolates the mean time per step of this session.
    """

    def __init__(self) -> None:
        self._start_time: float | None = None
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = time.perf_counter()
        self._start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs or self._start_time is None:
            return
        done = state.global_step - self._start_step
        elapsed = time.perf_counter() - self._start_time
        eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        logs["eta_s"] = round(eta, 1) if done else None
        if state.log_history and state.log_history[-1].get("step") == state.global_step:  # HF saved its copy first
            state.log_history[-1]["eta_s"] = logs["eta_s"]
        parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {float(logs['learning_rate']):.2e}")
        if "tokens_per_s" in logs:
            parts.append(f"{logs['tokens_per_s']:,.0f} tok/s")
        if "router/entropy_mean" in logs:  # RouterDiagnosticsCallback, registered before this one
            parts.append(f"router H {logs['router/entropy_mean']:.3f}, max load {logs['router/max_load_ratio']:.2f}")
        parts.append(f"ETA {format_duration(logs['eta_s'])}" if done else "ETA ?")  # the value saved
        logger.info(" | ".join(parts))


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """Loss (and lr on a second axis) against the optimizer step, from `TrainerState.log_history`."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e and "loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*points)
    ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lrs:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lrs), color="tab:orange", alpha=0.6, label="learning rate")
        ax_lr.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class CadenceFromArgsCallback(TrainerCallback):
    """A resumed run logs and saves at the --logging-steps / --save-steps it was given (a `--resume` may change
    them): HF's resume replaces the TrainerState with the checkpoint's, whose logging_steps / save_steps would win
    (HF only warns). Recomputed from the arguments as HF does for a fresh run (`TrainerState.compute_steps`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class LogAtCheckpointsCallback(TrainerCallback):
    """Logs at every checkpoint step, so that `--resume` reproduces the logged losses. A resumed run's first
    logging window starts at its checkpoint (HF restarts its loss accumulator there); where save_steps is not a
    multiple of logging_steps, the uninterrupted run's window had started earlier and averaged other steps. HF
    logs before it saves, so with this the checkpoint's log history ends exactly where the resumed run starts.
    Added after HF's DefaultFlowCallback, which decides `should_save` in the same event."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control


class LossCurveCallback(TrainerCallback):
    """Writes `loss_curve.png` and `loss_history.json` into the output dir at every save and at the end
    (the history survives a resume: it lives in the restored `TrainerState`)."""

    def __init__(self, output_dir: str | Path, title: str):
        self.output_dir = Path(output_dir)
        self.title = title

    def _write(self, state) -> None:
        if not state.is_world_process_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = [e for e in state.log_history if "loss" in e]
        atomic_write_text(self.output_dir / LOSS_HISTORY_JSON, json.dumps(history, indent=1) + "\n")
        if any("loss" in e and "step" in e for e in state.log_history):
            with atomic_file(self.output_dir / LOSS_CURVE_PNG) as staged:
                plot_loss_curve(state.log_history, staged, self.title)

    def on_save(self, args, state, control, **kwargs):
        self._write(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state)


ROUTER_STATS_JSON = "router_stats.json"
EXPERT_LOAD_PNG = "expert_load.png"


class RouterDiagnosticsCallback(TrainerCallback):
    """Router diagnostics of MoLE / PERFT / FactorLLM runs (issue 4, item 3).

    At every logging step (and step 1) it reads the routing of the step's last forward pass (`routing_fn`, e.g.
    `collect_router_outputs(model.language_model)`), records per-layer statistics in a `RouterStatsTracker`
    (entropy mean + histogram, expert load, soft-routed / broadcast fraction, aux losses), adds the scalar
    summary to the logs, and at the end writes `router_stats.json` and the layer x expert load heat map
    `expert_load.png` into the output directory. Steps in between read nothing (router stats are lazy).

    `router_stats.json` is also written at every checkpoint save, and a run resumed from a checkpoint starts from
    its steps up to that checkpoint, so the final statistics and heat map cover the whole run, not only the steps
    after the resume.
    """

    def __init__(self, output_dir: str | Path, routing_fn):
        from ..moe import RouterStatsTracker

        self.output_dir = Path(output_dir)
        self.routing_fn = routing_fn
        self.tracker = RouterStatsTracker()
        self._last_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from ..moe import RouterStatsTracker

        path = self.output_dir / ROUTER_STATS_JSON
        if not state.global_step or not path.is_file():  # a fresh run (or a resumed one that saved no statistics)
            return
        try:
            self.tracker = RouterStatsTracker.from_dict(json.loads(path.read_text()), up_to_step=state.global_step)
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.warning("router diagnostics: cannot read the interrupted run's %s (%s: %s); the statistics "
                           "start again at step %d", path, type(err).__name__, err, state.global_step)
            return
        self._last_step = self.tracker._last_step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._last_step is not None:  # what a resumed run starts from
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.tracker.write_json(self.output_dir / ROUTER_STATS_JSON)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 1 or (args.logging_steps and step % args.logging_steps == 0):
            routing = self.routing_fn()
            if routing:
                self.tracker.update(step, routing)
                self._last_step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._last_step == state.global_step:
            scalars = self.tracker.scalars(state.global_step)
            logs.update(scalars)  # for the callbacks after this one (the progress line)
            # Trainer.log appended a copy of `logs` to log_history before calling the callbacks: the scalars go
            # there too, so that loss_history.json and the checkpoints' trainer_state.json keep them
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        from ..moe import plot_expert_load

        if not state.is_world_process_zero or self._last_step is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tracker.write_json(self.output_dir / ROUTER_STATS_JSON)  # atomic, as the plot below
        with atomic_file(self.output_dir / EXPERT_LOAD_PNG) as staged:
            plot_expert_load(self.tracker, staged, title="Expert load (mean over logged steps)")
