"""Read and write MMMB in the VLMEvalKit MCQ TSV layout.

Layout (one file per language, ``mmmb_<lang>.tsv``; VLMEvalKit's ``ImageMCQDataset``):
``index, question, [hint], A, B, (C, D, ...), answer, category, [l2-category], image | image_path``
where ``image`` is a base64-encoded JPEG/PNG. As in VLMEvalKit, an ``image`` cell of at most 64 characters
that equals another row's index reuses that row's image (how the official files de-duplicate images).
Cells holding a tab, newline or double quote are quoted with inner quotes doubled (pandas' ``to_csv`` default,
which VLMEvalKit's ``read_csv`` undoes); the reader is strict about it, so a stray or unclosed quote is an error
rather than rows merged into one cell. A header without data rows is an error too.

Every problem is reported as :class:`MMMBFormatError` naming the file, the row (by its ``index`` and its
1-based data-row number) and the column; nothing is skipped or repaired silently.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from PIL import Image, UnidentifiedImageError

from mmmb.languages import LANGUAGES, canonical_language
from parrot.data.images import BadImageError, check_aspect_ratio, to_rgb

OPTION_LETTERS: str = string.ascii_uppercase
REQUIRED_COLUMNS: tuple[str, ...] = ("index", "question", "A", "B", "answer", "category")
_FILE_PATTERN = re.compile(r"^mmmb_([a-z]{2})\.tsv$", re.IGNORECASE)
_INTEGER = re.compile(r"-?[0-9]+")
_IMAGE_REFERENCE_MAX_CHARS = 64  # VLMEvalKit: shorter "image" cells are references to another row's index
_MAX_CELL_CHARS = 2**31 - 1  # a cell may hold a whole base64 image
# Inside one cell, a line that starts with an integer and a tab: the start of a row of the file.
_SWALLOWED_ROW = re.compile(r"[\r\n]-?\d+\t")
# Cell texts that pandas' read_csv (so VLMEvalKit's `load`) reads as a missing value (NaN) by default, quoted or
# not: an option "None" would vanish from the item there (read_csv's documented default `na_values`).
_PANDAS_NA_TEXTS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})


class MMMBFormatError(ValueError):
    """Bad MMMB input; ``file``, ``row`` (the row's index or data-row number) and ``column`` locate it."""

    def __init__(self, file: str | Path, message: str, row: str | int | None = None,
                 column: str | None = None):
        self.file, self.row, self.column = str(file), row, column
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass(frozen=True)
class MCQRecord:
    """One multiple-choice item of one language. ``options[i]`` is the text of letter ``OPTION_LETTERS[i]``."""

    index: int
    question: str
    options: tuple[str, ...]
    answer: str
    category: str
    l2_category: str | None = None
    hint: str | None = None
    image_b64: str | None = None
    image_path: str | None = None
    # Where the item was read (the TSV and its row, as "index (data row n)"), for errors about it found later;
    # None for items made in memory. Not part of the item's identity: equal items from two files compare equal.
    source: str | None = field(default=None, compare=False)
    source_row: str | None = field(default=None, compare=False)

    @property
    def letters(self) -> str:
        return OPTION_LETTERS[: len(self.options)]

    @property
    def answer_position(self) -> int:
        return self.letters.index(self.answer)

    def load_image(self) -> Image.Image:
        if self.image_b64 is not None:
            return decode_image(self.image_b64)
        if self.image_path is not None:
            if not Path(self.image_path).is_file():
                raise ValueError(f"{self.image_path}: image file not found")
            try:
                return _open_rgb(self.image_path)
            except ValueError as error:
                raise ValueError(f"{self.image_path}: {error}") from None
        raise ValueError(f"item {self.index} has neither an image nor an image_path")


def encode_image(image: Image.Image, image_format: str = "PNG") -> str:
    """Base64 of ``image`` saved as PNG (lossless, the default) or JPEG."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_image_bytes(data: bytes) -> str:
    """Base64 of an already-encoded image file, kept byte-for-byte (no re-compression)."""
    return base64.b64encode(data).decode("ascii")


def decode_image(b64: str) -> Image.Image:
    """Decode a base64 JPEG/PNG (a ``data:image/...;base64,`` prefix is allowed) to an RGB image.

    Raises ValueError when the text is not base64 or the bytes are not a readable image.
    """
    payload = b64.split(",", 1)[1] if b64.startswith("data:") else b64
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not valid base64 ({error})") from None
    try:
        return decode_image_bytes(data)
    except ValueError as error:
        raise ValueError(f"base64 payload: {error}") from None


# What Pillow raises for bytes that are not a usable image: a truncated or corrupt file (OSError, EOFError, and
# SyntaxError from some plugins), or one declaring more pixels than Image.MAX_IMAGE_PIXELS allows (a bomb).
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, EOFError, SyntaxError, Image.DecompressionBombError)


def _open_rgb(source: str | Path | io.BytesIO) -> Image.Image:
    """The image in ``source`` as RGB (``to_rgb``); ValueError without the source's name (the caller adds it):
    Pillow's errors (see ``_IMAGE_ERRORS``), or sides more than ``MAX_ASPECT_RATIO`` apart (from the header,
    before decoding: the model's "pad" mode would make a square of the longer side)."""
    try:
        with Image.open(source) as image:
            check_aspect_ratio(image.width, image.height)
            return to_rgb(image)
    except BadImageError as error:
        raise ValueError(str(error)) from None
    except _IMAGE_ERRORS as error:
        raise ValueError(f"not a decodable image ({type(error).__name__}: {error})") from None


def decode_image_bytes(data: bytes) -> Image.Image:
    """Decode the bytes of an image file (JPEG, PNG, ...) to an RGB image; ValueError when they are not one."""
    return _open_rgb(io.BytesIO(data))


def read_tsv(path: str | Path, check_images: bool = True) -> list[MCQRecord]:
    """Read one MMMB/VLMEvalKit MCQ TSV; validate every row (see module docstring)."""
    path = Path(path)
    columns, rows = _read_table(path)
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise MMMBFormatError(path, f"missing required column (found columns: {columns})", column=column)
    if "image" not in columns and "image_path" not in columns:
        raise MMMBFormatError(path, "missing required column: need 'image' (base64) or 'image_path'",
                              column="image")
    letters = [letter for letter in OPTION_LETTERS if letter in columns]
    if letters != list(OPTION_LETTERS[: len(letters)]):
        missing = next(letter for letter in OPTION_LETTERS if letter not in columns)
        raise MMMBFormatError(path, f"option columns must be contiguous from A; found {letters}", column=missing)

    indices = _parse_indices(path, rows)
    images_by_index = {idx: row.get("image", "") for idx, row in zip(indices, rows)}
    records = []
    for data_row, (idx, row) in enumerate(zip(indices, rows), start=1):
        where = f"{idx} (data row {data_row})"
        options = _parse_options(path, where, row, letters)
        answer = row["answer"].strip()
        if answer not in OPTION_LETTERS[: len(options)]:
            raise MMMBFormatError(path, f"answer {answer!r} is not among the options "
                                        f"{OPTION_LETTERS[: len(options)]}", row=where, column="answer")
        for column in ("question", "category"):
            if not row[column].strip():
                raise MMMBFormatError(path, "empty value", row=where, column=column)
        image_b64, image_path = _parse_image(path, where, row, images_by_index, check_images)
        records.append(MCQRecord(
            index=idx, question=row["question"], options=options, answer=answer, category=row["category"],
            l2_category=row.get("l2-category") or None, hint=row.get("hint") or None,
            image_b64=image_b64, image_path=image_path, source=str(path), source_row=where,
        ))
    return records


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and data rows (all cells as text) of a tab-separated file with CSV double-quote escaping.

    That is the dialect pandas writes (``to_csv(sep="\\t")``: a cell holding a tab, newline or quote is quoted,
    inner quotes doubled) and VLMEvalKit reads. Parsed strictly, unlike pandas' reader: a stray quote
    (``"Big" or small?``) or a quote left open, which pandas would silently merge with the following rows, is an
    error naming the line. Cells are kept as text: "None"/"NA" are legitimate option texts.
    """
    if not path.is_file():
        raise MMMBFormatError(path, "file not found")
    _allow_large_fields()
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            records = _strict_records(path, handle)
    except UnicodeDecodeError as error:
        raise MMMBFormatError(path, f"not a readable TSV (not UTF-8: {error})") from None
    if not records:
        raise MMMBFormatError(path, "empty file: no header line")
    (_, header), body = records[0], records[1:]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise MMMBFormatError(path, "column name used twice in the header", column=duplicated[0])
    if not body:
        raise MMMBFormatError(path, "no data rows (only a header)")
    rows = []
    for data_row, (line, cells) in enumerate(body, start=1):
        where = f"(data row {data_row}, line {line})"
        if len(cells) != len(header):
            raise MMMBFormatError(path, f"{len(cells)} cells but the header has {len(header)} columns "
                                        "(a stray tab, or a double quote left open?)", row=where)
        row = dict(zip(header, cells))
        _check_no_swallowed_row(path, where, row)
        rows.append(row)
    return header, rows


def _allow_large_fields() -> None:
    # Base64 images are far longer than the csv module's default limit of 128 KiB per cell.
    if csv.field_size_limit() < _MAX_CELL_CHARS:
        csv.field_size_limit(_MAX_CELL_CHARS)


def _strict_records(path: Path, handle: Iterable[str]) -> list[tuple[int, list[str]]]:
    """(first line number, cells) of every non-blank record."""
    reader = csv.reader(handle, delimiter="\t", quotechar='"', doublequote=True, strict=True)
    records, next_line = [], 1
    try:
        for cells in reader:
            if cells:  # pandas (and so VLMEvalKit) skips blank lines too
                records.append((next_line, cells))
            next_line = reader.line_num + 1
    except csv.Error as error:
        # The record began at next_line; a quote left open there is only noticed lines later.
        raise MMMBFormatError(path, f"malformed TSV at line {reader.line_num} ({error}): a double quote not "
                                    "escaped as \"\" inside a quoted cell, or a quote left open in this row",
                              row=f"(line {next_line})") from None
    return records


def _check_no_swallowed_row(path: Path, where: str, row: dict[str, str]) -> None:
    """A quote left open makes one cell run over the following rows; their "<index><tab>" starts give it away."""
    for column, value in row.items():
        swallowed = _SWALLOWED_ROW.search(value)
        if swallowed is not None:
            start = swallowed.group(0).strip()
            raise MMMBFormatError(path, f"the cell spans several lines and one starts like a row ({start!r}...): "
                                        "a double quote left open swallowed the rows after it", row=where,
                                  column=column)


def _parse_indices(path: Path, rows: list[dict]) -> list[int]:
    indices, seen = [], {}
    for data_row, row in enumerate(rows, start=1):
        raw = row["index"].strip()
        # ASCII digits only: int() would also take "1_000", "+1" or "١" (Arabic-Indic one) and give them the index
        # of another spelling.
        if _INTEGER.fullmatch(raw) is None:
            raise MMMBFormatError(path, f"index {raw!r} is not an integer", row=f"(data row {data_row})",
                                  column="index")
        idx = int(raw)
        if idx in seen:
            raise MMMBFormatError(path, f"duplicate index (first used at data row {seen[idx]})",
                                  row=f"{idx} (data row {data_row})", column="index")
        seen[idx] = data_row
        indices.append(idx)
    return indices


def _parse_options(path: Path, where: str, row: dict, letters: list[str]) -> tuple[str, ...]:
    values = [row[letter] for letter in letters]
    count = len(values)
    while count and not values[count - 1].strip():
        count -= 1
    for letter, value in zip(letters[:count], values[:count]):
        if not value.strip():
            raise MMMBFormatError(path, "empty option before a later non-empty one", row=where, column=letter)
    if count < 2:
        raise MMMBFormatError(path, "an item needs at least two options", row=where, column=letters[count])
    return tuple(values[:count])


def _parse_image(path: Path, where: str, row: dict, images_by_index: dict[int, str],
                 check_images: bool) -> tuple[str | None, str | None]:
    image = row.get("image", "").strip()
    if image:
        if len(image) <= _IMAGE_REFERENCE_MAX_CHARS and _INTEGER.fullmatch(image):
            target = images_by_index.get(int(image), "")
            if not target or len(target) <= _IMAGE_REFERENCE_MAX_CHARS:
                raise MMMBFormatError(path, f"image refers to index {image}, which has no base64 image",
                                      row=where, column="image")
            image = target
        if check_images:
            try:
                decode_image(image)
            except ValueError as error:
                raise MMMBFormatError(path, str(error), row=where, column="image") from None
        return image, None
    raw_path = row.get("image_path", "").strip()
    if not raw_path:
        column = "image" if "image" in row else "image_path"
        raise MMMBFormatError(path, "no image", row=where, column=column)
    image_path = Path(raw_path) if Path(raw_path).is_absolute() else path.parent / raw_path
    if check_images:
        try:
            if not image_path.is_file():
                raise ValueError("file not found")
            _open_rgb(image_path)
        except ValueError as error:
            raise MMMBFormatError(path, f"cannot open image {str(image_path)!r} ({error})", row=where,
                                  column="image_path") from None
    return None, str(image_path)


def write_tsv(path: str | Path, records: Iterable[MCQRecord]) -> Path:
    """Write records in the VLMEvalKit MCQ layout (``image`` if the records carry base64, else ``image_path``)."""
    path = Path(path)
    records = list(records)
    if not records:  # a header-only file, which every reader (this one included) refuses
        raise ValueError(f"{path}: no items to write (an MMMB file needs at least one item)")
    n_letters = max(len(record.options) for record in records)
    has_hint = any(record.hint for record in records)
    has_l2 = any(record.l2_category for record in records)
    rows = []
    for record in records:
        row: dict[str, object] = {"index": record.index, "question": record.question}
        if has_hint:
            row["hint"] = record.hint or ""
        for position, letter in enumerate(OPTION_LETTERS[:n_letters]):
            row[letter] = record.options[position] if position < len(record.options) else ""
        row["answer"] = record.answer
        row["category"] = record.category
        if has_l2:
            row["l2-category"] = record.l2_category or ""
        if record.image_b64 is not None:
            row["image"] = record.image_b64
        else:
            row["image_path"] = record.image_path
        _check_writable(path, row)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.isna().any().any():
        raise ValueError(f"{path}: records mix base64 images and image paths; use one kind per file")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False, encoding="utf-8")
    return path


def _check_writable(path: Path, row: dict[str, object]) -> None:
    """Refuse text that :func:`read_tsv` would take for a row swallowed by an open quote (so every file we
    write reads back), and text that VLMEvalKit would read as an empty cell (so it reads the same items)."""
    for column, value in row.items():
        if isinstance(value, str) and _SWALLOWED_ROW.search(value):
            raise ValueError(f"{path}: item {row['index']}, column {column!r}: a line inside the text starts "
                             "with a number and a tab, which read_tsv rejects as a swallowed row; "
                             "replace that tab")
        if isinstance(value, str) and value and value in _PANDAS_NA_TEXTS and column != "image_path":
            raise ValueError(f"{path}: item {row['index']}, column {column!r}: the text {value!r} is read as a "
                             "missing value by pandas and so by VLMEvalKit (an option would vanish from the item); "
                             "reword it (e.g. 'none' or 'None of them')")


def language_of_file(path: str | Path) -> str:
    """``mmmb_en.tsv`` → ``en``; ``mmmb_cn.tsv`` and ``mmmb_zh.tsv`` → ``zh``."""
    match = _FILE_PATTERN.match(Path(path).name)
    if match is None:
        raise MMMBFormatError(path, f"file name must be mmmb_<lang>.tsv with lang in {LANGUAGES} (or 'cn')")
    try:
        return canonical_language(match.group(1))
    except ValueError as error:
        raise MMMBFormatError(path, str(error)) from None


def find_language_files(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Language → TSV, from directories (every ``mmmb_*.tsv`` inside) and/or explicit TSV paths."""
    files: dict[str, Path] = {}
    for entry in map(Path, paths):
        candidates = sorted(p for p in entry.iterdir() if _FILE_PATTERN.match(p.name)) if entry.is_dir() else [entry]
        if entry.is_dir() and not candidates:
            raise MMMBFormatError(entry, "no mmmb_<lang>.tsv files in this directory")
        for candidate in candidates:
            language = language_of_file(candidate)
            if language in files and files[language] != candidate:
                raise MMMBFormatError(candidate, f"second file for language {language!r} (also {files[language]})")
            files[language] = candidate
    return files


def check_alignment(sets: dict[str, list[MCQRecord]], files: dict[str, Path] | None = None) -> None:
    """The same item must carry the same index in every language: equal index sets, and per index the same
    number of options and the same answer letter. Raises MMMBFormatError naming the file, row and column."""
    if len(sets) < 2:
        return
    languages = list(sets)
    reference = languages[0]
    ref_by_index = {record.index: record for record in sets[reference]}
    for language in languages[1:]:
        file = (files or {}).get(language, f"mmmb_{language}")
        by_index = {record.index: record for record in sets[language]}
        missing = sorted(set(ref_by_index) - set(by_index))
        extra = sorted(set(by_index) - set(ref_by_index))
        if missing:
            raise MMMBFormatError(file, f"index missing here but present in {reference!r} "
                                        f"(first missing: {missing[:5]})", row=missing[0], column="index")
        if extra:
            raise MMMBFormatError(file, f"index not present in {reference!r} (indices not aligned; "
                                        f"first extra: {extra[:5]})", row=extra[0], column="index")
        for idx, record in by_index.items():
            ref = ref_by_index[idx]
            if len(record.options) != len(ref.options):
                raise MMMBFormatError(file, f"{len(record.options)} options here but {len(ref.options)} in "
                                            f"{reference!r}: item not aligned", row=idx,
                                      column=OPTION_LETTERS[min(len(record.options), len(ref.options))])
            if record.answer != ref.answer:
                raise MMMBFormatError(file, f"answer {record.answer!r} here but {ref.answer!r} in {reference!r}: "
                                            "item not aligned", row=idx, column="answer")


def read_mmmb(paths: Sequence[str | Path], languages: Sequence[str] | None = None,
              check_images: bool = True) -> dict[str, list[MCQRecord]]:
    """Read the per-language TSVs found in ``paths`` (restricted to ``languages``), check index alignment,
    and return them in :data:`LANGUAGES` order."""
    files = find_language_files(paths)
    if languages is not None:
        wanted = [canonical_language(code) for code in languages]
        absent = [code for code in wanted if code not in files]
        if absent:
            raise MMMBFormatError(", ".join(map(str, paths)), f"no TSV for language(s) {absent}")
        files = {code: files[code] for code in wanted}
    ordered = {code: files[code] for code in LANGUAGES if code in files}
    sets = {code: read_tsv(path, check_images=check_images) for code, path in ordered.items()}
    check_alignment(sets, ordered)
    return sets
