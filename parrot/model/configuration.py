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
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

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
        if self.projector_type not in ("linear", "identity") and not _MLP_PROJECTOR.match(self.projector_type):
            raise ValueError(
                f"projector_type={self.projector_type!r} is unknown; use 'linear', 'identity' or 'mlp{{N}}x_gelu'"
            )
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
        if self.vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"vision_select_feature={self.vision_select_feature!r}; use 'patch' or 'cls_patch'")
        if self.use_moe and self.vision_select_feature != "cls_patch":
            raise ValueError("use_moe=True needs vision_select_feature='cls_patch' (the CLS token queries the text)")
        if self.moe_num_experts < 1:
            raise ValueError(f"moe_num_experts={self.moe_num_experts} must be >= 1")
        if self.moe_top_k is not None and not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be None (dense) or in [1, moe_num_experts]")
        if self.image_token_id < 0 or self.image_token_id >= self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is not a token of the text model "
                f"(vocab_size={self.text_config.vocab_size}); add '<image>' to the tokenizer and set it"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")
        # NaN / inf or a zero std would make every pixel value, hence every logit, NaN without an error
        if not all(math.isfinite(v) for v in self.image_mean) or not all(
                math.isfinite(v) and v > 0 for v in self.image_std):
            raise ValueError(f"image_mean {self.image_mean} must be finite and image_std {self.image_std} finite and "
                             "> 0")
        if not math.isfinite(self.moe_weight):
            raise ValueError(f"moe_weight={self.moe_weight} must be a finite number")

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
