"""Evaluate a model on MMMB: prompts → (generation + answer extraction | option-letter likelihood) → scores.

    python -m mmmb.evaluate --model runs/tiny --data data/mmmb [--mode generate|likelihood] [--circular]
                            [--batch-size 8] [--out results/tiny] [--languages en zh]

Writes to ``--out``: ``<model>_MMMB_<lang>.xlsx`` and ``.tsv`` (VLMEvalKit's names: ``cn`` for Chinese) with the
prediction of every prompt, ``<model>_MMMB_acc.csv|.md|.png`` (category × language accuracy, ``Avg`` column)
and ``summary.json`` (read by :mod:`mmmb.leaderboard`). Predictions are cached per prompt in
``cache/<mode>/<lang>.jsonl`` so an interrupted run resumes where it stopped; an ``--out`` whose ``summary.json``
records another mode or circular setting is refused (the run would replace those results). The cache is tied to
the model name, its weights (``EvalConfig.model_weights``: a hash of every weight byte), its settings (the adapter's
``settings_id(mode)``: processor, chat template, ``max_new_tokens``), each prompt's text and each item's image: a
cache made otherwise is refused, never reused; ``--fresh`` discards it. A path-based item's image file is read once
per use and decoded from the bytes that were hashed.

Bad items are errors, as in :mod:`mmmb.tsv` (an item skipped in one language would break the alignment of the six):
an item whose hint, question or option text spells one of the model's control-token texts (the adapter's
``reserved_texts()``, e.g. ``<|im_end|>`` or ``<image>``) is refused before any inference, naming the TSV file, the
row and the column. ``summary.json`` records the identity of the data of every language (item count and a hash of
the items' text, answers, categories and images), which :mod:`mmmb.leaderboard` compares across results.

Scoring is exact matching as in the Parrot paper; circular evaluation (MMBench's CircularEval) asks every
rotation of the options and counts an item as correct only if all rotations are answered correctly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmmb.cache import PredictionCache, prompt_hash
from mmmb.extract import extract_answer
from mmmb.languages import LANGUAGES, VLMEVALKIT_CODE
from mmmb.models import MCQModel
from mmmb.prompts import (format_question, prompt_fields, reserved_text_in, reserved_text_message,
                          rotate_options)
from mmmb.report import AVERAGE, OVERALL, accuracy_table, plot_accuracy, to_markdown
from mmmb.tsv import (OPTION_LETTERS, MCQRecord, MMMBFormatError, check_alignment, decode_image,
                      decode_image_bytes, read_mmmb)
from parrot.fileio import positive_int, read_json_mapping

logger = logging.getLogger(__name__)
MODES = ("generate", "likelihood")
CIRCULAR_INDEX_STRIDE = 1_000_000  # VLMEvalKit numbers rotation r of item i as i + r * 1e6


@dataclass(frozen=True)
class EvalConfig:
    model_name: str
    mode: str = "generate"
    circular: bool = False
    batch_size: int = 8
    # An identity of the weights (`ParrotMCQModel.weights_id`), recorded with every cached prediction: a cache made
    # by other weights under the same name (a retrained model) is refused, not reused. "" = not tracked.
    model_weights: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Query:
    """One prompt sent to the model: an item with its options rotated by ``rotation``."""

    record: MCQRecord
    rotation: int
    options: tuple[str, ...]
    answer: str
    prompt: str

    @property
    def key(self) -> str:
        return f"{self.record.index}:{self.rotation}"


@dataclass
class EvalResult:
    table: pd.DataFrame  # accuracy % (rows Overall + categories, columns languages + Avg)
    items: dict[str, pd.DataFrame]  # per language: index, category, hit, no_answer
    predictions: dict[str, pd.DataFrame]  # per language: one row per prompt

    @property
    def average(self) -> float:
        return float(self.table.loc[OVERALL, AVERAGE])


class ItemImages:
    """The images of one language's items: their sha1 (what the cache and the data identity are tied to) and,
    for the items asked, the decoded images. A path-based item's file is read once per use (the cache check, or a
    batch) and decoded from the very bytes that were hashed, so the hash recorded with a prediction is that of the
    image the model saw; a file that changes between two uses in a run is an error. Base64 images are hashed as
    their text."""

    def __init__(self, language: str):
        self.language = language
        self.sha1: dict[int, str] = {}  # item index -> sha1 of its image as stored
        # The previous batch's images: an item's rotations are consecutive, so one cut by a batch boundary finds
        # its image here instead of reading the file again. Holds one batch of images, not the benchmark's.
        self._previous: dict[int, Image.Image] = {}

    def digest(self, record: MCQRecord) -> str:
        """sha1 of the item's image as stored (base64 text, or the file's bytes); a file is read only the first
        time."""
        if record.index not in self.sha1:
            self._remember(record, hashlib.sha1(self._stored(record)).hexdigest())
        return self.sha1[record.index]

    def load(self, records: Sequence[MCQRecord]) -> list[Image.Image]:
        """The decoded image of each record, from consecutive batches (an item repeated by rotations, within a
        batch or across two, is read and decoded once)."""
        decoded: dict[int, Image.Image] = {}
        for record in records:
            if record.index in decoded:
                continue
            if record.index in self._previous:
                decoded[record.index] = self._previous[record.index]
                continue
            stored = self._stored(record)
            self._remember(record, hashlib.sha1(stored).hexdigest())
            decoded[record.index] = self._decode(record, stored)
        self._previous = decoded
        return [decoded[record.index] for record in records]

    def _where(self, record: MCQRecord) -> str:
        return f"MMMB {self.language}, item index {record.index}"

    def _stored(self, record: MCQRecord) -> bytes:
        if record.image_b64 is not None:
            return record.image_b64.encode("ascii", "replace")
        if record.image_path is None:
            raise ValueError(f"{self._where(record)}: the item has neither an image nor an image_path")
        try:
            return Path(record.image_path).read_bytes()
        except OSError as error:
            raise ValueError(f"{self._where(record)}: cannot read image file {record.image_path!r} ({error})") \
                from None

    def _decode(self, record: MCQRecord, stored: bytes) -> Image.Image:
        try:
            return decode_image(record.image_b64) if record.image_b64 is not None else decode_image_bytes(stored)
        except ValueError as error:
            source = "its base64 image" if record.image_b64 is not None else f"image file {record.image_path!r}"
            raise ValueError(f"{self._where(record)}: {source}: {error}") from None

    def _remember(self, record: MCQRecord, digest: str) -> None:
        known = self.sha1.setdefault(record.index, digest)
        if known != digest:
            raise ValueError(f"{self._where(record)}: image file {record.image_path!r} changed during the "
                             "evaluation; rerun once the data is final")


def build_queries(records: Sequence[MCQRecord], language: str, circular: bool) -> list[Query]:
    queries = []
    for record in records:
        for rotation in range(len(record.options) if circular else 1):
            options, answer = rotate_options(record, rotation)
            queries.append(Query(record, rotation, options, answer, format_question(record, options, language)))
    return queries


# Members of `MCQModel` that the evaluator calls in every mode (`generate` / `option_logprobs` only in their mode).
_ALWAYS_CALLED = ("settings_id", "reserved_texts")


def check_adapter(model: MCQModel) -> None:
    """Refuse an adapter without the `MCQModel` members called in every mode, before any work: subclassing
    `MCQModel` gives their documented defaults."""
    missing = [name for name in _ALWAYS_CALLED if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks the MCQModel member(s) {missing}; define them or subclass "
                        "mmmb.models.MCQModel to inherit their defaults")


def check_reserved_texts(data: dict[str, list[MCQRecord]], reserved: Sequence[str]) -> None:
    """Refuse an item whose prompt text spells one of ``reserved`` (the model's control-token texts), naming its
    TSV file, row and column: tokenised, the text would become the control token itself (end the user turn, or add
    an image placeholder without an image). An error, not a skip, as every bad item in :mod:`mmmb.tsv`."""
    for language, records in data.items():
        for record in records:
            for column, text in prompt_fields(record):
                found = reserved_text_in(text, reserved)
                if found is not None:
                    raise MMMBFormatError(record.source or f"MMMB {language} (items not read from a TSV)",
                                          reserved_text_message(found), row=record.source_row or record.index,
                                          column=column)


def data_identity(records: Sequence[MCQRecord], images: ItemImages) -> dict[str, object]:
    """What identifies the data a language was scored on: its item count and a blake2b-256 over every item's
    index, hint, question, options, answer, category and image sha1, in index order (so the same items in another
    row order or file layout give the same identity). :mod:`mmmb.leaderboard` ranks only results whose identities
    agree."""
    digest = hashlib.blake2b(digest_size=32)
    for record in sorted(records, key=lambda r: r.index):
        content = [record.index, record.hint, record.question, list(record.options), record.answer, record.category,
                   images.digest(record)]
        digest.update(json.dumps(content, ensure_ascii=False).encode("utf-8") + b"\n")
    return {"items": len(records), "digest": "blake2b-256:" + digest.hexdigest()}


def _locate(error: ValueError, batch: list[Query], language: str) -> ValueError:
    """``error`` raised by the model on ``batch``, reworded to name the language and the item(s): the model only
    knows positions in the batch ("prompt 0 is 234 tokens long")."""
    position = getattr(error, "position", None)
    if isinstance(position, int) and 0 <= position < len(batch):
        query = batch[position]
        where = f"item index {query.record.index} (rotation {query.rotation}, key {query.key!r})"
    else:
        where = f"a batch of item indices {sorted({query.record.index for query in batch})}"
    return ValueError(f"MMMB {language}, {where}: {error}")


class _ItemError(ValueError):
    """A problem with the model's answer to prompt ``position`` of a batch (located by :func:`_locate`)."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


def _run_batch(model: MCQModel, batch: list[Query], config: EvalConfig, language: str, settings: str,
               item_images: ItemImages) -> list[dict]:
    images = item_images.load([query.record for query in batch])  # its errors name the item already
    try:
        return _ask_model(model, batch, images, item_images, config, settings)
    except ValueError as error:
        raise _locate(error, batch, language) from error


def _ask_model(model: MCQModel, batch: list[Query], images: list[Image.Image], item_images: ItemImages,
               config: EvalConfig, settings: str) -> list[dict]:
    mode = config.mode
    prompts = [query.prompt for query in batch]
    base = [{"key": q.key, "index": q.record.index, "rotation": q.rotation, "prompt_sha1": prompt_hash(q.prompt),
             "image_sha1": item_images.digest(q.record), "model": config.model_name,
             "weights": config.model_weights, "settings": settings} for q in batch]
    if mode == "generate":
        texts = model.generate(prompts, images)
        if len(texts) != len(batch):
            raise ValueError(f"model.generate returned {len(texts)} outputs for {len(batch)} prompts")
        return [entry | {"prediction": str(text)} for entry, text in zip(base, texts)]
    letters = OPTION_LETTERS[: max(len(q.options) for q in batch)]
    scores = torch.as_tensor(model.option_logprobs(prompts, images, list(letters))).float()  # (B, L)
    if scores.shape != (len(batch), len(letters)):
        raise ValueError(f"model.option_logprobs returned shape {tuple(scores.shape)}, "
                         f"expected {(len(batch), len(letters))}")
    n_options = torch.tensor([len(q.options) for q in batch])
    valid = torch.arange(len(letters))[None, :] < n_options[:, None]  # (B, L): items may have fewer options
    masked = scores.masked_fill(~valid, float("-inf"))  # (B, L)
    # argmax would read a NaN row (an fp16 overflow) or an all -inf row as "A": refuse it instead.
    broken = (scores.isnan() & valid).any(dim=-1) | ~masked.max(dim=-1).values.isfinite()  # (B,)
    if broken.any():
        position = int(broken.nonzero()[0, 0])
        raise _ItemError(position, f"model.option_logprobs returned no finite score for prompt {position}: "
                                   f"{scores[position, : len(batch[position].options)].tolist()}")
    chosen = masked.argmax(dim=-1)  # (B,)
    return [entry | {"prediction": letters[c], "logprobs": row[: len(q.options)].tolist()}
            for entry, c, row, q in zip(base, chosen.tolist(), scores, batch)]


def _is_cached(query: Query, cache: PredictionCache, images: ItemImages) -> bool:
    """Whether the cache answers ``query``; an entry made for another prompt or image is an error (``cache.get``).
    Without an entry the image is not read here: it is read (once) when the query is asked."""
    if query.key not in cache.entries:
        return False
    cache.get(query.key, query.prompt, images.digest(query.record))
    return True


def predict_language(model: MCQModel, queries: list[Query], cache: PredictionCache, config: EvalConfig,
                     language: str, settings: str, images: ItemImages) -> dict[str, dict]:
    """Predictions for every query, asking the model only for those missing from the cache. An image is read
    for the cache check only where the cache has an entry to check."""
    mode, batch_size = config.mode, config.batch_size
    cached_models = {entry.get("model") for entry in cache.entries.values()} - {config.model_name}
    if cached_models:
        raise ValueError(f"{cache.path} holds predictions of model(s) {sorted(map(str, cached_models))}, not "
                         f"{config.model_name!r}; use another --out (or --fresh to discard the cache)")
    cached_weights = {entry.get("weights", "") for entry in cache.entries.values()} - {config.model_weights}
    if cached_weights:
        raise ValueError(f"{cache.path} holds predictions of other weights saved as {config.model_name!r} (weights "
                         f"{sorted(cached_weights)}, now {config.model_weights!r}: retrained?); use another --out "
                         "(or --fresh to discard the cache)")
    cached_settings = {entry.get("settings", "") for entry in cache.entries.values()} - {settings}
    if cached_settings:
        raise ValueError(f"{cache.path} holds predictions of {config.model_name!r} made with other settings "
                         f"({sorted(cached_settings)}, now {settings!r}); use another --out (or --fresh to discard "
                         "the cache)")
    todo = [query for query in queries if not _is_cached(query, cache, images)]
    if len(todo) < len(queries):
        logger.info("%s: %d of %d prompts already cached", language, len(queries) - len(todo), len(queries))
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc=f"MMMB {language} ({mode})", unit="batch", disable=not batches):
        cache.append(_run_batch(model, batch, config, language, settings, images))
    return {query.key: cache.get(query.key, query.prompt, images.digest(query.record)) for query in queries}


def score_language(queries: list[Query], predictions: dict[str, dict], mode: str,
                   category_of: dict[int, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-prompt predictions table, per-item results). An item is correct iff all its prompts are."""
    rows = []
    for query in queries:
        prediction = predictions[query.key]["prediction"]
        extracted = extract_answer(prediction, query.options) if mode == "generate" else prediction
        record = query.record
        rows.append({
            "index": record.index + query.rotation * CIRCULAR_INDEX_STRIDE, "question": record.question,
            **{letter: text for letter, text in zip(OPTION_LETTERS, query.options)},
            "answer": query.answer, "category": record.category, "l2-category": record.l2_category or "",
            "prediction": prediction, "extracted": extracted or "", "hit": extracted == query.answer,
            "item_index": record.index, "rotation": query.rotation,
        })
    per_prompt = pd.DataFrame(rows)
    by_item = per_prompt["item_index"]
    items = pd.DataFrame({
        "hit": per_prompt["hit"].groupby(by_item, sort=False).all(),
        "no_answer": per_prompt["extracted"].eq("").groupby(by_item, sort=False).any(),
    }).reset_index(names="index")
    items["category"] = items["index"].map(category_of)
    return per_prompt, items


def _write_predictions(frame: pd.DataFrame, stem: Path) -> None:
    frame.to_csv(stem.with_suffix(".tsv"), sep="\t", index=False)
    # openpyxl rejects control characters that a model may emit; the .tsv keeps the raw text.
    printable = frame.replace(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", regex=True)
    _write_excel(printable, stem.with_suffix(".xlsx"))


def _write_excel(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as .xlsx with every text cell stored as text: openpyxl turns a string starting with "="
    (a model answering "=B", an option "=1+1") into a formula, which Excel would evaluate."""
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        frame.to_excel(writer, index=False)
        for row in writer.sheets["Sheet1"].iter_rows():
            for cell in row:
                if cell.data_type == "f":
                    cell.data_type = "s"


def _setting_name(mode: object, circular: object) -> str:
    return f"{mode}{' circular' if circular else ''}"


def check_out_dir(out_dir: Path, mode: str, circular: bool) -> None:
    """Refuse an ``out_dir`` whose ``summary.json`` records another (mode, circular): the run would replace that
    evaluation's summary and tables with its own (the default folders are per mode, an explicit ``--out`` may be
    re-used). A re-run of the same setting continues there (its cache is per mode)."""
    previous = out_dir / "summary.json"
    if not previous.is_file():
        return
    old = read_json_mapping(previous, "an earlier evaluation's summary")
    if (old.get("mode"), bool(old.get("circular"))) != (mode, circular):
        raise ValueError(f"{out_dir} holds the results of a {_setting_name(old.get('mode'), old.get('circular'))} "
                         f"evaluation ({previous}); this {_setting_name(mode, circular)} run would "
                         "replace its summary and tables: use another --out (the default folder is per mode), or "
                         "delete that folder first")


def evaluate_mmmb(model: MCQModel, data: dict[str, list[MCQRecord]], out_dir: str | Path,
                  config: EvalConfig) -> EvalResult:
    """Evaluate ``model`` on the aligned per-language ``data`` and write all outputs to ``out_dir``."""
    check_adapter(model)
    check_alignment(data)
    empty = [language for language, records in data.items() if not records]
    if empty or not data:
        raise ValueError(f"no MMMB items to evaluate for language(s) {empty or 'any'}")
    check_reserved_texts(data, model.reserved_texts())
    settings = model.settings_id(config.mode)
    if not isinstance(settings, str):
        raise TypeError(f"{type(model).__name__}.settings_id({config.mode!r}) returned {type(settings).__name__}, "
                        "not str")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, config.mode, config.circular)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Categories come from one reference language so translated category names still share a table row.
    reference = "en" if "en" in data else next(iter(data))
    category_of = {record.index: record.category for record in data[reference]}
    items, predictions, identity = {}, {}, {}
    for language, records in data.items():
        queries = build_queries(records, language, config.circular)
        cache = PredictionCache(out_dir / "cache" / config.mode / f"{language}.jsonl")
        images = ItemImages(language)
        answered = predict_language(model, queries, cache, config, language, settings, images)
        identity[language] = data_identity(records, images)  # every image was hashed while predicting
        predictions[language], items[language] = score_language(queries, answered, config.mode, category_of)
        _write_predictions(predictions[language].drop(columns=["item_index"]),
                           out_dir / f"{config.model_name}_MMMB_{VLMEVALKIT_CODE[language]}")
    table = accuracy_table(items)
    stem = out_dir / f"{config.model_name}_MMMB_acc"
    table.to_csv(stem.with_suffix(".csv"))
    stem.with_suffix(".md").write_text(
        f"# {config.model_name} on MMMB ({config.mode}{', circular' if config.circular else ''})\n\n"
        + to_markdown(table), encoding="utf-8")
    plot_accuracy(table, stem.with_suffix(".png"), title=f"{config.model_name}: MMMB")
    summary = {
        **asdict(config), "model_settings": settings, "languages": list(data),
        "average": float(table.loc[OVERALL, AVERAGE]),
        "accuracy": {language: float(table.loc[OVERALL, language]) for language in data},
        "items": {language: len(frame) for language, frame in items.items()},
        "no_answer": {language: int(frame["no_answer"].sum()) for language, frame in items.items()},
        "data_identity": identity,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return EvalResult(table=table, items=items, predictions=predictions)


def main(argv: Sequence[str] | None = None) -> EvalResult:
    parser = argparse.ArgumentParser(prog="python -m mmmb.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Parrot model directory (weights + processor)")
    parser.add_argument("--data", required=True, nargs="+", help="directory of mmmb_<lang>.tsv and/or TSV files")
    parser.add_argument("--mode", choices=MODES, default="generate")
    parser.add_argument("--circular", action="store_true", help="ask every rotation of the options")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--out", help="output directory (default: results/<model name>[_likelihood][_circular])")
    parser.add_argument("--languages", nargs="+", default=None, help=f"subset of {LANGUAGES} (cn = zh)")
    parser.add_argument("--model-name", help="name used in file names and the leaderboard (default: model dir name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--fresh", action="store_true", help="discard cached predictions of this mode first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mmmb.models import ParrotMCQModel

    model_name = args.model_name or Path(args.model).resolve().name
    # Default folder per (model, mode) so a likelihood or circular run never overwrites a generation run.
    suffix = ("" if args.mode == "generate" else f"_{args.mode}") + ("_circular" if args.circular else "")
    out_dir = Path(args.out or Path("results") / f"{model_name}{suffix}")
    check_out_dir(out_dir, args.mode, args.circular)  # before the model loads and --fresh deletes anything there
    data = read_mmmb(args.data, languages=args.languages)
    model = ParrotMCQModel(args.model, device=args.device, max_new_tokens=args.max_new_tokens,
                           dtype=getattr(torch, args.dtype) if args.dtype else None)
    config = EvalConfig(model_name=model_name, mode=args.mode, circular=args.circular, batch_size=args.batch_size,
                        model_weights=model.weights_id)
    if args.fresh:
        shutil.rmtree(out_dir / "cache" / args.mode, ignore_errors=True)
    result = evaluate_mmmb(model, data, out_dir, config)
    print(to_markdown(result.table))
    return result


if __name__ == "__main__":
    main()
