"""`ParrotTrainer`: the HF `Trainer` plus what Parrot runs need.

- the MoLE routers' auxiliary losses join the LM loss (`parrot.moe.mole_aux_loss`), or, with an MoE tuning
  method (`tuning_setup`, from `parrot.moe.methods.prepare_for_tuning`), that method's aux losses
  (PERFT-R router balance / z losses, FactorLLM Prior-Approximate loss; CEFT has none), inside the model call
  (`AuxLossHook`), where a DDP wrapper sees them; an MoE tuning method's model call also gets its
  `forward_kwargs`, which decide whether the base MoE LLM's own load-balancing loss (transformers adds
  `router_aux_loss_coef` x it to `.loss` under `output_router_logits`) is part of the loss, as in the method's
  official trainer: CEFT trains on the LM cross-entropy alone, PERFT with that loss (`TuningSetup.forward_kwargs`);
- a non-finite loss stops the run before the optimizer step, naming the step and the first router (Parrot MoE
  projector router, then MoLE layers in forward order) whose outputs are non-finite;
- tokens/s (text + visual tokens, all processes) in every log;
- checkpoints are staged in a temporary folder and renamed when complete; keep-last-k rotation
  (`parrot.train.checkpoints`);
- the optimizer is the Trainer's AdamW (no weight decay on biases and norms) under every DeepSpeed config of
  configs/deepspeed, ZeRO-Offload included (accelerate turns it into DeepSpeed's CPU Adam with the same groups);
  a DeepSpeed config with its own "optimizer" section gets a warning (`warn_about_deepspeed_optimizer`), and one
  whose offloaded optimizer needs DeepSpeed's cpu_adam op on a machine that can neither load nor build it is refused
  (`check_deepspeed_offload`; `TrainConfig` runs the same check before the model is built);
- resuming does not warn that a tied weight (the LM head tied to the input embeddings) is missing from the
  checkpoint: it is saved once, under its other name (`untied_missing_keys`).
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Callable

import torch
import torch.distributed as dist
from transformers import Trainer

from ..moe import check_aux_loss_trains, collect_router_outputs, mole_aux_loss
from ..moe.methods import TuningSetup
from ..fileio import publish
from . import checkpoints
from .callbacks import CadenceFromArgsCallback, LogAtCheckpointsCallback
from .deepspeed_setup import check_deepspeed_offload, warn_about_deepspeed_optimizer

logger = logging.getLogger("parrot.train")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and, when routers exist, the layer."""


def _first_nonfinite_router(outputs, mole_routing: dict, kind: str = "MoLE") -> str | None:
    probs = getattr(outputs, "router_probs", None)
    if probs is not None and not bool(torch.isfinite(probs).all()):
        return "moe.router (the Parrot MoE projector router)"
    for name, routing in mole_routing.items():
        if not (bool(torch.isfinite(routing.logits).all()) and bool(torch.isfinite(routing.weights).all())):
            return f"language_model.{name} ({kind} router)"
    return None


class AuxLossHook:
    """Forward hook on the model: in training, adds the routers' aux losses to the output's loss inside the model
    call. A DDP wrapper (plain multi-process training, `find_unused_parameters`) decides from the forward's outputs
    which parameters take part: parameters reached only through aux losses computed after the call (FactorLLM's
    routers, trained by the Prior-Approximate loss alone) would be marked unused, and DDP fails when their
    gradients arrive anyway."""

    def __init__(self, aux_loss: Callable[[], torch.Tensor | float | None]):
        self.aux_loss = aux_loss

    def __call__(self, module: torch.nn.Module, args: tuple, output):
        if module.training and getattr(output, "loss", None) is not None:
            aux = self.aux_loss()
            if aux is not None:
                check_aux_loss_trains(aux, output.loss)
                output.loss = output.loss + aux
        return output


def untied_missing_keys(model: torch.nn.Module, missing_keys: list[str]) -> list[str]:
    """The keys of `missing_keys` that are really missing: a parameter tied to one that was loaded (safetensors keeps
    a tied weight once, under one of its names) is dropped from the list."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = set(missing_keys)
    loaded = {id(param) for name, param in params.items() if name not in missing}
    return [key for key in missing_keys if key not in params or id(params[key]) not in loaded]


class ParrotTrainer(Trainer):
    def __init__(self, *args, keep_last: int = 0, tuning_setup: TuningSetup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_last = keep_last
        self.tuning_setup = tuning_setup
        # The loss is a per-micro-batch mean (as LLaVA); the aux losses are per micro-batch too, so the Trainer
        # must divide by the accumulation steps itself rather than hand num_items_in_batch to the model.
        self.model_accepts_loss_kwargs = False
        warn_about_deepspeed_optimizer(self.args)
        check_deepspeed_offload(self.args)
        # Set when resuming from a checkpoint of the run's last step (stopped while saving its final model): `train`
        # then only restores the checkpoint. HF's loop checks max_steps after a step, so it would train one more.
        self.no_steps_left = False
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        for key, hook in list(self.model._forward_hooks.items()):  # one per model: this trainer's
            if isinstance(hook, AuxLossHook):
                del self.model._forward_hooks[key]
        self.model.register_forward_hook(AuxLossHook(self._aux_loss))
        self.add_callback(CadenceFromArgsCallback())  # a --resume may change --logging-steps / --save-steps
        self.add_callback(LogAtCheckpointsCallback())  # resumed runs log the same losses

    def _routing(self) -> dict:
        if self.tuning_setup is not None:
            return self.tuning_setup.routing()
        return collect_router_outputs(self.model.language_model)

    def _aux_loss(self) -> torch.Tensor | float | None:
        if self.tuning_setup is not None:
            return self.tuning_setup.aux_loss()
        routing = collect_router_outputs(self.model.language_model)
        return mole_aux_loss(routing) if routing else None

    # --- loss -------------------------------------------------------------------------------------------------
    def _run_epoch(self, *args, **kwargs):
        if self.no_steps_left:  # an HF-internal method: the one place the epoch loop can be skipped before a step
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _forward_kwargs(self) -> dict:
        """Keywords of every model call: the MoE tuning method's (`TuningSetup.forward_kwargs`), else none."""
        return dict(self.tuning_setup.forward_kwargs) if self.tuning_setup is not None else {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, **self._forward_kwargs())
        loss = outputs.loss  # with the aux losses in training (AuxLossHook)
        mask = outputs.attention_mask if outputs.attention_mask is not None else inputs["attention_mask"]
        self._tokens_since_log += int(mask.sum())
        self._stop_if_nonfinite(loss, outputs)
        return (loss, outputs) if return_outputs else loss

    def _stop_if_nonfinite(self, loss: torch.Tensor, outputs) -> None:
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        flag = torch.tensor([1.0 if local_bad else 0.0], device=loss.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops together
        if flag.item() == 0.0:
            return
        step = self.state.global_step + 1
        if not local_bad:
            raise NonFiniteLossError(f"non-finite training loss at optimizer step {step} on another process; "
                                     "see its message")
        message = f"non-finite training loss ({loss.item()}) at optimizer step {step} (epoch {self.state.epoch:.3f})"
        routing = self._routing()  # this forward's router outputs (only read here, on the way out)
        has_routers = getattr(outputs, "router_probs", None) is not None or bool(routing)
        if has_routers:
            kind = self.tuning_setup.method if self.tuning_setup is not None else "MoLE"
            culprit = _first_nonfinite_router(outputs, routing, kind)
            message += (f"; first router with non-finite outputs: {culprit}" if culprit
                        else "; every router output is finite (the LM head / loss overflowed)")
        message += ". Stopping before the optimizer step; lower --learning-rate or check the data of this step."
        raise NonFiniteLossError(message)

    # --- logging --------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # called on every rank at the same steps (the Trainer gathers the loss there too)
            now = time.perf_counter()
            tokens = torch.tensor([float(self._tokens_since_log)], device=self.args.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(tokens)
            if self._last_log_time is not None:
                logs["tokens_per_s"] = round(tokens.item() / max(now - self._last_log_time, 1e-9), 1)
            self._last_log_time = now
            self._tokens_since_log = 0
        super().log(logs, start_time)

    def _inner_training_loop(self, *args, **kwargs):
        self._last_log_time = time.perf_counter()
        self._tokens_since_log = 0
        return super()._inner_training_loop(*args, **kwargs)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def _issue_warnings_after_load(self, load_result) -> None:  # HF-internal: its check misses tied weights
        missing = untied_missing_keys(self.model, list(load_result.missing_keys))
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save_checkpoint(self, model, trial) -> None:
        """Write the Trainer's checkpoint into a staging folder, then rename it into place and rotate."""
        run_dir = self.args.output_dir
        step = self.state.global_step
        staging = checkpoints.staging_dir(run_dir, step)
        if self.args.should_save and staging.exists():
            checkpoints.remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)  # the Trainer writes <output_dir>/checkpoint-<step>
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staging / f"{checkpoints.CHECKPOINT_PREFIX}{step}",
                                checkpoints.checkpoint_dir(run_dir, step))
            shutil.rmtree(staging)
            checkpoints.rotate(run_dir, self.keep_last)
        self.accelerator.wait_for_everyone()
