"""Vision-to-language projectors (LLaVA): linear, mlp{N}x_gelu, identity."""

from __future__ import annotations

import torch.nn as nn

from .configuration import ParrotConfig


def build_projector(config: ParrotConfig) -> nn.Module:
    """(B, N_v, D_v) -> (B, N_v, D). Layer layout matches LLaVA's `mm_projector` so its weights load by name."""
    vision_hidden, text_hidden = config.vision_config.hidden_size, config.text_config.hidden_size
    if config.projector_type == "identity":
        return nn.Identity()
    if config.projector_type == "linear":
        return nn.Linear(vision_hidden, text_hidden)
    layers: list[nn.Module] = [nn.Linear(vision_hidden, text_hidden)]
    for _ in range(1, config.projector_depth):
        layers += [nn.GELU(), nn.Linear(text_hidden, text_hidden)]
    return nn.Sequential(*layers)
