"""Accuracy tables (category × language), Markdown rendering and the PNG chart for MMMB results."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmmb.languages import LANGUAGE_NAMES

OVERALL = "Overall"
AVERAGE = "Avg"


def accuracy_table(item_results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Accuracy in percent: rows ``Overall`` then categories, columns the languages then ``Avg``.

    ``item_results[lang]`` has one row per item with columns ``category`` and ``hit`` (bool). ``Overall`` is
    the item-level accuracy of a language; ``Avg`` the unweighted mean over languages (the Parrot paper's
    MMMB average).
    """
    columns = {}
    for language, items in item_results.items():
        hits = items["hit"].astype(float)
        per_category = hits.groupby(items["category"]).mean() * 100.0
        columns[language] = pd.concat([pd.Series({OVERALL: hits.mean() * 100.0}), per_category])
    table = pd.DataFrame(columns)
    categories = sorted(label for label in table.index if label != OVERALL)
    table = table.loc[[OVERALL, *categories]]
    table[AVERAGE] = table.mean(axis=1)
    table.index.name = "category"
    return table


def _cell(text: object) -> str:
    """Text as one Markdown table cell: a "|" (a category or model name "a|b") would start a new cell and a line
    break would end the row, so they are escaped / joined."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").split())


def to_markdown(table: pd.DataFrame, decimals: int = 2) -> str:
    """A GitHub Markdown table (index as the first column); NaN renders as ``-``."""
    header = [_cell(table.index.name or ""), *map(_cell, table.columns)]
    align = ["---:" if pd.api.types.is_numeric_dtype(dtype) else "---" for dtype in table.dtypes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *align]) + "|"]
    for label, row in table.iterrows():
        label = "-" if pd.isna(label) else label
        cells = ["-" if pd.isna(v) else f"{v:.{decimals}f}" if isinstance(v, (float, np.floating)) else _cell(v)
                 for v in row]
        lines.append("| " + " | ".join([_cell(label), *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Bar chart of per-language overall accuracy (with the average) beside a category × language heatmap."""
    languages = [column for column in table.columns if column != AVERAGE]
    categories = [label for label in table.index if label != OVERALL]
    figure = Figure(figsize=(6 + 0.8 * len(languages), max(4.0, 0.35 * len(categories) + 1.5)))
    FigureCanvasAgg(figure)
    bars, heat = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    overall = table.loc[OVERALL, languages].to_numpy(dtype=float)
    bars.bar([LANGUAGE_NAMES.get(code, code) for code in languages], overall, color="tab:blue")
    bars.axhline(table.loc[OVERALL, AVERAGE], color="tab:red", linestyle="--",
                 label=f"{AVERAGE} {table.loc[OVERALL, AVERAGE]:.1f}")
    for x, value in enumerate(overall):
        bars.text(x, value + 1, f"{value:.1f}", ha="center", fontsize=8)
    bars.set_ylim(0, 105)
    bars.set_ylabel("accuracy (%)")
    bars.tick_params(axis="x", labelrotation=45)
    bars.legend(loc="lower right")
    bars.set_title(title)
    values = table.loc[categories, languages].to_numpy(dtype=float)  # (n_categories, n_languages)
    image = heat.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(languages)), languages)
    heat.set_yticks(range(len(categories)), categories, fontsize=7)
    heat.set_title("per category")
    figure.colorbar(image, ax=heat, label="accuracy (%)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
