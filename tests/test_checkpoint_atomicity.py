"""Atomic checkpoints and final model: a run killed (SIGKILL) or failing while it writes a checkpoint, rotates old
ones or saves its final model never leaves a partial folder that looks complete, never loses the checkpoint to
resume from or the previous final model, and `--resume` still reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parrot import fileio
from parrot.model.builder import load_pretrained
from parrot.train import checkpoints, load_trained, train
from parrot.train.export import FINAL_SAVE_MARKER, IncompleteFinalModelError
from tests.test_train_pipeline import config, make_workspace

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                    "training_args.bin")


def _fake_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (folder / name).write_text(json.dumps({"global_step": step}) if name == "trainer_state.json" else "x")
    return folder


def _assert_published_checkpoints_complete(output_dir: Path) -> list[str]:
    names = []
    for folder in checkpoints.list_checkpoints(output_dir):
        missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
        assert not missing, f"{folder.name} looks published but lacks {missing}"
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
        assert folder.name == f"checkpoint-{step}"
        names.append(folder.name)
    return names


# --- unit level: rotation and publication -----------------------------------------------------------------------
def test_rotation_interrupted_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    real_rmtree = fileio.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process "dies"
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(fileio.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.rotate(tmp_path, 1)
    assert _assert_published_checkpoints_complete(tmp_path) in (["checkpoint-2", "checkpoint-3"], ["checkpoint-3"])
    monkeypatch.setattr(fileio.shutil, "rmtree", real_rmtree)
    checkpoints.remove_stale_staging(tmp_path)  # what the next run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_publish_cut_at_every_rename_keeps_a_complete_folder_under_the_name(tmp_path, monkeypatch):
    """Replacing checkpoint-2 by a re-saved one: whichever rename a crash stops before, after the next run's clean-up
    checkpoint-2 is complete and is the old folder or the new one (never lost, as when both leftovers were deleted)."""
    real_rename = Path.rename
    for cut in range(4):
        root = tmp_path / f"cut{cut}"
        _fake_checkpoint(root / "checkpoint-2", 2)
        staged = _fake_checkpoint(checkpoints.staging_dir(root, 2), 2)
        (staged / "model.safetensors").write_text("new")
        calls = []

        def crash_on(path, target, cut=cut, calls=calls):
            calls.append(target)
            if len(calls) > cut:
                raise KeyboardInterrupt("killed between renames")
            return real_rename(path, target)

        monkeypatch.setattr(Path, "rename", crash_on)
        try:
            fileio.publish(staged, root / "checkpoint-2")
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(Path, "rename", real_rename)
        checkpoints.remove_stale_staging(root)
        assert _assert_published_checkpoints_complete(root) == ["checkpoint-2"], cut
        content = (root / "checkpoint-2" / "model.safetensors").read_text()
        assert content == ("x" if cut < 2 else "new"), cut  # the new one once its rename happened
        assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"], cut


def test_rotation_keeps_the_newest_and_survives_an_undeletable_folder(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fileio.shutil, "rmtree", refuse)
    checkpoints.rotate(tmp_path, 1)  # a warning, not a crashed training run
    assert _assert_published_checkpoints_complete(tmp_path) == ["checkpoint-3"]


def test_publish_over_an_existing_folder_of_the_same_step(tmp_path):
    old = _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    (old / "stale.txt").write_text("old")
    staged = _fake_checkpoint(checkpoints.staging_dir(tmp_path, 4) / "checkpoint-4", 4)
    fileio.publish(staged, checkpoints.checkpoint_dir(tmp_path, 4))
    assert not (tmp_path / "checkpoint-4" / "stale.txt").exists()
    assert _assert_published_checkpoints_complete(tmp_path) == ["checkpoint-4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deleting")]


# --- the final model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("atomic_ws"))


def _disk_full_midway(real_save):
    def save(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        path = Path(directory) / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])  # the device filled up mid-file
        raise OSError(28, "No space left on device (simulated)")

    return save


def test_failed_final_save_keeps_the_previous_final_model(ws, tmp_path, monkeypatch):
    """A disk-full error while a final model is written over an earlier one leaves the earlier one as it was, and
    no half-written files in the output folder."""
    from parrot.model import ParrotForCausalLM
    from parrot.model.builder import load_pretrained
    from parrot.train.export import save_final_model

    out = tmp_path / "run"
    train(config(ws, out, max_steps=2))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    model, processor = load_pretrained(out)
    with torch.no_grad():
        model.mm_projector[0].weight.add_(1.0)  # a different model
    monkeypatch.setattr(ParrotForCausalLM, "save_pretrained", _disk_full_midway(ParrotForCausalLM.save_pretrained))
    with pytest.raises(OSError, match="No space left"):
        save_final_model(model, processor, out, training_info={"stage": 1, "tuning": None})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    load_pretrained(out)


def test_failed_final_save_on_resume_keeps_the_previous_final_model(ws, tmp_path, monkeypatch):
    """The same through `train`: resuming a finished run (its last checkpoint is its last step) only saves the
    final model again; a disk-full error there leaves the previous one complete, and the next attempt succeeds."""
    from parrot.model import ParrotForCausalLM

    out = tmp_path / "run"
    settings = dict(max_steps=2, save_steps=2)
    train(config(ws, out, **settings))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_save = ParrotForCausalLM.save_pretrained
    monkeypatch.setattr(ParrotForCausalLM, "save_pretrained", _disk_full_midway(real_save))
    with pytest.raises(OSError, match="No space left"):
        train(config(ws, out, resume=True, **settings))
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for name in ("model.safetensors", "config.json", "parrot_training.json", "parrot_processor.json"):
        assert after[name] == before[name], name
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]  # no step past max_steps
    monkeypatch.setattr(ParrotForCausalLM, "save_pretrained", real_save)
    result = train(config(ws, out, resume=True, **settings))  # the next attempt cleans up and completes
    assert result.global_step == 2 and [s for s, _ in result.losses] == [1, 2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    final, last = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in last)


def test_resume_from_the_last_step_trains_no_step_past_max_steps(ws, tmp_path, monkeypatch):
    """Stopped while saving the final model (mid-epoch: 3 of 4 steps per epoch), the run's last checkpoint is its
    last step; --resume must save that state as the final model, not train step 4."""
    from parrot.data.processor import ParrotProcessor

    settings = dict(max_steps=3, save_steps=1, keep_last=1)
    reference = train(config(ws, tmp_path / "reference", **settings))
    real_save = ParrotProcessor.save_pretrained

    def crash(self, directory):
        raise KeyboardInterrupt("stopped while saving the final model")

    monkeypatch.setattr(ParrotProcessor, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config(ws, tmp_path / "cut", **settings))
    monkeypatch.setattr(ParrotProcessor, "save_pretrained", real_save)
    resumed = train(config(ws, tmp_path / "cut", resume=True, **settings))
    assert resumed.global_step == 3
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "cut")] == ["checkpoint-3"]
    assert dict(resumed.losses) == dict(reference.losses)
    expected = load_file(str(tmp_path / "reference" / "model.safetensors"))
    final = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def _crash_while_moving_final_files(monkeypatch, at: str) -> list[str]:
    """os.replace from the final model's staging folder raises (a kill) when it reaches the file `at`; returns the
    names moved before."""
    real, moved = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(src).parent.name == checkpoints.FINAL_STAGING:
            if Path(dst).name == at:
                raise KeyboardInterrupt("killed while moving the final model into the output folder")
            moved.append(Path(dst).name)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return moved


def test_final_save_cut_off_while_moving_is_refused_and_resume_saves_it(ws, tmp_path, monkeypatch):
    """Killed while the final model's files move into the output folder (the new weights there, its processor not):
    the loaders and a fresh run refuse the folder naming the interrupted save and --resume; re-running with
    --resume restores the last checkpoint (the run's last step: no step trained) and saves the final model again."""
    out = tmp_path / "run"
    settings = dict(max_steps=2, save_steps=2)
    moved = _crash_while_moving_final_files(monkeypatch, "parrot_processor.json")
    with pytest.raises(KeyboardInterrupt):
        train(config(ws, out, **settings))
    monkeypatch.undo()
    assert "model.safetensors" in moved and (out / FINAL_SAVE_MARKER).is_file()
    for load in (load_pretrained, load_trained):
        with pytest.raises(IncompleteFinalModelError, match=rf"{out}: the final-model save .* interrupted.*--resume"):
            load(out)
    with pytest.raises(FileExistsError, match=rf"{out}: the final-model save .* interrupted.*--resume"):
        train(config(ws, out, **settings))  # the same command again, without --resume
    result = train(config(ws, out, resume=True, **settings))
    assert result.global_step == 2 and [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    model, _ = load_trained(out)
    last = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], last[k]) for k in last)


# --- SIGKILL at chosen points, in a subprocess -------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, os, signal, shutil, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tests.test_train_pipeline import config
    from parrot.train import checkpoints, train
    from parrot.train.trainer import ParrotTrainer
    ws = {{"registry": Path({registry!r}), "init": Path({init!r})}}
    out, kill_at, resume = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    calls = {{"n": 0}}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "checkpoint":  # the 3rd checkpoint: model and optimizer written, rng state and trainer state not
        real = ParrotTrainer._save_rng_state
        def rng(self, output_dir):
            calls["n"] += 1
            if calls["n"] == 3:
                die()
            real(self, output_dir)
        ParrotTrainer._save_rng_state = rng
    elif kill_at == "rotation":  # deleting the oldest checkpoint, one file gone
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            files = [p for p in Path(path).rglob("*") if p.is_file()]
            if "checkpoint-" not in Path(path).name or not files:
                return real_rmtree(path, *args, **kwargs)
            files[0].unlink()
            die()
        shutil.rmtree = rmtree
    elif kill_at == "final":  # the final model's weights written, the rest not
        from parrot.data.processor import ParrotProcessor
        def save(self, directory):
            die()
        ParrotProcessor.save_pretrained = save
    elif kill_at == "moving":  # the final model's weights moved into the output folder, the rest not
        real_replace = os.replace
        def replace(src, dst):
            if Path(src).parent.name == checkpoints.FINAL_STAGING and Path(dst).name == "parrot_processor.json":
                die()
            real_replace(src, dst)
        os.replace = replace
    settings = dict(stage=1, max_steps=4, save_steps=1, keep_last=2)
    train(config(ws, out, resume=resume, **settings))
    print("finished")
""")


def _run_child(script: Path, out: Path, kill_at: str, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, str(script), str(out), kill_at, "1" if resume else "0"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_sigkill_while_saving_never_publishes_a_partial_folder_and_resume_is_exact(ws, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), registry=str(ws["registry"]), init=str(ws["init"])))
    kill_points = ("checkpoint", "rotation", "final", "moving")
    # Independent runs, each in its own folder: two at a time (most of a child's time is its imports, one core each).
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda kill_at: _run_child(script, tmp_path / kill_at, kill_at, False),
                              ("none", *kill_points)))
    reference, killed_runs = runs[0], dict(zip(kill_points, runs[1:]))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = load_file(str(tmp_path / "none" / "model.safetensors"))

    for kill_at, killed in killed_runs.items():
        out = tmp_path / kill_at
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-3000:])
        published = _assert_published_checkpoints_complete(out)
        assert published, kill_at
        if kill_at == "final":  # nothing of a half-saved final model lies in the output folder
            assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
        if kill_at == "moving":  # the new weights without the rest: refused by name
            with pytest.raises(IncompleteFinalModelError, match="interrupted"):
                load_pretrained(out)
    with ThreadPoolExecutor(2) as pool:
        resumed_runs = dict(zip(kill_points, pool.map(
            lambda kill_at: _run_child(script, tmp_path / kill_at, "none", True), kill_points)))
    for kill_at, resumed in resumed_runs.items():
        out = tmp_path / kill_at
        assert resumed.returncode == 0, (kill_at, resumed.stderr[-3000:])
        assert _assert_published_checkpoints_complete(out) == ["checkpoint-3", "checkpoint-4"]
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], kill_at
        final = load_file(str(out / "model.safetensors"))
        assert final.keys() == expected.keys()
        for key in expected:
            assert torch.equal(final[key], expected[key]), (kill_at, key)
