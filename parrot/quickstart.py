"""The tiny end-to-end quickstart: synthetic data -> stage 1 -> stage 2 -> multilingual MCQ evaluation.

    python -m parrot.quickstart                 # (make quickstart) ~10 minutes on 2 CPU cores
    python -m parrot.quickstart --help          # sizes, steps, output folder

1. builds the tiny model of `configs/tiny.yaml` (random weights, tokenizer trained offline on the synthetic
   world's six languages) and writes the synthetic data: stage-1 captions, stage-2 short-answer QA plus
   multiple-choice instructions in the MMMB prompt format (English-heavy mixes, as Parrot's data);
2. stage 1: only the projector trains (vision tower + LLM frozen, MoE off);
3. stage 2: projector + Parrot MoE + LLM train (full tuning), from the stage-1 output;
4. evaluates on a held-out synthetic MMMB (the same items in en/zh/pt/ar/tr/ru, scenes never seen in training)
   with `mmmb.evaluate` (option-letter likelihood, exact match) and prints the per-language accuracy table.

Chance is 25% (four options).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .data.synthetic import LANGUAGES, default_language_weights, make_conversation_records, make_mcq_items
from .model.builder import TINY_RECIPE, build_tiny, save_pretrained
from .train import TrainConfig, train

logger = logging.getLogger("parrot.quickstart")
CHANCE = 25.0
EVAL_SEED_OFFSET = 1_000_003  # the benchmark's scenes come from another seed than the training MCQs


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    recipe: str = str(TINY_RECIPE)
    seed: int = 0
    n_caption: int = 2000
    n_qa: int = 2000
    n_mcq_train: int = 4000
    n_eval: int = 150  # benchmark items per language
    image_size: int = 64  # drawn size; the model's transform resizes to the recipe's image size
    stage1_steps: int = 60
    stage2_steps: int = 400
    batch_size: int = 32
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    eval_mode: str = "likelihood"


def mcq_training_records(n: int, seed: int, image_dir: Path, image_size: int) -> list[dict]:
    """Multiple-choice instructions in the MMMB prompt format (question, lettered options, the answer
    instruction in the item's language) with the answer letter as the target; one language per item, drawn
    with the English-heavy stage-2 weights."""
    from mmmb.prompts import format_question
    from mmmb.tsv import MCQRecord

    weights = default_language_weights("qa")
    probs = np.array([weights[lang] for lang in LANGUAGES])
    rng = np.random.default_rng([seed, 77])
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for item in make_mcq_items(n, seed=seed, image_size=image_size):
        lang = str(LANGUAGES[int(rng.choice(len(LANGUAGES), p=probs / probs.sum()))])
        options = tuple(item.options[lang])
        record = MCQRecord(item.index, item.questions[lang], options, item.answer, item.category)
        record_id = f"synthetic-mcq-train-{seed}-{item.index:07d}"
        item.image.save(image_dir / f"{record_id}.png")
        records.append({"id": record_id, "image": f"{record_id}.png", "lang": lang, "conversations": [
            {"from": "human", "value": "<image>\n" + format_question(record, options, lang)},
            {"from": "gpt", "value": item.answer},
        ]})
    return records


def write_data(cfg: QuickstartConfig, data_dir: Path) -> Path:
    """Write the stage-1 / stage-2 sets and their registry; returns the registry path."""
    image_dir = data_dir / "images"
    sets = {
        "caption": make_conversation_records(cfg.n_caption, cfg.seed, "caption", image_dir=image_dir,
                                             image_size=cfg.image_size),
        "qa": make_conversation_records(cfg.n_qa, cfg.seed, "qa", image_dir=image_dir, image_size=cfg.image_size),
        "mcq": mcq_training_records(cfg.n_mcq_train, cfg.seed, image_dir, cfg.image_size),
    }
    registry = {"root": ".", "datasets": {}}
    for name, records in sets.items():
        path = data_dir / f"{name}.json"
        path.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
        registry["datasets"][f"quickstart-{name}"] = {"path": path.name, "image_dir": "images"}
    registry_path = data_dir / "datasets.yaml"
    registry_path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return registry_path


def benchmark(n: int, seed: int, image_size: int) -> dict[str, list]:
    """The held-out synthetic MMMB: {language: [MCQRecord]} with the same items in every language."""
    from mmmb.tsv import MCQRecord, encode_image

    items = make_mcq_items(n, seed=seed + EVAL_SEED_OFFSET, image_size=image_size)
    data = {}
    for lang in LANGUAGES:
        data[lang] = [MCQRecord(item.index, item.questions[lang], tuple(item.options[lang]), item.answer,
                                item.category, image_b64=encode_image(item.image)) for item in items]
    return data


def evaluate(model_dir: Path, cfg: QuickstartConfig, out_dir: Path):
    from mmmb.evaluate import EvalConfig, evaluate_mmmb
    from mmmb.models import ParrotMCQModel

    data = benchmark(cfg.n_eval, cfg.seed, cfg.image_size)
    model = ParrotMCQModel(model_dir)
    return evaluate_mmmb(model, data, out_dir, EvalConfig(model_name="parrot-tiny", mode=cfg.eval_mode,
                                                          batch_size=32))


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
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(QuickstartConfig(**vars(args)))


if __name__ == "__main__":
    main()
