"""A tiny hand-made MMMB (no model or synthetic world needed) for tests and smoke runs."""
from __future__ import annotations

import random
from typing import Sequence

from PIL import Image

from mmmb.languages import LANGUAGES
from mmmb.tsv import OPTION_LETTERS, MCQRecord, encode_image

TOY_CATEGORIES = ("color", "count", "shape")


def toy_mmmb(n_items: int = 12, seed: int = 0, languages: Sequence[str] = LANGUAGES,
             min_options: int = 3, max_options: int = 4) -> dict[str, list[MCQRecord]]:
    """``n_items`` aligned items per language: same index, answer, option count and image in every language;
    question/option texts tagged with the language. Images are 8×8 solid colours."""
    rng = random.Random(seed)
    sets: dict[str, list[MCQRecord]] = {language: [] for language in languages}
    for position in range(n_items):
        index = 100 + 3 * position  # non-contiguous, not starting at 0: indices are ids, not positions
        n_options = rng.randint(min_options, max_options)
        answer = OPTION_LETTERS[rng.randrange(n_options)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        b64 = encode_image(Image.new("RGB", (8, 8), colour))
        category = TOY_CATEGORIES[position % len(TOY_CATEGORIES)]
        for language in languages:
            sets[language].append(MCQRecord(
                index=index, question=f"[{language}] question {index}: which one?",
                options=tuple(f"{language} option {index}-{k}" for k in range(n_options)),
                answer=answer, category=category, l2_category=f"{category}-l2", image_b64=b64,
            ))
    return sets
