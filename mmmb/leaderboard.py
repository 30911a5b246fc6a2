"""Merge the result folders of several models into one ranked MMMB table (like the Parrot paper's Table 2).

    python -m mmmb.leaderboard results/ [more_results/ ...] [--out results/]

Every folder (or direct sub-folder) holding a ``summary.json`` written by :mod:`mmmb.evaluate` is one entry.
Columns: rank, model, mode, Avg, accuracy (%) per language, then ``data``. Avg is the mean over all six languages
(or those given by ``--languages``); an entry missing one of them has no Avg and is listed after the ranked ones.

Only results on the same data are ranked together: per language, every entry's data identity (item count and
content hash, ``data_identity`` in ``summary.json``) must equal the others', else the leaderboard refuses, naming
both files (another benchmark version, a subset of the items, other images). Summaries written before data
identities were recorded still take part, marked ``unknown`` in the ``data`` column with a warning: only their
item counts are compared. ``checked``: the entry's identity was compared with every other recorded one.

A summary that cannot be one written by :mod:`mmmb.evaluate` is refused, naming the file and the field: an accuracy
that is not a number in [0, 100] (percentages; NaN included: a language not evaluated is simply absent), a model
name or mode that is not text, item counts that are not whole numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from mmmb.languages import LANGUAGES, canonical_language
from mmmb.report import AVERAGE, to_markdown

logger = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
DATA_COLUMN = "data"
CHECKED, UNKNOWN = "checked", "unknown"


def find_summaries(paths: Sequence[str | Path]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if path.is_file() and path.name == SUMMARY_FILE:
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.glob(SUMMARY_FILE)) + sorted(path.glob(f"*/{SUMMARY_FILE}")))
        else:
            raise FileNotFoundError(f"{path}: not a results folder or {SUMMARY_FILE}")
    if not found:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {[str(p) for p in paths]}; run mmmb.evaluate first")
    return found


class DataCheck:
    """Per language of the board, the item count and content digest of the first result that recorded them; every
    later result of that language must agree (languages outside the board are not compared)."""

    def __init__(self, languages: Sequence[str]):
        self.languages = list(languages)
        self.first: dict[tuple[str, str], tuple[object, Path]] = {}  # (language, "items"|"digest") -> value, file

    def add(self, path: Path, summary: dict) -> str:
        """Compare ``summary``'s data with the results added before; :data:`CHECKED`, or :data:`UNKNOWN` for a
        summary without a data identity (only its item counts can be compared)."""
        if "data_identity" in summary:
            identity = _read_identity(path, summary["data_identity"])
            status = CHECKED
        else:
            logger.warning("%s has no data identity (written by an older mmmb.evaluate): it is ranked with the "
                           "others but marked %r; only its item counts are compared", path, UNKNOWN)
            # "items" (counts per language) is older than data identities, but not in every hand-made summary.
            counts = summary["items"] if "items" in summary else {}
            identity = _read_item_counts(path, counts)
            status = UNKNOWN
        for language in self.languages:
            for field, value in identity.get(language, {}).items():
                self._agree(path, language, field, value)
        return status

    def _agree(self, path: Path, language: str, field: str, value: object) -> None:
        first, first_path = self.first.setdefault((language, field), (value, path))
        if value != first:
            raise ValueError(f"{path} and {first_path} were evaluated on different MMMB data for language "
                             f"{language!r} ({field} {value!r} vs {first!r}): another benchmark version or subset "
                             "of the items; rank results of the same data only")


def _whole_count(value: object) -> int:
    """An item count: a whole number >= 0 (JSON 12 or 12.0; not true, 12.5, "12" or -1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"item count {value!r} is not a whole number >= 0")
    return int(value)


def _read_item_counts(path: Path, counts: object) -> dict[str, dict[str, int]]:
    """``{language: {"items": int}}`` from an older summary's ``items`` (counts per language), checked."""
    try:
        return {canonical_language(language): {"items": _whole_count(count)} for language, count in counts.items()}
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{path}: field 'items': malformed item counts ({error})") from None


def _read_identity(path: Path, identity: object) -> dict[str, dict[str, object]]:
    """``{language: {"items": int, "digest": str}}`` from a summary's ``data_identity``, checked."""
    try:
        return {canonical_language(language): {"items": _whole_count(value["items"]),
                                               "digest": _digest(value["digest"])}
                for language, value in identity.items()}
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{path}: malformed data_identity ({error!r})") from None


def _digest(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"digest {value!r} is not text")
    return value


def _read_summary(path: Path) -> tuple[str, str, dict[str, float], dict]:
    """(model name, mode, {language: accuracy %}, the whole summary) of an ``mmmb.evaluate`` summary.json; ValueError
    naming the file and the field when it is not one: not UTF-8 JSON, a field missing or of the wrong type, or an
    accuracy that is not a number in [0, 100] (``mmmb.evaluate`` writes percentages; a NaN or 250 is a damaged
    or hand-edited file, never a score to rank or to show as "not evaluated")."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not an mmmb.evaluate summary (not UTF-8 text: {error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not an mmmb.evaluate summary (invalid JSON at line {error.lineno}, column "
                         f"{error.colno}: {error.msg})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not an mmmb.evaluate summary (a JSON {type(summary).__name__}, not an object)")
    for field, kind in (("model_name", str), ("mode", str), ("accuracy", dict)):
        if field not in summary:
            raise ValueError(f"{path}: not an mmmb.evaluate summary (no field {field!r})")
        if not isinstance(summary[field], kind) or (kind is str and not summary[field].strip()):
            expected = "a mapping of language -> accuracy %" if kind is dict else "non-empty text"
            raise ValueError(f"{path}: field {field!r} must be {expected}, got {summary[field]!r}")
    accuracy = {}
    for language, value in summary["accuracy"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
            raise ValueError(f"{path}: field 'accuracy' of language {language!r} is {value!r}, not a percentage in "
                             "[0, 100]")
        accuracy[language] = float(value)
    return summary["model_name"], summary["mode"], accuracy, summary


def leaderboard(paths: Sequence[str | Path], languages: Sequence[str] = LANGUAGES) -> pd.DataFrame:
    """Ranked table, best Avg first; ties share a rank (1, 2, 2, 4). Results on different data (see the module
    docstring) are refused."""
    languages = [canonical_language(code) for code in languages]
    rows, origin = [], {}
    data_check = DataCheck(languages)
    for summary_path in find_summaries(paths):
        name, mode, accuracy, summary = _read_summary(summary_path)
        mode += " circular" if summary.get("circular") else ""
        if (name, mode) in origin:
            raise ValueError(f"{summary_path}: model {name!r} ({mode}) also in {origin[(name, mode)]}; "
                             "rename one with --model-name")
        origin[(name, mode)] = summary_path
        data = data_check.add(summary_path, summary)
        scores = {language: float(accuracy.get(language, "nan")) for language in languages}  # NaN: not evaluated
        rows.append({"model": name, "mode": mode, **scores, DATA_COLUMN: data})
    table = pd.DataFrame(rows)
    table.insert(2, AVERAGE, table[languages].mean(axis=1, skipna=False))
    # Averages equal up to float rounding (the same scores summed in another order) are a tie: ranked alike and,
    # within the tie, listed by name, not by the rounding noise.
    rounded = table[AVERAGE].round(6)
    order = pd.DataFrame({"avg": rounded, "model": table["model"], "mode": table["mode"]})
    table = table.loc[order.sort_values(["avg", "model", "mode"], ascending=[False, True, True],
                                        na_position="last").index]
    table.insert(0, "rank", rounded.loc[table.index].rank(method="min", ascending=False).astype("Int64"))
    return table.reset_index(drop=True)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m mmmb.leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results folders (each model's --out, or their parent)")
    parser.add_argument("--out", help="where to write leaderboard.md/.csv (default: the first results folder)")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    args = parser.parse_args(argv)
    table = leaderboard(args.results, args.languages)
    out_dir = Path(args.out or args.results[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "leaderboard.csv", index=False)
    markdown = to_markdown(table.set_index("rank"))
    (out_dir / "leaderboard.md").write_text("# MMMB leaderboard (accuracy %)\n\n" + markdown, encoding="utf-8")
    print(markdown)
    return table


if __name__ == "__main__":
    main()
