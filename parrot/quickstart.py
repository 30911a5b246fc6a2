"""The tiny end-to-end quickstart: synthetic data -> stage 1 -> stage 2 -> multilingual MCQ evaluation.

    python -m parrot.quickstart                 # (make quickstart) minutes on 2 CPU cores (README: measured time)
    python -m parrot.quickstart --help          # sizes, steps, output folder

1. builds the tiny model of `configs/tiny.yaml` (random weights, tokenizer trained offline on the synthetic
   world's six languages) and writes the synthetic data: stage-1 captions, stage-2 short-answer QA plus
   multiple-choice instructions in the MMMB prompt format (English-heavy language mix, as Parrot's data);
2. stage 1: only the projector trains (vision tower + LLM frozen, MoE off);
3. stage 2: projector + Parrot MoE + LLM train (full tuning), from the stage-1 output;
4. evaluates on a held-out synthetic MMMB (the same items in en/zh/pt/ar/tr/ru, scenes never seen in training)
   with `mmmb.evaluate` and prints the per-language accuracy table.

Scale choices (a random 1M-parameter model has minutes of CPU): the benchmark and the MCQ training data use the
categories of `--categories` (default: background colour, colour presence, counting); the MCQ target is the
answer option's text (`--answer-format text`, scored by generation + `mmmb.extract`, which maps an option's text
to its letter) -- one lookup step, where a letter target needs the model to also bind letters to options;
`--answer-format letter` trains letters and scores option-letter likelihood.
Chance is 25% (four options). Running again into the same `--out` replaces the quickstart's own `stage1/`,
`stage2/` and `eval/` folders (the trainer refuses a folder that holds a finished model, the evaluator a cache of
other weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .data.synthetic import (
    LANGUAGES,
    MCQ_CATEGORIES,
    default_language_weights,
    make_conversation_records,
    make_mcq_items,
)
from .fileio import non_negative_int, positive_int
from .model.builder import TINY_RECIPE, build_tiny, save_pretrained
from .train import TrainConfig, train

logger = logging.getLogger("parrot.quickstart")
CHANCE = 25.0
EVAL_SEED_OFFSET = 1_000_003
ANSWER_FORMATS = ("text", "letter")  # the benchmark's scenes come from another seed than the training MCQs


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class QuickstartConfig:
    out: str = _setting("runs/quickstart",
                        "output folder (stage outputs, MMMB tables, chart, quickstart_summary.json)")
    recipe: str = _setting(str(TINY_RECIPE), "tiny model recipe YAML")
    seed: int = _setting(0, "seed of the data, the model init and training")
    n_caption: int = _setting(1280, "synthetic caption records (stage 1)")
    n_qa: int = _setting(2000, "synthetic multilingual question-answer records (stage 2)")
    n_mcq_train: int = _setting(2400,
                                "synthetic multiple-choice training records in the benchmark categories (stage 2)")
    n_eval: int = _setting(120, "MMMB-style benchmark items per language")
    image_size: int = _setting(64, "drawn image size in pixels (the model's transform resizes to the recipe's)")
    stage1_steps: int = _setting(40, "stage-1 optimizer steps (projector only)")
    stage2_steps: int = _setting(1000, "stage-2 optimizer steps (projector + MoE + LLM)")
    batch_size: int = _setting(32, "global batch size of both stages")
    stage1_lr: float = _setting(1e-3, "stage-1 learning rate")
    stage2_lr: float = _setting(2e-3, "stage-2 learning rate")
    categories: str = _setting("background,colour_presence,count",
                               "benchmark and MCQ training categories, comma-separated")
    answer_format: str = _setting("text", "MCQ training target: text (scored by generation + extraction) or "
                                          "letter (letter likelihood)")

    @property
    def category_tuple(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.categories.split(",") if c.strip())


def _mcq_items_in(categories: tuple[str, ...], n: int, seed: int, image_size: int) -> list:
    """The first `n` synthetic MCQ items whose category is in `categories` (items cycle through all 15)."""
    unknown = set(categories) - set(MCQ_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown MCQ categories {sorted(unknown)}; choose from {MCQ_CATEGORIES}")
    per_cycle = sum(c in categories for c in MCQ_CATEGORIES)
    pool = make_mcq_items(math.ceil(n / per_cycle) * len(MCQ_CATEGORIES), seed=seed, image_size=image_size)
    return [item for item in pool if item.category in categories][:n]


def mcq_training_records(n: int, seed: int, image_dir: Path, image_size: int,
                         categories: tuple[str, ...] = MCQ_CATEGORIES, answer_format: str = "letter") -> list[dict]:
    """Multiple-choice instructions in the MMMB prompt format (question, lettered options, the answer
    instruction in the item's language); one language per item, drawn with the English-heavy stage-2 weights.

    answer_format "letter": the target is the answer letter (scored by option-letter likelihood);
    "text": the target is the answer option's text (scored by generation + `mmmb.extract`, which maps an
    option's text to its letter) -- a one-step lookup that a tiny model learns in minutes.
    """
    from mmmb.prompts import format_question
    from mmmb.tsv import MCQRecord

    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    weights = default_language_weights("qa")
    probs = np.array([weights[lang] for lang in LANGUAGES])
    rng = np.random.default_rng([seed, 77])
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for item in _mcq_items_in(categories, n, seed, image_size):
        lang = str(LANGUAGES[int(rng.choice(len(LANGUAGES), p=probs / probs.sum()))])
        options = tuple(item.options[lang])
        record = MCQRecord(item.index, item.questions[lang], options, item.answer, item.category)
        answer = item.answer if answer_format == "letter" else options[record.answer_position]
        record_id = f"synthetic-mcq-train-{seed}-{item.index:07d}"
        item.image.save(image_dir / f"{record_id}.png")
        records.append({"id": record_id, "image": f"{record_id}.png", "lang": lang, "category": item.category,
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + format_question(record, options, lang)},
                            {"from": "gpt", "value": answer},
                        ]})
    return records


def write_data(cfg: QuickstartConfig, data_dir: Path) -> Path:
    """Write the stage-1 / stage-2 sets and their registry; returns the registry path."""
    image_dir = data_dir / "images"
    categories = cfg.category_tuple
    qa = make_conversation_records(cfg.n_qa, cfg.seed, "qa", image_dir=image_dir, image_size=cfg.image_size)
    sets = {
        "caption": make_conversation_records(cfg.n_caption, cfg.seed, "caption", image_dir=image_dir,
                                             image_size=cfg.image_size),
        # short-answer questions of the kinds the benchmark asks about (all kinds when none match)
        "qa": [r for r in qa if set(r["kinds"]) <= set(categories)] or qa,
        "mcq": mcq_training_records(cfg.n_mcq_train, cfg.seed, image_dir, cfg.image_size, categories,
                                    cfg.answer_format),
    }
    registry = {"root": ".", "datasets": {}}
    for name, records in sets.items():
        path = data_dir / f"{name}.json"
        path.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
        registry["datasets"][f"quickstart-{name}"] = {"path": path.name, "image_dir": "images"}
    registry_path = data_dir / "datasets.yaml"
    registry_path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return registry_path


def benchmark(n: int, seed: int, image_size: int, categories: tuple[str, ...] = MCQ_CATEGORIES) -> dict[str, list]:
    """The held-out synthetic MMMB: {language: [MCQRecord]} with the same items in every language, drawn from
    another seed than the training MCQs (so no benchmark scene is a training scene)."""
    from mmmb.build import records_from_items

    return records_from_items(_mcq_items_in(categories, n, seed + EVAL_SEED_OFFSET, image_size), LANGUAGES)


def evaluate(model_dir: Path, cfg: QuickstartConfig, out_dir: Path):
    from mmmb.evaluate import EvalConfig, evaluate_mmmb
    from mmmb.models import ParrotMCQModel

    data = benchmark(cfg.n_eval, cfg.seed, cfg.image_size, cfg.category_tuple)
    model = ParrotMCQModel(model_dir, max_new_tokens=8)
    mode = "likelihood" if cfg.answer_format == "letter" else "generate"
    return evaluate_mmmb(model, data, out_dir, EvalConfig(model_name="parrot-tiny", mode=mode, batch_size=32,
                                                          model_weights=model.weights_id))


def accuracy_lines(table) -> list[str]:
    from mmmb.report import AVERAGE, OVERALL

    langs = [lang for lang in LANGUAGES if lang in table.columns]
    header = "| " + " | ".join(["", *langs, AVERAGE]) + " |"
    rule = "|" + "---|" * (len(langs) + 2)
    row = "| accuracy (%) | " + " | ".join(f"{table.loc[OVERALL, c]:.1f}" for c in [*langs, AVERAGE]) + " |"
    return [header, rule, row]


def run(cfg: QuickstartConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    t0 = time.perf_counter()
    model, processor = build_tiny(cfg.recipe, seed=cfg.seed)
    init_dir = out / "init"
    save_pretrained(model, processor, init_dir)
    registry = write_data(cfg, out / "data")
    timings["model + data"] = time.perf_counter() - t0
    logger.info("tiny model (%s parameters) and synthetic data ready in %.0f s", f"{model.num_parameters():,}",
                timings["model + data"])

    common = dict(data_registry=str(registry), per_device_batch_size=cfg.batch_size,
                  global_batch_size=cfg.batch_size, seed=cfg.seed, logging_steps=20, warmup_ratio=0.03,
                  save_steps=0)
    for previous in (out / "stage1", out / "stage2", out / "eval"):
        if previous.exists():  # an earlier quickstart's output: the trainer and the evaluator's cache refuse it
            logger.info("replacing the previous quickstart run in %s", previous)
            shutil.rmtree(previous)
    t0 = time.perf_counter()
    train(TrainConfig(stage=1, model=str(init_dir), output_dir=str(out / "stage1"), data="quickstart-caption",
                      learning_rate=cfg.stage1_lr, max_steps=cfg.stage1_steps, **common))
    timings["stage 1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(TrainConfig(stage=2, model=str(out / "stage1"), output_dir=str(out / "stage2"), tuning="full",
                      data="quickstart-qa|quickstart-mcq", learning_rate=cfg.stage2_lr,
                      max_steps=cfg.stage2_steps, **common))
    timings["stage 2"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = evaluate(out / "stage2", cfg, out / "eval")
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    table = result.table
    from mmmb.report import OVERALL

    accuracy = {lang: float(table.loc[OVERALL, lang]) for lang in LANGUAGES}
    lines = [f"Synthetic MMMB, {cfg.n_eval} held-out items per language (chance {CHANCE:.0f}%):", "",
             *accuracy_lines(table), "",
             "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    print("\n".join(lines), flush=True)
    summary = {"accuracy": accuracy, "timings_s": timings, "config": cfg.__dict__}
    (out / "quickstart_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m parrot.quickstart", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = QuickstartConfig()
    for name, value in defaults.__dict__.items():
        kind = non_negative_int if name == "seed" else positive_int if isinstance(value, int) else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value, help=QuickstartConfig.__dataclass_fields__[name].metadata["help"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(QuickstartConfig(**vars(args)))


if __name__ == "__main__":
    main()
