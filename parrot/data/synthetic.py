"""A synthetic multilingual visual world: text-free scenes of coloured shapes, deterministic from a seed.

Stands in for the Parrot training data offline (Sun et al., 2024, "Parrot: Multilingual Visual Instruction
Tuning", Sec. 4): stage-1 caption pairs (LLaVA-Pretrain + multilingual captions), stage-2 English-heavy
instruction data (LLaVA-665k + small zh/pt/ar/tr/ru sets), and a held-out MMMB-style multiple-choice benchmark
whose every item exists in all six languages.

World rules (checked by `Scene`): at most one object per position (5 positions), objects of the same shape share
colour and size (a "group"), different groups have different shapes and different colours. These make every
question below unambiguous. Language is handled by `parrot.data.phrasebook`.

Randomness: every item i of a stream draws from `numpy.random.default_rng([seed, stream, i])`, so the first k
items do not depend on n, and the streams (captions, QA, benchmark, corpus) never share scenes by construction.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..fileio import is_whole_number, non_negative_int, positive_int
from .phrasebook import (
    BACKGROUND,
    BACKGROUNDS,
    COLOURS,
    FIGURE,
    LANGUAGES,
    POSITIONS,
    SHAPES,
    SIZES,
    Question,
    phrasebook,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LANGUAGES", "SHAPES", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "MCQ_CATEGORIES", "QA_KINDS",
    "SceneObject", "Group", "Scene", "MCQItem", "sample_scene", "render_scene", "make_conversation_records",
    "make_mcq_items", "corpus_texts", "default_language_weights",
]

RGB = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 225), "yellow": (240, 210, 40),
    "purple": (140, 60, 185), "orange": (250, 140, 25),
    "white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (115, 75, 40),
}
# Object centres as fractions of the image side; radii (fraction of the side) keep neighbours from touching.
CENTRES = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
RADIUS = {"large": 0.12, "small": 0.07}
MAX_JITTER = 0.02
MAX_ANGLE = 12.0

# Benchmark categories (synthetic MMMB); every one has four answer options.
MCQ_CATEGORIES = (
    "colour", "shape", "count", "position", "background", "shape_at_position", "colour_at_position",
    "most_frequent_shape", "total_count", "colour_presence", "shape_presence", "shape_absence", "colour_count",
    "attribute_binding", "largest_shape",
)
# Open-ended stage-2 question kinds (short answers).
QA_KINDS = (
    "colour", "shape", "count", "position", "background", "shape_at_position", "colour_at_position",
    "most_frequent_shape", "total_count", "colour_count", "largest_shape", "size", "exists",
)

STREAMS = {"caption": 1, "qa": 2, "mcq": 3, "corpus": 4, "mcq_letters": 5}


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0  # jitter of the centre, fraction of the image side
    dy: float = 0.0
    angle: float = 0.0  # degrees


@dataclass(frozen=True)
class Group:
    """All objects of one shape (they share colour and size), in scene order."""

    shape: str
    colour: str
    size: str
    count: int
    positions: tuple[str, ...]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    groups: tuple[Group, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} not in {BACKGROUNDS}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        for obj in self.objects:
            for value, allowed in ((obj.shape, SHAPES), (obj.colour, COLOURS), (obj.size, SIZES),
                                   (obj.position, POSITIONS)):
                if value not in allowed:
                    raise ValueError(f"{value!r} not in {allowed}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")
        groups: dict[str, list[SceneObject]] = {}
        for obj in self.objects:
            groups.setdefault(obj.shape, []).append(obj)
        built = []
        for shape, members in groups.items():
            if len({(o.colour, o.size) for o in members}) != 1:
                raise ValueError(f"objects of shape {shape!r} must share colour and size")
            built.append(Group(shape, members[0].colour, members[0].size, len(members),
                               tuple(o.position for o in members)))
        colours = [g.colour for g in built]
        if len(set(colours)) != len(colours):
            raise ValueError(f"different shapes must have different colours: {colours}")
        object.__setattr__(self, "groups", tuple(built))

    def group(self, shape: str) -> Group | None:
        return next((g for g in self.groups if g.shape == shape), None)


def sample_scene(rng: np.random.Generator, n_groups: int | None = None) -> Scene:
    """A random scene with 1-3 groups (or `n_groups`) and at most 5 objects (one per position)."""
    if n_groups is None:
        n_groups = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    shapes = rng.choice(SHAPES, size=n_groups, replace=False)
    colours = rng.choice(COLOURS, size=n_groups, replace=False)
    counts = []
    free = len(POSITIONS)
    for i in range(n_groups):
        still_needed = n_groups - i - 1
        counts.append(int(rng.integers(1, min(4, free - still_needed) + 1)))
        free -= counts[-1]
    positions = list(rng.permutation(POSITIONS))
    objects = []
    for shape, colour, count in zip(shapes, colours, counts):
        size = str(rng.choice(SIZES))
        for _ in range(count):
            dx, dy = rng.uniform(-MAX_JITTER, MAX_JITTER, size=2)
            objects.append(SceneObject(str(shape), str(colour), size, str(positions.pop()),
                                       float(dx), float(dy), float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))))
    return Scene(str(rng.choice(BACKGROUNDS)), tuple(objects))


# ------------------------------------------------------------------------------------------- rendering
def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    elif shape == "diamond":
        pts = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def render_scene(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image of `size`x`size` (drawn `supersample` times larger, then downscaled)."""
    side = size * supersample
    image = Image.new("RGB", (side, side), RGB[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx = (CENTRES[obj.position][0] + obj.dx) * side
        cy = (CENTRES[obj.position][1] + obj.dy) * side
        r = RADIUS[obj.size] * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RGB[obj.colour])
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r, obj.angle), fill=RGB[obj.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS) if supersample > 1 else image


# ------------------------------------------------------------------------------------------- questions
def _choose(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _others(rng: np.random.Generator, universe, exclude, k: int) -> list:
    pool = [x for x in universe if x not in set(exclude)]
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def ask(kind: str, scene: Scene, rng: np.random.Generator) -> tuple[Question, Any, list] | None:
    """(question, answer value, three distractor values) for `kind` on `scene`, or None when it does not apply.

    Distractors are always wrong for this scene, so they double as multiple-choice options.
    """
    groups = scene.groups
    g = _choose(rng, groups)
    present_shapes = [x.shape for x in groups]
    if kind == "colour":
        return Question(kind, shape=g.shape, plural=g.count > 1), g.colour, _others(rng, COLOURS, [g.colour], 3)
    if kind == "shape":
        return Question(kind, colour=g.colour), g.shape, _others(rng, SHAPES, [g.shape], 3)
    if kind == "count":
        return Question(kind, shape=g.shape), g.count, _others(rng, range(1, 6), [g.count], 3)
    if kind == "colour_count":
        return Question(kind, colour=g.colour), g.count, _others(rng, range(1, 6), [g.count], 3)
    if kind == "size":
        return Question(kind, shape=g.shape, plural=g.count > 1), g.size, _others(rng, SIZES, [g.size], 1)
    if kind == "position":
        singles = [x for x in groups if x.count == 1]
        if not singles:
            return None
        s = _choose(rng, singles)
        return Question(kind, shape=s.shape), s.positions[0], _others(rng, POSITIONS, s.positions, 3)
    if kind == "background":
        return Question(kind), scene.background, _others(rng, BACKGROUNDS, [scene.background], 3)
    if kind in ("shape_at_position", "colour_at_position"):
        obj = _choose(rng, scene.objects)
        if kind == "shape_at_position":
            return Question(kind, position=obj.position), obj.shape, _others(rng, SHAPES, [obj.shape], 3)
        return Question(kind, position=obj.position), obj.colour, _others(rng, COLOURS, [obj.colour], 3)
    if kind in ("most_frequent_shape", "largest_shape"):
        if len(groups) < 2:
            return None
        if kind == "most_frequent_shape":
            top = max(x.count for x in groups)
            winners = [x for x in groups if x.count == top]
        else:
            winners = [x for x in groups if x.size == "large"]
        if len(winners) != 1:
            return None
        answer = winners[0].shape
        present_others = [s for s in present_shapes if s != answer]
        distractors = (present_others + _others(rng, SHAPES, present_shapes, 3))[:3]
        return Question(kind), answer, distractors
    if kind == "total_count":
        total = len(scene.objects)
        return Question(kind), total, _others(rng, range(1, 6), [total], 3)
    if kind == "colour_presence":
        present = [x.colour for x in groups]
        return Question(kind), _choose(rng, present), _others(rng, COLOURS, present, 3)
    if kind == "shape_presence":
        return Question(kind), _choose(rng, present_shapes), _others(rng, SHAPES, present_shapes, 3)
    if kind == "shape_absence":
        if len(present_shapes) < 3:
            return None
        answer = _choose(rng, [s for s in SHAPES if s not in present_shapes])
        return Question(kind), answer, _others(rng, present_shapes, [], 3)
    if kind == "attribute_binding":
        other_size = next(s for s in SIZES if s != g.size)
        other_colour = _others(rng, COLOURS, [g.colour], 1)[0]
        distractors = [(other_size, g.colour), (g.size, other_colour), (other_size, other_colour)]
        return Question(kind, shape=g.shape), (g.size, g.colour), distractors
    if kind == "exists":
        if rng.random() < 0.5:
            return Question(kind, shape=g.shape, colour=g.colour), True, [False]
        shape = _choose(rng, SHAPES)
        present = scene.group(shape)
        colour = _others(rng, COLOURS, [present.colour] if present else [], 1)[0]
        return Question(kind, shape=shape, colour=colour), False, [True]
    raise ValueError(f"unknown question kind {kind!r}")


def render_value(lang: str, q: Question, value: Any) -> str:
    """An answer value as text in `lang`, agreeing with the noun it describes, first letter capitalised."""
    book = phrasebook(lang)
    kind = q.kind
    if kind in ("colour", "background", "colour_at_position", "colour_presence"):
        noun = {"colour": q.shape, "background": BACKGROUND, "colour_at_position": FIGURE}.get(kind)
        text = book.colour_word(value, noun, q.plural)
    elif kind in ("shape", "shape_at_position", "most_frequent_shape", "shape_presence", "shape_absence",
                  "largest_shape"):
        text = book.shape_word(value)
    elif kind in ("count", "total_count", "colour_count"):
        text = book.count_word(value, q.shape if kind == "count" else FIGURE)
    elif kind == "position":
        text = book.position_word(value)
    elif kind == "size":
        text = book.size_word(value, q.shape, q.plural)
    elif kind == "attribute_binding":
        size, colour = value
        text = book.description(q.shape, colour, size)
    elif kind == "exists":
        text = book.yes_no(value)
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return book.capitalize(text)


# --------------------------------------------------------------------------------------------- records
def default_language_weights(stage: str, languages=LANGUAGES) -> dict[str, float]:
    """English-heavy mixes like Parrot's data: stage 2 en 0.6 / others share 0.4; stage 1 en 0.5."""
    english = {"caption": 0.5, "qa": 0.6}[stage]
    others = [lang for lang in languages if lang != "en"]
    if "en" not in languages:
        return {lang: 1.0 / len(languages) for lang in languages}
    if not others:
        return {"en": 1.0}
    return {lang: english if lang == "en" else (1.0 - english) / len(others) for lang in languages}


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream], index])


def make_conversation_records(
    n: int,
    seed: int,
    stage: str,
    languages=LANGUAGES,
    language_weights: dict[str, float] | None = None,
    image_dir: str | Path | None = None,
    image_size: int = 64,
    max_turns: int = 1,
) -> list[dict]:
    """`n` LLaVA-format records; each record's PNG is written to `image_dir/<id>.png` ("image" is relative).

    stage "caption": one turn "<image>\\n<describe prompt>" -> caption. stage "qa": 1..`max_turns` question/short
    answer turns about one image, the placeholder in the first. Records also carry "lang" (and "kinds" for qa).
    With `image_dir=None` no image is written (the text is still deterministic).
    """
    if stage not in ("caption", "qa"):
        raise ValueError(f"stage must be 'caption' or 'qa', got {stage!r}")
    for name, value, minimum in (("n", n, 0), ("seed", seed, 0), ("image_size", image_size, 1),
                                 ("max_turns", max_turns, 1)):
        if not is_whole_number(value) or value < minimum:
            raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown languages {unknown}; choose from {LANGUAGES}")
    weights = language_weights or default_language_weights(stage, languages)
    missing = [lang for lang in languages if lang not in weights]
    if missing:
        raise ValueError(f"language_weights has no weight for {missing}")
    probs = np.array([weights[lang] for lang in languages], dtype=np.float64)
    if (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"language weights must be non-negative with a positive sum: {weights}")
    probs /= probs.sum()
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)

    records = []
    for i in tqdm(range(n), desc=f"synthetic {stage}", disable=n < 2000):
        rng = _rng(seed, stage, i)
        lang = str(languages[int(rng.choice(len(languages), p=probs))])
        book = phrasebook(lang)
        scene = sample_scene(rng)
        record_id = f"synthetic-{stage}-{seed}-{i:07d}"
        if stage == "caption":
            turns = [(_choose(rng, book.caption_prompts), book.caption(scene, int(rng.integers(1 << 16))))]
            kinds = None
        else:
            turns, kinds = [], []
            n_turns = int(rng.integers(1, max_turns + 1))
            for kind in rng.permutation(QA_KINDS):
                asked = ask(str(kind), scene, rng)
                if asked is None:
                    continue
                q, value, _ = asked
                turns.append((book.question(q, int(rng.integers(1 << 16))), render_value(lang, q, value)))
                kinds.append(str(kind))
                if len(turns) == n_turns:
                    break
        conversations = []
        for t, (human, gpt) in enumerate(turns):
            conversations.append({"from": "human", "value": f"<image>\n{human}" if t == 0 else human})
            conversations.append({"from": "gpt", "value": gpt})
        record = {"id": record_id, "image": f"{record_id}.png", "lang": lang, "conversations": conversations}
        if kinds is not None:
            record["kinds"] = kinds
        if image_dir is not None:
            render_scene(scene, image_size).save(Path(image_dir) / record["image"])
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------- benchmark
@dataclass
class MCQItem:
    """One benchmark question, the same item in every language (options in the same order everywhere)."""

    index: int
    category: str
    image: Image.Image
    answer: str  # "A".."D"
    questions: dict[str, str]
    options: dict[str, list[str]]
    scene: Scene | None = None


LETTERS = "ABCD"


def make_mcq_items(n: int, seed: int, languages=LANGUAGES, image_size: int = 64,
                   max_tries: int = 200) -> list[MCQItem]:
    """`n` items cycling through the 15 `MCQ_CATEGORIES`; the answer letter is a fresh permutation of A-D for
    every block of four items, so letters are exactly balanced over each block. Uses its own seed stream, so
    benchmark scenes are never training scenes for the same seed."""
    items = []
    for i in tqdm(range(n), desc="synthetic MMMB", disable=n < 2000):
        category = MCQ_CATEGORIES[i % len(MCQ_CATEGORIES)]
        rng = _rng(seed, "mcq", i)
        for _ in range(max_tries):
            scene = sample_scene(rng)
            asked = ask(category, scene, rng)
            if asked is not None:
                break
        else:  # pragma: no cover - every category is feasible for a large share of scenes
            raise RuntimeError(f"could not sample a scene for category {category!r} in {max_tries} tries")
        q, value, distractors = asked
        block = _rng(seed, "mcq_letters", i // 4).permutation(4)
        answer_pos = int(block[i % 4])
        values = list(distractors)
        values.insert(answer_pos, value)
        # One wording draw per known language, in a fixed order, so a language's wording does not depend on
        # which other languages were requested.
        wording = {lang: int(rng.integers(1 << 16)) for lang in LANGUAGES}
        questions, options = {}, {}
        for lang in languages:
            questions[lang] = phrasebook(lang).question(q, wording[lang])
            options[lang] = [render_value(lang, q, v) for v in values]
        items.append(MCQItem(i, category, render_scene(scene, image_size), LETTERS[answer_pos], questions, options,
                             scene))
    return items


# --------------------------------------------------------------------------------------------- corpus
def corpus_texts(seed: int, n: int, languages=LANGUAGES) -> list[str]:
    """`n` texts of the world's phrasings (captions, prompts, questions + answers), languages in turn."""
    texts = []
    for i in range(n):
        rng = _rng(seed, "corpus", i)
        lang = languages[i % len(languages)]
        book = phrasebook(lang)
        scene = sample_scene(rng)
        choice = i // len(languages) % 3
        if choice == 0:
            texts.append(f"{_choose(rng, book.caption_prompts)}\n{book.caption(scene, int(rng.integers(1 << 16)))}")
        else:
            kinds = MCQ_CATEGORIES if choice == 1 else QA_KINDS
            for _ in range(20):
                asked = ask(str(_choose(rng, kinds)), scene, rng)
                if asked is not None:
                    break
            q, value, distractors = asked
            answers = [render_value(lang, q, v) for v in [value, *distractors]]
            texts.append(f"{book.question(q, int(rng.integers(1 << 16)))}\n{' '.join(answers)}")
    return texts


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parrot.data.synthetic", description="Write the synthetic caption / QA datasets (LLaVA JSON + PNGs).")
    parser.add_argument("--out", default="data/synthetic", help="output folder (caption.json, qa.json, images/)")
    parser.add_argument("--n-caption", type=non_negative_int, default=4000, help="caption records (0: none)")
    parser.add_argument("--n-qa", type=non_negative_int, default=4000, help="QA records (0: none)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--image-size", type=positive_int, default=64, help="image side in pixels")
    parser.add_argument("--max-turns", type=positive_int, default=1, help="most question/answer turns per QA record")
    parser.add_argument("--languages", default=",".join(LANGUAGES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    languages = tuple(args.languages.split(","))
    for stage, n in (("caption", args.n_caption), ("qa", args.n_qa)):
        records = make_conversation_records(n, args.seed, stage, languages, image_dir=out / "images",
                                            image_size=args.image_size, max_turns=args.max_turns)
        path = out / f"{stage}.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        mix = Counter(r["lang"] for r in records)
        logger.info("wrote %d %s records to %s (languages %s)", len(records), stage, path, dict(sorted(mix.items())))


if __name__ == "__main__":
    main()
