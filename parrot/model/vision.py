"""Vision towers: HF `CLIPVisionModel` or an open_clip ViT, returning one hidden layer's tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .configuration import OpenCLIPVisionConfig, ParrotConfig


def build_open_clip_visual(config: OpenCLIPVisionConfig) -> nn.Module:
    """An open_clip `VisionTransformer` from a model config, randomly initialised (never downloads)."""
    from open_clip.model import _build_vision_tower  # the builder open_clip's own CLIP class uses

    return _build_vision_tower(config.embed_dim, dict(config.vision_cfg), quick_gelu=config.quick_gelu)


class VisionTower(nn.Module):
    """pixel_values (B, 3, H, W) -> visual tokens (B, N_v, D_v) of the selected hidden layer.

    `select_layer` indexes hidden states as HF does (0 = embeddings output, -1 = last block, LLaVA uses -2);
    `select_feature` "patch" drops the CLS token, "cls_patch" keeps it first.
    """

    def __init__(self, config: ParrotConfig, model: nn.Module | None = None):
        super().__init__()
        vision_config = config.vision_config
        self.backend = config.vision_backend
        self.select_feature = config.vision_select_feature
        num_layers = vision_config.num_hidden_layers
        self.select_layer = config.vision_select_layer % (num_layers + 1)  # as an index into hidden states
        if self.backend == "open_clip" and self.select_layer == 0:
            raise ValueError("vision_select_layer selects the embeddings output, unsupported for open_clip towers")
        if model is not None:
            self.model = model
        elif self.backend == "hf_clip":
            self.model = CLIPVisionModel(vision_config)
        else:
            self.model = build_open_clip_visual(vision_config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.dtype)
        if self.backend == "hf_clip":
            hidden = self.model(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]  # (B, 1+P, D_v)
        else:
            out = self.model.forward_intermediates(
                pixel_values, indices=[self.select_layer - 1], stop_early=True, intermediates_only=True,
                output_fmt="NLC", output_extra_tokens=True,
            )
            hidden = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        return hidden if self.select_feature == "cls_patch" else hidden[:, 1:]


def load_pretrained_vision_model(path: str, config: CLIPVisionConfig | OpenCLIPVisionConfig) -> nn.Module:
    """Weights of a real tower from a local path: an HF CLIP(-vision) checkpoint dir, or an open_clip state file."""
    if isinstance(config, CLIPVisionConfig):
        return CLIPVisionModel.from_pretrained(path, dtype=torch.float32)  # as the LLM and projector: one dtype
    visual = build_open_clip_visual(config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # open_clip checkpoints hold the whole CLIP; keep the visual tower's entries.
    prefix = "visual."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    visual.load_state_dict(state, strict=True)
    return visual
