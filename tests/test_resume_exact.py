"""Exact resume, tensor by tensor: N steps in one go vs k steps, a crash, and --resume to N give the same final model,
adapter, optimizer state, lr schedule, RNG states, trainer state and training record (`torch.equal` everywhere).
Covers gradient accumulation, a mid-epoch and an epoch-boundary resume, DataLoader workers, LoRA / MoLE dropout and
a GW-MoE run (thresholds calibrated before training)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parrot.train import train
from parrot.train.trainer import untied_missing_keys
from tests.test_train_pipeline import CrashAtStep, _Crash, config, make_workspace

TIMING_KEYS = ("tokens_per_s", "eta_s", "train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("resume_ws"))


@pytest.fixture(scope="module")
def stage1(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_stage1") / "run"
    train(config(ws, out))
    return out


def _tensors(value, prefix=""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{index}]")


def _content(path: Path):
    """(tensors, other data) of a checkpoint / output file, timings removed."""
    if path.suffix == ".safetensors":
        return dict(load_file(str(path))), None
    if path.suffix in (".pt", ".pth"):
        loaded = torch.load(path, weights_only=False, map_location="cpu")
        tensors = dict(_tensors(loaded))
        return tensors, None if tensors else loaded
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        entries = data.get("log_history", []) if isinstance(data, dict) else data
        for entry in entries if isinstance(entries, list) else ():
            for key in TIMING_KEYS:
                entry.pop(key, None)
        return {}, data
    return {}, None


def _assert_same_files(a: Path, b: Path, names) -> None:
    for name in names:
        tensors_a, data_a = _content(a / name)
        tensors_b, data_b = _content(b / name)
        assert tensors_a.keys() == tensors_b.keys(), name
        for key in tensors_a:
            assert torch.equal(tensors_a[key], tensors_b[key]), f"{name}{key}"
        assert data_a == data_b, name


@pytest.mark.parametrize("case", [
    # logging every 2 steps, saving every 3: the logged losses too (a resumed run's first window starts at its checkpoint)
    dict(stage=1, max_steps=6, save_steps=3, logging_steps=2, dataloader_workers=2),
    dict(stage=2, data="qa", tuning="lora", lora_dropout=0.3, lora_targets="q_proj,v_proj", max_steps=6,
         save_steps=4, learning_rate=3e-3),
    dict(stage=2, data="qa", tuning="mole", router="gwmoe", lora_dropout=0.2, lora_targets="q_proj", mole_experts=2,
         mole_top_k=1, max_steps=6, save_steps=3, learning_rate=3e-3, dataloader_workers=2,
         gw_calibration_batches=2),
], ids=["stage1_workers_mid_epoch", "lora_dropout_epoch_boundary", "gwmoe_workers_dropout"])
def test_resume_is_bit_identical(ws, stage1, tmp_path, case, caplog):
    case = dict(case)  # global batch 8 = 2 x per-device 4: gradient accumulation 2; 32 records: 4 steps per epoch
    if case["stage"] == 2:
        case["model"] = str(stage1)
    full = train(config(ws, tmp_path / "full", **case))
    with pytest.raises(_Crash):
        train(config(ws, tmp_path / "cut", **case), callbacks=[CrashAtStep(case["save_steps"] + 1)])
    hf_logger = logging.getLogger("transformers")  # HF's loggers do not propagate to the root (caplog's) handler
    hf_logger.addHandler(caplog.handler)
    try:
        resumed = train(config(ws, tmp_path / "cut", resume=True, **case))
    finally:
        hf_logger.removeHandler(caplog.handler)
    assert resumed.losses == full.losses
    # the tiny LLM ties its LM head to the embeddings: the checkpoint holds that weight once, which is not "missing"
    assert not [r.message for r in caplog.records if "missing keys" in r.getMessage()]
    a, b = tmp_path / "full", tmp_path / "cut"
    outputs = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors")
    _assert_same_files(a, b, outputs + ["parrot_training.json", "loss_history.json"])
    last = "checkpoint-6"
    names = sorted(p.name for p in (a / last).iterdir())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(names)
    _assert_same_files(a / last, b / last, [n for n in names if n != "training_args.bin"])


def test_untied_missing_keys_keeps_only_weights_not_loaded_under_another_name():
    tied = torch.nn.Module()
    tied.embed = torch.nn.Embedding(4, 3)
    tied.head = torch.nn.Linear(3, 4, bias=False)
    tied.head.weight = tied.embed.weight
    tied.norm = torch.nn.LayerNorm(3)
    # the LM head's weight is the embedding's (loaded): not missing; the norm's were never saved: missing
    assert untied_missing_keys(tied, ["head.weight", "norm.weight", "norm.bias"]) == ["norm.weight", "norm.bias"]
    # both names of a tied weight missing: it was not loaded under either
    assert untied_missing_keys(tied, ["embed.weight", "head.weight"]) == ["embed.weight", "head.weight"]
    untied = torch.nn.Module()
    untied.embed = torch.nn.Embedding(4, 3)
    untied.head = torch.nn.Linear(3, 4, bias=False)
    assert untied_missing_keys(untied, ["head.weight"]) == ["head.weight"]
