"""Stage-wise Parrot training on the HF Trainer (+ DeepSpeed): `python -m parrot.train --stage 1|2 ...`.

- `config`: `TrainConfig` (every setting; CLI and YAML), `parse_args`.
- `stages`: `apply_stage` (what trains in stage 1 / 2, LoRA / MoLE injection), `describe_trainable`.
- `trainer`: `ParrotTrainer` (MoLE aux loss, NaN stop, tokens/s, atomic checkpoints), `NonFiniteLossError`.
- `checkpoints`: atomic publication, keep-last-k, latest checkpoint.
- `export`: full-weight gathering (ZeRO-3), LoRA folding, MoLE adapter files, `load_trained`.
- `run`: `train(cfg) -> TrainResult`.
"""

from .config import TrainConfig, parse_args
from .export import load_trained
from .run import TrainResult, train
from .trainer import NonFiniteLossError

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "load_trained", "parse_args", "train"]
