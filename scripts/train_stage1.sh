#!/usr/bin/env bash
# Parrot stage 1 (projector alignment: vision tower + LLM frozen, MoE off). --help lists every argument.
#   scripts/train_stage1.sh --config configs/train/tiny_stage1.yaml
#   scripts/train_stage1.sh --config configs/train/parrot7b_stage1.yaml --llm /models/Qwen1.5-7B-Chat \
#       --vision /models/clip-vit-large-patch14-336
exec "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" 1 configs/deepspeed/zero2.json "$@"
