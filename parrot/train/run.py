"""One training run: model + stage preset + data + `ParrotTrainer` (+ DeepSpeed) -> a saved model directory.

    from parrot.train import TrainConfig, train
    result = train(TrainConfig(stage=1, model="configs/tiny.yaml", data="synthetic-caption", output_dir="runs/s1"))
    result = train(TrainConfig(stage=2, model="runs/s1", data="synthetic-qa", tuning="mole", router="dynmole",
                               learning_rate=2e-5, global_batch_size=128, output_dir="runs/s2"))

Output directory: the final model (`load_trained(dir)`; plain `load_pretrained(dir)` unless MoLE / PERFT /
FactorLLM, whose adapter files `load_trained` adds -- see `parrot.train.export`), the processor,
`train_config.json`, `parrot_training.json`, `loss_curve.png`, `loss_history.json`, `bad_data_report.json`, and
`checkpoint-<step>/` folders (HF Trainer format, DeepSpeed shards included) for `--resume`.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..data.datasets import DEFAULT_REGISTRY, DataCollator, DataConfig, build_dataset
from ..data.processor import ParrotProcessor
from ..fileio import read_json_mapping
from ..model import ParrotForCausalLM
from ..model.builder import build_from_local, build_tiny, load_pretrained, load_recipe
from ..moe import calibrate_gwmoe, collect_router_outputs
from . import checkpoints
from .callbacks import LossCurveCallback, ProgressLogCallback, RouterDiagnosticsCallback
from .config import RESUME_FREE_FIELDS, TrainConfig
from .export import (ADAPTER_FILES, FINAL_SAVE_MARKER, FINISHED_MODEL_FILES, TRAINING_INFO, final_save_interrupted,
                     interrupted_save_message, save_final_model, saved_adapter_kind)
from .stages import StagePlan, apply_stage, describe_trainable
from .trainer import ParrotTrainer

logger = logging.getLogger("parrot.train")
BAD_DATA_REPORT = "bad_data_report.json"
TRAIN_CONFIG = "train_config.json"


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[tuple[int, float]]  # (optimizer step, logged loss), resumed runs include the earlier steps
    train_runtime_s: float


class _QuietProgressCallback(ProgressCallback):
    """The tqdm bar without its raw log-dict lines (ProgressLogCallback prints a readable line instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


class OutputFolderInUse(FileExistsError):
    """--output-dir holds another run (checkpoints, a finished model, an interrupted final save); the message says
    what to do instead."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def epoch_end_repeats(num_records: int, per_device_batch_size: int, processes: int) -> int:
    """Records repeated at the end of every epoch: with several processes accelerate's sharded sampler
    (`even_batches`, HF Trainer's default) completes the last step's batches from the start of the epoch."""
    if processes < 2:
        return 0
    per_step = per_device_batch_size * processes
    return -num_records % per_step


def load_model(cfg: TrainConfig) -> tuple[ParrotForCausalLM, ParrotProcessor]:
    """Stage 1: recipe YAML (tiny: random init; real: --llm/--vision) or an init dir. Stage 2: the stage-1 dir.

    --llm / --vision are refused where they would not be used (a tiny recipe builds its own random LLM and tower;
    a saved directory holds them already): ignored, the run would train another model than the one named. A saved
    directory whose model carries a MoLE / PERFT / FactorLLM adapter beside its base weights is refused too: it
    would load without that adapter, dropping what the run that saved it trained."""
    path = Path(cfg.model)
    from_dir = cfg.stage == 2 or path.suffix not in (".yaml", ".yml")
    recipe = None if from_dir else load_recipe(path)
    if (cfg.llm or cfg.vision) and (from_dir or recipe.is_tiny):
        given = " and ".join(flag for flag, value in (("--llm", cfg.llm), ("--vision", cfg.vision)) if value)
        source = ("a saved model directory, which holds its own LLM and vision tower" if from_dir
                  else "a tiny recipe, which builds a random LLM and vision tower of its own")
        raise ValueError(f"{given} would be ignored: --model {path} is {source}. Only stage 1 with a real-scale "
                         "recipe (e.g. configs/parrot-7b.yaml) loads the checkpoints --llm / --vision name; drop "
                         f"{given} or give such a recipe")
    if from_dir:
        if not (path / "config.json").is_file():
            what = "the stage-1 output directory" if cfg.stage == 2 else "a recipe YAML or a saved model directory"
            raise FileNotFoundError(f"--model {path}: no config.json there; stage {cfg.stage} expects {what}")
        adapter = saved_adapter_kind(path)  # also refuses a folder whose recorded adapter files are missing / mixed
        if adapter is not None:
            raise ValueError(f"--model {path} holds a model trained with a {adapter} adapter "
                             f"({', '.join(ADAPTER_FILES[adapter])} beside the base weights); a run cannot start "
                             "from it: it would load the base weights without the adapter and silently drop what "
                             f"that run trained. Stage {cfg.stage} starts from "
                             + ("the stage-1 output directory" if cfg.stage == 2 else "a recipe or a saved model "
                                "without an adapter") + " (load_trained evaluates this model)")
        info_path = path / TRAINING_INFO
        if cfg.stage == 2 and info_path.is_file():
            if read_json_mapping(info_path, "a training record").get("stage") != 1:
                logger.warning("%s was not produced by a stage-1 run (%s)", path, info_path)
        model, processor = load_pretrained(path)
        return model.train(), processor
    if recipe.is_tiny:
        return build_tiny(recipe, seed=cfg.seed)
    if not (cfg.llm and cfg.vision):
        raise ValueError(f"--model {path} is a real-scale recipe: give --llm and --vision (local checkpoint dirs)")
    return build_from_local(recipe, cfg.llm, cfg.vision)


def build_train_dataset(cfg: TrainConfig, processor: ParrotProcessor, output_dir: Path):
    settings = processor.settings
    # As LLaVA: a record is truncated at model_max_length text tokens; only a record with an image loses the
    # num_image_tokens - 1 positions its <image> placeholder expands to in the LLM beyond its own token.
    data_config = DataConfig(
        spec=cfg.data, registry=cfg.data_registry or str(DEFAULT_REGISTRY), data_root=cfg.data_root,
        max_length=settings.model_max_length, image_extra_tokens=max(settings.num_image_tokens - 1, 0),
        template=settings.template, on_bad_image=cfg.on_bad_image,
        bad_data_report=str(output_dir / BAD_DATA_REPORT) if is_rank_zero() else None, seed=cfg.seed,
        max_records=cfg.max_samples,  # drawn from the whole mix before the checks: a quick run checks only those
    )
    dataset = build_dataset(data_config, processor.tokenizer, processor.image_transform)
    if len(dataset) == 0:
        raise ValueError(f"--data {cfg.data!r}: no usable records")
    return dataset, dataset.report


def gradient_accumulation(cfg: TrainConfig, processes: int) -> int:
    per_step = cfg.per_device_batch_size * processes
    if cfg.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --per-device-batch-size "
                         f"({cfg.per_device_batch_size}) x processes ({processes})")
    return cfg.global_batch_size // per_step


def single_process_rendezvous(environ=os.environ) -> bool:
    """Give a process started without a launcher (no RANK / WORLD_SIZE: `python -m parrot.train --deepspeed ...`)
    the environment of a one-process launch (rank 0 of 1, a free local port), as torchrun would. DeepSpeed
    initialises torch.distributed even for one process, and without these it falls back to MPI discovery, which fails
    with "No module named 'mpi4py'". Returns whether anything was set (nothing under torchrun / deepspeed)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=environ.get("MASTER_PORT", str(port)))
    return True


def training_arguments(cfg: TrainConfig, processes: int) -> TrainingArguments:
    use_cpu = not torch.cuda.is_available()
    if cfg.deepspeed is not None and single_process_rendezvous():
        logger.info("DeepSpeed without a launcher: one process (rank 0 of 1, MASTER_PORT %s)", os.environ["MASTER_PORT"])
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg, processes),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a share of the total steps (TrainConfig checks < 1)
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        tf32=True if cfg.tf32 else None,  # HF: False would switch TF32 off process-wide, None leaves it
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5.24 name of gradient_checkpointing
        dataloader_num_workers=cfg.dataloader_workers,
        deepspeed=cfg.deepspeed,
        torch_compile=cfg.torch_compile is not None,
        torch_compile_mode=cfg.torch_compile,
        torch_compile_backend=cfg.torch_compile_backend if cfg.torch_compile is not None else None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=None,  # ParrotTrainer rotates published checkpoints itself (keep_last)
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=not cfg.progress_bar,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        average_tokens_across_devices=False,
        # Stage 2 parameters can miss a step's gradient: a text-only batch (allowed, ~40k rows of LLaVA-665k) does
        # not reach the projector and the MoE; top-k routing (MoLE, PERFT-R/E) leaves experts without tokens, and
        # CEFT experts may get none. Plain DDP must tolerate that (DeepSpeed ignores the flag).
        ddp_find_unused_parameters=cfg.stage == 2,
    )


def _calibrate_gwmoe(model: ParrotForCausalLM, dataset, collator: DataCollator, cfg: TrainConfig) -> None:
    loader = DataLoader(dataset, batch_size=cfg.per_device_batch_size, collate_fn=collator, shuffle=False)
    batches = (batch for _, batch in zip(range(cfg.gw_calibration_batches), loader))
    thresholds = calibrate_gwmoe(model, batches, cfg.gw_quantile)
    logger.info("GW-MoE thresholds (quantile %.2f): %s", cfg.gw_quantile,
                {k: round(v, 4) for k, v in list(thresholds.items())[:4]})


def is_rank_zero() -> bool:
    """Rank 0 of the launch (torchrun / deepspeed set RANK), usable before torch.distributed is initialised."""
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging() -> None:
    level = logging.INFO if is_rank_zero() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("transformers", "DeepSpeed", "deepspeed", "torch"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _routing_source(model, plan: StagePlan):
    """What the router diagnostics read after a step: MoLE layers, or the tuning method's routers; else None."""
    if plan.tuning_setup is not None:
        return plan.tuning_setup.routing
    if plan.mole_config is not None:
        return lambda: collect_router_outputs(model.language_model)
    return None


def check_output_dir(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after refusing output folders that would mix runs:
    a fresh run never starts where checkpoints or a finished model lie (files the new run does not write, such as
    another tuning's adapter, would survive next to its model), and a resumed run must have the saved settings.
    A folder whose final-model save was interrupted is refused by a fresh run with the way out: --resume restores
    the last checkpoint and saves the final model again (a last-step checkpoint trains no further step)."""
    if cfg.resume:
        resume_from = checkpoints.latest_checkpoint(output_dir)
        if resume_from is None:
            lost = (f"; its final-model save was interrupted ({FINAL_SAVE_MARKER}) and no checkpoint is left to save "
                    "it again from: train again into a new --output-dir") if final_save_interrupted(output_dir) else ""
            raise FileNotFoundError(f"--resume: no published checkpoint-<step> folder in {output_dir}{lost}")
        check_resume_settings(cfg, output_dir / TRAIN_CONFIG)
        return resume_from
    if final_save_interrupted(output_dir):  # a fresh run would train again what --resume only has to save
        raise OutputFolderInUse(interrupted_save_message(output_dir))
    if checkpoints.list_checkpoints(output_dir):
        raise OutputFolderInUse(f"{output_dir} already holds checkpoints; pass --resume to continue that run or "
                              "choose another --output-dir")
    finished = [name for name in FINISHED_MODEL_FILES if (output_dir / name).exists()]
    if finished:
        raise OutputFolderInUse(f"{output_dir} already holds a finished model ({', '.join(finished)}); choose another "
                              "--output-dir or delete that folder first (--resume only continues from a "
                              "checkpoint-<step> folder)")
    return None


def check_resume_settings(cfg: TrainConfig, saved_path: Path) -> None:
    """Raise unless `cfg` matches the interrupted run's saved settings (see `RESUME_FREE_FIELDS`)."""
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {saved_path} is missing, so the settings of the run to continue are "
                                "unknown")
    saved = read_json_mapping(saved_path, "the interrupted run's training settings (--resume)")
    diffs = cfg.resume_differences(saved)
    if diffs:
        raise ValueError(f"--resume: these settings differ from the interrupted run's {saved_path}: "
                         + "; ".join(diffs) + f". Resume with the saved settings (only {sorted(RESUME_FREE_FIELDS)} "
                         "may change) or start a new run in another --output-dir")


def run_mean_loss(log_history: list[dict], fallback: float) -> float:
    """The mean training loss per optimizer step over the whole run, a resumed run's earlier sessions included
    (HF's `training_loss` covers only the steps of the current `train()` call): the logged losses, each the mean
    over the steps since the previous log, weighted by those steps. Steps after the last log are not counted."""
    total, steps, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else fallback


def checkpoint_is_final(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at its run's last optimizer step (its trainer_state.json says so)."""
    state = read_json_mapping(checkpoint / "trainer_state.json", "the checkpoint's trainer state")
    max_steps = state.get("max_steps") or 0
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def train(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Run one stage; `callbacks`: extra `TrainerCallback`s (tests use them to interrupt or poison a run).

    A ZeRO-3 config switches transformers' process-wide "ZeRO-3 is on" flag (set by `TrainingArguments`, kept alive
    by the DeepSpeed state after the run); it is put back as it was when the run ends, also on an error. Left on,
    every later model built in the process went through `deepspeed.zero.Init`: `load_trained` of the result gave a
    partitioned (empty) bfloat16 model, and a following run in the same process (stage 1 then stage 2, a sweep)
    loaded its --model in bfloat16 and saved that, or, without DeepSpeed, failed on the empty weights."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    try:
        return _train(cfg, callbacks)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _train(cfg: TrainConfig, callbacks: list | None) -> TrainResult:
    _setup_logging()
    output_dir = Path(cfg.output_dir)
    main = is_rank_zero()
    resume_from = check_output_dir(cfg, output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_stale_staging(output_dir)
        cfg.save(output_dir / TRAIN_CONFIG)

    set_seed(cfg.seed)  # adapter / MoLE initialisation (and tiny recipes) must not depend on earlier RNG use
    # The model is built before TrainingArguments: with a ZeRO-3 config the latter switches HF loading to
    # zero.Init, and the stage surgery below (LoRA/MoLE injection) must see whole, unpartitioned modules.
    model, processor = load_model(cfg)
    load_dtype = model.dtype  # DeepSpeed's bf16 mode casts the module; the saved model keeps this dtype
    plan: StagePlan = apply_stage(model, cfg)
    if main:
        print(describe_trainable(model, plan), flush=True)

    dataset, bad_data = build_train_dataset(cfg, processor, output_dir)
    collator = DataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    if plan.mole_config is not None and plan.mole_config.router.kind == "gwmoe" and cfg.gw_threshold is None:
        _calibrate_gwmoe(model, dataset, collator, cfg)  # (a set --gw-threshold is already the routers')

    processes = world_size()
    repeated = epoch_end_repeats(len(dataset), cfg.per_device_batch_size, processes)
    if repeated and main:
        logger.warning("%d records over %d processes x %d per device: accelerate fills each epoch's last step by "
                       "repeating the first %d records of the epoch (so every process gets a full batch); choose "
                       "sizes that divide the data to avoid it", len(dataset), processes,
                       cfg.per_device_batch_size, repeated)
    args = training_arguments(cfg, processes)
    trainer = ParrotTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                            keep_last=cfg.keep_last, tuning_setup=plan.tuning_setup)
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgressCallback)
    title = f"Parrot stage {cfg.stage}" + (f" ({cfg.tuning})" if cfg.stage == 2 else "")
    routing_fn = _routing_source(model, plan)
    if routing_fn is not None:  # first: its scalars join the logs that the next two print and save
        trainer.add_callback(RouterDiagnosticsCallback(output_dir, routing_fn))
    trainer.add_callback(ProgressLogCallback())
    trainer.add_callback(LossCurveCallback(output_dir, title))
    for callback in callbacks or ():
        trainer.add_callback(callback)
    if main:
        logger.info("%d samples, %d process(es) x batch %d x accumulation %d = global batch %d%s",
                    len(dataset), processes, cfg.per_device_batch_size, args.gradient_accumulation_steps,
                    cfg.global_batch_size, f", resuming from {resume_from}" if resume_from else "")

    if resume_from is not None and checkpoint_is_final(resume_from):
        # The interrupted run had finished training (it was stopped while saving its final model): HF would still
        # run one optimizer step past max_steps on resume, so only the checkpoint is restored here.
        logger.info("%s holds the run's last step: no steps left, saving its final model", resume_from)
        trainer.no_steps_left = True
    # Fork-started DataLoader workers share the trainer's pages until they write them; a full collection in a
    # worker writes the gc header of every object it inherited (~100 MB of pages copied per worker). Frozen
    # objects are never walked (Python's gc docs: freeze right before forking). Unfrozen after training, so that
    # a process that trains again (a sweep, the tests) can still collect this run's cycles.
    gc.collect()
    gc.freeze()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        gc.unfreeze()

    info = {"stage": cfg.stage, "tuning": plan.tuning, "trained_parts": list(plan.trained_parts),
            "router": plan.mole_config.router.kind if plan.mole_config else None,
            "method_settings": plan.method_settings or None,
            "global_step": trainer.state.global_step, "data": cfg.data,
            "train_loss": run_mean_loss(trainer.state.log_history, output.training_loss)}
    save_final_model(trainer.model, processor, output_dir, lora_scaling=plan.lora_scaling,
                     mole_config=plan.mole_config, training_info=info,
                     tuning_method=plan.tuning if plan.tuning_setup is not None else None,
                     method_settings=plan.method_settings, dtype=load_dtype)
    if main:  # the bad-data report again, at the end of the run
        bad_data.write(output_dir / BAD_DATA_REPORT)
    trainer.accelerator.wait_for_everyone()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    if main:
        logger.info("saved the stage-%d model to %s (%d steps, final logged loss %.4f)", cfg.stage, output_dir,
                    trainer.state.global_step, losses[-1][1] if losses else float("nan"))
    return TrainResult(output_dir, trainer.state.global_step, losses, output.metrics.get("train_runtime", 0.0))
