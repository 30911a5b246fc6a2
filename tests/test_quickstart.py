"""The quickstart pipeline end to end at a reduced size (the full-size numbers are measured for the README)."""

from __future__ import annotations

import json

import pytest

from parrot import quickstart
from parrot.data.synthetic import LANGUAGES


def test_mcq_training_records_use_the_mmmb_prompt(tmp_path):
    from mmmb.languages import ANSWER_INSTRUCTION

    records = quickstart.mcq_training_records(12, seed=3, image_dir=tmp_path, image_size=32)
    assert len(records) == 12
    for record in records:
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n")
        assert human["value"].endswith(ANSWER_INSTRUCTION[record["lang"]])
        assert gpt["value"] in "ABCD" and len(gpt["value"]) == 1
        assert f"\n{gpt['value']}. " in human["value"]
        assert (tmp_path / record["image"]).is_file()


def test_text_answers_are_the_answer_option(tmp_path):
    records = quickstart.mcq_training_records(20, seed=3, image_dir=tmp_path, image_size=32,
                                              categories=("background", "count"), answer_format="text")
    letters = quickstart.mcq_training_records(20, seed=3, image_dir=tmp_path, image_size=32,
                                              categories=("background", "count"))
    assert {r["category"] for r in records} == {"background", "count"}
    for text, letter in zip(records, letters):
        prompt, answer = text["conversations"][0]["value"], text["conversations"][1]["value"]
        assert f"\n{letter['conversations'][1]['value']}. {answer}\n" in prompt


def test_benchmark_is_held_out_and_aligned():
    train_items = quickstart.make_mcq_items(30, seed=0, image_size=32)
    bench = quickstart.benchmark(30, seed=0, image_size=32)
    assert set(bench) == set(LANGUAGES)
    assert all(len(records) == 30 for records in bench.values())
    answers = {lang: [r.answer for r in records] for lang, records in bench.items()}
    assert all(a == answers["en"] for a in answers.values())  # the same items in every language
    train_scenes = {item.scene for item in train_items}
    bench_scenes = {item.scene for item in quickstart.make_mcq_items(30, seed=quickstart.EVAL_SEED_OFFSET,
                                                                     image_size=32)}
    assert not train_scenes & bench_scenes


QUICK_ARGS = ["--n-caption", "48", "--n-qa", "48", "--n-mcq-train", "48", "--n-eval", "8", "--batch-size", "8",
              "--image-size", "32", "--categories", "background,count"]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    summary = quickstart.main(["--out", str(tmp_path / "qs"), "--stage1-steps", "2", "--stage2-steps", "3", *QUICK_ARGS])
    printed = capsys.readouterr().out
    assert "| accuracy (%) |" in printed and all(f" {lang} " in printed for lang in LANGUAGES)
    assert set(summary["accuracy"]) == set(LANGUAGES)
    assert all(0.0 <= acc <= 100.0 for acc in summary["accuracy"].values())
    saved = json.loads((tmp_path / "qs" / "quickstart_summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"]
    eval_summary = json.loads((tmp_path / "qs" / "eval" / "summary.json").read_text())
    assert eval_summary["items"] == {lang: 8 for lang in LANGUAGES}
    for stage in ("stage1", "stage2"):
        info = json.loads((tmp_path / "qs" / stage / "parrot_training.json").read_text())
        assert info["stage"] == int(stage[-1])
    # Again into the same folder (the trainer refuses folders holding a finished model): the quickstart replaces
    # its own stage outputs and evaluates the new model.
    quickstart.main(["--out", str(tmp_path / "qs"), "--stage1-steps", "1", "--stage2-steps", "2", *QUICK_ARGS])
    info = json.loads((tmp_path / "qs" / "stage2" / "parrot_training.json").read_text())
    assert info["global_step"] == 2


def test_quickstart_help_describes_every_setting(capsys):
    """Each QuickstartConfig field is a flag with a help text and its default (--help listed bare names)."""
    from parrot.quickstart import QuickstartConfig, main

    with pytest.raises(SystemExit):
        main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    for name, setting in QuickstartConfig.__dataclass_fields__.items():
        text = setting.metadata["help"]
        assert f"{' '.join(text.split())} (default: {getattr(QuickstartConfig(), name)})" in printed, name
    with pytest.raises(SystemExit):
        main(["--stage2-steps", "0"])
    assert "argument --stage2-steps: must be >= 1" in capsys.readouterr().err
