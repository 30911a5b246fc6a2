"""Build the six MMMB TSVs (``mmmb_<lang>.tsv``, VLMEvalKit MCQ layout) and validate them.

    python -m mmmb.build --source items.json --out data/mmmb            # your own items
    python -m mmmb.build --source items_dir/ --out data/mmmb            # en.json + zh.json + ... per language
    python -m mmmb.build --synthetic 2000 --seed 1234 --out data/mmmb   # synthetic MMMB (offline default)

Source formats (JSON list, ``{"items": [...]}`` or JSONL):

* one multilingual file, each item
  ``{"index": 0, "image": "img/0.png", "category": "...", "l2-category": "...", "answer": "B",
  "question": {"en": "...", "zh": "...", ...}, "options": {"en": ["...", ...], "zh": [...], ...}}``;
* a folder of per-language files ``<lang>.json``/``<lang>.jsonl`` (``cn`` accepted for Chinese), each item
  ``{"index", "question": str, "options": [...], "answer", "category", "image"}``. Non-English files may omit
  ``image``/``answer``/``category``/``l2-category`` (one English set plus translations): they are taken from the
  English item with the same index, and must equal it where given.

``image`` is a path relative to the source file, or base64 (optionally a ``data:image/...;base64,`` URI).
Every output row is validated (answer among its options, image decodes, same indices in every language) and
the written files are read back. Errors name the file, item index and field.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from mmmb.languages import LANGUAGES, VLMEVALKIT_CODE, canonical_language
from mmmb.tsv import (OPTION_LETTERS, MCQRecord, MMMBFormatError, check_alignment, decode_image,
                      encode_image, encode_image_bytes, read_mmmb, write_tsv)
from parrot.fileio import JSONLineError, NotUTF8Error, decode_utf8, iter_jsonl, non_negative_int, positive_int

logger = logging.getLogger(__name__)
_INHERITED_FIELDS = ("image", "answer", "category", "l2-category")


def _load_items(path: Path) -> list[dict]:
    """The items of a JSON list, ``{"items": [...]}`` or JSONL file (UTF-8, a leading byte-order mark allowed; JSONL
    read by ``parrot.fileio.iter_jsonl``, lines ending at "\\n" only); MMMBFormatError naming the file, and the
    1-based line for text that is not UTF-8 or JSON that does not parse."""
    try:
        if path.suffix == ".jsonl":
            items = [item for _, item in iter_jsonl(path)]
        else:
            text = decode_utf8(path.read_bytes())
    except (NotUTF8Error, JSONLineError) as error:
        raise MMMBFormatError(path, f"line {error.line}: {error}") from None
    if path.suffix != ".jsonl":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise MMMBFormatError(path, f"line {error.lineno}: invalid JSON ({error.msg} at column {error.colno}); "
                                        "expected a JSON list or {'items': [...]}") from None
        if isinstance(loaded, dict) and "items" not in loaded:
            raise MMMBFormatError(path, "a JSON object without an 'items' list; expected a JSON list of items or "
                                        "{'items': [...]}")
        items = loaded["items"] if isinstance(loaded, dict) else loaded
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise MMMBFormatError(path, "expected a list of item objects")
    return items


def _field(path: Path, item: dict, name: str, row: object, kind: type = str):
    if name not in item or item[name] in (None, ""):
        raise MMMBFormatError(path, "missing field", row=row, column=name)
    value = item[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):  # JSON true is no index
        raise MMMBFormatError(path, f"expected {kind.__name__}, got {type(value).__name__}", row=row, column=name)
    return value


def _is_file(candidate: Path) -> bool:
    try:
        return candidate.is_file()
    except OSError:  # e.g. a short inline base64 image read as a path: a "file name too long"
        return False


def _image_b64(path: Path, value: str, row: object, decoded: dict[str, str]) -> str:
    """Base64 of the item's image (file bytes kept as they are), checked to decode; cached per source value."""
    if value not in decoded:
        candidate = path.parent / value if len(value) < 4096 else None
        if candidate is not None and _is_file(candidate):
            b64 = encode_image_bytes(candidate.read_bytes())
        else:
            b64 = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            decode_image(b64)
        except ValueError as error:
            hint = "" if candidate is None or _is_file(candidate) else f" (and no file {str(candidate)!r})"
            raise MMMBFormatError(path, f"image does not decode: {error}{hint}", row=row, column="image") from None
        decoded[value] = b64
    return decoded[value]


def _record(path: Path, item: dict, row: object, question: object, options: object, b64: str) -> MCQRecord:
    if not isinstance(question, str) or not question.strip():
        raise MMMBFormatError(path, "missing or empty question text", row=row, column="question")
    if (not isinstance(options, list) or len(options) < 2 or len(options) > len(OPTION_LETTERS)
            or not all(isinstance(o, str) and o.strip() for o in options)):
        raise MMMBFormatError(path, "options must be a list of 2-26 non-empty strings", row=row, column="options")
    answer = _field(path, item, "answer", row).strip()
    if answer not in OPTION_LETTERS[: len(options)]:
        raise MMMBFormatError(path, f"answer {answer!r} is not among the options {OPTION_LETTERS[: len(options)]}",
                              row=row, column="answer")
    return MCQRecord(index=_field(path, item, "index", row, int), question=question, options=tuple(options),
                     answer=answer, category=_field(path, item, "category", row),
                     l2_category=item.get("l2-category") or None, image_b64=b64)


def _check_unique_indices(path: Path, items: list[dict]) -> None:
    seen = set()
    for position, item in enumerate(items):
        index = _field(path, item, "index", f"(item {position})", int)
        if index in seen:
            raise MMMBFormatError(path, "duplicate index", row=index, column="index")
        seen.add(index)


def _by_language(path: Path, row: object, column: str, values: dict) -> dict:
    """{MMMB language: value} of one item field. Codes of other languages are left out (a source may hold more
    languages than MMMB's six); two aliases of one language (`zh` and `cn`) are an error, not one overwriting the
    other."""
    by_language: dict[str, object] = {}
    for code, value in values.items():
        try:
            language = canonical_language(str(code))
        except ValueError:
            continue
        if language in by_language:
            raise MMMBFormatError(path, f"two entries for language {language!r} (aliases, e.g. 'zh' and 'cn')",
                                  row=row, column=f"{column}.{code}")
        by_language[language] = value
    return by_language


def records_from_multilingual_file(path: Path, languages: Sequence[str]) -> dict[str, list[MCQRecord]]:
    items = _load_items(path)
    _check_unique_indices(path, items)
    sets: dict[str, list[MCQRecord]] = {language: [] for language in languages}
    decoded: dict[str, str] = {}
    for item in tqdm(items, desc=f"reading {path.name}", unit="item"):
        row = item["index"]
        questions, options = _field(path, item, "question", row, dict), _field(path, item, "options", row, dict)
        questions = _by_language(path, row, "question", questions)
        options = _by_language(path, row, "options", options)
        b64 = _image_b64(path, _field(path, item, "image", row), row, decoded)
        for language in languages:
            if language not in questions or language not in options:
                field = "question" if language not in questions else "options"
                raise MMMBFormatError(path, f"no {language!r} translation", row=row, column=f"{field}.{language}")
            sets[language].append(_record(path, item, row, questions[language], options[language], b64))
    return sets


def records_from_language_folder(folder: Path, languages: Sequence[str]) -> dict[str, list[MCQRecord]]:
    files: dict[str, Path] = {}
    for candidate in sorted(folder.iterdir()):
        if candidate.suffix in (".json", ".jsonl"):
            try:
                language = canonical_language(candidate.stem)
            except ValueError:
                continue
            if language in files:
                raise MMMBFormatError(candidate, f"second source file for {language!r} (also {files[language]})")
            files[language] = candidate
    missing = [language for language in languages if language not in files]
    if missing:
        raise MMMBFormatError(folder, f"no source file for language(s) {missing} (expected <lang>.json/.jsonl)")
    english_path = files.get("en")
    english = {item.get("index"): item for item in _load_items(english_path)} if english_path else {}
    sets, decoded = {}, {}
    for language in languages:
        path = files[language]
        items = _load_items(path)
        _check_unique_indices(path, items)
        records = []
        for item in tqdm(items, desc=f"reading {path.name}", unit="item"):
            row = item["index"]
            base = english.get(row, {})
            for name in _INHERITED_FIELDS:
                if name in item and name in base and item[name] != base[name]:
                    raise MMMBFormatError(path, f"{item[name]!r} differs from the English item's {base[name]!r}",
                                          row=row, column=name)
            merged = {name: base[name] for name in _INHERITED_FIELDS if name in base} | item
            image_source = english_path if "image" not in item and "image" in base else path
            b64 = _image_b64(image_source, _field(path, merged, "image", row), row, decoded)
            records.append(_record(path, merged, row, merged.get("question"), merged.get("options"), b64))
        sets[language] = records
    check_alignment(sets, files)
    return sets


def records_from_source(source: str | Path, languages: Sequence[str] = LANGUAGES) -> dict[str, list[MCQRecord]]:
    """Per-language records from a multilingual JSON/JSONL file or a folder of per-language files."""
    source = Path(source)
    languages = [canonical_language(code) for code in languages]
    if source.is_dir():
        return records_from_language_folder(source, languages)
    if source.is_file():
        return records_from_multilingual_file(source, languages)
    raise MMMBFormatError(source, "source not found")


def records_from_synthetic(n: int, seed: int, languages: Sequence[str] = LANGUAGES,
                           image_format: str = "PNG") -> dict[str, list[MCQRecord]]:
    """The synthetic MMMB: ``n`` items of the project's synthetic visual world, the same items in every language."""
    from parrot.data.synthetic import make_mcq_items

    languages = [canonical_language(code) for code in languages]
    return records_from_items(make_mcq_items(n, seed, languages), languages, image_format)


def records_from_items(items: Sequence, languages: Sequence[str] = LANGUAGES,
                       image_format: str = "PNG") -> dict[str, list[MCQRecord]]:
    """Synthetic ``MCQItem``s -> {language: [MCQRecord]}, aligned by index across languages."""
    sets: dict[str, list[MCQRecord]] = {language: [] for language in languages}
    for item in tqdm(items, desc="encoding synthetic MMMB", unit="item"):
        b64 = encode_image(item.image, image_format)  # one encoding shared by the six languages
        for language in languages:
            sets[language].append(MCQRecord(
                index=int(item.index), question=item.questions[language], options=tuple(item.options[language]),
                answer=item.answer, category=item.category, image_b64=b64,
            ))
    return sets


def write_mmmb(sets: dict[str, list[MCQRecord]], out_dir: str | Path, chinese_code: str = "zh",
               verify: bool = True) -> dict[str, Path]:
    """Validate alignment, write ``mmmb_<lang>.tsv`` per language and (``verify``) read them back."""
    if chinese_code not in ("zh", "cn"):
        raise ValueError(f"chinese_code must be 'zh' or 'cn', got {chinese_code!r}")
    check_alignment(sets)
    out_dir = Path(out_dir)
    paths = {}
    for language, records in sets.items():
        code = VLMEVALKIT_CODE[language] if language == "zh" and chinese_code == "cn" else language
        paths[language] = write_tsv(out_dir / f"mmmb_{code}.tsv", records)
        logger.info("wrote %s (%d items)", paths[language], len(records))
    if verify:
        read_back = read_mmmb(list(paths.values()))
        for language, records in sets.items():
            if read_back[language] != records:
                raise RuntimeError(f"{paths[language]}: read-back differs from the records written")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m mmmb.build", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="multilingual JSON/JSONL file, or folder of <lang>.json files")
    source.add_argument("--synthetic", type=positive_int, metavar="N", help="build N synthetic items (N >= 1)")
    parser.add_argument("--seed", type=non_negative_int, default=1234,
                        help="synthetic world seed, >= 0 (keep it held out from training)")
    parser.add_argument("--out", required=True, help="output directory for mmmb_<lang>.tsv")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    parser.add_argument("--image-format", choices=("PNG", "JPEG"), default="PNG", type=str.upper,
                        help="encoding of synthetic images (source image files are kept byte-for-byte)")
    parser.add_argument("--chinese-code", choices=("zh", "cn"), default="zh",
                        help="file name code for Chinese (official files use cn)")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the written files back")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.synthetic is not None:
        sets = records_from_synthetic(args.synthetic, args.seed, args.languages, args.image_format)
    else:
        sets = records_from_source(args.source, args.languages)
    paths = write_mmmb(sets, args.out, chinese_code=args.chinese_code, verify=not args.no_verify)
    for language, path in paths.items():
        print(f"{language}: {path} ({len(sets[language])} items)")
    return paths


if __name__ == "__main__":
    main()
