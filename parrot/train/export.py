"""The final model of a run: gather full weights (also under ZeRO-3), fold adapters, save a loadable directory.

- `gather_full_state_dict`: every parameter and buffer at full size on the main process. Under DeepSpeed
  ZeRO-3 each parameter is partitioned over the processes; it is all-gathered one at a time
  (`deepspeed.zero.GatheredParameters`), so peak memory stays at one full parameter above the shards. Trained
  parameters come from DeepSpeed's float32 master copies where it keeps them (with `--bf16` the module holds a
  bfloat16 working copy), and `save_final_model` writes every tensor in the dtype the run loaded the model in
  (DeepSpeed's bf16 mode casts the whole module; frozen parts are saved as the run used them).
- LoRA (`--tuning lora`): folded into the base weights, W' = W + (alpha / r) B A (Hu et al., 2021, eq. 3),
  so the output is a plain Parrot model.
- MoLE (`--tuning mole`): routed experts cannot be folded (the mixture depends on the token); the base weights
  go to the Parrot model files and the experts + routers to `mole_adapter.safetensors` + `mole_config.json`
  (the `parrot.moe.save_mole` format, names relative to the language model). `load_trained` restores both.
- MoE tuning methods (`--tuning perft-*|factorllm|ceft`, `parrot.moe.methods`):
  - PERFT: the routed PEFT experts cannot be folded either; the base weights go to the Parrot model files, the
    adapters to `perft_adapter.safetensors` + `perft_config.json` (the `parrot.moe.methods.save_perft` format,
    names relative to the language model); `load_trained` re-injects and loads them (`load_perft`).
  - CEFT: the tuned expert slices are written back into the stacked expert tensors (as `merge_ceft`), so the
    output is a plain Parrot model.
  - FactorLLM: the experts (trained or not) are concatenated back into the dense `gate/up/down_proj` (the
    inverse of the contiguous split: with all experts active it is the same FFN); the routers and the
    `FactorLLMConfig` go to `factorllm_adapter.safetensors` + `factorllm_config.json`. `load_trained`
    re-splits the dense MLPs contiguously (giving back exactly the trained experts) and loads the routers.
    `load_pretrained` alone gives the dense model (FactorLLM with k = E).

Publication (`save_final_model`). The final model lives at the output folder's root, beside `checkpoint-<step>/`,
so it cannot be published by renaming one folder; it is written into `<output_dir>/.staging-final-model/`,
flushed, then its files are renamed into the root one by one. A crash during those renames could leave a folder
mixing the previous model's files with the new one's that looks complete. Two things make that state impossible to
load silently:
- the marker `.final-save-incomplete` is written (flushed) before the first file of the folder changes and removed
  only after the last one is in place; the previous training record `parrot_training.json` is removed right after
  the marker and the new record moves in last (so no record ever describes a half-moved model);
- the record lists every file the save wrote with its size (`final_model_files`), checked at load (a `stat` per
  file, no reading: every listed file must exist, weight files `*.safetensors` with their recorded size; small
  config/tokenizer files may be edited by hand), which also catches a folder copied incompletely later.
`check_final_model` refuses a folder with the marker, or whose files differ from its record's list, with an error
naming the folder and the way out (re-run the training command with `--resume`: it restores the last checkpoint
and saves the final model again). It runs in every loader (`load_model_strict`, so `load_pretrained`,
`load_trained`, a stage-2 run's `--model`, the LoRA merge's base) yet only those two things trigger it: converted
or official checkpoints, builder outputs and runs saved before records listed their files have neither and load
as before. A checksum instead of sizes would have to read every weight file at each load; the marker + ordering
already exclude the crash cases, the sizes are a cheap guard on top.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from ..data.processor import ParrotProcessor
from ..model import ParrotConfig, ParrotForCausalLM
from ..moe import MoLEConfig, load_mole
from ..moe.methods import PERFT_VARIANTS, FactorLLMConfig, PerftConfig, inject_factorllm, load_perft
from ..moe.methods.factorllm import FactorizedMLP
from ..moe.methods.perft import PERFT_CONFIG_NAME, PERFT_WEIGHTS_NAME
from ..moe.methods.router_lens import CEFTExperts
from ..moe.mole import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter_files, write_adapter_files
from ..fileio import atomic_write_text, fsync, fsync_tree, read_json_mapping, remove_file
from . import checkpoints

TRAINING_INFO = "parrot_training.json"
FACTORLLM_WEIGHTS_NAME = "factorllm_adapter.safetensors"
FACTORLLM_CONFIG_NAME = "factorllm_config.json"
LM_PREFIX = "language_model."
# The files of each adapter kind `save_final_model` may write beside the model ((config, weights)).
ADAPTER_FILES = {
    "mole": (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME),
    "perft": (PERFT_CONFIG_NAME, PERFT_WEIGHTS_NAME),
    "factorllm": (FACTORLLM_CONFIG_NAME, FACTORLLM_WEIGHTS_NAME),
}
# Any of these in an output folder means a finished (or half-saved) model lives there; a fresh run refuses it.
FINISHED_MODEL_FILES = (TRAINING_INFO, "config.json", "model.safetensors", "model.safetensors.index.json",
                        *(name for files in ADAPTER_FILES.values() for name in files))
WEIGHT_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
# Present while `save_final_model` moves files into the output folder (see the module docstring, Publication).
FINAL_SAVE_MARKER = ".final-save-incomplete"
# The training record's {file name: size in bytes} of every other file its final-model save wrote.
RECORD_FILES_KEY = "final_model_files"


class IncompleteFinalModelError(ValueError):
    """A folder whose final model may mix two saves (an interrupted save) or no longer matches its record."""


def interrupted_save_message(directory: Path) -> str:
    """Why a folder with `FINAL_SAVE_MARKER` is refused, and how to finish its save."""
    return (f"{directory}: the final-model save into this folder was interrupted ({FINAL_SAVE_MARKER} is still "
            "there), so its model files may mix the previous model with the new one; it is not loaded. Re-run the "
            "same training command with --resume: it continues from the last checkpoint-<step> folder and saves the "
            "final model again (a run that kept no checkpoint must be trained again, into a new --output-dir)")


def final_save_interrupted(directory: str | Path) -> bool:
    return (Path(directory) / FINAL_SAVE_MARKER).exists()


def check_final_model(directory: str | Path) -> None:
    """Refuse (IncompleteFinalModelError) a folder whose final-model save was interrupted, or whose files differ
    from those its training record lists (changed or copied incompletely since). Folders without the marker and
    without a file list (converted or official checkpoints, builder outputs, older runs) pass: nothing tells
    what they should hold. A record that cannot be read is an error naming it (it cannot vouch for the folder).
    See the module docstring (Publication)."""
    directory = Path(directory)
    if final_save_interrupted(directory):
        raise IncompleteFinalModelError(interrupted_save_message(directory))
    record_path = directory / TRAINING_INFO
    if not record_path.is_file():
        return
    files = read_json_mapping(record_path, "the training record").get(RECORD_FILES_KEY)
    if files is None:
        return
    if not (isinstance(files, dict) and all(isinstance(size, int) for size in files.values())):
        raise ValueError(f"{record_path}: {RECORD_FILES_KEY} must map file names to sizes in bytes")
    sizes = {name: _file_size(directory / name) for name in files}
    # Weight files must have their recorded size; small text files (generation_config.json, the tokenizer's chat
    # template) are edited by hand in normal use, so for them only presence is checked.
    wrong = [f"{name}: {'missing' if sizes[name] is None else f'{sizes[name]} bytes'}, recorded {size} bytes"
             for name, size in files.items()
             if sizes[name] is None or (name.endswith(".safetensors") and sizes[name] != size)]
    if wrong:
        raise IncompleteFinalModelError(
            f"{directory}: its files do not match the final model its {TRAINING_INFO} records ({'; '.join(wrong[:5])}"
            f"{'; ...' if len(wrong) > 5 else ''}), so the folder was changed or copied incompletely after the save. "
            "Copy it again from its source, or re-run the training command with --resume to save the final model "
            "again")


def _file_size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fp32_master(tensor: torch.Tensor) -> torch.Tensor | None:
    """DeepSpeed's full float32 master copy of a trained parameter (None outside DeepSpeed or when frozen).
    Collective under ZeRO (every rank must ask for the same parameters in the same order)."""
    if not (isinstance(tensor, nn.Parameter) and tensor.requires_grad):
        return None
    if not (hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping")):  # not a DeepSpeed-managed parameter
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(tensor)


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} on the main process ({} elsewhere); trained parameters from DeepSpeed's float32
    masters where it has them. Collective under DeepSpeed ZeRO: call on every rank."""
    main = is_main_process()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        master = _fp32_master(tensor)
        if master is not None:
            if main:
                state[name] = master.detach().to("cpu", copy=True)
        elif hasattr(tensor, "ds_id"):  # a ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if main:
                    state[name] = tensor.data.detach().to("cpu", copy=True)
        elif main:
            state[name] = tensor.detach().to("cpu", copy=True)
    return state


@contextmanager
def _outside_hf_zero3():
    """Switch off transformers' global "ZeRO-3 is on" flag (set by TrainingArguments with a ZeRO-3 config):
    under it, building a model runs `deepspeed.zero.Init`, a collective that would hang the main process
    building the export model alone."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def fold_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft LoRA names (`x.base_layer.weight`, `x.lora_A.default.weight`, `x.lora_B.default.weight`) ->
    `x.weight` = W + scaling * B A; every other key is kept as is."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for key in state:
        if ".lora_A." not in key:
            continue
        prefix = key.split(".lora_A.")[0]
        lora_a = state[key].float()  # (r, D_in)
        lora_b = state[key.replace(".lora_A.", ".lora_B.")].float()  # (D_out, r)
        base = out[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (base.float() + scaling * lora_b @ lora_a).to(base.dtype)
    return out


def split_mole(state: dict[str, torch.Tensor], mole_modules: list[str]) -> tuple[dict, dict]:
    """(base state with `x.base.weight` -> `x.weight`, adapter state named relative to the language model)."""
    prefixes = tuple(f"{name}." for name in mole_modules)
    base, adapter = {}, {}
    for key, value in state.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is None:
            base[key] = value
        elif key.startswith(owner + "base."):
            base[owner + key[len(owner) + len("base."):]] = value
        else:
            adapter[key[len("language_model."):]] = value
    return base, adapter


def split_perft(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(base state, PERFT adapter state named relative to the language model)."""
    base, adapter = {}, {}
    for key, value in state.items():
        if key.startswith(LM_PREFIX) and ".perft." in key:
            adapter[key[len(LM_PREFIX):]] = value
        else:
            base[key] = value
    return base, adapter


def fold_ceft(state: dict[str, torch.Tensor], ceft_modules: list[str]) -> dict[str, torch.Tensor]:
    """`x.base.<p>` with rows `x.expert_ids` replaced by `x.tuned_<p>` -> `x.<p>` (CEFTExperts unwrapped)."""
    prefixes = tuple(f"{name}." for name in ceft_modules)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + "base."):
            out[owner + key[len(owner) + len("base."):]] = value
    for owner in prefixes:
        ids = state[owner + "expert_ids"]
        for key in state:
            if key.startswith(owner + "tuned_"):
                name = owner + key[len(owner) + len("tuned_"):]
                out[name] = out[name].index_copy(0, ids, state[key].to(out[name].dtype))
    return out


def split_factorllm(state: dict[str, torch.Tensor], factorized: list[str]) -> tuple[dict, dict]:
    """(base state with each FactorizedMLP folded back to dense `gate/up/down_proj.weight`, router state named
    relative to the language model). Experts e own neurons [e I/E, (e+1) I/E) of the dense FFN."""
    prefixes = tuple(f"{name}." for name in factorized)
    base, adapter = {}, {}
    for key, value in state.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is None:
            base[key] = value
        elif key.startswith(owner + "router."):
            adapter[key[len(LM_PREFIX):]] = value
        elif not key.startswith(owner + "experts."):
            raise KeyError(f"FactorLLM export: unexpected tensor {key}")
    for owner in prefixes:
        gate, up, down = (state[f"{owner}experts.{n}"] for n in ("gate_proj", "up_proj", "down_proj"))
        E, D, I_e = gate.shape  # (E, D, I/E)
        base[f"{owner}gate_proj.weight"] = gate.transpose(1, 2).reshape(E * I_e, D).contiguous()  # (I, D)
        base[f"{owner}up_proj.weight"] = up.transpose(1, 2).reshape(E * I_e, D).contiguous()  # (I, D)
        base[f"{owner}down_proj.weight"] = down.reshape(E * I_e, D).t().contiguous()  # (D, I)
    return base, adapter


def save_final_model(
    model: ParrotForCausalLM,
    processor: ParrotProcessor,
    output_dir: str | Path,
    lora_scaling: float | None = None,
    mole_config: MoLEConfig | None = None,
    training_info: dict | None = None,
    tuning_method: str | None = None,
    method_settings: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Gather, fold/split adapters and write a directory `load_trained` (and, without MoLE, `load_pretrained`)
    reads. Collective under ZeRO-3 (call on every rank); only the main process writes.

    `tuning_method` / `method_settings`: an MoE tuning method of the run and its `prepare_for_tuning`
    keywords (see the module docstring for what each method writes). `dtype`: of every floating tensor written
    (the dtype the run loaded the model in; None keeps the tensors' own).

    Every file is first written into `<output_dir>/.staging-final-model/` and flushed to disk; only then do the files
    move into `output_dir` (renames, which need no space and cannot fail half-way through a file). A write that
    fails (disk full) or a crash while writing leaves the output folder as it was: a previous final model stays
    complete, and no half-written model appears there. A crash while the files move leaves a folder that every
    loader refuses (`check_final_model`) until a re-run saves it again; the training record (always written,
    `training_info` or {}) lists the saved files and moves last."""
    state = gather_full_state_dict(model)
    if not is_main_process():
        return None
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    final_dir = Path(output_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    staging = final_dir / checkpoints.FINAL_STAGING  # the files are written here, then moved (see above)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        _write_final_files(model, processor, staging, state, lora_scaling, mole_config, tuning_method,
                           method_settings)
        _write_record(staging, training_info or {})
        fsync_tree(staging)
        _move_final_files(staging, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final_dir


def _write_record(staging: Path, training_info: dict) -> None:
    """The training record, with the {name: size} of every other staged file (`check_final_model` compares them)."""
    files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file() and p.name != TRAINING_INFO}
    record = {**training_info, RECORD_FILES_KEY: files}
    (staging / TRAINING_INFO).write_text(json.dumps(record, indent=2) + "\n")


def _move_final_files(staging: Path, final_dir: Path) -> None:
    """Replace the final model in `final_dir` by the staged one, file by file (atomic renames), in the order that
    keeps every intermediate state detectable: the marker first, then the old record goes, then the previous
    model's files that the new one does not write again, then the new files, the new record last, and the marker
    goes once all of it is on disk (each step flushed before the next)."""
    new = sorted(p.name for p in staging.iterdir() if p.name != TRAINING_INFO)
    stale = _stale_final_files(final_dir, {*new, TRAINING_INFO})  # read before the old record goes
    atomic_write_text(final_dir / FINAL_SAVE_MARKER, interrupted_save_message(final_dir) + "\n")
    remove_file(final_dir / TRAINING_INFO)
    for name in stale:
        (final_dir / name).unlink()
    for name in new:
        os.replace(staging / name, final_dir / name)
    fsync(final_dir)
    os.replace(staging / TRAINING_INFO, final_dir / TRAINING_INFO)
    fsync(final_dir)
    remove_file(final_dir / FINAL_SAVE_MARKER)


def _stale_final_files(final_dir: Path, keep: set[str]) -> list[str]:
    """Files of the previous final model in `final_dir` that the new save does not write again (left, they would
    lie beside the new model): those its record lists, and model / adapter files or weight shards."""
    listed = _recorded_files(final_dir)
    return sorted(p.name for p in final_dir.iterdir() if p.is_file() and p.name not in keep
                  and (p.name in listed or p.name in FINISHED_MODEL_FILES or WEIGHT_SHARD.match(p.name)))


def _recorded_files(directory: Path) -> dict:
    """The file list of `directory`'s training record; {} when there is none or it is unreadable (a broken old
    record must not block saving the new model)."""
    try:
        record = json.loads((directory / TRAINING_INFO).read_text())
    except (OSError, ValueError):
        return {}
    files = record.get(RECORD_FILES_KEY) if isinstance(record, dict) else None
    return files if isinstance(files, dict) else {}


def _write_final_files(model, processor, output_dir: Path, state: dict, lora_scaling, mole_config, tuning_method,
                       method_settings) -> None:
    from ..moe.mole import MoLELinear

    if lora_scaling is not None:
        state = fold_lora(state, lora_scaling)
    if mole_config is not None:
        mole_names = [name for name, m in model.named_modules() if isinstance(m, MoLELinear)]
        state, adapter = split_mole(state, mole_names)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(output_dir / ADAPTER_WEIGHTS_NAME))
        (output_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(mole_config.to_dict(), indent=2) + "\n")
    settings = dict(method_settings or {})
    if tuning_method in PERFT_VARIANTS:
        state, adapter = split_perft(state)
        write_adapter_files(output_dir, adapter, PerftConfig(variant=tuning_method, **settings).to_dict(),
                            PERFT_WEIGHTS_NAME, PERFT_CONFIG_NAME)
    elif tuning_method == "ceft":
        state = fold_ceft(state, [name for name, m in model.named_modules() if isinstance(m, CEFTExperts)])
    elif tuning_method == "factorllm":
        settings.pop("permutations", None)  # folded away: the saved dense MLPs are already in expert order
        state, adapter = split_factorllm(state, [n for n, m in model.named_modules() if isinstance(m, FactorizedMLP)])
        write_adapter_files(output_dir, adapter, asdict(FactorLLMConfig(**settings)), FACTORLLM_WEIGHTS_NAME,
                            FACTORLLM_CONFIG_NAME)
    elif tuning_method is not None:
        raise ValueError(f"save_final_model: unknown tuning method {tuning_method!r}")
    # A fresh model (no adapters) receives the weights: strict loading proves every key has a home.
    config = ParrotConfig.from_dict(model.config.to_dict())
    with _outside_hf_zero3():
        with torch.device("meta"):
            clean = ParrotForCausalLM(config)
        clean.load_state_dict(state, strict=True, assign=True)
        clean.tie_weights()
        clean.generation_config = model.generation_config
        clean.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def adapter_kind_of(tuning: str | None) -> str | None:
    """The `ADAPTER_FILES` kind a run with `--tuning tuning` saves beside its model (None: plain model files)."""
    if tuning == "mole":
        return "mole"
    if tuning in PERFT_VARIANTS:
        return "perft"
    if tuning == "factorllm":
        return "factorllm"
    return None


def saved_adapter_kind(directory: Path) -> str | None:
    """The adapter kind the model in `directory` was trained with: the one its `parrot_training.json` records
    (else the only kind whose files are there). Raises if that adapter's files are missing, or if adapter files of
    another kind lie beside the model (left by an earlier run; applying them would change the model)."""
    present = {kind: [n for n in names if (directory / n).exists()] for kind, names in ADAPTER_FILES.items()}
    present = {kind: names for kind, names in present.items() if names}
    info_path = directory / TRAINING_INFO
    info = read_json_mapping(info_path, "the training record") if info_path.is_file() else {}
    if "tuning" in info:
        expected = adapter_kind_of(info["tuning"])
        source = f"{info_path} records tuning {info['tuning']!r}"
    elif len(present) > 1:
        raise ValueError(f"{directory}: adapter files of several kinds ({sorted(present)}) and no tuning recorded in "
                         f"{TRAINING_INFO}; cannot tell which adapter belongs to the model")
    else:
        expected = next(iter(present), None)
        source = f"{directory} holds {expected} adapter files"
    if expected is not None:
        missing = [n for n in ADAPTER_FILES[expected] if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}, but its adapter file(s) {missing} are missing in {directory}")
    stray = [n for kind, names in present.items() if kind != expected for n in names]
    if stray:
        raise ValueError(f"{source}, but {directory} also holds {stray}, adapter files of another run; remove them "
                         "(they do not belong to this model)")
    return expected


def load_trained(directory: str | Path) -> tuple[ParrotForCausalLM, ParrotProcessor]:
    """A run's output directory -> (model in eval mode, processor), with the MoLE, PERFT or FactorLLM adapter that
    the run recorded in `parrot_training.json` (`saved_adapter_kind`). A folder whose final-model save was
    interrupted, or whose files differ from its record, is refused first (`check_final_model`)."""
    from ..model.builder import load_pretrained

    directory = Path(directory)
    check_final_model(directory)  # first: an interrupted save may lack adapter files, and that is the error to give
    kind = saved_adapter_kind(directory)
    if kind is not None:
        check_adapter_files(directory, kind)
    model, processor = load_pretrained(directory, final_model_checked=True)
    config_name, weights_name = ADAPTER_FILES.get(kind, (None, None))
    try:
        if kind == "mole":
            load_mole(model.language_model, directory)
        elif kind == "perft":
            load_perft(model.language_model, directory)
        elif kind == "factorllm":
            _load_factorllm(model.language_model, directory)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:  # names / shapes / settings that do not fit
        raise ValueError(f"{directory}: the {kind} adapter ({config_name} + {weights_name}) does not fit the model "
                         f"of its config.json ({type(err).__name__}: {err})") from err
    return model.eval(), processor


def check_adapter_files(directory: Path, kind: str) -> None:
    """The adapter's config must be a readable JSON object and its weights a readable safetensors file
    (ValueError naming the file)."""
    from safetensors import safe_open

    config_name, weights_name = ADAPTER_FILES[kind]
    read_json_mapping(directory / config_name, f"the {kind} adapter config")
    try:
        with safe_open(str(directory / weights_name), framework="pt") as weights:
            for key in weights.keys():
                weights.get_slice(key)
    except Exception as err:  # SafetensorError (truncated / not safetensors), OSError
        raise ValueError(f"{directory / weights_name}: cannot read the {kind} adapter weights "
                         f"({type(err).__name__}: {err})") from err


def _load_factorllm(language_model: nn.Module, directory: Path) -> FactorLLMConfig:
    """Split the saved dense MLPs contiguously into experts (= the trained experts) and load the routers."""
    raw, tensors = read_adapter_files(directory, FACTORLLM_WEIGHTS_NAME, FACTORLLM_CONFIG_NAME, "FactorLLM")
    config = FactorLLMConfig(**raw)
    inject_factorllm(language_model, config)
    expected = {n for n, _ in language_model.state_dict().items() if ".router." in n}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise KeyError(f"{directory / FACTORLLM_WEIGHTS_NAME}: router mismatch: missing={missing[:5]}, "
                       f"unexpected={unexpected[:5]}")
    language_model.load_state_dict(tensors, strict=False)
    return config
