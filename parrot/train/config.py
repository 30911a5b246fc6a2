"""`TrainConfig`: every setting of a stage-1 / stage-2 run, from the command line and/or a YAML file.

The command line is generated from the dataclass (one `--flag` per field, its help from the field's metadata),
so `python -m parrot.train --help` and `scripts/train_stage{1,2}.sh --help` always document every argument.
A YAML file (`--config configs/train/<name>.yaml`) sets defaults; flags given on the command line win.
Unknown YAML keys, and values that are not of the setting's type, raise a ValueError naming the file and the key.

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..fileio import atomic_write_text, load_yaml
from .deepspeed_setup import check_deepspeed_config

# full / lora / mole: the dense-LLM modes of `stages`; the rest: MoE tuning methods of `parrot.moe.methods`
MOE_METHOD_TUNINGS = ("perft-r", "perft-e", "perft-d", "perft-s", "factorllm", "ceft")
TUNING_MODES = ("full", "lora", "mole", *MOE_METHOD_TUNINGS)
ROUTER_KINDS = ("topk", "dynmole", "gwmoe", "mor")
MOLE_BALANCE_MODES = ("layer", "pooled")  # parrot.moe.mole.BALANCE_MODES
BAD_IMAGE_POLICIES = ("error", "skip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to train ----------------------------------------------------------------------------------
    stage: int = _opt(1, "1: only the projector trains (vision tower + LLM frozen, MoE off); "
                         "2: projector + Parrot MoE + LLM (per --tuning) train, MoE on", (1, 2))
    model: str = _opt("configs/tiny.yaml", "stage 1: a model recipe YAML (configs/tiny.yaml builds a random tiny "
                                           "model; a real recipe needs --llm/--vision) or a saved init directory; "
                                           "stage 2: the stage-1 output directory")
    llm: str | None = _opt(None, "stage 1 with a real recipe: local causal-LM checkpoint directory")
    vision: str | None = _opt(None, "stage 1 with a real recipe: local CLIP checkpoint directory")
    output_dir: str | None = _opt(None, "where the final model, checkpoints, loss curve and reports go "
                                        "(None: runs/stage<stage>)")
    tuning: str = _opt("full", "stage 2: how the LLM trains: full fine-tuning, LoRA (peft), MoLE "
                               "(LoRA experts + router from parrot.moe), or an MoE method of "
                               "parrot.moe.methods: PERFT variants perft-r|perft-e|perft-d|perft-s (MoE LLM), "
                               "factorllm (dense SwiGLU LLM), ceft (MoE LLM, needs --ceft-ranking). As their official "
                               "trainers, ceft trains on the LM cross-entropy alone and perft-* adds the MoE LLM's own "
                               "load-balancing loss (router_aux_loss_coef x it), whatever the LLM config's "
                               "output_router_logits; the other modes follow that setting", TUNING_MODES)
    # --- LoRA / MoLE ---------------------------------------------------------------------------------------
    lora_rank: int = _opt(8, "LoRA / MoLE expert rank r")
    lora_alpha: float = _opt(16.0, "LoRA / MoLE scaling numerator alpha (scale alpha / r)")
    lora_dropout: float = _opt(0.05, "LoRA / MoLE input dropout")
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "comma-separated names of the LLM linear layers that get LoRA / MoLE")
    router: str = _opt("topk", "MoLE router kind (--tuning mole)", ROUTER_KINDS)
    mole_experts: int = _opt(4, "MoLE: LoRA experts per layer")
    mole_top_k: int = _opt(2, "MoLE: experts kept per token (topk / gwmoe / mor routers)")
    mole_fused: str = _opt("auto", "MoLE: fused router + experts path (Triton kernels, parrot.moe.fused): auto = on "
                                   "CUDA where it applies, never = the eager modules", ("auto", "never"))
    mole_balance: str = _opt("layer", "MoLE: the routers' load-balancing loss: layer = each router's Switch loss on its "
                                      "layer's tokens (shares sum to 1), mean over layers; pooled = the official "
                                      "MoE-PEFT loss (MixLoRA / DynMoLE): one transformers load_balancing_loss_func "
                                      "term over every MoLE layer's tokens pooled (shares sum to k), same "
                                      "coefficient (0.001); pooled runs the eager routers (not the fused path)",
                             MOLE_BALANCE_MODES)
    gw_quantile: float = _opt(0.8, "GW-MoE: broadcast threshold = this quantile of the router entropies measured "
                                   "on --gw-calibration-batches batches before training")
    gw_calibration_batches: int = _opt(8, "GW-MoE: batches for the threshold calibration")
    gw_threshold: float | None = _opt(None, "GW-MoE: a fixed broadcast threshold on the router entropy in nats, as the "
                                            "official scripts (8 experts: 1.6 GLUE, 1.8 QA / summarisation; it must be "
                                            "below ln(--mole-experts)); set, it replaces the calibration "
                                            "(--gw-quantile, --gw-calibration-batches unused); none: calibrate")
    # --- MoE tuning methods (parrot.moe.methods) ---------------------------------------------------------
    perft_experts: int = _opt(4, "PERFT-R / PERFT-D: PEFT experts per MoE block (PERFT-E uses the block's expert "
                                 "count, PERFT-S one)")
    perft_rank: int = _opt(8, "PERFT: bottleneck rank r of each PEFT expert")
    perft_alpha: float = _opt(16.0, "PERFT: output scale numerator alpha (scale alpha / r)")
    perft_top_k: int = _opt(2, "PERFT-R: PEFT experts kept per token by its top-k router")
    perft_balance_coef: float | None = _opt(0.01, "PERFT-R: weight of its routers' load-balancing loss, one term "
                                                  "over every layer's tokens pooled, as the official code (its "
                                                  "configs: 0.01 OLMoE, 0.001 / 0.02 Mixtral); 0 turns it off; none "
                                                  "(YAML null): each router's own per-layer balance loss instead, the "
                                                  "rule of runs saved before this setting existed")
    factorllm_experts: int = _opt(4, "FactorLLM: experts each dense MLP is split into (must divide the "
                                     "intermediate size)")
    factorllm_top_k: int = _opt(2, "FactorLLM: experts kept per token")
    ceft_ranking: str | None = _opt(None, "CEFT: Router Lens ranking CSV (python -m parrot.moe.methods.router_lens "
                                          "writes router_lens_ranking.csv; block names of the language model)")
    ceft_top_n: int = _opt(8, "CEFT: experts tuned per layer (official ceft-8), or overall with "
                              "--no-ceft-per-layer")
    ceft_per_layer: bool = _opt(True, "CEFT: take the top --ceft-top-n experts of every layer (else overall)")
    # --- data ------------------------------------------------------------------------------------------------
    data: str = _opt("synthetic-caption", "datasets to mix, by registry name: 'a|b' or 'a:0.5|b' (ratio after ':')")
    data_registry: str | None = _opt(None, "dataset registry YAML (None: configs/datasets.yaml)")
    data_root: str | None = _opt(None, "resolve the registry's relative paths against this folder")
    on_bad_image: str = _opt("error", "missing/unreadable image: stop with an error, or skip the record and count "
                                      "it in <output_dir>/bad_data_report.json", BAD_IMAGE_POLICIES)
    max_samples: int | None = _opt(None, "quick runs: draw N records of the mix with --seed (every dataset in "
                                         "proportion, in mix order) before the image and label checks, so only "
                                         "those are checked; skips are counted after the draw, so fewer than N "
                                         "may remain (logged)")
    # --- optimisation ----------------------------------------------------------------------------------------
    learning_rate: float = _opt(1e-3, "peak learning rate (paper: 1e-3 stage 1, 2e-5 stage 2)")
    global_batch_size: int = _opt(256, "samples per optimizer step over all processes (paper: 256 stage 1, "
                                       "128 stage 2); gradient accumulation = global / (per-device * processes)")
    per_device_batch_size: int = _opt(16, "samples per process per forward pass")
    epochs: float = _opt(1.0, "passes over the data (paper: 1 per stage)")
    max_steps: int = _opt(-1, "stop after this many optimizer steps (overrides --epochs when > 0)")
    warmup_ratio: float = _opt(0.03, "linear warm-up share of the steps")
    lr_scheduler: str = _opt("cosine", "learning-rate schedule (any HF Trainer lr_scheduler_type)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    seed: int = _opt(42, "seed of the model init (tiny recipes), the data order and dropout")
    bf16: bool = _opt(False, "train in bfloat16 mixed precision")
    tf32: bool = _opt(False, "CUDA float32 matmuls on TF32 tensor cores (Ampere or newer; the official recipe's "
                             "--tf32 True); off leaves PyTorch's setting")
    gradient_checkpointing: bool = _opt(False, "recompute LLM activations in the backward pass (saves memory)")
    dataloader_workers: int = _opt(0, "DataLoader worker processes")
    deepspeed: str | None = _opt(None, "DeepSpeed config JSON (configs/deepspeed/zero2.json, zero3.json, "
                                       "zero3_offload.json); an optimizer offload needs DeepSpeed's cpu_adam op "
                                       "prebuilt or a C++ compiler, ninja and the Python headers (checked at start)")
    torch_compile: str | None = _opt(None, "compile the model with torch.compile in this mode (HF Trainer's "
                                           "torch_compile); reduce-overhead replays CUDA graphs, which removes the "
                                           "per-kernel launch cost of small MoLE layers; fused MoLE layers keep their "
                                           "kernels in the graph (ops parrot::mole_route)", COMPILE_MODES)
    torch_compile_backend: str = _opt("inductor", "torch.compile backend of --torch-compile (aot_eager: trace only, "
                                                  "no code generation)")
    # --- checkpoints and logging ---------------------------------------------------------------------------
    save_steps: int = _opt(0, "save a checkpoint every N optimizer steps (0: only the final model)")
    keep_last: int = _opt(2, "keep only the last K checkpoints (0: keep all)")
    resume: bool = _opt(False, "continue from the latest checkpoint in --output-dir (same data order and "
                                "RNG); also saves again a final model whose save was interrupted "
                                "(.final-save-incomplete)")
    logging_steps: int = _opt(10, "log loss, lr, tokens/s and ETA every N optimizer steps")
    progress_bar: bool = _opt(True, "show the tqdm progress bar")

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 1:  # stage 1 trains the projector only: a stage-2 setting would be silently ignored
            given = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                     if f.name in STAGE2_FIELDS and getattr(self, f.name) != f.default]
            if given:
                raise ValueError(f"stage 1 trains only the projector (LLM frozen, MoE off), so {', '.join(given)} "
                                 "would be ignored: these are stage-2 settings; drop them, or train stage 2 "
                                 "(--stage 2, scripts/train_stage2.sh)")
        if self.output_dir is None:  # per stage: a stage-2 run must not land in (or be refused by) stage 1's folder
            self.output_dir = f"runs/stage{self.stage}"
        if self.tuning not in TUNING_MODES:
            raise ValueError(f"tuning must be one of {TUNING_MODES}, got {self.tuning!r}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.mole_fused not in ("auto", "never"):
            raise ValueError(f"mole_fused must be 'auto' or 'never', got {self.mole_fused!r}")
        if self.mole_balance not in MOLE_BALANCE_MODES:
            raise ValueError(f"mole_balance must be one of {MOLE_BALANCE_MODES}, got {self.mole_balance!r}")
        if self.torch_compile is not None and self.torch_compile not in COMPILE_MODES:
            raise ValueError(f"torch_compile must be one of {COMPILE_MODES}, got {self.torch_compile!r}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")
        for name in ("global_batch_size", "per_device_batch_size", "logging_steps", "lora_rank", "mole_experts",
                     "perft_experts", "perft_rank", "perft_top_k", "factorllm_experts", "factorllm_top_k",
                     "ceft_top_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # NaN / inf compare false with every bound below: refuse them first
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)}")
        for name in ("learning_rate", "lora_alpha", "perft_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 (or max_steps > 0), got {self.epochs}: the run would train nothing "
                             "and publish the untrained model")
        if self.gw_threshold is not None and not (math.isfinite(self.gw_threshold) and self.gw_threshold > 0):
            raise ValueError(f"gw_threshold must be a finite number > 0 (nats), got {self.gw_threshold}")
        if self.gw_threshold is not None and self.gw_threshold >= math.log(self.mole_experts):
            raise ValueError(f"gw_threshold={self.gw_threshold} nats is not below ln(mole_experts={self.mole_experts})"
                             f" = {math.log(self.mole_experts):.4f}, the largest router entropy over {self.mole_experts}"
                             " experts: no token would ever be broadcast (the official 1.6 / 1.8 are for 8 experts)")
        if self.perft_balance_coef is not None and not (math.isfinite(self.perft_balance_coef)
                                                        and self.perft_balance_coef >= 0):
            raise ValueError(f"perft_balance_coef must be a finite number >= 0 (or null), got {self.perft_balance_coef}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) and max_grad_norm ({self.max_grad_norm}, 0: no "
                             "clipping) must be >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.tuning == "ceft" and not self.ceft_ranking:
            raise ValueError("--tuning ceft needs --ceft-ranking (a Router Lens ranking CSV)")
        if self.save_steps < 0 or self.keep_last < 0:
            raise ValueError("save_steps and keep_last must be >= 0")
        # HF reads warmup_steps >= 1 as a step count, so a ratio of 1 or more would silently become a few steps
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1) (a share of the training steps), got {self.warmup_ratio}")
        if self.deepspeed is not None and self.deepspeed.strip().lower() in ("", "none"):
            self.deepspeed = None  # `--deepspeed none` (the scripts' --no-deepspeed) overrides a YAML's deepspeed:
        if self.deepspeed is not None:  # before any model is built: a run that cannot train fails at once
            check_deepspeed_config(self.deepspeed)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_targets.split(",") if name.strip())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        # written whole, then renamed: other processes of a resumed run read this file at the same time
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def uses(self, name: str) -> bool:
        """Whether this run's training reads setting `name` (the settings of other LLM tunings or routers do not
        change what it trains)."""
        if self.stage == 1 and name in STAGE2_FIELDS:
            return False
        users = {"perft_balance_coef": self.tuning == "perft-r", "perft_": self.tuning.startswith("perft-"),
                 "factorllm_": self.tuning == "factorllm",
                 "ceft_": self.tuning == "ceft", "gw_": self.tuning == "mole" and self.router == "gwmoe",
                 "mole_": self.tuning == "mole", "router": self.tuning == "mole",
                 "lora_": self.tuning in ("lora", "mole")}
        return next((used for prefix, used in users.items() if name.startswith(prefix)), True)

    def resume_differences(self, saved: dict[str, Any]) -> list[str]:
        """'field: saved -> now' for every setting that differs from the run's saved `train_config.json`,
        except those in `RESUME_FREE_FIELDS` (a resumed run must train exactly what the first run started). Paths
        (`PATH_FIELDS`) are compared as absolute paths: 'runs/s1/' names the folder 'runs/s1' names. In stage 1 the
        stage-2 settings are not compared: they train nothing there (a run saved before stage 1 refused them may
        have recorded other values). A setting the saved file lacks because it was added later is compared with
        `SETTINGS_ADDED_LATER`'s value, where the run uses it."""
        missing = object()
        diffs = []
        for name, value in self.to_dict().items():
            if name in RESUME_FREE_FIELDS or (self.stage == 1 and name in STAGE2_FIELDS):
                continue
            before = saved.get(name, missing)
            if name in PATH_FIELDS and isinstance(value, str) and isinstance(before, str) \
                    and os.path.abspath(value) == os.path.abspath(before):
                continue
            if before is missing and name in SETTINGS_ADDED_LATER:  # a run saved before the setting existed
                earlier = SETTINGS_ADDED_LATER[name]
                if value != earlier and self.uses(name):
                    diffs.append(f"{name}: (not saved: the run trained as {earlier!r} does) -> {value!r}")
            elif before is missing:
                diffs.append(f"{name}: (not saved) -> {value!r}")
            elif before != value:
                diffs.append(f"{name}: {before!r} -> {value!r}")
        diffs += [f"{name}: {saved[name]!r} -> (unknown setting)" for name in saved if name not in self.to_dict()]
        return diffs


# Settings a `--resume` may change: they steer logging, progress display, checkpoint cadence / retention and where
# the run lives, never the trained weights. Everything else (model, data, optimisation, adapter, router, seed,
# steps, precision, DeepSpeed, compile) must match the saved train_config.json, or the resumed run would silently
# mix two trainings. Note: logging_steps also sets the steps the router diagnostics sample.
RESUME_FREE_FIELDS = frozenset({"resume", "output_dir", "logging_steps", "progress_bar", "save_steps", "keep_last"})
# Settings added after runs were first saved, with the value that trains as a run saved without them did: resuming
# such a run compares against it, and only where the run uses the setting (`TrainConfig.uses`).
SETTINGS_ADDED_LATER: dict[str, Any] = {"tf32": False, "gw_threshold": None, "perft_balance_coef": None,
                                        "mole_balance": "layer"}
# Settings that name a file or folder: a resume compares them as absolute paths (relative to the working directory).
PATH_FIELDS = frozenset({"model", "llm", "vision", "data_registry", "data_root", "deepspeed", "ceft_ranking"})
# Settings only stage 2 uses (its LLM tuning: LoRA / MoLE and routers, the MoE tuning methods): stage 1 trains the
# projector alone (`stages.apply_stage`), so a stage-1 config refuses any of them that is not at its default.
STAGE2_FIELDS = frozenset({
    "tuning", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "router", "mole_experts", "mole_top_k",
    "mole_fused", "mole_balance", "gw_quantile", "gw_calibration_batches", "gw_threshold", "perft_experts", "perft_rank",
    "perft_alpha", "perft_top_k", "perft_balance_coef", "factorllm_experts", "factorllm_top_k", "ceft_ranking",
    "ceft_top_n", "ceft_per_layer",
})


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return typ
    return str


_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")


def _yaml_value(path: Path, key: str, f: dataclasses.Field, value: Any) -> Any:
    """One YAML value -> the field's type. PyYAML reads `2e-3` as a string and quoted values stay strings, so
    values are converted here; anything that does not convert exactly raises naming the file and the key."""
    typ = _field_type(f)
    if value is None:
        if "None" in str(f.type):
            return None
        raise ValueError(f"{path}: {key}: expected {typ.__name__}, got null")
    converted: Any = None
    if typ is bool:
        if isinstance(value, bool):
            converted = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            converted = value.strip().lower() in _TRUE_WORDS
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            converted = value
        elif isinstance(value, str):
            try:
                converted = int(value.strip())
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            converted = float(value)
        elif isinstance(value, str):
            try:
                converted = float(value.strip())
            except ValueError:
                pass
    elif isinstance(value, str):  # str settings: a YAML number or boolean here is a typo, not a name
        converted = value
    if converted is None:
        expected = "bool (true/false/yes/no/1/0)" if typ is bool else typ.__name__
        raise ValueError(f"{path}: {key}: expected {expected}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and converted not in choices:
        raise ValueError(f"{path}: {key}: expected one of {choices}, got {value!r}")
    return converted


def load_yaml_defaults(path: str | Path) -> dict[str, Any]:
    """A YAML training config -> {field: value of the field's type}; unknown keys and values that do not convert
    raise a ValueError naming the file and the key."""
    path = Path(path)
    try:
        raw = load_yaml(path)  # a key given twice, invalid YAML or non-UTF-8 text: ValueError naming the line
    except OSError as err:
        raise ValueError(f"{path}: cannot read training config ({err})") from err
    raw = {} if raw is None else raw  # an empty file sets nothing
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of training settings")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown training setting {key!r}")
        values[name] = _yaml_value(path, key, known[name], value)
    return values


def _or_none(typ: type) -> Callable[[str], Any]:
    """argparse type of an optional number setting: "none" / "null" (any case) -> None, as YAML's null."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in its error message
    return parse


def build_parser(prog: str = "python -m parrot.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Stage-wise Parrot training (stage 1: projector alignment; stage 2: multilingual instruction "
                    "tuning with the MoE) on the HF Trainer, optionally with DeepSpeed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of settings (configs/train/*.yaml); command-line flags win")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _or_none(typ) if "None" in str(f.type) and typ is not str else typ
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
        parser._option_string_actions[flag].help += f" (default: {f.default})"  # SUPPRESS hides the default
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "python -m parrot.train") -> TrainConfig:
    """Command line (+ optional YAML) -> TrainConfig."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config", None)
    try:
        values = load_yaml_defaults(yaml_path) if yaml_path else {}
        values.update(args)
        return TrainConfig(**values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
