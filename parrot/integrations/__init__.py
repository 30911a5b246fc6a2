"""Adapters that let other tools use this package's checkpoints.

- `vlmevalkit.ParrotVLMEval`: a VLMEvalKit model (`generate(message, dataset)`, `use_custom_prompt`,
  `build_prompt`, `set_dump_image`) for `run.py --model` evaluation; VLMEvalKit is not needed to import it.
"""

from .vlmevalkit import ParrotVLMEval

__all__ = ["ParrotVLMEval"]
