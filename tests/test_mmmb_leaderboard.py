"""mmmb.leaderboard: merging result folders into one table ranked by the six-language average."""
import json

import pandas as pd
import pytest

from mmmb.languages import LANGUAGES
from mmmb.leaderboard import leaderboard, main


def _summary(folder, name, accuracy, mode="generate", circular=False):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(
        {"model_name": name, "mode": mode, "circular": circular, "accuracy": accuracy}))


def _scores(*values):
    return dict(zip(LANGUAGES, values))


def test_ranked_by_average_with_ties_and_incomplete_entries_last(tmp_path):
    models = {
        "alpha": _scores(50, 40, 30, 20, 10, 0),        # avg 25
        "beta": _scores(90, 80, 70, 60, 50, 40),        # avg 65
        "gamma": _scores(65, 65, 65, 65, 65, 65),       # avg 65 (tie with beta)
        "delta": _scores(70, 60, 50, 40, 30, 20),       # avg 45
        "partial": {"en": 99.0, "zh": 99.0},            # no avg: not all six languages
    }
    for name, accuracy in models.items():
        _summary(tmp_path / name, name, accuracy)
    table = leaderboard([tmp_path])
    assert list(table["model"]) == ["beta", "gamma", "delta", "alpha", "partial"]
    assert list(table["rank"][:4]) == [1, 1, 3, 4] and pd.isna(table["rank"][4])
    expected_avg = {name: sum(acc.values()) / 6 for name, acc in models.items() if len(acc) == 6}
    for _, row in table.iloc[:4].iterrows():
        assert row["Avg"] == pytest.approx(expected_avg[row["model"]])
        assert [row[lang] for lang in LANGUAGES] == list(models[row["model"]].values())
    assert list(table.columns) == ["rank", "model", "mode", "Avg", *LANGUAGES, "data"]
    assert (table["data"] == "unknown").all()  # these summaries carry no data identity


def test_cli_writes_markdown_and_csv(tmp_path):
    _summary(tmp_path / "a", "model-a", _scores(10, 20, 30, 40, 50, 60))
    _summary(tmp_path / "b", "model-b", _scores(60, 60, 60, 60, 60, 60), mode="likelihood", circular=True)
    main([str(tmp_path)])
    lines = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert lines[2].startswith("| rank | model | mode | Avg | en | zh | pt | ar | tr | ru |")
    assert lines[4].startswith("| 1 | model-b | likelihood circular | 60.00 |")
    assert lines[5].startswith("| 2 | model-a | generate | 35.00 | 10.00 |")
    assert list(pd.read_csv(tmp_path / "leaderboard.csv")["model"]) == ["model-b", "model-a"]


def test_duplicate_entries_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        leaderboard([tmp_path])
    _summary(tmp_path / "run1", "same", _scores(*[1] * 6))
    _summary(tmp_path / "run2", "same", _scores(*[2] * 6))
    with pytest.raises(ValueError, match="also in"):
        leaderboard([tmp_path])


def test_averages_equal_up_to_float_rounding_tie_and_are_listed_by_name(tmp_path):
    """The same six scores in another order: mathematically the same average, so the same rank, listed by name."""
    import itertools

    scores = [100 * 7 / 12, 100 * 5 / 12, 100 / 3, 100 * 11 / 12, 100 * 2 / 3, 100 / 12]
    reference = pd.Series(scores).mean()
    permuted = next(list(p) for p in itertools.permutations(scores) if pd.Series(list(p)).mean() != reference)
    low, high = sorted([scores, permuted], key=lambda s: pd.Series(s).mean())
    _summary(tmp_path / "zeta", "zeta", _scores(*high))  # the float noise favours the later name
    _summary(tmp_path / "alpha", "alpha", _scores(*low))
    table = leaderboard([tmp_path])
    assert list(table["model"]) == ["alpha", "zeta"] and list(table["rank"]) == [1, 1]


def test_markdown_cells_escape_pipes_and_line_breaks(tmp_path):
    """A model name holding "|" or a line break must stay one cell of its row."""
    import re

    _summary(tmp_path / "a", "clip|qwen\nv2", _scores(*[50] * 6))
    main([str(tmp_path)])
    lines = (tmp_path / "leaderboard.md").read_text().splitlines()
    header, row = lines[2], lines[4]
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == len(header.split("|")[1:-1]) == 11
    assert cells[1].replace("\\|", "|") == "clip|qwen v2"


def _identity(items=10, digest="d1", **per_language):
    """A data_identity of the six languages; ``per_language`` overrides one language's (items, digest)."""
    return {language: dict(zip(("items", "digest"), per_language.get(language, (items, f"{digest}-{language}"))))
            for language in LANGUAGES}


def _summary_with(folder, name, identity=None, items=None):
    _summary(folder, name, _scores(*[50] * 6))
    summary = json.loads((folder / "summary.json").read_text())
    if identity is not None:
        summary["data_identity"] = identity
    if items is not None:
        summary["items"] = items
    (folder / "summary.json").write_text(json.dumps(summary))


def test_results_on_different_data_are_refused_naming_both_files(tmp_path):
    _summary_with(tmp_path / "a", "model-a", _identity())
    _summary_with(tmp_path / "b", "model-b", _identity(tr=(10, "other")))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'b' / 'summary.json'} and {tmp_path / 'a' / 'summary.json'} "
                                         r"were evaluated on different MMMB data for language 'tr' \(digest 'other' "
                                         r"vs 'd1-tr'\)"):
        leaderboard([tmp_path])
    # a board of the other languages compares only those
    table = leaderboard([tmp_path], languages=["en", "zh", "pt", "ar", "ru"])
    assert list(table["model"]) == ["model-a", "model-b"] and list(table["data"]) == ["checked", "checked"]


def test_a_subset_of_the_items_is_refused(tmp_path):
    _summary_with(tmp_path / "all", "full", _identity())
    _summary_with(tmp_path / "some", "partial", _identity(en=(7, "d1-en")))
    with pytest.raises(ValueError, match=r"language 'en' \(items 7 vs 10\)"):
        leaderboard([tmp_path])


def test_old_summaries_without_a_data_identity_are_marked_unknown_with_a_warning(tmp_path, caplog):
    _summary_with(tmp_path / "new", "new", _identity())
    _summary_with(tmp_path / "old", "old", items={language: 10 for language in LANGUAGES})
    with caplog.at_level("WARNING", logger="mmmb.leaderboard"):
        table = leaderboard([tmp_path])
    assert dict(zip(table["model"], table["data"])) == {"new": "checked", "old": "unknown"}
    assert "old/summary.json has no data identity" in caplog.text
    assert list(table["rank"]) == [1, 1]  # still ranked
    # an old summary's item counts are still compared
    _summary_with(tmp_path / "older", "older", items={language: 12 for language in LANGUAGES})
    with pytest.raises(ValueError, match=r"older/summary.json and .*new/summary.json.*'en' \(items 12 vs 10\)"):
        leaderboard([tmp_path])


def test_evaluations_of_two_benchmark_versions_are_not_ranked_together(tmp_path):
    """End to end: mmmb.evaluate records what it was run on, and the leaderboard tells the two runs apart."""
    from mmmb.evaluate import EvalConfig, evaluate_mmmb
    from mmmb.models import MCQModel
    from mmmb.toy import toy_mmmb

    class AlwaysA(MCQModel):
        def generate(self, prompts, images):
            return ["A"] * len(prompts)

    version_1 = toy_mmmb(n_items=6, seed=1, languages=LANGUAGES)
    version_2 = toy_mmmb(n_items=6, seed=2, languages=LANGUAGES)  # same indices and count, other items
    evaluate_mmmb(AlwaysA(), version_1, tmp_path / "one", EvalConfig("one"))
    evaluate_mmmb(AlwaysA(), version_1, tmp_path / "same", EvalConfig("same"))
    table = leaderboard([tmp_path])
    assert list(table["data"]) == ["checked", "checked"] and list(table["rank"]) == [1, 1]
    evaluate_mmmb(AlwaysA(), version_2, tmp_path / "two", EvalConfig("two"))
    with pytest.raises(ValueError, match=r"two/summary.json and .*one/summary.json were evaluated on different MMMB "
                                         r"data for language 'en' \(digest"):
        leaderboard([tmp_path])
