"""All-or-nothing files: a final-model save cut off while its files move into the output folder is refused by every
loader (never a silent mix of two models), the builder publishes a whole folder, and the JSON reports / the
expert-load plot keep their previous content when a write fails half-way. (Whole training runs cut off and resumed:
tests/test_checkpoint_atomicity.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from parrot import fileio
from parrot.data.datasets import BadDataReport
from parrot.data.tokenizer import build_tiny_tokenizer
from parrot.model import ParrotForCausalLM
from parrot.model.builder import load_pretrained, save_pretrained
from parrot.moe import RouterStatsTracker
from parrot.train import load_trained
from parrot.train.callbacks import EXPERT_LOAD_PNG, ROUTER_STATS_JSON, RouterDiagnosticsCallback
from parrot.train.export import (FINAL_SAVE_MARKER, RECORD_FILES_KEY, TRAINING_INFO, IncompleteFinalModelError,
                                 save_final_model)
from tests.conftest import save_tiny_parrot_for

INFO = {"stage": 1, "tuning": None}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An output folder holding a finished final model (with its record), and a different model to save over it."""
    root = tmp_path_factory.mktemp("final_atomic")
    model, processor = load_pretrained(save_tiny_parrot_for(build_tiny_tokenizer(vocab_size=300, n_texts=200),
                                                            root / "init"))
    save_final_model(model, processor, root / "run", training_info=INFO)
    (root / "run" / "train_config.json").write_text("{}\n")  # a run's own file: no final save may touch it
    new = load_pretrained(root / "init")[0]
    with torch.no_grad():
        new.mm_projector[0].weight.add_(1.0)
    return {"dir": root / "run", "old": model.state_dict(), "new": new, "processor": processor}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _fail_at_replace(monkeypatch, n: int) -> dict:
    """os.replace raises on its n-th call (a crash at that rename); returns the call counter."""
    real, calls = os.replace, {"n": 0}

    def replace(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(5, "Input/output error (simulated crash)")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def _same_state(model, state: dict) -> bool:
    return all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


def test_final_save_cut_at_any_rename_is_the_old_model_or_refused(finished, tmp_path, monkeypatch):
    """A crash at each rename of a final save over a finished one: the folder loads as the old model, or every loader
    refuses it naming the interrupted save and --resume; never new weights beside an old config or record."""
    counting = tmp_path / "count"
    shutil.copytree(finished["dir"], counting)
    calls = _fail_at_replace(monkeypatch, 0)
    save_final_model(finished["new"], finished["processor"], counting, training_info=INFO)
    total = calls["n"]
    monkeypatch.undo()
    assert total >= 5  # the marker, the model files, the record
    outcomes = []
    for n in range(1, total + 1):
        out = tmp_path / f"cut{n}"
        shutil.copytree(finished["dir"], out)
        _fail_at_replace(monkeypatch, n)
        with pytest.raises(OSError, match="simulated crash"):
            save_final_model(finished["new"], finished["processor"], out, training_info=INFO)
        monkeypatch.undo()
        assert (out / "train_config.json").read_text() == "{}\n"
        try:
            model, _ = load_pretrained(out)
        except IncompleteFinalModelError as err:
            assert f"{out}: the final-model save into this folder was interrupted" in str(err)
            assert "--resume" in str(err)
            with pytest.raises(IncompleteFinalModelError, match="interrupted"):
                load_trained(out)
            outcomes.append("refused")
            continue
        assert _same_state(model, finished["old"]), f"crash at rename {n}: a mix loaded silently"
        load_trained(out)
        outcomes.append("old")
    assert outcomes[0] == "old" and outcomes[-1] == "refused"  # the marker itself failed / the record moved in
    model, _ = load_pretrained(counting)  # the uncut save: the new model, no marker left
    assert _same_state(model, finished["new"].state_dict()) and not (counting / FINAL_SAVE_MARKER).exists()


def test_a_new_final_save_finishes_an_interrupted_one(finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished["dir"], out)
    _fail_at_replace(monkeypatch, 3)
    with pytest.raises(OSError):
        save_final_model(finished["new"], finished["processor"], out, training_info=INFO)
    monkeypatch.undo()
    save_final_model(finished["new"], finished["processor"], out, training_info=INFO)
    assert _same_state(load_trained(out)[0], finished["new"].state_dict())
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_the_record_lists_the_saved_files_and_a_changed_folder_is_refused(finished, tmp_path):
    out = shutil.copytree(finished["dir"], tmp_path / "copy")
    listed = json.loads((out / TRAINING_INFO).read_text())[RECORD_FILES_KEY]
    assert {"config.json", "model.safetensors", "parrot_processor.json"} <= set(listed)
    assert TRAINING_INFO not in listed and "train_config.json" not in listed
    generation = out / "generation_config.json"
    generation.write_text(generation.read_text().replace("{", '{\n  "do_sample": false,', 1))  # edited by hand
    load_pretrained(out)  # text files may change; weights may not
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # an incomplete copy
    with pytest.raises(IncompleteFinalModelError, match=r"model\.safetensors: \d+ bytes, recorded \d+ bytes"):
        load_pretrained(out)
    weights.unlink()
    with pytest.raises(IncompleteFinalModelError, match=r"model\.safetensors: missing"):
        load_trained(out)


def test_a_final_save_removes_the_files_of_the_previous_one(finished, tmp_path):
    """Files the previous save wrote (its record lists them) and the new one does not go; the run's other files
    stay."""
    out = shutil.copytree(finished["dir"], tmp_path / "run")
    record = json.loads((out / TRAINING_INFO).read_text())
    (out / "vocab.txt").write_text("old tokenizer file")
    (out / "notes.txt").write_text("mine")
    record[RECORD_FILES_KEY]["vocab.txt"] = len("old tokenizer file")
    (out / TRAINING_INFO).write_text(json.dumps(record))
    load_pretrained(out)
    save_final_model(finished["new"], finished["processor"], out, training_info=INFO)
    assert not (out / "vocab.txt").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "train_config.json").is_file()


def test_folders_without_a_record_still_load(finished, tmp_path):
    """Converted / official / builder folders hold no record: nothing to check, they load as before."""
    out = shutil.copytree(finished["dir"], tmp_path / "converted")
    (out / TRAINING_INFO).unlink()
    load_pretrained(out)
    (out / TRAINING_INFO).write_text(json.dumps(INFO))  # a record written before records listed their files
    load_trained(out)


def test_load_trained_checks_the_folder_once(finished, tmp_path, monkeypatch):
    """load_trained runs check_final_model itself (before reading adapter files) and its loader does not repeat it;
    an interrupted save is still refused with the same message."""
    import parrot.train.export as train_export

    out = shutil.copytree(finished["dir"], tmp_path / "run")
    real, calls = train_export.check_final_model, []
    monkeypatch.setattr(train_export, "check_final_model", lambda d: calls.append(Path(d)) or real(d))
    load_trained(out)
    assert calls == [out]
    (out / FINAL_SAVE_MARKER).write_text("")
    with pytest.raises(IncompleteFinalModelError) as refused:
        load_trained(out)
    assert str(refused.value) == train_export.interrupted_save_message(out) and calls == [out, out]


# --- the builder: a whole folder, published -----------------------------------------------------------------------
def _disk_full_midway(real_save):
    def save(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        path = Path(directory) / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        raise OSError(28, "No space left on device (simulated)")

    return save


def test_builder_save_is_all_or_nothing(finished, tmp_path, monkeypatch):
    old = load_pretrained(finished["dir"])[0]
    out = save_pretrained(old, finished["processor"], tmp_path / "init")
    before = _files(out)
    monkeypatch.setattr(ParrotForCausalLM, "save_pretrained", _disk_full_midway(ParrotForCausalLM.save_pretrained))
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(finished["new"], finished["processor"], out)
    monkeypatch.undo()
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["init"]
    save_pretrained(finished["new"], finished["processor"], out)  # replaces a saved model folder
    assert _same_state(load_pretrained(out)[0], finished["new"].state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]


def test_builder_save_refuses_to_delete_other_files(finished, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-3").mkdir()
    with pytest.raises(FileExistsError, match=r"run holds \['checkpoint-3', 'notes.txt'\].*would delete them"):
        save_pretrained(finished["new"], finished["processor"], out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- single files: reports, statistics, plots ---------------------------------------------------------------------
def _half_written(monkeypatch):
    """Path.write_text writes half the text, then the disk is full."""
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("write", [
    lambda path: fileio.atomic_write_text(path, json.dumps({"new": list(range(100))})),
    lambda path: BadDataReport(checked=3).write(path),
    lambda path: RouterStatsTracker().write_json(path),
], ids=["atomic_write_text", "bad_data_report", "router_stats"])
def test_a_json_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch, write):
    path = tmp_path / "report.json"
    path.write_text('{"old": true}\n')
    _half_written(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write(path)
    monkeypatch.undo()
    assert path.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write(path)
    assert json.loads(path.read_text()) != {"old": True}


def test_the_expert_load_plot_is_replaced_whole(tmp_path, monkeypatch):
    import parrot.moe

    (tmp_path / EXPERT_LOAD_PNG).write_bytes(b"old plot")
    callback = RouterDiagnosticsCallback(tmp_path, routing_fn=lambda: {})
    callback._last_step = 1  # as after a logged step

    def plot_cut_off(tracker, path, title):
        Path(path).write_bytes(b"half a pl")
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(parrot.moe, "plot_expert_load", plot_cut_off)
    with pytest.raises(OSError, match="No space left"):
        callback.on_train_end(None, SimpleNamespace(is_world_process_zero=True), None)
    assert (tmp_path / EXPERT_LOAD_PNG).read_bytes() == b"old plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([EXPERT_LOAD_PNG, ROUTER_STATS_JSON])
