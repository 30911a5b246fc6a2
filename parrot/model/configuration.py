"""Configurations: `ParrotConfig` (the whole MLLM) and `OpenCLIPVisionConfig` (open_clip towers).

A Parrot checkpoint is one `config.json` holding
- `text_config`: any HF causal-LM config (Qwen2, Llama, ...), resolved through `AutoConfig` by its model_type;
- `vision_config`: either HF `CLIPVisionConfig` (model_type "clip_vision_model") or our
  `OpenCLIPVisionConfig` (model_type "parrot_open_clip_vision"); the backend follows from its model_type;
- the projector and MoE settings as plain fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..data.processor import check_image_normalisation
from ..fileio import is_whole_number

VISION_BACKENDS = {"clip_vision_model": "hf_clip", "parrot_open_clip_vision": "open_clip"}
_MLP_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")

# CLIP's normalisation constants (OpenAI CLIP, also open_clip's OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@strict
class OpenCLIPVisionConfig(PreTrainedConfig):
    """An open_clip vision tower described by its model config (no download, no pretrained tag).

    `vision_cfg` holds the keyword arguments of `open_clip.model.CLIPVisionCfg` (width, layers, patch_size,
    image_size, head_width, ...); `embed_dim` is the CLIP joint embedding size (only the unused output projection
    depends on it). Real towers are loaded with `ParrotForCausalLM.from_parts(vision_path=...)`.
    """

    model_type = "parrot_open_clip_vision"

    vision_cfg: dict | None = None
    embed_dim: int = 512
    quick_gelu: bool = False

    def __post_init__(self, **kwargs):
        if self.vision_cfg is None:
            self.vision_cfg = {"width": 768, "layers": 12, "patch_size": 16, "image_size": 224, "head_width": 64}
        super().__post_init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return int(self.vision_cfg.get("width", 768))

    @property
    def image_size(self) -> int:
        size = self.vision_cfg.get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def patch_size(self) -> int:
        size = self.vision_cfg.get("patch_size", 16)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.vision_cfg.get("layers", 12))


# Sizes a sub-config must hold as whole numbers >= 1 where it has them, by HF's standard attribute names (GPT-2's
# n_embd / n_head / n_layer / n_positions are read through its attribute_map). Torch refuses a negative one only as
# "Trying to create tensor with negative dimension", naming neither the config nor the field; a zero one builds a
# model that cannot compute anything (no heads, no layers, images of no pixels).
_POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "intermediate_size", "vocab_size", "max_position_embeddings", "image_size", "patch_size")
# An open_clip tower's sizes live in its `vision_cfg` (width, layers, head_width, image_size, patch_size).
_OPEN_CLIP_KEYS = {"hidden_size": "width", "num_hidden_layers": "layers", "head_width": "head_width",
                   "image_size": "image_size", "patch_size": "patch_size"}


def check_sub_config_sizes(config: PreTrainedConfig, section: str, given: Mapping | None = None) -> None:
    """Raise a ValueError naming `section.key` when a sub-config's sizes build no working model, for any LLM family
    (the HF config's standard attributes are read) and both vision backends:

    - a size below 1 (`_POSITIVE_SIZES`; torch fails with a raw "negative dimension" error, or builds a model with no
      heads / layers / pixels);
    - a hidden size the attention heads do not divide, where the config gives no head_dim (each head gets
      hidden_size // num_attention_heads: rotary embeddings fail at the first forward, or the heads silently cover
      less than the hidden size), key/value heads that do not divide the attention heads (grouped-query attention
      fails at the first forward), an odd head size under fully rotary position embeddings (fails at the first
      forward).

    An image size the patch size does not divide is allowed: real towers do it (SigLIP so400m/14 at 384 px: 27x27
    patches, the border pixels unused) and `ParrotConfig.num_image_tokens` counts whole patches as the tower does.

    `given`: the settings as written (a recipe's section), so that the message names the key the user wrote and
    marks a value that came from the model type's defaults.
    """
    open_clip = isinstance(config, OpenCLIPVisionConfig)
    written = {} if given is None else (given.get("vision_cfg") or {}) if open_clip else given

    def key(attr: str) -> str:
        if open_clip:
            return f"vision_cfg.{_OPEN_CLIP_KEYS[attr]}"
        stored = config.attribute_map.get(attr, attr)
        return attr if attr in written and stored not in written else stored

    def named(attr: str) -> str:
        value = values(attr)
        value = value[0] if len(value) == 1 else list(value)
        last = key(attr).rsplit(".", 1)[-1]
        default = given is not None and last not in written
        return f"{section}.{key(attr)}={value!r}" + (f" (the {config.model_type} default)" if default else "")

    def values(attr: str) -> tuple:
        if open_clip:
            if attr not in _OPEN_CLIP_KEYS:
                return ()
            value = (config.vision_cfg or {}).get(_OPEN_CLIP_KEYS[attr])
        else:
            value = getattr(config, attr, None)
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return value if value and all(is_whole_number(v) for v in value) else ()  # (other types: HF's own type checks)

    def size(attr: str) -> int | None:
        found = values(attr)
        return found[0] if len(found) == 1 else None

    for attr in (*_POSITIVE_SIZES, "head_width"):
        if any(v < 1 for v in values(attr)):
            raise ValueError(f"{named(attr)} must be a whole number >= 1")
    if open_clip:
        width, head_width = size("hidden_size"), size("head_width")
        if width is not None and head_width is not None and width % head_width:
            raise ValueError(f"{named('hidden_size')} must be a multiple of {named('head_width')} (the tower has "
                             "width / head_width attention heads)")
    elif not getattr(config, "is_heterogeneous", False):
        hidden, heads, kv_heads = size("hidden_size"), size("num_attention_heads"), size("num_key_value_heads")
        head_dim = size("head_dim")
        # (a head_dim the recipe does not give but the config derives as hidden_size // num_attention_heads, as
        # Llama's does, is no choice of head size either)
        derived = head_dim is None or (given is not None and "head_dim" not in written and hidden is not None
                                       and heads is not None and head_dim == hidden // heads)
        if hidden is not None and heads is not None and derived and hidden % heads:
            raise ValueError(f"{named('hidden_size')} must be a multiple of {named('num_attention_heads')} (with no "
                             "head_dim given, each head gets hidden_size / num_attention_heads)")
        if heads is not None and kv_heads is not None and heads % kv_heads:
            raise ValueError(f"{named('num_attention_heads')} must be a multiple of {named('num_key_value_heads')} "
                             "(each key/value head serves a whole group of attention heads)")
        rope = getattr(config, "rope_parameters", None)
        per_head = head_dim if head_dim is not None else hidden // heads if hidden and heads else None
        if isinstance(rope, Mapping) and rope and per_head is not None and per_head % 2:
            layers = [r for r in rope.values() if isinstance(r, Mapping)] or [rope]  # per layer type, or one
            factors = [r.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
                       for r in layers]
            if any(isinstance(f, (int, float)) and int(per_head * f) == per_head for f in factors):
                what = named("head_dim") if head_dim is not None else (
                    f"{named('hidden_size')} / {named('num_attention_heads')} = {per_head}")
                raise ValueError(f"{what}: rotary position embeddings need an even size per attention head")


def check_parrot_settings(settings: Any) -> None:
    """Checks of ParrotConfig's own fields, read as attributes of `settings` (a ParrotConfig, or a recipe's `parrot`
    section over the defaults): a ValueError whose message starts with the offending field's name."""
    if settings.projector_type not in ("linear", "identity") and not _MLP_PROJECTOR.match(settings.projector_type):
        raise ValueError(
            f"projector_type={settings.projector_type!r} is unknown; use 'linear', 'identity' or 'mlp{{N}}x_gelu'"
        )
    if settings.vision_select_feature not in ("patch", "cls_patch"):
        raise ValueError(f"vision_select_feature={settings.vision_select_feature!r}; use 'patch' or 'cls_patch'")
    if settings.use_moe and settings.vision_select_feature != "cls_patch":
        raise ValueError("use_moe=True needs vision_select_feature='cls_patch' (the CLS token queries the text)")
    if settings.moe_num_experts < 1:
        raise ValueError(f"moe_num_experts={settings.moe_num_experts} must be >= 1")
    if settings.moe_intermediate_size is not None and settings.moe_intermediate_size < 1:
        raise ValueError(f"moe_intermediate_size={settings.moe_intermediate_size} must be >= 1 (or null: the text "
                         "model's hidden size)")
    if settings.moe_top_k is not None and not 1 <= settings.moe_top_k <= settings.moe_num_experts:
        raise ValueError(f"moe_top_k={settings.moe_top_k} must be None (dense) or in [1, moe_num_experts]")
    for name in ("image_mean", "image_std"):
        check_image_normalisation(name, getattr(settings, name))
    if not math.isfinite(settings.moe_weight):
        raise ValueError(f"moe_weight={settings.moe_weight} must be a finite number")


@strict
class ParrotConfig(PreTrainedConfig):
    r"""Configuration of `ParrotForCausalLM`.

    Vision features:
        vision_select_layer: index into the tower's hidden states (embeddings output = 0), LLaVA's default -2.
        vision_select_feature: "patch" (drop CLS) or "cls_patch" (CLS first; required by the Parrot MoE, which
            uses the CLS token as the query of its text cross-attention).
    Projector:
        projector_type: "linear", "mlp{N}x_gelu" (N linear layers with GELU between) or "identity".
    Parrot MoE (Sun et al., 2024, sec. 3.2):
        use_moe: apply the text-guided MoE to the projected visual tokens (False in stage 1: identity).
        moe_num_experts (E), moe_intermediate_size (SwiGLU width; None -> text hidden size),
        moe_top_k: None -> dense soft routing over all experts (as the paper / official code); k -> top-k with
            renormalisation.
        use_moe_residual, moe_weight: output = sum_e p_e Expert_e(V) + moe_weight * V when the residual is on.
    Tokens:
        image_token_id: id of the `<image>` placeholder in the tokenizer; each placeholder is replaced by the
            image's visual tokens.
    """

    model_type = "parrot"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = -1
    vision_select_layer: int = -2
    vision_select_feature: Literal["patch", "cls_patch"] = "cls_patch"
    projector_type: str = "mlp2x_gelu"
    use_moe: bool = False
    moe_num_experts: int = 6
    moe_intermediate_size: int | None = None
    moe_top_k: int | None = None
    use_moe_residual: bool = True
    moe_weight: float = 0.1
    image_mean: list[float] | tuple[float, ...] = CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = CLIP_STD
    image_aspect_mode: Literal["pad", "resize", "crop"] = "pad"  # see parrot.data.images.ImageTransform
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # PreTrainedConfig's init sets its own attention / experts implementation (None unless requested) on every
        # sub-config. A sub-config given as an object may be a loaded model's own config (`from_parts` passes the
        # LLM's): reset to None, that model would run with no causal mask (attention over later tokens) and no experts
        # dispatch. Such a sub-config keeps what it holds unless an implementation is requested here.
        kept = {key: (sub._attn_implementation, sub._experts_implementation)
                for key in ("text_config", "vision_config")
                if isinstance(sub := getattr(self, key), PreTrainedConfig)}
        super().__post_init__(**kwargs)
        for key, (attn, experts) in kept.items():
            sub = getattr(self, key)
            if "attn_implementation" not in kwargs and sub._attn_implementation is None:
                sub._attn_implementation = attn
            if "experts_implementation" not in kwargs and sub._experts_implementation is None:
                sub._experts_implementation = experts
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)

    def check_model_settings(self) -> None:
        """Raise a ValueError naming the offending field when the settings cannot build a model."""
        if self.vision_config.model_type not in VISION_BACKENDS:
            raise ValueError(
                f"vision_config.model_type={self.vision_config.model_type!r} is not supported; "
                f"use one of {sorted(VISION_BACKENDS)}"
            )
        check_sub_config_sizes(self.text_config, "text_config")
        check_sub_config_sizes(self.vision_config, "vision_config")
        check_parrot_settings(self)
        vision_hidden, text_hidden = self.vision_config.hidden_size, self.text_config.hidden_size
        if self.projector_type == "identity" and vision_hidden != text_hidden:
            raise ValueError(
                f"projector_type='identity' needs vision_config.hidden_size ({vision_hidden}) == "
                f"text_config.hidden_size ({text_hidden})"
            )
        num_layers = self.vision_config.num_hidden_layers
        if not -(num_layers + 1) <= self.vision_select_layer <= num_layers:
            raise ValueError(
                f"vision_select_layer={self.vision_select_layer} is out of range for a tower with "
                f"{num_layers} layers (hidden states indices {-(num_layers + 1)}..{num_layers})"
            )
        if self.image_token_id < 0 or self.image_token_id >= self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is not a token of the text model "
                f"(vocab_size={self.text_config.vocab_size}); add '<image>' to the tokenizer and set it"
            )

    @property
    def vision_backend(self) -> str:
        return VISION_BACKENDS[self.vision_config.model_type]

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image after feature selection."""
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return patches + (1 if self.vision_select_feature == "cls_patch" else 0)

    @property
    def projector_depth(self) -> int:
        match = _MLP_PROJECTOR.match(self.projector_type)
        return int(match.group(1)) if match else 1
