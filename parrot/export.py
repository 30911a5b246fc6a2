"""Export a standalone Parrot checkpoint with plain LoRA (peft) adapters merged into the base weights.

    python -m parrot.export --merge-lora --src runs/stage2-lora/checkpoint-500 --dst runs/parrot-merged
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
no trust_remote_code). The merge runs in float32; weights are saved in the base checkpoint's dtype.

MoLE adapters (`mole_config.json`, `--tuning mole`) are refused: a token's update sum_e p_e(x) B_e A_e x mixes
the experts with router weights p(x) that depend on that token, so it is not one fixed matrix to add to W.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from .data.processor import PROCESSOR_FILE, ParrotProcessor
from .model import ParrotForCausalLM
from .moe.mole import ADAPTER_CONFIG_NAME as MOLE_CONFIG_NAME

logger = logging.getLogger(__name__)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
    """The adapter cannot be merged or does not fit the base model; the message names the file or keys."""


def check_mergeable(adapter_dir: Path) -> dict:
    """The adapter's peft config as a dict; ExportError for MoLE adapters, other peft types or missing files."""
    if (adapter_dir / MOLE_CONFIG_NAME).is_file():
        raise ExportError(
            f"{adapter_dir / MOLE_CONFIG_NAME}: MoLE adapters cannot be merged into the base weights. A MoLE layer "
            "computes W x + sum_e p_e(x) B_e A_e x with router weights p(x) that change from token to token, so "
            "the update is not one fixed matrix that could be added to W (plain LoRA's (alpha / r) B A is). Keep "
            "the adapter next to the model and load both with parrot.train.export.load_trained."
        )
    path = adapter_dir / PEFT_CONFIG_NAME
    if not path.is_file():
        raise ExportError(f"{path}: not found; expected a peft LoRA adapter (adapter_config.json + "
                          "adapter_model.safetensors)")
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "LORA":
        raise ExportError(f"{path}: peft_type={raw.get('peft_type')!r}; only plain LoRA adapters ('LORA') are "
                          "merged here")
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


def adapter_target(model: ParrotForCausalLM, adapter_keys: list[str]) -> torch.nn.Module:
    """The module the adapter was trained on: the whole Parrot model or its language model (from the key paths)."""
    paths = {key.removeprefix(PEFT_PREFIX).split(".lora_")[0] for key in adapter_keys if ".lora_" in key}
    if not paths:
        raise ExportError("the adapter weights hold no lora_A / lora_B tensors")
    for target in (model, model.language_model):
        modules = dict(target.named_modules())
        if paths <= set(modules):
            return target
    unknown = sorted(p for p in paths if p not in dict(model.named_modules())
                     and p not in dict(model.language_model.named_modules()))
    raise ExportError(f"adapter modules not found in the Parrot model or its language model: {unknown[:5]}"
                      + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))


def merge_lora(model: ParrotForCausalLM, adapter_dir: str | Path) -> ParrotForCausalLM:
    """Load a peft LoRA adapter onto `model` (or its language model), merge it and remove the LoRA layers.

    Every adapter tensor must find its module and every injected LoRA weight must be loaded (ExportError).
    """
    from peft import LoraConfig, PeftModel, load_peft_weights, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    check_mergeable(adapter_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    target = adapter_target(model, list(weights))
    peft_model = PeftModel(target, config)
    result = set_peft_model_state_dict(peft_model, weights)
    unloaded = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or unloaded:
        raise ExportError(f"{adapter_dir}: adapter does not fit the base model; unexpected "
                          f"{sorted(result.unexpected_keys)[:5]}, not loaded {sorted(unloaded)[:5]}")
    merged = peft_model.merge_and_unload()
    if target is model.language_model:
        model.language_model = merged
        return model
    return merged


def load_base_model(base_dir: Path) -> ParrotForCausalLM:
    """The base model in float32, without the adapter saved next to it.

    transformers' `from_pretrained` applies an `adapter_config.json` it finds in the model directory by itself
    (its peft integration); the merge must start from the bare base, so such a directory is read through a
    temporary view that links every file except the adapter's.
    """
    if not (base_dir / PEFT_CONFIG_NAME).is_file():
        return ParrotForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as view:
        for path in base_dir.iterdir():
            if path.is_file() and not path.name.startswith("adapter_"):
                (Path(view) / path.name).symlink_to(path.resolve())
        return ParrotForCausalLM.from_pretrained(view, dtype=torch.float32)


def export_merged(src: str | Path, dst: str | Path, base: str | Path | None = None) -> Path:
    """Merge the LoRA adapter in `src` into its base model and write model + processor to `dst`."""
    src, dst = Path(src), Path(dst)
    peft_config = check_mergeable(src)
    base_dir = resolve_base(src, Path(base) if base is not None else None, peft_config)
    logger.info("base model %s, adapter %s", base_dir, src)
    model = load_base_model(base_dir)
    saved_dtype = json.loads((base_dir / "config.json").read_text()).get("dtype") or "float32"
    model = merge_lora(model, src)
    model.to(getattr(torch, saved_dtype)).eval()
    model.save_pretrained(dst)
    if (base_dir / PROCESSOR_FILE).is_file():
        ParrotProcessor.from_pretrained(base_dir).save_pretrained(dst)
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
