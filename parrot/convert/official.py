"""Convert a checkpoint saved by the official AIDC-AI/Parrot code into this package's format.

The official model (`ParrotQwen2ForCausalLM`, `model_type` "parrot_qwen2"; Sun et al., 2024, arXiv 2406.02539)
is a Qwen2 causal LM whose `model` also owns the multimodal parts. Its checkpoint names map to ours as

    model.{embed_tokens,layers,norm}.*                      -> language_model.model.*
    lm_head.weight                                          -> language_model.lm_head.weight
    model.mm_projector.*  (linear / mlp{N}x_gelu)           -> mm_projector.*          (same layer indices)
    model.vision_tower.vision_tower[.vision_model].*        -> vision_tower.model.*    (HF CLIPVisionModel)
    model.moe_model.gate.weight               (E, D)        -> moe.router.gate.weight  (E, D)
    model.moe_model.experts.{e}.gate_proj.weight  (I, D)    -> moe.experts.gate_proj[e] (D, I)   (transposed,
    model.moe_model.experts.{e}.up_proj.weight    (I, D)    -> moe.experts.up_proj[e]   (D, I)    stacked over e:
    model.moe_model.experts.{e}.down_proj.weight  (D, I)    -> moe.experts.down_proj[e] (I, D)    x @ W layout)

and its config keys to `ParrotConfig`: `mm_projector_type` -> projector_type, `mm_vision_select_layer` /
`mm_vision_select_feature` -> vision_select_layer / vision_select_feature, `num_experts` -> moe_num_experts,
`moe_intermediate_size`, `use_moe`, `use_moe_residual`, `moe_weight`, `image_aspect_ratio` -> image_aspect_mode.
Where a key is absent the official forward's own default applies (`MultilingualMoE`: use_moe=True,
use_moe_residual=True, moe_weight=1.0; `CLIPVisionTower`: select_feature "patch"; projector "linear").
The official MoE always routes densely over all experts (its `moe_top_k` is never used), so moe_top_k=None.

The official code has no `<image>` token: its `tokenizer_image_token` splits the prompt at the literal text
"<image>" and inserts the sentinel id -200. Here `<image>` is added to the tokenizer as a special token; it
takes the first free id (Qwen's embedding matrix is padded beyond the tokenizer, so no resize is needed), and
otherwise the embeddings and the LM head grow by rows equal to the mean of the existing rows.

The vision tower's architecture is read from `--vision DIR` (an HF CLIP / CLIPVision checkpoint), else from
`mm_vision_tower` when that is a local directory, else from `KNOWN_VISION_TOWERS` by name. Its weights come
from the checkpoint (the official trainer saves the whole state dict) or, when absent there, from that directory.

Generation defaults: the checkpoint's `generation_config.json` (sampling settings, lengths, eos / pad ids) is carried
over, its token ids checked against the tokenizer and the converted tokenizer's eos / pad kept consistent with it
(`generation_settings`); without one, eos and pad are the converted tokenizer's.

Output: `dst` must be a new or empty folder outside `src` and the vision directory; everything is written into a
staging folder beside it, renamed to `dst` when complete. Every checkpoint tensor is saved in its own dtype (the
config's `dtype` is the one holding most elements), tensors from elsewhere in that dtype: one copy of the model in
memory, never a widened one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, GenerationConfig, PreTrainedTokenizerBase

from ..data.processor import IMAGE_TOKEN, ParrotProcessor, check_image_normalisation, check_template_name
from ..fileio import is_finite_number, is_whole_number, output_folder_problem, read_json_mapping, staged_folder
from ..model import ParrotConfig, ParrotForCausalLM
from ..model.parrot_moe import ParrotMoEProjector
from ..model.vision import load_pretrained_vision_model

logger = logging.getLogger(__name__)

OFFICIAL_IMAGE_TOKEN_INDEX = -200  # the official sentinel id for "<image>" (parrot/utils/constants.py)
# Official model_type -> the HF model_type of its language model (the official code ships only Qwen2).
OFFICIAL_TEXT_MODEL_TYPES = {"parrot_qwen2": "qwen2"}
# Keys the official code adds to the LLM config (multimodal, MoE and training settings): not part of the LLM.
OFFICIAL_EXTRA_KEYS = frozenset({
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_patch_merge_type", "use_mm_proj", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr",
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "num_experts", "moe_hidden_size",
    "use_moe", "use_moe_residual", "moe_intermediate_size", "moe_top_k", "moe_weight", "architectures",
    "model_type", "auto_map", "transformers_version", "_name_or_path",
})
_COMMON_CLIP = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
# Vision towers the official recipes use, by the name `mm_vision_tower` holds (hub id or a path ending in it).
KNOWN_VISION_TOWERS: dict[str, dict] = {
    "clip-vit-large-patch14-336": dict(_COMMON_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "clip-vit-large-patch14": dict(_COMMON_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
}
_EXPERT = re.compile(r"^model\.moe_model\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_VISION_PREFIX = "model.vision_tower.vision_tower."


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message names the file, config key or tensors."""


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; ConversionError naming the file (see `fileio.read_json_mapping`)."""
    return read_json_mapping(path, f"the {what}", ConversionError)


def _checked(path: Path, key: str, value, kind: type, low: float | None = None, high: float | None = None,
             open_low: bool = False):
    """`value` of `key` checked to be of `kind` -- int (not bool), float (a finite int or float) or bool -- and within
    [low, high] (`open_low`: > low); ConversionError naming the file and key otherwise (never a silent int("3"),
    int(2.7) or bool("false")). Returns it, a float for `kind` float."""
    ok = (isinstance(value, bool) if kind is bool else is_whole_number(value) if kind is int
          else is_finite_number(value) if kind is float else isinstance(value, kind))
    ok = ok and (low is None or value > low or (value == low and not open_low)) and (high is None or value <= high)
    if not ok:
        wanted = {int: "a whole number", float: "a finite number", bool: "true or false"}.get(kind, kind.__name__)
        bounds = [f"{'>' if open_low else '>='} {low}"] if low is not None else []
        bounds += [f"<= {high}"] if high is not None else []
        limits = " and ".join(bounds)
        raise ConversionError(f"{path}: {key}={value!r} must be {wanted}" + (f" {limits}" if limits else ""))
    return float(value) if kind is float else value


def _typed(raw: dict, key: str, kind: type, path: Path, default=None, minimum: float | None = None):
    """raw[key] (`default` when absent / null) checked by `_checked` (>= `minimum`)."""
    value = raw.get(key)
    return default if value is None else _checked(path, key, value, kind, low=minimum)


@dataclass(frozen=True)
class OfficialSettings:
    """What an official `config.json` says beyond the language model."""

    vision_tower: str
    projector_type: str
    select_layer: int
    select_feature: str
    has_moe: bool  # the official model builds `moe_model` only when `moe_hidden_size` is in the config
    use_moe: bool
    num_experts: int
    moe_hidden_size: int | None
    moe_intermediate_size: int | None
    use_moe_residual: bool
    moe_weight: float
    image_aspect_mode: str
    model_max_length: int | None


# --- reading the source ----------------------------------------------------------------------------------------
def read_official_config(src: Path) -> tuple[dict, OfficialSettings]:
    """(the language model's config dict with its HF model_type, the multimodal settings)."""
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found; --src must be an official Parrot checkpoint directory")
    raw = _read_json_object(path, "checkpoint config")
    model_type = raw.get("model_type")
    if model_type not in OFFICIAL_TEXT_MODEL_TYPES:
        raise ConversionError(f"{path}: model_type={model_type!r}; an official Parrot checkpoint has one of "
                              f"{sorted(OFFICIAL_TEXT_MODEL_TYPES)}")
    for key in ("mm_vision_tower", "mm_vision_select_layer"):
        if key not in raw:
            raise ConversionError(f"{path}: key {key!r} is missing (needed to rebuild the vision tower)")
    merge_type = raw.get("mm_patch_merge_type", "flat")
    if merge_type != "flat":
        raise ConversionError(f"{path}: mm_patch_merge_type={merge_type!r} is not supported (only 'flat')")
    if raw.get("mm_use_im_start_end", False):
        raise ConversionError(f"{path}: mm_use_im_start_end=true is not supported (the official code has no "
                              "image start/end tokens either)")
    aspect = raw.get("image_aspect_ratio")  # the official default (absent / None) is CLIP's own preprocessing
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise ConversionError(f"{path}: image_aspect_ratio={aspect!r} (LLaVA-NeXT's multi-crop grid) is not "
                              "supported; parrot feeds one image of image_size x image_size")
    # The official code pads to a square for "pad" and otherwise runs the CLIP image processor: shortest side
    # resized, then a centre crop (parrot's "crop" mode).
    image_aspect_mode = "pad" if aspect == "pad" else "crop"
    has_moe = "moe_hidden_size" in raw
    if has_moe:
        for key in ("num_experts", "moe_intermediate_size"):
            if raw.get(key) is None:
                raise ConversionError(f"{path}: key {key!r} is missing but moe_hidden_size is set")
        num_experts = _typed(raw, "num_experts", int, path, minimum=1)
    else:  # no MoE in the checkpoint: the fresh (unused) one gets the config's count when it is a usable one
        value = raw.get("num_experts")
        num_experts = value if is_whole_number(value) and value >= 1 else 1
    for key in ("mm_vision_tower", "mm_projector_type", "mm_vision_select_feature"):
        if key in raw and not isinstance(raw[key], str):
            raise ConversionError(f"{path}: {key}={raw[key]!r} must be a string")
    if raw["mm_vision_select_layer"] is None:
        raise ConversionError(f"{path}: mm_vision_select_layer=null; it must be a whole number (e.g. -2)")
    settings = OfficialSettings(
        vision_tower=raw["mm_vision_tower"],
        projector_type=raw.get("mm_projector_type", "linear"),
        select_layer=_typed(raw, "mm_vision_select_layer", int, path),
        select_feature=raw.get("mm_vision_select_feature", "patch"),
        has_moe=has_moe,
        use_moe=has_moe and _typed(raw, "use_moe", bool, path, default=True),
        num_experts=num_experts,
        moe_hidden_size=_typed(raw, "moe_hidden_size", int, path, minimum=1),
        moe_intermediate_size=_typed(raw, "moe_intermediate_size", int, path, minimum=1),
        use_moe_residual=_typed(raw, "use_moe_residual", bool, path, default=True),
        moe_weight=_typed(raw, "moe_weight", float, path, default=1.0),
        image_aspect_mode=image_aspect_mode,
        # (the processor's prompt-length limit: a NaN / 0 / negative one would turn the length checks off)
        model_max_length=_typed(raw, "tokenizer_model_max_length", int, path, minimum=1),
    )
    if has_moe and settings.moe_hidden_size != raw.get("hidden_size"):
        raise ConversionError(f"{path}: moe_hidden_size={settings.moe_hidden_size} differs from hidden_size="
                              f"{raw.get('hidden_size')}; the Parrot MoE runs in the LLM's hidden size")
    text_config = {k: v for k, v in raw.items() if k not in OFFICIAL_EXTRA_KEYS}
    text_config["model_type"] = OFFICIAL_TEXT_MODEL_TYPES[model_type]
    return text_config, settings


def load_checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF-style checkpoint: sharded or single, safetensors or PyTorch `.bin`."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = _read_json_object(index_path, "checkpoint shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ConversionError(f"{index_path}: 'weight_map' must be an object of tensor name -> shard file")
            files = sorted(set(weight_map.values()))
            break
    else:
        files = [name for name in ("model.safetensors", "pytorch_model.bin") if (directory / name).is_file()][:1]
    if not files:
        raise ConversionError(f"{directory}: no model.safetensors / pytorch_model.bin (or their .index.json)")
    missing = [name for name in files if not (directory / name).is_file()]  # before reading gigabytes of the rest
    if missing:
        raise ConversionError(f"{directory}: shard(s) listed in the checkpoint index but missing: {missing}")
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(files, desc="reading shards", disable=len(files) < 2):
        path = directory / name
        try:
            if name.endswith(".safetensors"):
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # SafetensorError, unpickling errors, truncated files: name the file
            raise ConversionError(f"{path}: cannot read the weights ({type(err).__name__}: {err})") from err
    return state


def vision_config_for(settings: OfficialSettings, vision_dir: Path | None) -> CLIPVisionConfig:
    """The CLIP vision tower's config (see the module docstring for where it comes from)."""
    local = vision_dir or (Path(settings.vision_tower) if Path(settings.vision_tower).is_dir() else None)
    if local is not None:
        if not (local / "config.json").is_file():
            raise ConversionError(f"{local}: no config.json; --vision must be an HF CLIP checkpoint directory")
        config = AutoConfig.from_pretrained(local)
        config = config.vision_config if hasattr(config, "vision_config") else config  # a full CLIPConfig
        if not isinstance(config, CLIPVisionConfig):
            raise ConversionError(f"{local}: model_type={config.model_type!r}; only CLIP towers are supported")
        return config
    name = settings.vision_tower.rstrip("/").rsplit("/", 1)[-1]
    if name not in KNOWN_VISION_TOWERS:
        raise ConversionError(f"mm_vision_tower={settings.vision_tower!r} is neither a local directory nor a known "
                              f"tower ({sorted(KNOWN_VISION_TOWERS)}); pass --vision DIR (a local CLIP checkpoint)")
    return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])


def image_normalisation(vision_dir: Path | None) -> dict:
    """image_mean / image_std from the tower's `preprocessor_config.json` when there is one."""
    path = vision_dir / "preprocessor_config.json" if vision_dir is not None else None
    if path is None or not path.is_file():
        return {}
    raw = _read_json_object(path, "vision tower's image preprocessing settings")
    found = {key: raw[key] for key in ("image_mean", "image_std") if key in raw}
    for key, value in found.items():  # named here: the model's own check could only name the checkpoint's config
        check_image_normalisation(key, value, f"{path}: ", ConversionError)
    return found


# --- mapping ---------------------------------------------------------------------------------------------------
def _our_name(name: str) -> str | None:
    """Our parameter name for an official (non-expert) tensor name; None for names we do not know."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith(_VISION_PREFIX):
        rest = name[len(_VISION_PREFIX):]
        return "vision_tower.model." + rest.removeprefix("vision_model.")  # CLIPVisionModel drops vision_model.
    if name.startswith("model.mm_projector."):
        return name[len("model."):]
    if name == "model.moe_model.gate.weight":
        return "moe.router.gate.weight"
    if name.startswith(("model.moe_model.", "model.image_newline")):
        return None
    if name.startswith("model."):
        return "language_model." + name
    return None


def _stack_experts(state: dict[str, torch.Tensor], num_experts: int, hidden: int, inner: int,
                   problems: list[str]) -> dict[str, torch.Tensor]:
    """Official per-expert nn.Linear weights -> our stacked (E, D, I) / (E, I, D) tensors (x @ W layout)."""
    linear_shape = {"gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}
    stacked = {}
    for proj, shape in linear_shape.items():
        per_expert = []
        for e in range(num_experts):
            key = f"model.moe_model.experts.{e}.{proj}.weight"
            if key not in state:
                problems.append(f"missing: {key}")
            elif tuple(state[key].shape) != shape:
                problems.append(f"mis-shaped: {key} is {tuple(state[key].shape)}, expected {shape}")
            else:
                per_expert.append(state[key].t())
        if len(per_expert) == num_experts:
            stacked[f"moe.experts.{proj}"] = torch.stack(per_expert).contiguous()  # (E, D, I) or (E, I, D)
    return stacked


def map_official_state_dict(
    state: dict[str, torch.Tensor], config: ParrotConfig, expected: dict[str, tuple[int, ...]],
    with_moe: bool, optional_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Rename/reshape official tensors to ours and check them against `expected` (our names -> shapes).

    `with_moe`: the checkpoint must hold the MoE (`model.moe_model.*`). Keys under `optional_prefixes` may be
    missing (the caller fills them). Raises ConversionError listing every missing, mis-shaped and unknown tensor
    by its official name.
    """
    problems: list[str] = []
    mapped: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            embeddings = state.get("model.embed_tokens.weight")
            if embeddings is None or not torch.equal(tensor, embeddings):
                problems.append("unexpected: lm_head.weight differs from model.embed_tokens.weight although the "
                                "config ties them (tie_word_embeddings=true)")
            continue  # a saved copy of the tied embeddings
        expert = _EXPERT.match(name)
        if expert is not None and with_moe and int(expert.group(1)) < config.moe_num_experts:
            continue  # stacked below
        ours = _our_name(name) if expert is None else None
        if ours is None or ours not in expected or (ours.startswith("moe.") and not with_moe):
            problems.append(f"unexpected: {name}")
            continue
        mapped[ours], source_of[ours] = tensor, name
    if with_moe:
        hidden, inner = config.text_config.hidden_size, config.moe_intermediate_size or config.text_config.hidden_size
        mapped.update(_stack_experts(state, config.moe_num_experts, hidden, inner, problems))
        source_of.update({f"moe.experts.{p}": f"model.moe_model.experts.*.{p}.weight"
                          for p in ("gate_proj", "up_proj", "down_proj")})
    for ours, shape in expected.items():
        if ours in mapped:
            if tuple(mapped[ours].shape) != shape:
                problems.append(f"mis-shaped: {source_of[ours]} is {tuple(mapped[ours].shape)}, expected {shape}")
        elif not ours.startswith(optional_prefixes) and not ours.startswith("moe.experts."):
            problems.append(f"missing: {official_name(ours)}")  # (missing experts are named by _stack_experts)
    if problems:
        raise ConversionError("the checkpoint does not match its config:\n  " + "\n  ".join(sorted(set(problems))))
    return mapped


def official_name(ours: str) -> str:
    """The official checkpoint name of one of our tensors (for error messages)."""
    if ours == "language_model.lm_head.weight":
        return "lm_head.weight"
    if ours.startswith("language_model."):
        return ours[len("language_model."):]
    if ours.startswith("vision_tower.model."):
        return _VISION_PREFIX + "vision_model." + ours[len("vision_tower.model."):]
    if ours == "moe.router.gate.weight":
        return "model.moe_model.gate.weight"
    return "model." + ours


def expected_tensors(config: ParrotConfig) -> dict[str, tuple[int, ...]]:
    """Our model's saved tensors (tied weights once) and their shapes, from a meta-device instance (no memory)."""
    with torch.device("meta"):
        model = ParrotForCausalLM(config)
    seen: set[int] = set()
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


# --- tokenizer -------------------------------------------------------------------------------------------------
def prepare_tokenizer(src: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with the official special-token roles and an atomic `<image>` token.

    As the official loader: pad = `<|endoftext|>`, eos = `<|im_end|>` (Qwen ChatML) when the vocabulary has them.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError) as err:  # no or unreadable tokenizer files
        raise ConversionError(f"{src}: cannot load the checkpoint's tokenizer (the official checkpoint ships its Qwen "
                              f"tokenizer: tokenizer.json or vocab.json + merges.txt, tokenizer_config.json) "
                              f"({type(err).__name__}: {err})") from err
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        tokenizer.pad_token = "<|endoftext|>"
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def _grow_vocab(state: dict[str, torch.Tensor], new_size: int) -> None:
    """Append rows (the mean of the existing rows) to the embeddings and the untied LM head."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            weight = state[key]
            extra = weight.float().mean(0, keepdim=True).to(weight.dtype).expand(new_size - weight.shape[0], -1)
            state[key] = torch.cat([weight, extra])


# --- generation defaults ---------------------------------------------------------------------------------------
GENERATION_FILE = "generation_config.json"
# Settings of a generation_config.json checked here, as HF reads them without a word (a string temperature, top_p 2,
# a negative max_length, do_sample "yes") and fails, or samples differently, only inside generate():
# key -> (kind, lowest, highest, lowest excluded).
_GENERATION_VALUES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "do_sample": (bool, None, None, False), "temperature": (float, 0, None, True), "top_p": (float, 0, 1, True),
    "top_k": (int, 0, None, False), "min_p": (float, 0, 1, False), "typical_p": (float, 0, 1, True),
    "repetition_penalty": (float, 0, None, True), "length_penalty": (float, None, None, False),
    "max_length": (int, 1, None, False), "max_new_tokens": (int, 1, None, False),
    "min_length": (int, 0, None, False), "min_new_tokens": (int, 0, None, False), "num_beams": (int, 1, None, False),
    "num_return_sequences": (int, 1, None, False), "no_repeat_ngram_size": (int, 0, None, False),
}
_GENERATION_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_settings(src: Path, tokenizer: PreTrainedTokenizerBase, image_token_id: int) -> GenerationConfig:
    """The converted model's generation defaults (written as its generation_config.json).

    The checkpoint's own generation_config.json, when it has one, is carried over (its sampling settings, lengths and
    token ids: `generate()` of the converted model behaves as the official one's); a malformed one is refused naming
    the file and key. Its token ids must be tokens of the checkpoint's tokenizer (the conversion only appends
    `<image>`, so every such id still means the same token). The converted tokenizer's roles are then kept
    consistent, each change logged: its eos (`<|im_end|>` for a Qwen tokenizer, as the official loader sets it) is
    added to the eos ids when missing, and pad is the tokenizer's pad (the id the processor pads prompts with).
    Without the file: eos and pad are the converted tokenizer's."""
    path = src / GENERATION_FILE
    if not path.is_file():
        return GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    raw = _read_json_object(path, "generation settings")
    for key, value in raw.items():
        if key in _GENERATION_VALUES and value is not None:
            kind, low, high, open_low = _GENERATION_VALUES[key]
            _checked(path, key, value, kind, low, high, open_low)

    def token(token_id: int | None) -> str:
        return "none" if token_id is None else repr(tokenizer.convert_ids_to_tokens(token_id))

    for key in _GENERATION_TOKENS:
        value = raw.get(key)
        ids = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is None:
            continue
        for token_id in ids:
            if not is_whole_number(token_id):
                raise ConversionError(f"{path}: {key}={value!r} must be a token id (a whole number)"
                                      + (" or a list of them" if key == "eos_token_id" else ""))
            if token_id == image_token_id:
                raise ConversionError(f"{path}: {key}={value!r}: {token_id} is the id of the image placeholder "
                                      f"{IMAGE_TOKEN!r} in the converted tokenizer, not a token of the checkpoint's")
            if not 0 <= token_id < len(tokenizer):
                raise ConversionError(f"{path}: {key}={value!r}: {token_id} is not a token of the checkpoint's "
                                      f"tokenizer ({len(tokenizer)} tokens with {IMAGE_TOKEN!r})")
    try:
        generation = GenerationConfig.from_pretrained(src)
    except (OSError, ValueError, TypeError) as err:  # HF's own checks (max_new_tokens 0, early_stopping "x", ...)
        raise ConversionError(f"{path}: cannot read the generation settings ({type(err).__name__}: "
                              f"{' '.join(str(err).split())})") from err

    eos = generation.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        if eos_ids:
            logger.warning("%s: eos_token_id=%s (%s) does not hold the converted tokenizer's eos %s (id %d); adding "
                           "it, so that generate() also stops where the tokenizer ends an answer", path, eos,
                           ", ".join(token(i) for i in eos_ids), token(tokenizer.eos_token_id), tokenizer.eos_token_id)
        eos_ids.append(tokenizer.eos_token_id)
    if eos_ids:
        generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if generation.pad_token_id is not None and generation.pad_token_id != tokenizer.pad_token_id:
        logger.warning("%s: pad_token_id=%s (%s) is not the converted tokenizer's pad %s (id %s), which the processor "
                       "pads prompts with; using the tokenizer's", path, generation.pad_token_id,
                       token(generation.pad_token_id), token(tokenizer.pad_token_id), tokenizer.pad_token_id)
    generation.pad_token_id = tokenizer.pad_token_id
    logger.info("generation settings from %s: %s", path, generation.to_diff_dict())
    return generation


# --- the conversion --------------------------------------------------------------------------------------------
def convert_official(
    src: str | Path, dst: str | Path, vision: str | Path | None = None, template: str = "chatml",
    model_max_length: int | None = None, max_shard_size: str = "5GB",
) -> Path:
    """Read an official Parrot checkpoint in `src`, write our model + processor to `dst`; returns `dst`.

    Nothing is written when the checkpoint does not match its config (ConversionError names the tensors).
    """
    src, dst = Path(src), Path(dst)
    vision_dir = Path(vision) if vision is not None else None
    if model_max_length is not None and (not is_whole_number(model_max_length) or model_max_length < 1):
        raise ConversionError(f"model_max_length (--model-max-length)={model_max_length!r}: the processor's prompt "
                              "length limit must be a whole number >= 1 (leave it out for the checkpoint's "
                              "tokenizer_model_max_length, else 2048)")
    check_template_name(template, name="template (--template)", error=ConversionError)  # before reading the checkpoint
    check_destination(dst, src, vision_dir)
    text_config, settings = read_official_config(src)
    tokenizer = prepare_tokenizer(src)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    generation = generation_settings(src, tokenizer, image_token_id)  # (before reading the weights)
    logger.info("reading %s", src)
    state = load_checkpoint_tensors(src)
    dtype = main_dtype(state)

    if image_token_id >= text_config["vocab_size"]:
        logger.info("growing the vocabulary %d -> %d for %s", text_config["vocab_size"], len(tokenizer), IMAGE_TOKEN)
        _grow_vocab(state, len(tokenizer))
        text_config["vocab_size"] = len(tokenizer)
    text_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision_config = vision_config_for(settings, vision_dir)
    config = ParrotConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        vision_select_layer=settings.select_layer,
        vision_select_feature=settings.select_feature,
        projector_type=settings.projector_type,
        use_moe=settings.use_moe,
        moe_num_experts=settings.num_experts,
        moe_intermediate_size=settings.moe_intermediate_size,
        moe_top_k=None,
        use_moe_residual=settings.use_moe_residual,
        moe_weight=settings.moe_weight,
        image_aspect_mode=settings.image_aspect_mode,
        # (the official tower reads its CLIPImageProcessor from the same directory as its config)
        **image_normalisation(vision_dir or (Path(settings.vision_tower) if Path(settings.vision_tower).is_dir()
                                             else None)),
    )
    try:
        config.check_model_settings()
    except ValueError as err:
        raise ConversionError(f"{src / 'config.json'}: {err}") from err
    config.dtype = str(dtype).removeprefix("torch.")

    expected = expected_tensors(config)
    has_vision_weights = any(k.startswith(_VISION_PREFIX) for k in state)
    optional = ("vision_tower.",) if not has_vision_weights else ()
    if not settings.has_moe:
        optional += ("moe.",)  # saved without `moe_model`: the MoE is off and gets fresh (unused) weights
    mapped = map_official_state_dict(state, config, expected, settings.has_moe, optional)
    # Tensors from the checkpoint keep their dtype; those from --vision or freshly initialised get `dtype`.
    if not has_vision_weights:
        mapped.update({k: v.to(dtype) for k, v in _vision_weights(settings, vision_dir, vision_config).items()})
    if not settings.has_moe:
        mapped.update({k: v.to(dtype) for k, v in _fresh_moe(config).items()})
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ConversionError("missing tensors after conversion: " + ", ".join(missing))
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(f"{name}: shape {tuple(tensor.shape)} from --vision, expected {expected[name]}")

    # Written into a staging folder beside dst, renamed when complete: a failed or interrupted conversion leaves no
    # dst (never a half-written folder that looks like a model).
    with staged_folder(dst) as staging:
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        logger.info("writing %d tensors to %s", len(mapped), dst)
        save_torch_state_dict({k: v.contiguous() for k, v in mapped.items()}, staging, max_shard_size=max_shard_size)
        # (the first one given: both are checked to be whole numbers >= 1 above, so none is replaced silently)
        max_length = next(v for v in (model_max_length, settings.model_max_length, 2048) if v is not None)
        ParrotProcessor.for_model(tokenizer, config, template, max_length).save_pretrained(staging)
    return dst


def check_destination(dst: Path, src: Path, vision_dir: Path | None) -> None:
    """dst must be a new or empty folder that is not (and does not lie inside) --src or --vision: the conversion
    never overwrites files (writing into the source would delete its weight shards, which share their names with
    the output's)."""
    problem = output_folder_problem(dst, {"--src": src, "--vision": vision_dir})
    if problem:
        raise ConversionError(problem)


def main_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype holding the most elements of the checkpoint (its language model's): the output
    config's `dtype`. Tensors are saved in the dtype they have (a float32 tensor in a bfloat16 checkpoint stays
    float32), so nothing is rounded and no second copy of the model is made."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _vision_weights(settings: OfficialSettings, vision_dir: Path | None,
                    vision_config: CLIPVisionConfig) -> dict[str, torch.Tensor]:
    local = vision_dir or (Path(settings.vision_tower) if Path(settings.vision_tower).is_dir() else None)
    if local is None:
        raise ConversionError(f"the checkpoint holds no vision tower weights ({_VISION_PREFIX}*) and "
                              f"mm_vision_tower={settings.vision_tower!r} is not local; pass --vision DIR")
    logger.info("vision tower weights from %s", local)
    tower = load_pretrained_vision_model(str(local), vision_config)
    return {f"vision_tower.model.{k}": v for k, v in tower.state_dict().items()}


def _fresh_moe(config: ParrotConfig) -> dict[str, torch.Tensor]:
    """A freshly initialised (and unused: use_moe is off) MoE for a checkpoint saved without one."""
    return {f"moe.{k}": v for k, v in ParrotMoEProjector(config).state_dict().items()}
