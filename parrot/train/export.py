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
from . import checkpoints
from .config import read_json_mapping

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
    complete, and no half-written model appears there."""
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
        _write_final_files(model, processor, staging, state, lora_scaling, mole_config, training_info,
                           tuning_method, method_settings)
        checkpoints.fsync_tree(staging)
        _move_final_files(staging, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final_dir


def _move_final_files(staging: Path, final_dir: Path) -> None:
    """Replace the final model in `final_dir` by the staged one, file by file (atomic renames): files of an older
    final model that the new one does not have go first, the training record moves last."""
    new = {p.name for p in staging.iterdir()}
    shards = re.compile(r"^model-\d+-of-\d+\.safetensors$")
    for path in final_dir.iterdir():
        if path.is_file() and path.name not in new and (path.name in FINISHED_MODEL_FILES or shards.match(path.name)):
            path.unlink()
    for name in sorted(new, key=lambda n: (n == TRAINING_INFO, n == "config.json", n)):
        os.replace(staging / name, final_dir / name)
    fd = os.open(final_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_final_files(model, processor, output_dir: Path, state: dict, lora_scaling, mole_config, training_info,
                       tuning_method, method_settings) -> None:
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
    if training_info is not None:
        (output_dir / TRAINING_INFO).write_text(json.dumps(training_info, indent=2) + "\n")


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
    the run recorded in `parrot_training.json` (`saved_adapter_kind`)."""
    from ..model.builder import load_pretrained

    directory = Path(directory)
    kind = saved_adapter_kind(directory)
    if kind is not None:
        check_adapter_files(directory, kind)
    model, processor = load_pretrained(directory)
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
