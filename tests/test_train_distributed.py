"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU: 2 processes (torchrun + gloo) against a single-process reference.

Two processes with per-device batch b and no accumulation see, at each optimizer step, the same 2b samples as
one process with batch b and 2 accumulation steps (the distributed sampler hands out consecutive batches of the
same seeded permutation), so their weights must agree up to float round-off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parrot.train import train

from .test_train_pipeline import config, make_workspace, weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    torchrun_bin = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun_bin), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "parrot.train",
           *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # A session of its own, so that a hang is cleaned up with every worker (not only the torchrun agent).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{stderr[-6000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def cli_args(ws: dict, out: Path, **overrides) -> list[str]:
    """The command line of `config(ws, out, **overrides)` (same defaults as the in-process runs)."""
    cfg = config(ws, out, **overrides)
    names = ["stage", "model", "data", "data_registry", "output_dir", "learning_rate", "warmup_ratio",
             "logging_steps", "seed", "max_steps", "per_device_batch_size", "global_batch_size", *overrides]
    args = []
    for name in dict.fromkeys(names):
        value, flag = getattr(cfg, name), name.replace("_", "-")
        args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return args + ["--no-progress-bar"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("dist_ws"))


def assert_same_weights(reference: dict, distributed: dict, atol: float = 2e-5) -> None:
    assert reference.keys() == distributed.keys()
    for key in reference:
        assert reference[key].shape == distributed[key].shape, key  # full, not ZeRO-3 shards
        torch.testing.assert_close(distributed[key], reference[key], atol=atol, rtol=1e-4, msg=key)


def test_zero2_two_processes_match_single_process(ws, tmp_path):
    common = dict(max_steps=3, per_device_batch_size=4)
    reference = tmp_path / "single"
    train(config(ws, reference, global_batch_size=8, **common))  # 1 process x 4 x accumulation 2
    out = tmp_path / "zero2"
    proc = torchrun(cli_args(ws, out, global_batch_size=8, deepspeed=str(REPO / "configs/deepspeed/zero2.json"),
                             **common))
    assert "step 3/3" in proc.stderr + proc.stdout
    assert_same_weights(weights(reference), weights(out))
    assert (out / "loss_curve.png").is_file()


def test_zero3_saves_full_weights_of_every_trained_part(ws, tmp_path):
    stage1 = tmp_path / "stage1"
    train(config(ws, stage1, max_steps=1))
    common = dict(stage=2, model=str(stage1), data="qa", tuning="mole", router="topk", lora_targets="q_proj,up_proj",
                  mole_experts=2, mole_top_k=2, lora_dropout=0.0, max_steps=2, per_device_batch_size=4, save_steps=1,
                  keep_last=1, learning_rate=1e-3)  # Adam turns round-off of near-zero gradients into ~lr steps
    reference = tmp_path / "single"
    train(config(ws, reference, global_batch_size=8, **common))
    out = tmp_path / "zero3"
    torchrun(cli_args(ws, out, global_batch_size=8, deepspeed=str(REPO / "configs/deepspeed/zero3.json"), **common))
    # Parrot model files: projector + MoE (trained) and the frozen parts, all at full size.
    assert_same_weights(weights(reference), weights(out))
    before, after = weights(stage1), weights(out)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith(("moe.", "mm_projector.")))
    # MoLE adapters (experts + routers), gathered from the shards.
    assert_same_weights(load_file(str(reference / "mole_adapter.safetensors")),
                        load_file(str(out / "mole_adapter.safetensors")))
    # Checkpoints under DeepSpeed are published atomically and rotated like single-process ones.
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


def test_zero2_bf16_saves_the_float32_masters_in_the_loaded_dtype(ws, tmp_path):
    """DeepSpeed's bf16 mode casts the module to bfloat16 and keeps float32 masters of what trains: the saved model
    is float32 (the dtype the run loaded), the trained projector comes from the masters (not representable in
    bfloat16), the frozen parts are saved as the run used them (bfloat16 values)."""
    out = tmp_path / "zero2_bf16"
    torchrun(cli_args(ws, out, max_steps=2, per_device_batch_size=4, global_batch_size=8, bf16=True,
                      deepspeed=str(REPO / "configs/deepspeed/zero2.json")))
    saved = weights(out)
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    projector = [t for k, t in saved.items() if k.startswith("mm_projector.") and k.endswith("weight")]
    frozen = [t for k, t in saved.items() if k.startswith("language_model.") and k.endswith("weight")]
    assert projector and frozen
    assert all(not torch.equal(t, t.bfloat16().float()) for t in projector)  # float32 masters
    assert all(torch.equal(t, t.bfloat16().float()) for t in frozen)  # the bfloat16 copies the run computed with


def test_deepspeed_without_a_launcher_trains_as_one_process(ws, tmp_path):
    """`python -m parrot.train --deepspeed ...` with no launcher environment (DeepSpeed would try MPI discovery and
    fail on a missing mpi4py): the run sets a one-process rendezvous itself and matches the plain run."""
    common = dict(max_steps=2, per_device_batch_size=4, global_batch_size=4)
    reference = tmp_path / "single"
    train(config(ws, reference, **common))
    out = tmp_path / "ds-one-process"
    args = cli_args(ws, out, deepspeed=str(REPO / "configs/deepspeed/zero2.json"), **common)
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    proc = subprocess.run([sys.executable, "-m", "parrot.train", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "DeepSpeed without a launcher: one process" in proc.stderr + proc.stdout
    assert_same_weights(weights(reference), weights(out))


def test_single_process_rendezvous_leaves_a_launched_process_alone():
    from parrot.train.run import single_process_rendezvous

    launched = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    assert not single_process_rendezvous(launched) and launched == {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    bare: dict[str, str] = {}
    assert single_process_rendezvous(bare)
    assert bare["RANK"] == "0" and bare["WORLD_SIZE"] == "1" and bare["LOCAL_RANK"] == "0"
    with socket.socket() as sock:  # the port it chose was free
        sock.bind(("127.0.0.1", int(bare["MASTER_PORT"])))
