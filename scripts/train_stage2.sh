#!/usr/bin/env bash
# Parrot stage 2 (instruction tuning: projector + MoE + LLM, full / LoRA / MoLE), from the stage-1 output.
# --help lists every argument.
#   scripts/train_stage2.sh --config configs/train/tiny_stage2.yaml
#   scripts/train_stage2.sh --config configs/train/parrot7b_stage2.yaml
#   scripts/train_stage2.sh --model runs/tiny-stage1 --data synthetic-qa --tuning mole --router dynmole \
#       --output-dir runs/tiny-stage2-mole
exec "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" 2 configs/deepspeed/zero3.json "$@"
