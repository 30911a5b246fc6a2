"""Tiny end-to-end numbers: one stage-2 training step, and MMMB evaluation throughput (generation vs likelihood).

Training: the tiny recipe (`configs/tiny.yaml`) with the Parrot MoE on (stage 2: projector + MoE + LLM train,
vision tower frozen), one AdamW step = forward with labels + backward + optimizer step. The same model with
the MoE switched off (`config.use_moe = False`: stage-1 data path) is the comparison: the ratio is the MoE's
share of a step.

MMMB: the same model saved and loaded through `mmmb.models.ParrotMCQModel`; one batch of toy MMMB items
(`mmmb.toy.toy_mmmb`) answered by greedy generation (`generate`, `--max-new-tokens`) vs by option-letter
likelihood (`option_logprobs`, one forward). Items/s = batch / median time. `extra.end_to_end` also times one
full `mmmb.evaluate.evaluate_mmmb` run per mode (prompts, model, extraction, scoring, reports).

    python -m benchmarks.bench_train_eval [--device cuda] [--batch 8] [--out results/]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmmb.evaluate import EvalConfig, evaluate_mmmb
from mmmb.languages import LANGUAGES
from mmmb.models import ParrotMCQModel
from mmmb.prompts import format_question
from mmmb.toy import toy_mmmb
from mmmb.tsv import OPTION_LETTERS, decode_image
from parrot.fileio import positive_int
from parrot.model.builder import build_tiny, save_pretrained

from .harness import BenchSettings, Ratio, add_common_args, finish, profile_cases, settings_from_args, time_cases

QUESTIONS = ("What colour is the square in the picture?", "How many circles are there?",
             "Which shape is on the left?", "Describe the image in one word.")


def training_batch(processor, batch: int, generator: np.random.Generator) -> dict[str, torch.Tensor]:
    size = processor.settings.image_size
    images = [Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    texts = [processor.build_prompt(QUESTIONS[i % len(QUESTIONS)]) + " red square" for i in range(batch)]
    encoded = processor(texts, images, padding_side="right")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return encoded


def run(args: argparse.Namespace, settings: BenchSettings):
    device, dtype = settings.device, settings.dtype
    sizes = dict(batch=4 if settings.quick else args.batch, eval_batch=4 if settings.quick else args.eval_batch,
                 max_new_tokens=args.max_new_tokens, eval_items=6 if settings.quick else args.eval_items,
                 recipe="configs/tiny.yaml")
    model, processor = build_tiny(seed=settings.seed, use_moe=True)
    model.to(device=device, dtype=dtype).train()
    for name, p in model.named_parameters():
        p.requires_grad_("vision" not in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {k: v.to(device) for k, v in training_batch(processor, sizes["batch"], np.random.default_rng(0)).items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)

    def train_step(use_moe: bool):
        def step():
            model.config.use_moe = use_moe
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            model.config.use_moe = True
            return loss
        return step

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-parrot"
        model.eval()
        save_pretrained(model, processor, model_dir)
        model.train()
        mcq = ParrotMCQModel(model_dir, device=str(device), dtype=dtype, max_new_tokens=sizes["max_new_tokens"])
        languages = ("en", "zh") if settings.quick else LANGUAGES
        data = toy_mmmb(n_items=sizes["eval_items"], seed=settings.seed, languages=languages)
        records = data["en"][: sizes["eval_batch"]] * max(1, -(-sizes["eval_batch"] // len(data["en"])))
        records = records[: sizes["eval_batch"]]
        prompts = [format_question(r, r.options, "en") for r in records]
        images = [decode_image(r.image_b64) for r in records]
        letters = OPTION_LETTERS[: max(len(r.options) for r in records)]

        cases = {
            "train step: stage 2 (MoE on)": train_step(True),
            "train step: MoE off (stage-1 data path)": train_step(False),
            f"MMMB generate ({sizes['max_new_tokens']} new tokens)": lambda: mcq.generate(prompts, images),
            "MMMB likelihood (option letters)": lambda: mcq.option_logprobs(prompts, images, letters),
        }
        times = time_cases(cases, settings, "train/eval")
        if settings.profile:
            profile_cases(cases, settings, "train_eval")

        end_to_end = {}
        for mode in ("generate", "likelihood"):
            start = time.perf_counter()
            try:
                evaluate_mmmb(mcq, data, Path(tmp) / f"eval-{mode}",
                              EvalConfig(model_name="tiny", mode=mode, batch_size=sizes["eval_batch"]))
            except Exception as err:  # e.g. no openpyxl for the .xlsx report: keep the timed numbers above
                end_to_end[mode] = {"error": f"{type(err).__name__}: {err}"}
                continue
            seconds = time.perf_counter() - start
            n_prompts = sum(len(v) for v in data.values())
            end_to_end[mode] = {"prompts": n_prompts, "seconds": round(seconds, 3),
                                "items_per_s": round(n_prompts / seconds, 2)}

    names = list(cases)
    ratios = [Ratio("stage-2 step / MoE-off step", names[0], names[1]),
              Ratio("likelihood speedup over generation", names[2], names[3])]
    medians = {name: statistics.median(t) for name, t in times.items()}  # the tables' median (Timing.of)
    throughput = {"generate_items_per_s": round(sizes["eval_batch"] / medians[names[2]] * 1e3, 2),
                  "likelihood_items_per_s": round(sizes["eval_batch"] / medians[names[3]] * 1e3, 2)}
    print(f"  MMMB throughput (one batch of {sizes['eval_batch']}): {throughput}")
    print(f"  MMMB end to end (toy set, all languages, with reports): {end_to_end}")
    notes = ["tiny random model: absolute numbers show the pipeline's overhead, not a 7B model's speed",
             "generation may stop early if every row emits EOS; the tiny random model rarely does"]
    return finish("train_eval", sizes, times, ratios, [], settings, names[0], notes,
                  extra={"mmmb_throughput": throughput, "end_to_end": end_to_end})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=8, help="training batch size")
    parser.add_argument("--eval-batch", type=positive_int, default=8, help="MMMB prompts per model call")
    parser.add_argument("--eval-items", type=positive_int, default=12, help="toy MMMB items per language (end-to-end run)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    add_common_args(parser, warmup=(1, 3), repeats=(5, 20))
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    return run(args, settings_from_args(args))


if __name__ == "__main__":
    main()
