"""Build a model + processor from a YAML recipe (`configs/*.yaml`), or load a saved one.

- Tiny recipes (with `text_config`/`vision_config`/`tokenizer`) build everything offline: the tokenizer is
  trained on the synthetic world's multilingual text, the weights are random.
- Real recipes give only the Parrot settings; the LLM and the vision tower come from local paths
  (`--llm`, `--vision`), never from a hub.

    python -m parrot.model.builder --recipe configs/tiny.yaml --out runs/tiny-init
    python -m parrot.model.builder --recipe configs/parrot-7b.yaml --llm /models/Qwen1.5-7B-Chat \\
        --vision /models/clip-vit-large-patch14-336 --out runs/parrot-7b-init
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

from ..convert.official import image_normalisation
from ..data.processor import IMAGE_TOKEN, ParrotProcessor, check_template_name
from ..data.templates import get_template
from ..fileio import is_finite_number, is_whole_number, load_yaml, non_negative_int, publish
from .configuration import ParrotConfig, check_parrot_settings, check_sub_config_sizes
from .modeling import ParrotForCausalLM

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TINY_RECIPE = CONFIG_DIR / "tiny.yaml"
_OLD_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")  # a saved model's weight files


@dataclass
class TokenizerRecipe:
    vocab_size: int = 2000
    seed: int = 0


@dataclass
class ModelRecipe:
    parrot: dict = field(default_factory=dict)  # ParrotConfig fields (projector, MoE, vision feature choice)
    text_config: dict | None = None  # tiny recipes only: the LLM's config
    vision_config: dict | None = None  # tiny recipes only: the tower's config
    tokenizer: TokenizerRecipe | None = None  # tiny recipes only: train a tokenizer offline
    template: str = "chatml"
    model_max_length: int = 2048

    @property
    def is_tiny(self) -> bool:
        return self.text_config is not None


def load_recipe(path: str | Path) -> ModelRecipe:
    """Parse a recipe YAML; unknown keys raise a ValueError naming the file and key."""
    path = Path(path)
    raw = load_yaml(path)  # refuses a key given twice, invalid YAML, non-UTF-8 text, naming the file and line
    raw = {} if raw is None else raw  # an empty file; `[]` or `0` are refused below, not read as empty
    known = {f.name for f in dataclasses.fields(ModelRecipe)}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of {sorted(known)}, got {type(raw).__name__} ({raw!r:.80})")
    for key in raw:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r} (known: {sorted(known)})")
    for key in ("parrot", "text_config", "vision_config", "tokenizer"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"{path}: '{key}' must be a mapping of settings, got {type(raw[key]).__name__} "
                             f"({raw[key]!r:.80})")
    if "parrot" in raw and raw["parrot"] is None:
        raw["parrot"] = {}  # an empty section: no settings
    parrot_fields = {f.name for f in dataclasses.fields(ParrotConfig)}
    for key in raw.get("parrot", {}):
        if key not in parrot_fields or key in ("text_config", "vision_config"):
            raise ValueError(f"{path}: unknown key 'parrot.{key}'")
    if (raw.get("text_config") is None) != (raw.get("vision_config") is None):
        raise ValueError(f"{path}: give both 'text_config' and 'vision_config' (tiny recipe) or neither")
    _check_recipe_values(path, raw)
    if raw.get("tokenizer") is not None:
        try:
            raw["tokenizer"] = TokenizerRecipe(**raw["tokenizer"])
        except TypeError as err:
            raise ValueError(f"{path}: bad 'tokenizer' section ({err})") from err
    return ModelRecipe(**raw)


def _fits(value, annotation: str) -> bool | None:
    """Whether a YAML value fits a ParrotConfig field's annotation ("int | None", "Literal['pad', 'crop']",
    "list[float] | tuple[float, ...]", ...); None when the annotation is one this check does not read."""
    verdicts = []
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None":
            verdicts.append(value is None)
        elif part == "bool":
            verdicts.append(isinstance(value, bool))
        elif part == "int":
            verdicts.append(is_whole_number(value))
        elif part == "float":
            verdicts.append(is_finite_number(value))
        elif part == "str":
            verdicts.append(isinstance(value, str))
        elif part in ("list[float]", "tuple[float, ...]"):
            verdicts.append(isinstance(value, list) and all(_fits(v, "float") for v in value))
        elif part.startswith("Literal[") and part.endswith("]"):
            try:
                choices = ast.literal_eval(f"({part[len('Literal['):-1]},)")
            except (ValueError, SyntaxError):
                verdicts.append(None)
                continue
            verdicts.append(isinstance(value, str) and value in choices)
        else:
            verdicts.append(None)
    return True if True in verdicts else None if None in verdicts else False


def _check_recipe_values(path: Path, raw: dict) -> None:
    """Type and range checks of a recipe's values, each error naming the file and the key (`parrot.moe_weight`,
    `text_config.hidden_size`, ...), before anything is built: a wrong type would otherwise fail deep inside the
    model or tokenizer code without naming either, or be used silently (`model_max_length: -1`)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    from ..data.tokenizer import SPECIAL_TOKENS

    if "template" in raw:
        check_template_name(raw["template"], f"{path}: ")
    length = raw.get("model_max_length", 1)
    if not _fits(length, "int") or length < 1:
        raise ValueError(f"{path}: model_max_length={raw['model_max_length']!r} must be a whole number >= 1 (the "
                         "processor's prompt length limit, visual tokens included)")
    smallest_vocab = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
    for key, minimum in (("vocab_size", smallest_vocab), ("seed", 0)):
        value = (raw.get("tokenizer") or {}).get(key, minimum)
        if not _fits(value, "int") or value < minimum:
            raise ValueError(f"{path}: tokenizer.{key}={value!r} must be a whole number >= {minimum}"
                             + (" (the byte alphabet and the special tokens)" if key == "vocab_size" else ""))
    annotations = {f.name: f.type for f in dataclasses.fields(ParrotConfig)}
    for key, value in (raw.get("parrot") or {}).items():
        annotation = annotations.get(key)
        if isinstance(annotation, str) and _fits(value, annotation) is False:
            raise ValueError(f"{path}: parrot.{key}={value!r} must be {annotation}"
                             + (" with finite numbers" if "float" in annotation else ""))
    # ranges and combinations of the Parrot settings (the model's own check, over ParrotConfig's defaults)
    parrot_defaults = {f.name: f.default for f in dataclasses.fields(ParrotConfig)
                       if f.default is not dataclasses.MISSING}
    try:
        check_parrot_settings(SimpleNamespace(**{**parrot_defaults, **(raw.get("parrot") or {})}))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: parrot.{err}") from err
    defaults = {"text_config": "qwen2", "vision_config": "clip_vision_model"}  # as ParrotConfig's sub-configs
    for section, default_type in defaults.items():
        settings = raw.get(section)
        if settings is None:
            continue
        model_type = settings.get("model_type", default_type)
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ValueError(f"{path}: {section}.model_type={model_type!r} is not a model type transformers knows")
        try:  # HF's configs check their fields' types (strict dataclasses); the error names the field
            config = AutoConfig.for_model(model_type, **{k: v for k, v in settings.items() if k != "model_type"})
        except (StrictDataclassError, ValueError, TypeError) as err:
            message = " ".join(str(err).split())
            field = re.match(r"Validation error for field '([^']+)': (.*)", message)
            if field and field.group(1) in settings:
                raise ValueError(f"{path}: {section}.{field.group(1)}={settings[field.group(1)]!r} is refused "
                                 f"({field.group(2)})") from err
            # HF's own architecture checks (hidden size vs heads, ...) name no key: ours name the keys as written
            lenient = _config_without_class_checks(CONFIG_MAPPING[model_type], settings)
            try:
                if lenient is not None:
                    check_sub_config_sizes(lenient, section, given=settings)
            except ValueError as named:
                raise ValueError(f"{path}: {named}") from err
            raise ValueError(f"{path}: bad '{section}' ({type(err).__name__}: {message})") from err
        try:  # sizes of the right type that build no working model (negative, heads not dividing the hidden size, ...)
            check_sub_config_sizes(config, section, given=settings)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _config_without_class_checks(config_class: type, settings: dict):
    """`config_class(**settings)` built without HF's class validators (`validate_architecture`, ...), to name the
    keys behind a refusal; None when it cannot be built so. (`@strict` wraps the plain init and keeps it as
    `__wrapped__`; its field type checks still run.)"""
    init = getattr(config_class.__init__, "__wrapped__", None)
    if init is None:
        return None
    config = config_class.__new__(config_class)
    try:
        init(config, **{k: v for k, v in settings.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - only a better message is at stake; HF's own one is given instead
        return None
    return config


def build_tiny(
    recipe: ModelRecipe | str | Path = TINY_RECIPE, seed: int = 0, **parrot_overrides
) -> tuple[ParrotForCausalLM, ParrotProcessor]:
    """A randomly initialised model from a tiny recipe and its offline-trained tokenizer."""
    from ..data.tokenizer import build_tiny_tokenizer

    if not isinstance(recipe, ModelRecipe):
        recipe = load_recipe(recipe)
    if not recipe.is_tiny:
        raise ValueError("this recipe has no text_config/vision_config; use build_from_local with --llm/--vision")
    tokenizer_recipe = recipe.tokenizer or TokenizerRecipe()
    tokenizer = build_tiny_tokenizer(vocab_size=tokenizer_recipe.vocab_size, seed=tokenizer_recipe.seed)
    text_config = dict(recipe.text_config, vocab_size=len(tokenizer))
    text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
    text_config.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = ParrotConfig(
        text_config=text_config,
        vision_config=recipe.vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        **{**recipe.parrot, **parrot_overrides},
    )
    torch.manual_seed(seed)
    model = ParrotForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if get_template(recipe.template).name != "chatml":
        # build_tiny_tokenizer attaches the ChatML Jinja; a model built for another template must not advertise it
        # (HF's apply_chat_template would render prompts the model is never trained on)
        tokenizer.chat_template = None
    processor = ParrotProcessor.for_model(tokenizer, config, recipe.template, recipe.model_max_length)
    return model, processor


def build_from_local(
    recipe: ModelRecipe | str | Path, llm_path: str, vision_path: str, **parrot_overrides
) -> tuple[ParrotForCausalLM, ParrotProcessor]:
    """Stage-1 initialisation from a local LLM checkpoint (with its tokenizer) and a local CLIP tower.

    `<image>` is added to the LLM's tokenizer as a special token when missing (the embeddings grow by one row,
    unless the LLM's embedding matrix is padded beyond its tokenizer, as Qwen's is, and already has a row for it).
    Images are normalised with the tower's `image_mean` / `image_std` when its folder has a `preprocessor_config.json`
    (as `parrot.convert` reads them: a tower trained with other statistics than CLIP's keeps them); values the recipe
    or `parrot_overrides` give explicitly win.
    """
    if not isinstance(recipe, ModelRecipe):
        recipe = load_recipe(recipe)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tower_dir = Path(vision_path)
    try:
        normalisation = image_normalisation(tower_dir) if tower_dir.is_dir() else {}  # an open_clip file has none
    except OSError as err:  # (a malformed file is a ConversionError naming it and the value already)
        raise ValueError(f"{tower_dir / 'preprocessor_config.json'}: cannot read the tower's image_mean / image_std "
                         f"({type(err).__name__}: {err})") from err
    model = ParrotForCausalLM.from_parts(
        llm_path, vision_path, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vocab_size=len(tokenizer), **{**normalisation, **recipe.parrot, **parrot_overrides},
    )
    processor = ParrotProcessor.for_model(tokenizer, model.config, recipe.template, recipe.model_max_length)
    return model, processor


def _check_saved_config(directory: Path) -> None:
    """config.json must be a readable JSON object of a Parrot model (not, e.g., a plain LLM's config)."""
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json, not a saved Parrot model")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory}: cannot load the saved model ({path}: {type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{directory}: cannot load the saved model ({path}: expected a JSON object, got "
                         f"{type(raw).__name__})")
    if raw.get("model_type") != ParrotConfig.model_type:
        raise ValueError(f"{path}: model_type={raw.get('model_type')!r}, not a Parrot model config "
                         f"({ParrotConfig.model_type!r}); load_pretrained reads a saved ParrotForCausalLM directory")


def load_model_strict(directory: str | Path, *, final_model_checked: bool = False, **kwargs) -> ParrotForCausalLM:
    """`ParrotForCausalLM.from_pretrained(directory, **kwargs)` that fails (ValueError naming the directory or file)
    instead of initialising missing, unexpected or mis-shaped tensors randomly, and on unreadable files. A run's
    output folder whose final-model save was interrupted, or whose files differ from those its training record
    lists, is refused (`parrot.train.export.check_final_model`, skipped when the caller has run it on `directory`:
    `final_model_checked`); folders without a record (converted or official checkpoints, builder outputs) are not
    affected."""
    from ..train.export import check_final_model  # lazy: parrot.train imports this module

    directory = Path(directory)
    if not final_model_checked:
        check_final_model(directory)  # a run's final model cut off mid-save, or changed since: refused by name
    _check_saved_config(directory)
    # HF only warns about missing / unexpected tensors and randomly initialises the missing ones (mis-shaped ones
    # too with ignore_mismatched_sizes, else it raises without naming them); a saved Parrot model must load
    # completely. Tied weights (lm_head) and non-persistent buffers (rotary inv_freq) are not reported by HF, so
    # any report is a real mismatch.
    try:
        model, info = ParrotForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                        ignore_mismatched_sizes=True, **kwargs)
    except (OSError, json.JSONDecodeError, SafetensorError) as err:  # unreadable config.json or weights file
        raise ValueError(f"{directory}: cannot load the saved model ({type(err).__name__}: {err})") from err
    except (ValueError, TypeError, KeyError, RuntimeError) as err:  # settings of config.json that build no model
        raise ValueError(f"{directory / 'config.json'}: cannot build the saved model "
                         f"({type(err).__name__}: {err})") from err

    def describe(entry) -> str:  # mismatched keys come as (name, saved shape, model shape)
        if isinstance(entry, tuple) and len(entry) == 3:
            return f"{entry[0]} saved {tuple(entry[1])} vs model {tuple(entry[2])}"
        return str(entry)

    problems = {what: sorted(describe(k) for k in info.get(what) or ())
                for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        details = "; ".join(f"{what.replace('_', ' ')}: {keys}" for what, keys in problems.items())
        raise ValueError(f"{directory}: the saved weights do not match the model of its config.json ({details})")
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():  # HF falls back to defaults on an unreadable one (other eos / pad tokens)
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{generation_path}: cannot read the generation settings "
                             f"({type(err).__name__}: {err})") from err
    return model


def load_pretrained(directory: str | Path, *,
                    final_model_checked: bool = False) -> tuple[ParrotForCausalLM, ParrotProcessor]:
    """A saved Parrot model directory (model + processor files) -> (model in eval mode, processor).
    `final_model_checked`: the caller has run `check_final_model` on `directory` (see `load_model_strict`)."""
    directory = Path(directory)
    model = load_model_strict(directory, final_model_checked=final_model_checked)
    try:
        processor = ParrotProcessor.from_pretrained(directory)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as err:  # tokenizer files
        raise ValueError(f"{directory}: cannot load the processor / tokenizer files "
                         f"({type(err).__name__}: {err})") from err
    mismatches = processor.mismatches(model.config)
    if mismatches:
        raise ValueError(f"{directory}: parrot_processor.json / tokenizer do not match config.json (processor vs "
                         f"model): {'; '.join(mismatches)}")
    return model.eval(), processor


def save_pretrained(model: ParrotForCausalLM, processor: ParrotProcessor, directory: str | Path) -> Path:
    """Save model + processor as the folder `directory`, all or nothing: the files are written into a staging
    folder beside it, flushed, and the folder is published under its name (`parrot.fileio.publish`), so a crash or a
    full disk leaves the previous folder (or none) there, never a partly written or mixed model.

    An existing `directory` is replaced (as writing into it used to overwrite its model) only when nothing else would
    be lost: every entry in it is a file this save writes again, or an older weight file (`model*.safetensors`,
    its index), which HF's own save would delete too. Anything else (checkpoint folders, a training record, your own
    files) is refused with FileExistsError naming those entries, and the folder is left as it was."""
    directory = Path(directory).resolve()  # a name to publish under, also for "." or "out/"
    staging = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        _refuse_losing_files(directory, {p.name for p in staging.iterdir()})
        publish(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _refuse_losing_files(directory: Path, written: set[str]) -> None:
    """FileExistsError unless replacing `directory` loses only files the save writes again or older weight files."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; choose another output path")
    kept = sorted(p.name for p in directory.iterdir()
                  if not (p.is_file() and (p.name in written or _OLD_WEIGHTS.match(p.name))))
    if kept:
        raise FileExistsError(f"{directory} holds {kept[:10]}, which a saved model does not hold; replacing the "
                              "folder would delete them: choose a new or empty output folder, or delete them first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parrot.model.builder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(TINY_RECIPE), help="model recipe YAML (configs/)")
    parser.add_argument("--llm", help="local causal-LM checkpoint dir (real recipes)")
    parser.add_argument("--vision", help="local CLIP checkpoint dir or open_clip state file (real recipes)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except (OSError, ValueError) as err:  # the message names the recipe file and key: no traceback to read past
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if recipe.is_tiny:
        model, processor = build_tiny(recipe, seed=args.seed)
    else:
        if not (args.llm and args.vision):
            parser.error(f"{args.recipe} is a real-scale recipe: give --llm and --vision local paths")
        model, processor = build_from_local(recipe, args.llm, args.vision)
    save_pretrained(model, processor, args.out)
    print(f"saved {model.num_parameters():,}-parameter Parrot model to {args.out}")


if __name__ == "__main__":
    main()
