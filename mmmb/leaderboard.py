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
            identity = {canonical_language(language): {"items": int(count)} for language, count in counts.items()}
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


def _read_identity(path: Path, identity: object) -> dict[str, dict[str, object]]:
    """``{language: {"items": int, "digest": str}}`` from a summary's ``data_identity``, checked."""
    try:
        return {canonical_language(language): {"items": int(value["items"]), "digest": str(value["digest"])}
                for language, value in identity.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: malformed data_identity ({error!r})") from None


def leaderboard(paths: Sequence[str | Path], languages: Sequence[str] = LANGUAGES) -> pd.DataFrame:
    """Ranked table, best Avg first; ties share a rank (1, 2, 2, 4). Results on different data (see the module
    docstring) are refused."""
    languages = [canonical_language(code) for code in languages]
    rows, origin = [], {}
    data_check = DataCheck(languages)
    for summary_path in find_summaries(paths):
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            name, mode, accuracy = summary["model_name"], summary["mode"], summary["accuracy"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{summary_path}: not an mmmb.evaluate summary ({error})") from None
        mode += " circular" if summary.get("circular") else ""
        if (name, mode) in origin:
            raise ValueError(f"{summary_path}: model {name!r} ({mode}) also in {origin[(name, mode)]}; "
                             "rename one with --model-name")
        origin[(name, mode)] = summary_path
        data = data_check.add(summary_path, summary)
        scores = {language: float(accuracy.get(language, "nan")) for language in languages}
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
