"""DeepSpeed ZeRO-3 with CPU offload (`configs/deepspeed/zero3_offload.json`) on CPU: 2 processes (torchrun + gloo).

The first run on a machine JIT-compiles DeepSpeed's `cpu_adam` op (about 1.5 min on 2 cores, then cached in
~/.cache/torch_extensions); later runs take about 25 s each.
"""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from parrot.moe.mole import MoLELinear
from parrot.train import load_trained, train
from parrot.train import deepspeed_setup
from parrot.train.config import TrainConfig, parse_args
from parrot.train.deepspeed_setup import (DeepSpeedSetupError, check_deepspeed_config, check_deepspeed_offload,
                                          find_build_tools, needs_cpu_adam, warn_about_deepspeed_optimizer)

from .test_train_distributed import REPO, assert_same_weights, cli_args, torchrun
from .test_train_pipeline import config, make_workspace, weights

OFFLOAD = str(REPO / "configs/deepspeed/zero3_offload.json")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("offload_ws"))


def logged(directory) -> dict[int, tuple[float, float]]:
    """{step: (loss, learning rate)} of a run's loss_history.json."""
    return {e["step"]: (e["loss"], e["learning_rate"]) for e in json.loads((directory / "loss_history.json").read_text())}


@pytest.mark.slow
def test_zero3_offload_matches_single_process_and_resumes(ws, tmp_path):
    """Stage 2 (MoLE) under ZeRO-3 + CPU offload of parameters and optimizer: the same weights, adapters and logged
    learning rates as one process (weight decay on: like every other mode, no decay on biases and norms), the saved
    model loads back, and a run resumed from checkpoint-2 ends where the uninterrupted run ended."""
    common = dict(stage=2, data="qa", tuning="mole", router="topk", lora_targets="q_proj,up_proj", mole_experts=2,
                  mole_top_k=2, lora_dropout=0.0, max_steps=4, per_device_batch_size=4, global_batch_size=8,
                  save_steps=2, keep_last=0, weight_decay=0.5, learning_rate=1e-2)
    reference = tmp_path / "single"
    train(config(ws, reference, **common))  # 1 process x 4 x accumulation 2
    out = tmp_path / "offload"
    torchrun(cli_args(ws, out, deepspeed=OFFLOAD, **common))

    assert_same_weights(weights(reference), weights(out))
    assert_same_weights(load_file(str(reference / "mole_adapter.safetensors")),
                        load_file(str(out / "mole_adapter.safetensors")))
    ref_log, out_log = logged(reference), logged(out)
    assert sorted(out_log) == [1, 2, 3, 4]
    for step, (loss, lr) in ref_log.items():  # the lr each step trained with (not the next step's)
        assert out_log[step][1] == pytest.approx(lr, rel=1e-6), (step, out_log[step], ref_log[step])
        assert out_log[step][0] == pytest.approx(loss, rel=1e-5), step
    model, _ = load_trained(out)  # base weights + MoLE adapter
    assert sum(isinstance(m, MoLELinear) for m in model.language_model.modules()) == 4  # 2 layers x 2 targets

    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(out / "checkpoint-2", cut / "checkpoint-2")
    shutil.copy(out / "train_config.json", cut / "train_config.json")
    torchrun(cli_args(ws, cut, deepspeed=OFFLOAD, resume=True, **common))
    resumed_log = logged(cut)
    assert sorted(resumed_log) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint, 3-4 retrained
    for step in (3, 4):
        assert resumed_log[step][0] == pytest.approx(out_log[step][0], rel=1e-6), step
    # DeepSpeed's CPU Adam keeps beta^t as a running float32 product but recomputes it with pow() after a resume
    # (deepspeed/ops/csrc/includes/cpu_adam.h, IncrementStep): the resumed updates may differ in the last bit.
    for name in ("model.safetensors", "mole_adapter.safetensors"):
        full, resumed = load_file(str(out / name)), load_file(str(cut / name))
        assert full.keys() == resumed.keys()
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6, msg=key)


def test_deepspeed_configs_leave_the_optimizer_to_the_trainer(caplog):
    """An "optimizer" section would decay biases and norms and shift the logged lr (see the test above): the
    shipped configs have none, and a user's config with one gets a warning."""
    for path in sorted((REPO / "configs/deepspeed").glob("*.json")):
        assert "optimizer" not in json.loads(path.read_text()), path
    def args(config):
        return SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=config), deepspeed="ds.json", weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger="parrot.train"):
        warn_about_deepspeed_optimizer(SimpleNamespace(hf_deepspeed_config=None))
        warn_about_deepspeed_optimizer(args(json.loads((REPO / "configs/deepspeed/zero3_offload.json").read_text())))
        assert not caplog.records
        warn_about_deepspeed_optimizer(args({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    assert "ds.json defines its own optimizer" in caplog.text and "biases and norms" in caplog.text


# ---- preflight: ZeRO-Offload needs DeepSpeed's cpu_adam op, prebuilt or buildable (no build in these tests) ----


def _bin(tmp_path, *tools: str):
    """A folder holding stand-in executables `tools`, to be the whole PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in tools:
        exe = folder / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return folder


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """No prebuilt op, PATH = an empty folder (fill it with `_bin`), no $CXX."""
    monkeypatch.setattr(deepspeed_setup, "cpu_adam_prebuilt", lambda: False)
    monkeypatch.setenv("PATH", str(_bin(tmp_path)))
    monkeypatch.delenv("CXX", raising=False)
    return tmp_path


def test_offload_preflight_passes_on_this_machine():
    """This container has a C++ compiler, ninja and Python.h: the shipped offload config passes, as a TrainConfig
    too; configs without an optimizer offload do not need the op."""
    tools = find_build_tools()
    assert tools.compiler and tools.ninja and tools.python_headers and tools.missing() == []
    check_deepspeed_config(OFFLOAD)
    assert TrainConfig(deepspeed=OFFLOAD).deepspeed == OFFLOAD
    assert needs_cpu_adam(json.loads((REPO / "configs/deepspeed/zero3_offload.json").read_text()))
    for name in ("zero2", "zero3"):
        assert not needs_cpu_adam(json.loads((REPO / f"configs/deepspeed/{name}.json").read_text()))


def test_offload_preflight_names_the_config_and_the_missing_compiler(bare_machine, monkeypatch, capsys):
    _bin(bare_machine, "ninja")
    with pytest.raises(DeepSpeedSetupError, match=r"zero3_offload\.json: offload_optimizer device 'cpu'") as err:
        check_deepspeed_config(OFFLOAD)
    assert "a C++ compiler: 'c++' is not on PATH and $CXX is not set" in str(err.value)
    assert "ninja" not in str(err.value).split("lacks:")[1].split(". Install")[0]  # ninja is there
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):  # before any model is built: at the config
        TrainConfig(stage=2, deepspeed=OFFLOAD)
    with pytest.raises(SystemExit):
        parse_args(["--deepspeed", OFFLOAD])
    assert "zero3_offload.json" in capsys.readouterr().err
    _bin(bare_machine, "g++")  # torch calls c++ (or $CXX), never g++ by itself: say how to use it
    with pytest.raises(DeepSpeedSetupError, match="export CXX=g\\+\\+"):
        check_deepspeed_config(OFFLOAD)
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(DeepSpeedSetupError, match=r"\$CXX='no-such-c\+\+' is not an executable"):
        check_deepspeed_config(OFFLOAD)
    monkeypatch.setenv("CXX", "g++")
    check_deepspeed_config(OFFLOAD)


def test_offload_preflight_names_missing_ninja_and_python_headers(bare_machine, monkeypatch, tmp_path):
    _bin(bare_machine, "c++")
    with pytest.raises(DeepSpeedSetupError, match=r"lacks: ninja \(pip install ninja"):
        check_deepspeed_config(OFFLOAD)
    _bin(bare_machine, "ninja")
    check_deepspeed_config(OFFLOAD)
    monkeypatch.setattr(deepspeed_setup.sysconfig, "get_path", lambda *a, **k: str(tmp_path / "no_headers"))
    with pytest.raises(DeepSpeedSetupError, match=r"the Python headers: no Python\.h in .*no_headers"):
        check_deepspeed_config(OFFLOAD)


def test_offload_preflight_skips_configs_without_cpu_adam(bare_machine, tmp_path):
    # no optimizer offload, or a torch optimizer allowed on the CPU: no cpu_adam, nothing to check
    for ds_config in ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
                      {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}},
                      {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False}):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds_config))
        check_deepspeed_config(path)
    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}}
    with pytest.raises(DeepSpeedSetupError, match="ds.json: offload_optimizer device 'nvme'"):
        check_deepspeed_offload(SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=nvme), deepspeed="ds.json"))
    check_deepspeed_offload(SimpleNamespace(hf_deepspeed_config=None, deepspeed=None))
    with pytest.raises(ValueError, match="missing.json: cannot read a DeepSpeed config"):
        check_deepspeed_config(tmp_path / "missing.json")
