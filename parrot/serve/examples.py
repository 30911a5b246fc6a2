"""Example images for the demo: synthetic-world scenes with a question in each MMMB language.

The scenes come from the same world the tiny model is trained on (`parrot.data.synthetic`), so a trained
quickstart model answers them; the questions are written by that language's phrasebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.phrasebook import LANGUAGES, phrasebook
from ..data.synthetic import ask, render_scene, sample_scene

# Question kinds that apply to every scene (`ask` never returns None for them), one per example.
EXAMPLE_KINDS = ("colour", "shape", "count", "background", "total_count", "colour_count")
EXAMPLE_IMAGE_SIZE = 256  # display size; the processor resizes to the model's input size


@dataclass(frozen=True)
class Example:
    lang: str
    image_path: Path
    prompt: str


def write_examples(directory: str | Path, seed: int = 2024) -> list[Example]:
    """Render one scene per language into `directory` (PNG) and phrase a question about it in that language."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    examples = []
    for index, (lang, kind) in enumerate(zip(LANGUAGES, EXAMPLE_KINDS)):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng)
        question, _, _ = ask(kind, scene, rng)
        path = directory / f"example_{index}_{lang}.png"
        render_scene(scene, size=EXAMPLE_IMAGE_SIZE).save(path)
        examples.append(Example(lang, path, phrasebook(lang).question(question, variant=0)))
    return examples
