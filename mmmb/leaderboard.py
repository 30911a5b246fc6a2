"""Merge the result folders of several models into one ranked MMMB table (like the Parrot paper's Table 2).

    python -m mmmb.leaderboard results/ [more_results/ ...] [--out results/]

Every folder (or direct sub-folder) holding a ``summary.json`` written by :mod:`mmmb.evaluate` is one entry.
Columns: rank, model, mode, Avg, then accuracy (%) per language. Avg is the mean over all six languages (or
those given by ``--languages``); an entry missing one of them has no Avg and is listed after the ranked ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from mmmb.languages import LANGUAGES, canonical_language
from mmmb.report import AVERAGE, to_markdown

SUMMARY_FILE = "summary.json"


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


def leaderboard(paths: Sequence[str | Path], languages: Sequence[str] = LANGUAGES) -> pd.DataFrame:
    """Ranked table, best Avg first; ties share a rank (1, 2, 2, 4)."""
    languages = [canonical_language(code) for code in languages]
    rows, origin = [], {}
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
        scores = {language: float(accuracy.get(language, "nan")) for language in languages}
        rows.append({"model": name, "mode": mode, **scores})
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
