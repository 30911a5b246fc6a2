"""Export a standalone Parrot checkpoint with plain LoRA (peft) adapters merged into the base weights.

    python -m parrot.export --merge-lora --src runs/lora-adapter-next-to-its-model --dst runs/parrot-merged
    python -m parrot.export --merge-lora --src adapters/my-lora --base runs/parrot-base --dst runs/parrot-merged

LoRA adds delta W = (alpha / r) B A to a frozen linear layer (Hu et al., 2021, arXiv 2106.09685, eq. 3), a fixed
matrix, so W' = W + (alpha / r) B A computes the same function without the adapter (peft's `merge_and_unload`;
DoRA / rsLoRA variants are merged by peft with their own formulas).

Expected layout (peft's standard `save_pretrained` output):
    adapter_config.json                               peft LoraConfig (peft_type "LORA")
    adapter_model.safetensors | adapter_model.bin     keys "base_model.model.<module path>.lora_{A,B}.weight"
The module paths are either relative to the whole `ParrotForCausalLM` ("language_model.model.layers.0...",
"mm_projector.0", ...: `get_peft_model(parrot_model, ...)`) or to its language model ("model.layers.0...":
`get_peft_model(parrot_model.language_model, ...)` or `inject_adapter_in_model` on it); which one is detected from
the keys. The base model is the Parrot model directory in `--src` itself (adapter files saved next to the model)
or `--base DIR`, or the adapter's `base_model_name_or_path` when that is a local directory. The processor
(tokenizer + `parrot_processor.json`) is copied from the base directory.

The output loads with `AutoModelForCausalLM.from_pretrained(dst)` after `import parrot.model` (registration,
no trust_remote_code). The merge runs in float32; weights are saved in the base checkpoint's dtype. `dst` must be
a new (or empty) folder outside `--src` and the base; the model is written into a staging folder beside it and
renamed when complete. A LoRA on one side of tied input/output embeddings unties them in the output.

Adapter settings: plain LoRA with rsLoRA, DoRA, lora_bias, rank/alpha patterns, modules_to_save, trainable tokens
and target_parameters (e.g. the Parrot MoE's expert tensors) are merged (tested against the unmerged peft model);
any other non-default setting, a key this peft version does not know, or an initialisation that changed the base
weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ... without peft's conversion) is refused, naming the setting.
A missing, unreadable or mis-shaped adapter or base file is an error naming it.

MoLE adapters (`mole_config.json`, `--tuning mole`) are refused: a token's update sum_e p_e(x) B_e A_e x mixes
the experts with router weights p(x) that depend on that token, so it is not one fixed matrix to add to W. A base
model with a MoLE, PERFT or FactorLLM adapter beside its files is refused too (the merge reads the model files only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .data.processor import PROCESSOR_FILE, ParrotProcessor
from .model import ParrotForCausalLM
from .moe.mole import ADAPTER_CONFIG_NAME as MOLE_CONFIG_NAME
from .fileio import output_folder_problem, staged_folder

logger = logging.getLogger(__name__)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class ExportError(ValueError):
    """The adapter cannot be merged or does not fit the base model; the message names the file or keys."""


# LoraConfig settings whose merge this export reproduces exactly (tests/test_export*.py check each against the
# unmerged peft model) or that do not change the adapted function (metadata, dropout, initialisation details).
MERGEABLE_SETTINGS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "runtime_config", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "trainable_token_indices", "use_dora", "lora_bias", "target_parameters", "ensure_weight_tying",
    "eva_config", "loftq_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
})
# init_lora_weights values that only initialise A and B. Others (pissa, corda, olora, loftq, lora_ga, ...) change
# the *base* weights at initialisation (W_res = W - B0 A0) or select a layer variant: such an adapter belongs to
# that residual base, not to the saved one, unless peft converted it when saving
# (`save_pretrained(path_initial_model_for_weight_conversion=...)`, which writes init_lora_weights=true).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _read_peft_config(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: cannot read the adapter config ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a JSON object (a peft LoraConfig), got {type(raw).__name__}")
    return raw


def unsupported_settings(raw: dict) -> list[str]:
    """`key=value` for each adapter_config.json setting this export does not merge (changed from peft's default,
    a base-changing init, or a key this peft version does not know)."""
    import dataclasses

    from peft import LoraConfig

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    problems = []
    for key, value in raw.items():
        if key == "init_lora_weights":
            if not any(value is init or (isinstance(value, str) and value == init) for init in PLAIN_INITS):
                problems.append(f"init_lora_weights={value!r} (this initialisation changes the base weights or the "
                                "layer; save the adapter with peft's path_initial_model_for_weight_conversion to get "
                                "a plain LoRA of the saved base)")
        elif key in MERGEABLE_SETTINGS:
            continue
        elif key not in fields:
            problems.append(f"{key}={value!r} (unknown to peft {_peft_version()}: the adapter was saved by another "
                            "version, and dropping the setting could change what it computes)")
        else:
            field = fields[key]
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            if value != default and not (value in (None, [], {}) and default in (None, [], {})):
                problems.append(f"{key}={value!r}")
    return problems


def _peft_version() -> str:
    import peft

    return peft.__version__


def check_mergeable(adapter_dir: Path) -> dict:
    """The adapter's peft config as a dict; ExportError for MoLE adapters, other peft types, settings this export
    does not merge (`unsupported_settings`) or missing / unreadable files."""
    if (adapter_dir / MOLE_CONFIG_NAME).is_file():
        raise ExportError(
            f"{adapter_dir / MOLE_CONFIG_NAME}: MoLE adapters cannot be merged into the base weights. A MoLE layer "
            "computes W x + sum_e p_e(x) B_e A_e x with router weights p(x) that change from token to token, so "
            "the update is not one fixed matrix that could be added to W (plain LoRA's (alpha / r) B A is). Keep "
            "the adapter next to the model and load both with parrot.train.export.load_trained."
        )
    path = adapter_dir / PEFT_CONFIG_NAME
    if not path.is_file():
        hint = ""
        if (adapter_dir / "trainer_state.json").is_file():
            hint = (" (this is a training checkpoint: a `--tuning lora` run keeps its LoRA inside the model "
                    "weights there; the run's output folder gets its final model with the LoRA folded in, so resume "
                    "an unfinished run with --resume)")
        raise ExportError(f"{path}: not found; expected a peft LoRA adapter (adapter_config.json + "
                          f"adapter_model.safetensors){hint}")
    raw = _read_peft_config(path)
    if raw.get("peft_type") != "LORA":
        raise ExportError(f"{path}: peft_type={raw.get('peft_type')!r}; only plain LoRA adapters ('LORA') are "
                          "merged here")
    problems = unsupported_settings(raw)
    if problems:
        raise ExportError(f"{path}: settings this export cannot merge into plain weights: " + "; ".join(problems)
                          + ". Merge such an adapter with peft itself (merge_and_unload) if it supports them, or "
                          "train a plain LoRA")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise ExportError(f"{adapter_dir}: no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}) next to "
                          f"{PEFT_CONFIG_NAME}")
    return raw


def resolve_base(adapter_dir: Path, base: Path | None, peft_config: dict) -> Path:
    """The base Parrot model directory (see the module docstring for the search order)."""
    candidates = [base] if base is not None else [adapter_dir, peft_config.get("base_model_name_or_path")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    if base is not None:
        raise ExportError(f"{base}: no config.json, not a saved Parrot model")
    raise ExportError(f"{adapter_dir}: holds no base model (config.json) and its adapter_config.json "
                      f"base_model_name_or_path={peft_config.get('base_model_name_or_path')!r} is not a local "
                      "model directory; pass --base DIR")


def adapter_module_paths(adapter_keys) -> set[str]:
    """The module paths of an adapter's LoRA tensors. LoRA on several parameters of one module (peft's
    `target_parameters`, e.g. two expert tensors of the Parrot MoE) nests wrappers: `x.base_layer.lora_A...`."""
    paths = set()
    for key in adapter_keys:
        if ".lora_" in key:
            path = key.removeprefix(PEFT_PREFIX).split(".lora_")[0]
            while path.endswith(".base_layer"):
                path = path.removesuffix(".base_layer")
            paths.add(path)
    return paths


def _untie_adapted_embeddings(model: ParrotForCausalLM, target: torch.nn.Module, paths: set[str],
                              config, config_path: Path) -> bool:
    """Give lm_head its own copy of a tied embedding matrix when the adapter has LoRA on lm_head or embed_tokens.

    With tied input / output embeddings, a LoRA on one side changes that side only, but merging it into the shared
    matrix would change the other side too; the merged model is saved with `tie_word_embeddings=False`. An adapter
    saved with peft's `ensure_weight_tying` (one adapter shared by both sides) is refused."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    names = {id(module): name for name, module in target.named_modules()}
    if not {names.get(id(head)), names.get(id(embed))} & paths:
        return False
    if getattr(config, "ensure_weight_tying", False):
        raise ExportError(f"{config_path}: ensure_weight_tying=True with LoRA on the tied input/output "
                          "embeddings is not merged here (peft applies one shared adapter to both sides and would "
                          "merge it twice into the shared matrix)")
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for owner in (model.config, model.config.text_config, model.language_model.config):
        owner.tie_word_embeddings = False
    logger.info("the adapter changes one side of the tied input/output embeddings: the merged model unties them")
    return True


def adapter_target(model: ParrotForCausalLM, adapter_keys: list[str]) -> torch.nn.Module:
    """The module the adapter was trained on: the whole Parrot model or its language model (from the key paths)."""
    paths = adapter_module_paths(adapter_keys)
    if not paths:
        raise ExportError("the adapter weights hold no lora_A / lora_B tensors")
    for target in (model, model.language_model):
        modules = dict(target.named_modules())
        if paths <= set(modules):
            return target
    unknown = sorted(p for p in paths if p not in dict(model.named_modules())
                     and p not in dict(model.language_model.named_modules()))
    raise ExportError(f"adapter modules not found in the Parrot model or its language model: {_first_five(unknown)}")


def _first_five(names: list[str]) -> str:
    """The first five of `names` (a list's repr), then how many more there are."""
    return f"{names[:5]}" + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Names of the floating-point tensors (`named_parameters()`, a state dict's items) holding a NaN or an inf."""
    return {name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()}


def _merged_weight_problems(tensors: Iterable[tuple[str, torch.Tensor]],
                            dtype: torch.dtype) -> tuple[set[str], set[str]]:
    """(names of the floating-point tensors holding a NaN or an inf, names of those finite but beyond the range of
    `dtype`, which they are about to be cast to), in one pass over each tensor: its largest magnitude decides both
    (a NaN propagates through `aminmax`; rounding to a narrower dtype keeps the order of magnitudes, so the largest
    one overflows exactly when some value does)."""
    nonfinite, overflow = set(), set()
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        low, high = torch.aminmax(t.detach())
        peak = torch.maximum(-low, high)
        if not torch.isfinite(peak):
            nonfinite.add(name)
        elif torch.isinf(peak.to(dtype)):
            overflow.add(name)
    return nonfinite, overflow


def _check_scaling_settings(config, config_path: Path) -> None:
    """lora_alpha (and alpha_pattern's values) must be finite numbers: merged weights are W + alpha / r * B A, so a
    NaN or infinite alpha would write NaN / inf weights for every adapted module."""
    values = {"lora_alpha": config.lora_alpha}
    values.update({f"alpha_pattern[{key!r}]": value for key, value in (config.alpha_pattern or {}).items()})
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ExportError(f"{config_path}: {name}={value!r} must be a finite number (the merge scales the LoRA "
                              "update by alpha / r)")


def merge_lora(model: ParrotForCausalLM, adapter_dir: str | Path,
               dtype: torch.dtype = torch.float32) -> ParrotForCausalLM:
    """Load a peft LoRA adapter onto `model` (or its language model), merge it and remove the LoRA layers.

    Every adapter tensor must find its module and every injected LoRA weight must be loaded (ExportError). Non-finite
    adapter tensors or scaling settings, a merge that gives NaN / inf weights, and merged weights beyond the range of
    `dtype` (the dtype the caller will save them in; float16 ends at 65504) are refused (ExportError naming the file
    and the tensors): nothing is merged into NaN. Weights that were NaN / inf before the merge are not the adapter's
    doing and pass.
    """
    from peft import LoraConfig, PeftModel, load_peft_weights, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    check_mergeable(adapter_dir)
    config_path = adapter_dir / PEFT_CONFIG_NAME
    weights_path = next(adapter_dir / n for n in ADAPTER_WEIGHT_FILES if (adapter_dir / n).is_file())
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError, KeyError) as err:
        raise ExportError(f"{config_path}: not a valid peft LoraConfig ({type(err).__name__}: {err})") from err
    config.inference_mode = True
    _check_scaling_settings(config, config_path)
    try:
        weights = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as err:  # SafetensorError, unpickling errors, truncated files: name the file
        raise ExportError(f"{weights_path}: cannot read the adapter weights ({type(err).__name__}: {err})") from err
    bad = sorted(_nonfinite(weights.items()))
    if bad:
        raise ExportError(f"{weights_path}: {len(bad)} adapter tensor(s) hold NaN / inf values: {_first_five(bad)}; "
                          "nothing merged")
    target = adapter_target(model, list(weights))
    # (a base that already holds NaN / inf is not the adapter's doing)
    nonfinite_before = _nonfinite(model.named_parameters())
    _untie_adapted_embeddings(model, target, adapter_module_paths(weights), config, config_path)
    try:
        peft_model = PeftModel(target, config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as err:
        raise ExportError(f"{config_path}: the adapter config does not fit the base model "
                          f"({type(err).__name__}: {err})") from err
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except (RuntimeError, KeyError, ValueError) as err:  # shapes that differ from the config's rank / the model
        raise ExportError(f"{weights_path}: the adapter weights do not fit {config_path.name} and the base model "
                          f"({type(err).__name__}: {err})") from err
    adapter_markers = (".lora_", ".modules_to_save.")  # (trainable tokens of a tied lm_head are not saved)
    unloaded = [k for k in result.missing_keys if any(m in k for m in adapter_markers)]
    if result.unexpected_keys or unloaded:
        raise ExportError(f"{weights_path}: adapter does not fit the base model or {config_path.name}; unexpected "
                          f"{sorted(result.unexpected_keys)[:5]}, not loaded {sorted(unloaded)[:5]}")
    merged = peft_model.merge_and_unload()
    if target is model.language_model:
        model.language_model = merged
    else:
        model = merged
    nonfinite, overflow = _merged_weight_problems(model.named_parameters(), dtype)  # one pass per tensor
    bad = sorted(nonfinite - nonfinite_before)
    if bad:  # finite factors whose product overflows float32, e.g. a huge lora_alpha
        raise ExportError(f"{adapter_dir}: merging the adapter gives NaN / inf weights in {_first_five(bad)}"
                          f" (lora_alpha={config.lora_alpha!r}, r={config.r!r} in {config_path.name}); nothing "
                          "written")
    bad = sorted(overflow - nonfinite_before)
    if bad:  # merged weights beyond the saved dtype's range would be saved as inf
        raise ExportError(f"{adapter_dir}: the merged weights of {_first_five(bad)} overflow the base model's dtype "
                          f"{dtype} (NaN / inf); nothing written")
    return model


def load_base_model(base_dir: Path) -> ParrotForCausalLM:
    """The base model in float32, without the adapter saved next to it; ExportError naming the directory when its
    files are unreadable or its weights miss, add or mis-shape tensors (never a randomly initialised tensor).

    transformers' `from_pretrained` applies an `adapter_config.json` it finds in the model directory by itself
    (its peft integration); the merge must start from the bare base, so such a directory is read through a
    temporary view that links every file except the adapter's.
    """
    from .model.builder import load_model_strict

    if not (base_dir / PEFT_CONFIG_NAME).is_file():
        try:
            return load_model_strict(base_dir, dtype=torch.float32)
        except (ValueError, FileNotFoundError) as err:
            raise ExportError(f"base model: {err}") from err
    with tempfile.TemporaryDirectory() as view:
        for path in base_dir.iterdir():
            if path.is_file() and not path.name.startswith("adapter_"):
                (Path(view) / path.name).symlink_to(path.resolve())
        try:
            return load_model_strict(view, dtype=torch.float32)
        except (ValueError, FileNotFoundError) as err:
            raise ExportError(f"base model: {str(err).replace(view, str(base_dir))}") from err


def saved_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint was saved in (config.json `dtype`, `torch_dtype` in transformers 4 files)."""
    raw = json.loads((base_dir / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ExportError(f"{base_dir / 'config.json'}: dtype={name!r} is not a floating-point torch dtype")
    return dtype


def check_base_is_plain(base_dir: Path) -> None:
    """The base must be a plain Parrot model: a run output whose MoLE, PERFT or FactorLLM adapter lies beside its
    model files (`parrot.train.export.ADAPTER_FILES`) is that model only together with the adapter, and the merge
    reads the model files alone, so the output would silently lose the adapter. ExportError naming the files."""
    from .train.export import ADAPTER_FILES

    for kind, names in ADAPTER_FILES.items():
        present = [name for name in names if (base_dir / name).exists()]
        if present:
            raise ExportError(
                f"{base_dir}: the base model holds a {kind} adapter ({', '.join(present)}); its routed experts "
                "mix per token and cannot be folded into plain weights, and merging a LoRA into the model files "
                "alone would silently drop them. Load that model with parrot.train.export.load_trained instead, "
                "or merge into a base without such an adapter")


def check_destination(dst: Path, src: Path, base_dir: Path) -> None:
    """The output folder must not be (or lie inside) the adapter or base folder, and must be new or empty."""
    problem = output_folder_problem(dst, {"--src": src, "--base": base_dir})
    if problem:
        raise ExportError(problem)


def export_merged(src: str | Path, dst: str | Path, base: str | Path | None = None) -> Path:
    """Merge the LoRA adapter in `src` into its base model and write model + processor to `dst`.

    Everything is written into a staging folder next to `dst` that is renamed to `dst` once complete, so a failed
    or interrupted export leaves no `dst` (and never a half-written model that looks complete)."""
    src, dst = Path(src), Path(dst)
    peft_config = check_mergeable(src)
    base_dir = resolve_base(src, Path(base) if base is not None else None, peft_config)
    check_base_is_plain(base_dir)
    check_destination(dst, src, base_dir)
    logger.info("base model %s, adapter %s", base_dir, src)
    model = load_base_model(base_dir)  # (checks config.json first)
    dtype = saved_dtype(base_dir)
    model = merge_lora(model, src, dtype)  # (refuses merged weights that are NaN / inf or overflow dtype)
    model.to(dtype).eval()
    with staged_folder(dst) as staging:  # renamed to dst when complete (flushed first); removed on failure
        model.save_pretrained(staging)
        if (base_dir / PROCESSOR_FILE).is_file():
            ParrotProcessor.from_pretrained(base_dir).save_pretrained(staging)
        else:
            logger.warning("%s has no %s: wrote the model only", base_dir, PROCESSOR_FILE)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parrot.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge-lora", action="store_true", required=True,
                        help="merge a peft LoRA adapter into the base weights (the only export for now)")
    parser.add_argument("--src", required=True, help="adapter dir (adapter_config.json + adapter_model.*)")
    parser.add_argument("--base", help="base Parrot model dir (default: --src itself, else the adapter's "
                                       "base_model_name_or_path)")
    parser.add_argument("--dst", required=True, help="output dir for the merged model + processor")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dst = export_merged(args.src, args.dst, args.base)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.src} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
