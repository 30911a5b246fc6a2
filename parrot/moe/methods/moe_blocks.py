"""Finding the sparse MoE FFN blocks of a Hugging Face MoE causal LM (transformers 5.x layout).

In transformers 5.x the MoE FFN of OLMoE, Mixtral, Qwen2-MoE (and their relatives) is a block with two
children, checked in transformers 5.24 (`OlmoeSparseMoeBlock`, `MixtralSparseMoeBlock`,
`Qwen2MoeSparseMoeBlock`):

- `gate`: a top-k router (`*TopKRouter`) with `weight` (E, D), `top_k`, `num_experts`, whose forward maps
  hidden (T, D) to `(router_logits (T, E), router_scores (T, k), router_indices (T, k))`; the scores are the
  softmax probabilities of the chosen experts, renormalised when the model says so (`norm_topk_prob`,
  always for Mixtral);
- `experts`: all experts' weights stacked in 3-D parameters (`gate_up_proj` (E, 2I, D), `down_proj` (E, D, I)),
  forward `(hidden (T, D), top_k_index (T, k), top_k_weights (T, k)) -> (T, D)`.

The block maps (B, S, D) -> (B, S, D); Qwen2-MoE adds its gated shared expert inside the block.
"""

from __future__ import annotations

import re

import torch.nn as nn

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_moe_block(module: nn.Module) -> bool:
    """True for a transformers 5.x sparse MoE block (see the module docstring)."""
    gate = getattr(module, "gate", None)
    experts = getattr(module, "experts", None)
    return (
        isinstance(gate, nn.Module)
        and isinstance(experts, nn.Module)
        and isinstance(getattr(gate, "weight", None), nn.Parameter)
        and isinstance(getattr(gate, "top_k", None), int)
        and isinstance(getattr(gate, "num_experts", None), int)
    )


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(module name, block)] of every sparse MoE block, in model order; raises if there is none."""
    blocks = [(name, m) for name, m in model.named_modules() if name and is_moe_block(m)]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no sparse MoE block (a module with a top-k `gate` router and stacked "
            "`experts`, as OlmoeSparseMoeBlock / MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock in transformers 5.x)"
        )
    return blocks


def layer_index(module_name: str) -> int:
    """Decoder layer index from a module name ('model.layers.3.mlp' -> 3)."""
    match = _LAYER_INDEX.search(module_name + ".")
    if match is None:
        raise ValueError(f"module name {module_name!r} has no 'layers.<i>.' part")
    return int(match.group(1))
