"""LLaVA / Parrot conversation data: files -> validated records -> mixed datasets -> token ids, labels, images.

Records follow LLaVA's JSON format::

    {"id": "...", "image": "relative/to/image_dir.png",             # "image" absent: a text-only record
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}

Datasets are named in a registry YAML (`configs/datasets.yaml`) and mixed with a spec string such as
`"synthetic-caption|synthetic-qa"` or `"a:0.5|b"` (a ratio after the colon overrides the registry's).
A ratio r keeps round(r * N) of a dataset's N records: r < 1 subsamples without replacement, r > 1 repeats
the dataset floor(r) times and subsamples the rest (deterministic for the seed). `DataConfig.max_records` (the
trainer's `--max-samples`) then draws that many records of the mixed list (`sample_records`: every dataset in
proportion to its share of the mix, deterministic for the seed, kept in mix order) BEFORE the checks below, so a
quick run decodes and tokenises only those; the checks' skips are counted after the draw, so fewer may remain.

Batches (`DataCollator`): `input_ids`/`labels`/`attention_mask` (B, T) right-padded, and `pixel_values`
(n_images, 3, H, W) with one image per record that has one, in batch order — the order of the `<image>`
placeholders, which is what `ParrotForCausalLM` expects. Text-only records contribute no image and no
placeholder; a batch with no image has no `pixel_values` key.

Bad images (missing, unreadable, or too thin: sides more than `images.MAX_ASPECT_RATIO` apart, kind
"too_thin_image"): `on_bad_image="error"` raises naming the file and record; `"skip"` drops the record and counts
it in a `BadDataReport` (written to JSON with `BadDataReport.write`). Images are checked (fully decoded, each
distinct file once, by a few threads: PIL releases the GIL while decoding JPEG) when the dataset is built, so a
skip never happens silently mid-training; the kept records, the report and the first error are those of a
one-thread check.

Length: `max_length` counts the LLM's positions (the model's `model_max_length`), as LLaVA's truncation does. A
text-only record keeps up to `max_length` text tokens; a record with an image keeps `image_extra_tokens` fewer, the
positions its `<image>` placeholder takes in the LLM beyond its own token (num_image_tokens - 1), so both fit the
model. A record holds at most one image (one placeholder), so its text budget is max_length or
max_length - image_extra_tokens.

Nothing to learn from: a record without an assistant turn is a DataFormatError when files are loaded; a record
whose answer lies wholly past its text budget after truncation (an over-long first user turn) is skipped when the
dataset is built and counted in the same report (kind "no_supervised_tokens"). So is a record whose text spells
one of the tokenizer's control tokens, e.g. a literal "<|im_end|>" in a scraped answer (kind "control_token_text"):
tokenised, it would become that token and end the turn mid-answer.

A conversation that opens with an assistant turn (after an optional system turn) loses that turn, as in LLaVA's
`preprocess` (`source = source[1:]`; real LLaVA files hold a few such records): the record is kept and counted in
the report's `changed` list (kind "leading_assistant_turn_dropped"), so LLaVA data trains unedited and the drop is
visible; a record with no assistant turn after it is a DataFormatError at load.

The `<image>` placeholder goes to the front of its turn, as in LLaVA's `preprocess_multimodal`: the turn becomes
"<image>\\n" + the rest of its text, stripped (so "question\\n<image>" trains as "<image>\\nquestion", the layout
`ParrotProcessor.build_messages` gives at inference). A record whose placeholder this moves (text stood before it in
its turn) is kept and listed in the report's `changed` list (kind "image_placeholder_moved_to_front"). One whose
placeholder already opened its turn is normalised the same way when only the whitespace around it differs
(" <image> question", "<image>question"), but not listed: nothing moved; one already written "<image>\\n" + stripped
text is unchanged.

Files are UTF-8 (a byte-order mark is allowed); JSONL lines end at "\n" only (JSON strings may hold U+2028 or
U+0085 raw). A `<image>` placeholder belongs in a user turn; a spec naming a dataset twice, a ratio that is not a
finite number > 0, or one that keeps none of a dataset's records is an error naming the dataset. Ids repeated
within one file are a warning at load (count, first ids and their lines), not an error: LLaVA's own files hold a
few, but the report names records by id, so their entries are ambiguous.

Why plain JSON instead of HF `datasets` here: LLaVA files mix records with and without "image" and with
ragged conversations, which Arrow schemas reject or pad with nulls, and we need error messages that name the
file line of a bad record. Files are parsed into Python dicts (as LLaVA's LazySupervisedDataset keeps them); a
built `ConversationDataset` keeps its records packed (`PackedRecords`: one JSON byte buffer + integer arrays, about
the size of the JSON), which DataLoader workers share instead of each copying a list of dicts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import numbers
import os
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..fileio import JSONLineError, NotUTF8Error, YAMLFileError, atomic_write_text, decode_utf8, iter_jsonl, load_yaml
from .images import BadImageError, ImageAspectRatioError, load_image
from .templates import (IGNORE_INDEX, IMAGE_TOKEN, LLAVA_ROLES, ChatTemplate, PlaceholderCutError,
                        control_token_strings, get_template, llava_to_messages)

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
REQUIRED_FIELDS = ("id", "conversations")
ASSISTANT_SOURCES = tuple(source for source, role in LLAVA_ROLES.items() if role == "assistant")  # "gpt", ...
CONTROL_TOKEN_TEXT = "control_token_text"  # BadDataReport kind: a turn spells a control token ("<|im_end|>")
NO_SUPERVISED_TOKENS = "no_supervised_tokens"  # BadDataReport kind: every label ignored after truncation
# BadDataReport kind of a skipped record whose image's sides are more than `images.MAX_ASPECT_RATIO` apart
TOO_THIN_IMAGE = "too_thin_image"
# BadDataReport kind of a record kept with a change: its first turn (after a system turn) was the assistant's
LEADING_ASSISTANT_TURN_DROPPED = "leading_assistant_turn_dropped"
# BadDataReport kind of a record kept with a change: its image placeholder, after some text of its turn, was moved to
# the front as LLaVA's preprocess_multimodal does ("<image>\n" + the rest, stripped). Only whitespace normalised
# around a placeholder already first is not counted (see ConversationDataset._move_image_placeholders_to_front).
IMAGE_PLACEHOLDER_MOVED_TO_FRONT = "image_placeholder_moved_to_front"
CHANGES_LISTED_PER_KIND = 1000  # kept-with-a-change records listed by name in the report, per kind (all counted)
SKIPS_LISTED_PER_KIND = 1000  # skipped records listed by name in the report, per kind (all counted)
DUPLICATE_IDS_SHOWN = 5  # duplicated ids named in load_records' warning
DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "configs" / "datasets.yaml"


class DataFormatError(ValueError):
    """A data file or record that cannot be used; the message names the file and the line/record/field."""


# ------------------------------------------------------------------------------------------- loading
def validate_record(record, source: str, index: int, image_token: str = IMAGE_TOKEN) -> None:
    """Raise DataFormatError naming `source`, the record index and the field when `record` is malformed."""
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise DataFormatError(f"{where}: missing required field {name!r}")
    where = f"{where} (id {record['id']!r})"
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise DataFormatError(f"{where}: field 'conversations' must be a non-empty list")
    for t, turn in enumerate(conversations):
        for name in ("from", "value"):
            if not isinstance(turn, dict) or name not in turn:
                raise DataFormatError(f"{where}: missing required field 'conversations[{t}].{name}'")
        if not isinstance(turn["from"], str) or turn["from"] not in LLAVA_ROLES:
            raise DataFormatError(f"{where}: field 'conversations[{t}].from' is {turn['from']!r}; expected one of "
                                  f"{sorted(LLAVA_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataFormatError(f"{where}: field 'conversations[{t}].value' must be a string, got "
                                  f"{type(turn['value']).__name__}")
        if turn["from"] in ASSISTANT_SOURCES and image_token in turn["value"]:
            # The model answers about the image, it never writes one: a placeholder here would be trained on as
            # part of the answer text around it, and no prompt at inference puts an image in an answer.
            raise DataFormatError(f"{where}: field 'conversations[{t}].value': {image_token!r} placeholder in an "
                                  f"assistant turn (from {turn['from']!r}); it belongs in a user turn")
    if "image" in record and (not isinstance(record["image"], str) or not record["image"].strip()):
        raise DataFormatError(f"{where}: field 'image' must be a non-empty string path")
    leading = leading_assistant_turn(conversations)
    if not any(turn["from"] in ASSISTANT_SOURCES for t, turn in enumerate(conversations) if t != leading):
        dropped = "" if leading is None else (f" after its leading one (conversations[{leading}], before any user "
                                              "turn, which is dropped as LLaVA's preprocessing does)")
        raise DataFormatError(f"{where}: 'conversations' has no assistant turn (from 'gpt'){dropped}: nothing to "
                              "train on")
    placeholders = sum(turn["value"].count(image_token) for turn in conversations)
    expected = 1 if "image" in record else 0
    if placeholders != expected:
        raise DataFormatError(f"{where}: {placeholders} {image_token!r} placeholders in 'conversations' "
                              f"but {'one image' if expected else 'no image'}")


def leading_assistant_turn(conversations: list) -> int | None:
    """The index of an assistant turn that opens the conversation (after an optional system turn), else None.
    LLaVA's `preprocess` drops such a turn (`if roles[source[0]["from"]] != roles["human"]: source = source[1:]`);
    `ConversationDataset` drops it too and counts it. Tolerates malformed turns (they are reported elsewhere)."""
    def source(turn):
        return turn.get("from") if isinstance(turn, dict) else None

    first = 1 if conversations and source(conversations[0]) == "system" else 0
    if first < len(conversations) and source(conversations[first]) in ASSISTANT_SOURCES:
        return first
    return None


def image_placeholder_first(conversations: list[dict], image_token: str = IMAGE_TOKEN) -> list[dict]:
    """LLaVA's `preprocess_multimodal` (mm_use_im_start_end off): the turn holding the image placeholder becomes
    `(image_token + "\\n" + value.replace(image_token, "").strip()).strip()`, so training sees the placeholder where
    inference puts it (`ParrotProcessor.build_messages`: first, then a newline, then the question).

    Only a conversation holding exactly one placeholder is normalised (a record has at most one image, and
    `validate_record` refuses any other count): with several, moving each to the front of its turn would collapse
    the placeholders of one turn into one and orphan an image, so such a conversation is returned unchanged.
    Returns `conversations` itself when nothing changes, else a new list (the turns are not modified in place)."""
    holding = [t for t, turn in enumerate(conversations) if image_token in turn["value"]]
    if len(holding) != 1 or conversations[holding[0]]["value"].count(image_token) != 1:
        return conversations
    t = holding[0]
    value = conversations[t]["value"]
    normalised = (image_token + "\n" + value.replace(image_token, "").strip()).strip()
    if normalised == value:
        return conversations
    return conversations[:t] + [{**conversations[t], "value": normalised}] + conversations[t + 1:]


def _decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data` as UTF-8 text (a leading byte-order mark is dropped); DataFormatError naming the line otherwise."""
    try:
        return decode_utf8(data, first_line)
    except NotUTF8Error as err:
        raise DataFormatError(f"{path}:{err.line}: {err}") from None


def load_records(path: str | Path, image_token: str = IMAGE_TOKEN) -> list[dict]:
    """Records from a JSON list (`.json`) or one object per line (`.jsonl`, read line by line), each validated.
    UTF-8 with or without a byte-order mark; an error names the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    lines = None  # JSONL: the file line of each record
    if path.suffix.lower() == ".jsonl":
        try:
            numbered = list(iter_jsonl(path))
        except (NotUTF8Error, JSONLineError) as err:
            raise DataFormatError(f"{path}:{err.line}: {err}") from None
        lines = [lineno for lineno, _ in numbered]
        records = [record for _, record in numbered]
    else:
        try:
            records = json.loads(_decode_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(records, list):
            raise DataFormatError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        validate_record(record, str(path), i, image_token)
    _warn_duplicate_ids(records, path, lines)
    return records


def _warn_duplicate_ids(records: list[dict], path: Path, lines: list[int] | None = None) -> None:
    """Warn (not an error: LLaVA's own files hold a few) when record ids repeat within one file, with the count and
    the first few ids and where they are (file lines for JSONL, else record positions): the bad-data report and
    several messages name a record by its id, which is then ambiguous. Ids compare as the report writes them,
    `str(id)`."""
    positions: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        positions.setdefault(str(record["id"]), []).append(lines[i] if lines is not None else i)
    repeated = [(record_id, where) for record_id, where in positions.items() if len(where) > 1]
    if not repeated:
        return
    unit = "lines" if lines is not None else "records"
    shown = "; ".join(f"{record_id!r} at {unit} {', '.join(map(str, where))}"
                      for record_id, where in repeated[:DUPLICATE_IDS_SHOWN])
    more = f" (and {len(repeated) - DUPLICATE_IDS_SHOWN} more)" if len(repeated) > DUPLICATE_IDS_SHOWN else ""
    logger.warning("%s: %d record ids occur more than once (%d records); the bad-data report names records by id, "
                   "so their entries are ambiguous: %s%s", path, len(repeated), sum(len(w) for _, w in repeated),
                   shown, more)


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path
    image_dir: Path | None = None
    ratio: float = 1.0


def load_registry(registry: str | Path = DEFAULT_REGISTRY, data_root: str | Path | None = None
                  ) -> dict[str, DatasetEntry]:
    """Name -> DatasetEntry. Relative paths resolve against `data_root`, else the registry's `root` key
    (itself relative to the registry file), else the registry file's folder."""
    registry = Path(registry)
    try:
        raw = load_yaml(registry) or {}
    except YAMLFileError as err:  # a dataset named twice, invalid YAML, not UTF-8: names the file and line
        raise DataFormatError(str(err)) from err
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
        raise DataFormatError(f"{registry}: expected a mapping with a 'datasets' mapping of name -> entry")
    raw_root = raw.get("root", ".")
    if not isinstance(raw_root, str):
        raise DataFormatError(f"{registry}: field 'root' must be a path string, got {raw_root!r}")
    root = Path(data_root) if data_root is not None else (registry.parent / raw_root).resolve()
    entries = {}
    for name, spec in raw["datasets"].items():
        where = f"{registry}: dataset {name!r}"
        if not isinstance(spec, dict) or "path" not in spec:
            raise DataFormatError(f"{where}: missing required field 'path'")
        unknown = set(spec) - {"path", "image_dir", "ratio"}
        if unknown:
            raise DataFormatError(f"{where}: unknown fields {sorted(unknown)}")
        for key in ("path", "image_dir"):
            value = spec.get(key)
            if key in spec and value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataFormatError(f"{where}: field {key!r} must be a path string, got {value!r}")
        if spec["path"] is None:
            raise DataFormatError(f"{where}: field 'path' must be a path string, got None")
        ratio = _check_ratio(spec.get("ratio", 1.0), f"{where}: field 'ratio'", DataFormatError)
        image_dir = spec.get("image_dir")
        entries[str(name)] = DatasetEntry(str(name), root / spec["path"], root / image_dir if image_dir else None,
                                          ratio)
    return entries


def _check_ratio(value, where: str, error: type[Exception] = ValueError) -> float:
    """`value` as a ratio: a finite number > 0, else `error` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise error(f"{where}: ratio {value!r} is not a number")
    try:
        ratio = float(value)
    except ValueError:
        raise error(f"{where}: ratio {value!r} is not a number") from None
    if not math.isfinite(ratio) or ratio <= 0:
        raise error(f"{where}: ratio must be a finite number > 0, got {value!r}")
    return ratio


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
    """'a:0.5|b' -> [('a', 0.5), ('b', None)]. A ratio is a finite number > 0; a dataset is named once."""
    parts = []
    for chunk in spec.split("|"):
        chunk = chunk.strip()
        name, sep, ratio = chunk.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"empty dataset name in spec {spec!r}")
        if name in (seen for seen, _ in parts):
            raise ValueError(f"dataset spec {spec!r}: {name!r} is named twice; give it once with the ratio you want "
                             f"(e.g. '{name}:2')")
        parts.append((name, _check_ratio(ratio.strip(), f"dataset spec {chunk!r}") if sep else None))
    return parts


@dataclass(frozen=True)
class SourcedRecord:
    """A record with where it came from (for error messages and image paths)."""

    record: dict
    source: str  # data file
    index: int  # position in that file
    image_dir: Path | None
    dataset: str

    @property
    def where(self) -> str:
        return f"{self.source}: record {self.index} (id {self.record['id']!r})"

    @property
    def image_path(self) -> Path | None:
        if "image" not in self.record:
            return None
        base = self.image_dir if self.image_dir is not None else Path(self.source).parent
        return base / self.record["image"]


def _sample_indices(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """round(ratio * n) indices: whole copies of the dataset, then a sample without replacement for the rest."""
    total = round(ratio * n)
    whole, extra = divmod(total, n) if n else (0, 0)
    picked = np.sort(rng.permutation(n)[:extra])
    return np.concatenate([np.tile(np.arange(n), whole), picked]).astype(np.int64)


def mix_datasets(spec: str, registry: str | Path = DEFAULT_REGISTRY, data_root: str | Path | None = None,
                 seed: int = 0) -> list[SourcedRecord]:
    """Load and mix the datasets of `spec` (see module docstring) into one list of SourcedRecords."""
    entries = load_registry(registry, data_root)
    mixed: list[SourcedRecord] = []
    for name, ratio in parse_spec(spec):
        if name not in entries:
            raise ValueError(f"dataset {name!r} is not in {registry}; known: {sorted(entries)}")
        entry = entries[name]
        records = load_records(entry.path)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        indices = _sample_indices(len(records), ratio if ratio is not None else entry.ratio, rng)
        if not len(indices):  # a named dataset silently missing from the mix is a config mistake
            raise ValueError(f"dataset {name!r} ({entry.path}): ratio {ratio if ratio is not None else entry.ratio} "
                             f"of its {len(records)} records keeps none")
        mixed.extend(SourcedRecord(records[i], str(entry.path), int(i), entry.image_dir, name) for i in indices)
        logger.info("dataset %s: %d of %d records (ratio %s)", name, len(indices), len(records),
                    ratio if ratio is not None else entry.ratio)
    return mixed


def _check_record_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"max_records (--max-samples) must be a positive number of records, got {n!r}")


def _proportional_quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """n split over groups in proportion to `sizes` (largest remainder; ties go to the earlier group): sums to n."""
    exact = n * sizes / sizes.sum()  # (n_groups,)
    quotas = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - quotas), kind="stable")[: n - int(quotas.sum())]
    quotas[extra] += 1
    return quotas


def sample_records(mixed: Sequence[SourcedRecord], n: int, seed: int = 0) -> list[SourcedRecord]:
    """`n` records of the mix drawn with `seed`, each dataset contributing in proportion to its share of the mix
    (a quick run sees every dataset, not only the first), kept in mix order. All of them when n >= len(mixed).

    Deterministic for (mix, n, seed); a stream of its own (not the ratios' per-dataset ones)."""
    _check_record_count(n)
    if n >= len(mixed):
        return list(mixed)
    groups: dict[str, list[int]] = {}  # dataset -> its positions in the mix
    for position, item in enumerate(mixed):
        groups.setdefault(item.dataset, []).append(position)
    sizes = np.array([len(g) for g in groups.values()], dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(b"max_records")])
    quotas = _proportional_quotas(sizes, n)
    picked = [np.asarray(g)[rng.permutation(len(g))[:q]] for g, q in zip(groups.values(), quotas)]
    return [mixed[int(i)] for i in np.sort(np.concatenate(picked))]


class PackedRecords(Sequence):
    """A read-only sequence of SourcedRecords kept compactly: every distinct record's JSON in one byte buffer and
    its origin in integer arrays, so that a dataset of 665k records is about the size of its JSON, not five times
    that in dicts and strings, and DataLoader workers forked from the trainer share it: reading a record touches no
    Python object's reference count, so the pages are never copied (one copy per worker with plain lists).

    Identical records (a ratio > 1 repeats them) are stored once. Records must be JSON values (from JSON files)."""

    def __init__(self, items: Iterable[SourcedRecord]):
        origins: dict[tuple[str, Path | None, str], int] = {}
        # a record's JSON digest -> its slot. The JSON goes straight into one growing buffer: the build never holds
        # every record's bytes twice (a list of chunks, then their join: the build's peak memory).
        slots: dict[bytes, int] = {}
        buffer = bytearray()
        ends: list[int] = []
        item_origin, item_index, item_slot = [], [], []
        for item in items:
            origin = origins.setdefault((item.source, item.image_dir, item.dataset), len(origins))
            data = json.dumps(item.record, ensure_ascii=False).encode("utf-8")
            key = hashlib.blake2b(data, digest_size=16).digest()
            slot = slots.get(key)
            if slot is None or buffer[(ends[slot - 1] if slot else 0):ends[slot]] != data:  # new (or a collision)
                slot = slots[key] = len(ends)
                buffer += data
                ends.append(len(buffer))
            item_origin.append(origin)
            item_index.append(item.index)
            item_slot.append(slot)
        self._buffer = np.frombuffer(buffer, dtype=np.uint8)
        self._buffer.flags.writeable = False
        self._ends = np.asarray(ends, dtype=np.int64)  # (n_distinct,)
        self._origins = list(origins)  # a few (file, image dir, dataset) triples
        self._origin = np.asarray(item_origin, dtype=np.int32)  # (n,)
        self._index = np.asarray(item_index, dtype=np.int64)  # (n,)
        self._slot = np.asarray(item_slot, dtype=np.int64)  # (n,)

    def __len__(self) -> int:
        return len(self._slot)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        slot = int(self._slot[i])
        start = int(self._ends[slot - 1]) if slot else 0
        record = json.loads(self._buffer[start:int(self._ends[slot])].tobytes())
        source, image_dir, dataset = self._origins[int(self._origin[i])]
        return SourcedRecord(record, source, int(self._index[i]), image_dir, dataset)

    def __eq__(self, other) -> bool:
        if isinstance(other, (PackedRecords, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None


# ---------------------------------------------------------------------------------------- bad data
@dataclass
class BadDataReport:
    """Counts and a list of (file, record id, reason) for skipped records: bad images, records left with no
    supervised token after truncation, records spelling a control token; and, apart, records kept with a counted
    change (`changed`: a dropped leading assistant turn, an image placeholder moved to the front of its turn).
    `counts` has one entry per kind of either list; "skipped" counts only the skipped records."""

    # the first SKIPS_LISTED_PER_KIND skipped records of each kind (a wrong image_dir skips every record with an
    # image: 188k entries, 41 MB of JSON, for 200k LLaVA-style records); all are counted in `skipped_counts`
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # parallel to `skipped`
    skipped_counts: Counter = field(default_factory=Counter)
    checked: int = 0
    # (data file, id, reason, kind) of kept records, the first CHANGES_LISTED_PER_KIND of each kind: a change can
    # concern most of a large mix (LLaVA-665k writes many questions before their "<image>"); all are counted.
    changed: list[tuple[str, str, str, str]] = field(default_factory=list)
    changed_counts: Counter = field(default_factory=Counter)

    def add(self, file: str, record_id: str, reason: str, kind: str) -> None:
        """A skipped record. `kind` is "missing" (no such image file), "unreadable" (cannot be decoded),
        TOO_THIN_IMAGE (sides more than `images.MAX_ASPECT_RATIO` apart), NO_SUPERVISED_TOKENS or CONTROL_TOKEN_TEXT
        (`file` is then the data file)."""
        if self.skipped_counts[kind] < SKIPS_LISTED_PER_KIND:
            self.skipped.append((file, record_id, reason))
            self.kinds.append(kind)
        self.skipped_counts[kind] += 1

    @property
    def num_skipped(self) -> int:
        """Skipped records, listed or not."""
        return sum(self.skipped_counts.values())

    def add_change(self, file: str, record_id: str, reason: str, kind: str) -> None:
        """A record kept with a change, kind LEADING_ASSISTANT_TURN_DROPPED or IMAGE_PLACEHOLDER_MOVED_TO_FRONT;
        `file` is the data file. Counted always; listed in `changed` while the kind has fewer than
        CHANGES_LISTED_PER_KIND entries there."""
        if self.changed_counts[kind] < CHANGES_LISTED_PER_KIND:
            self.changed.append((file, record_id, reason, kind))
        self.changed_counts[kind] += 1

    @property
    def counts(self) -> dict[str, int]:
        return {"checked": self.checked, "skipped": self.num_skipped, **dict(self.skipped_counts),
                **dict(self.changed_counts)}

    def to_dict(self) -> dict:
        return {"counts": self.counts,
                "skipped": [{"file": f, "id": i, "kind": k, "reason": r}
                            for (f, i, r), k in zip(self.skipped, self.kinds)],
                "skipped_listed_per_kind": SKIPS_LISTED_PER_KIND,
                "changed": [{"file": f, "id": i, "kind": k, "reason": r} for f, i, r, k in self.changed],
                "changed_listed_per_kind": CHANGES_LISTED_PER_KIND}

    def write(self, path: str | Path) -> None:
        """Write the report all or nothing (`atomic_write_text`): a crash mid-write keeps the previous report."""

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ checks
LABEL_CHECK_CHUNK = 512  # records whose check texts are tokenised in one batched call
IMAGE_CHECK_AHEAD = 4  # images queued per image-check thread


def default_image_workers() -> int:
    """Threads decoding images in the build-time check: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _image_status(path: Path) -> tuple[BadImageError, str] | None:
    """None when the image at `path` decodes fully, else (error, kind "missing" | "unreadable" | TOO_THIN_IMAGE)."""
    try:
        load_image(path)
        return None
    except ImageAspectRatioError as err:
        return err, TOO_THIN_IMAGE
    except BadImageError as err:
        return err, ("unreadable" if path.is_file() else "missing")


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for every item, yielded in order; computed `workers` at a time in threads with a bounded queue (a
    few per thread, not one future per item of a 665k list), or inline for workers=1. Closing the iterator early
    cancels what is queued and waits for what is running."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="parrot-image-check")
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * IMAGE_CHECK_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _PretokenizedSegments:
    """The tokenizer as the build-time label check sees it: `tokenizer(text, add_special_tokens=False)` is answered
    from ids tokenised beforehand for a chunk of records in one batched call (`fill`), everything else (a text not
    foreseen, other arguments, attributes) goes to the tokenizer. One call per text costs ~0.1 ms of Python around the
    tokeniser, several per record; a batched call gives the same ids as single calls."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def fill(self, texts: Iterable[str]) -> None:
        """Tokenise the distinct `texts` in one call, replacing what was there (memory stays one chunk's worth)."""
        unique = list(dict.fromkeys(texts))
        self._ids = dict(zip(unique, self._tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        ids = self._ids.get(text) if isinstance(text, str) and not add_special_tokens and not kwargs else None
        if ids is None:
            return self._tokenizer(text, add_special_tokens=add_special_tokens, **kwargs)
        return {"input_ids": ids}

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# ------------------------------------------------------------------------------------------ dataset
class ConversationDataset(Dataset):
    """SourcedRecords -> {"input_ids", "labels", "pixel_values" (3, H, W) or None}.

    `image_transform` is any callable PIL image -> tensor (3, H, W), e.g. `parrot.data.images.ImageTransform`.
    Images are decoded once at construction to apply `on_bad_image` (see module docstring), by `image_workers`
    threads (None: `default_image_workers()`; 1: in this thread); the result does not depend on the count.
    A leading assistant turn is dropped and the image placeholder moved to the front of its turn (as LLaVA does),
    each record so changed counted in `report.changed` (a placeholder already first whose turn only had its
    whitespace normalised is not counted: `_move_image_placeholders_to_front`).

    `max_length` counts LLM positions (the model's `model_max_length`): a text-only record is truncated to
    `max_length` text tokens, a record with an image to `max_length - image_extra_tokens` (`image_extra_tokens`: the
    positions one `<image>` adds in the LLM beyond its placeholder token, num_image_tokens - 1; 0 counts text tokens
    only). See `text_budget`.
    """

    def __init__(
        self,
        records: list[SourcedRecord],
        tokenizer,
        template: ChatTemplate | str,
        max_length: int,
        image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        on_bad_image: str = "error",
        report: BadDataReport | None = None,
        system: str | None = None,
        image_token: str = IMAGE_TOKEN,
        image_workers: int | None = None,
        image_extra_tokens: int = 0,
    ):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
            raise ValueError(f"max_length must be a positive number of LLM positions, got {max_length!r} (the "
                             "model's model_max_length)")
        if isinstance(image_extra_tokens, bool) or not isinstance(image_extra_tokens, numbers.Integral) \
                or image_extra_tokens < 0:
            raise ValueError(f"image_extra_tokens must be a number of positions >= 0, got {image_extra_tokens!r} "
                             "(num_image_tokens - 1)")
        if image_extra_tokens >= max_length:
            raise ValueError(f"max_length={max_length} leaves no text token to a record with an image, whose "
                             f"placeholder takes {image_extra_tokens} more positions (image_extra_tokens)")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.max_length = max_length
        self.image_extra_tokens = image_extra_tokens
        self.image_transform = image_transform
        self.system = system
        self.image_token = image_token
        self.report = report if report is not None else BadDataReport()
        if image_workers is not None and (isinstance(image_workers, bool)
                                          or not isinstance(image_workers, numbers.Integral) or image_workers < 1):
            raise ValueError(f"image_workers must be a positive number of threads (or None), got {image_workers!r}")
        self.image_workers = default_image_workers() if image_workers is None else image_workers
        without_transform = next((r for r in records if r.image_path is not None), None) if image_transform is None \
            else None
        if without_transform is not None:
            raise ValueError(f"{without_transform.where}: has an image but the dataset has no image_transform")
        # Text first: it is cheap and its errors (a malformed conversation, a placeholder truncation would cut) stop
        # the build before every image has been decoded; a record skipped for its text needs no image check.
        records = self._drop_leading_assistant_turns(self._move_image_placeholders_to_front(records))
        text_ok = self._drop_unsupervised(self._drop_control_text(records))
        self.records = PackedRecords(self._check_images(text_ok, on_bad_image))

    def _move_image_placeholders_to_front(self, records: Sequence[SourcedRecord]) -> list[SourcedRecord]:
        """`records`, the placeholder of each record with an image moved to the front of its turn as LLaVA's
        `preprocess_multimodal` does (`image_placeholder_first`). The stored record is the normalised one, so the
        checks and the training tokenisation all build their messages from the same text.

        Counted in `report.changed` (kind IMAGE_PLACEHOLDER_MOVED_TO_FRONT) are only the records whose placeholder
        really moved: some text (not only whitespace) stood before it in its turn, as in "question\\n<image>". A turn
        whose placeholder was already first and whose only change is the whitespace around it (" <image> question",
        "<image>question", "<image>\\nquestion ") is normalised just the same (LLaVA strips it too) but not counted:
        the count tells how much of a mix had its image/question layout changed, and such tidying is not that."""
        out = []
        moved = 0
        for item in records:
            conversations = item.record["conversations"]
            normalised = image_placeholder_first(conversations, self.image_token) if "image" in item.record \
                else conversations
            if normalised is conversations:
                out.append(item)
                continue
            out.append(SourcedRecord({**item.record, "conversations": normalised}, item.source, item.index,
                                     item.image_dir, item.dataset))
            turn = next(t for t, (old, new) in enumerate(zip(conversations, normalised)) if old != new)
            if not conversations[turn]["value"].split(self.image_token)[0].strip():
                continue  # already first: whitespace normalised only, not counted
            moved += 1
            layout = self.image_token + "\n"
            reason = (f"{item.where}: conversations[{turn}]: {self.image_token!r} placeholder moved to the front of "
                      f"the turn, from after some of its text (the turn is now {layout!r} + its text, stripped, as in "
                      "LLaVA's preprocess_multimodal)")
            self.report.add_change(item.source, str(item.record["id"]), reason, IMAGE_PLACEHOLDER_MOVED_TO_FRONT)
        if moved:
            logger.warning("moved the image placeholder to the front of its turn in %d records (kept; listed in the "
                           "bad-data report)", moved)
        return out

    def _drop_leading_assistant_turns(self, records: Sequence[SourcedRecord]) -> list[SourcedRecord]:
        """`records`, each conversation that opens with an assistant turn (after an optional system turn) without
        that turn, as LLaVA's `preprocess` does (`source = source[1:]`), each drop counted in `report.changed` (kind
        LEADING_ASSISTANT_TURN_DROPPED): real LLaVA files hold a few, and they train unedited. The turn answers no
        question; it never holds the image placeholder (`validate_record` refuses one in an assistant turn)."""
        out = []
        dropped = 0
        for item in records:
            turn = leading_assistant_turn(item.record["conversations"])
            if turn is None:
                out.append(item)
                continue
            dropped += 1
            conversations = item.record["conversations"]
            record = {**item.record, "conversations": conversations[:turn] + conversations[turn + 1:]}
            out.append(SourcedRecord(record, item.source, item.index, item.image_dir, item.dataset))
            self.report.add_change(item.source, str(item.record["id"]),
                                   f"{item.where}: conversations[{turn}] is an assistant turn before any user turn; "
                                   "dropped (as LLaVA's preprocessing does)", LEADING_ASSISTANT_TURN_DROPPED)
        if dropped:
            logger.warning("dropped the leading assistant turn of %d records (kept; listed in the bad-data report)",
                           dropped)
        return out

    def _check_images(self, records: list[SourcedRecord], on_bad_image: str) -> list[SourcedRecord]:
        """Decode every distinct image once (`image_workers` threads: PIL releases the GIL while decoding JPEG), then
        walk the records in order, so the kept list, the report and the first error are those of a serial check."""
        paths = [item.image_path for item in records]  # None: a text-only record
        distinct = dict.fromkeys(str(path) for path in paths if path is not None)  # first-use order
        statuses = _ordered_map(_image_status, map(Path, distinct), self.image_workers)
        kept = []
        skipped_before = self.report.num_skipped
        failures: dict[str, tuple[BadImageError, str] | None] = {}  # image path -> (error, kind); None: it loads
        with closing(statuses):
            for item, path in zip(tqdm(records, desc="checking images", disable=len(records) < 5000), paths):
                if path is None:
                    kept.append(item)
                    continue
                self.report.checked += 1
                key = str(path)
                if key not in failures:  # first use: the next status is this path's (same order as `distinct`)
                    failures[key] = next(statuses)
                if failures[key] is not None:
                    err, kind = failures[key]
                    if on_bad_image == "error":
                        raise BadImageError(f"{item.where}: {err}") from err
                    self.report.add(key, str(item.record["id"]), str(err), kind)
                    continue
                kept.append(item)
        skipped = self.report.num_skipped - skipped_before
        if skipped:
            logger.warning("skipped %d records with bad images (%s)", skipped, self.report.counts)
        return kept

    def _drop_control_text(self, records: list[SourcedRecord]) -> list[SourcedRecord]:
        """Skip, counted in the report, records whose turns spell one of the tokenizer's control tokens (e.g. a
        scraped answer containing "<|im_end|>"): tokenised, the text would become the control token itself and
        teach the model to end a turn (or start one) in mid-answer. The image placeholder is checked elsewhere."""
        reserved = [t for t in control_token_strings(self.tokenizer) if t != self.image_token]
        if not reserved:
            return list(records)
        pattern = re.compile("|".join(map(re.escape, reserved)))
        kept = []
        for item in records:
            found = next(((i, m.group()) for i, turn in enumerate(item.record["conversations"])
                          if (m := pattern.search(turn["value"]))), None)
            if found is None:
                kept.append(item)
                continue
            turn, text = found
            self.report.add(item.source, str(item.record["id"]),
                            f"{item.where}: conversations[{turn}] contains {text!r}, the text of a control token of "
                            "the tokenizer (it would be read as that token)", CONTROL_TOKEN_TEXT)
        if len(kept) < len(records):
            logger.warning("skipped %d records whose text spells a control token (%s)", len(records) - len(kept),
                           self.report.counts)
        return kept

    def _drop_unsupervised(self, records: list[SourcedRecord]) -> list[SourcedRecord]:
        """Skip, counted in the report, records whose labels are all ignored after truncation (a first user
        turn longer than the record's `text_budget`, or no assistant turn): they teach nothing and give a NaN loss
        when a whole batch is made of them. Chunk by chunk, the texts the check will tokenise are tokenised in one
        batched call first (`_PretokenizedSegments`); the records are then decided one by one, in order."""
        kept = []
        tokenizer = _PretokenizedSegments(self.tokenizer)
        progress = tqdm(total=len(records), desc="checking labels", disable=len(records) < 5000)
        for start in range(0, len(records), LABEL_CHECK_CHUNK):
            chunk = records[start:start + LABEL_CHECK_CHUNK]
            tokenizer.fill(text for item in chunk for text in self._check_texts(item))
            for item in chunk:
                if self._keeps_supervised_token(item, tokenizer):
                    kept.append(item)
                else:
                    self.report.add(item.source, str(item.record["id"]),
                                    f"{item.where}: no assistant token within {self._budget_text(item)} "
                                    "(first user turn too long, or no assistant turn)", NO_SUPERVISED_TOKENS)
                progress.update()
        progress.close()
        skipped = len(records) - len(kept)
        if skipped:
            logger.warning("skipped %d records with no supervised token within their text budget (max_length=%d, "
                           "image_extra_tokens=%d) (%s)", skipped, self.max_length, self.image_extra_tokens,
                           self.report.counts)
        return kept

    def _placeholders(self, item: SourcedRecord) -> int:
        """Image placeholders in the record's text: 1 for a record with an image, 0 for a text-only one
        (`validate_record`)."""
        return sum(turn["value"].count(self.image_token) for turn in item.record["conversations"])

    def text_budget(self, item: SourcedRecord) -> int:
        """The text tokens `item` keeps at most: `max_length` LLM positions less `image_extra_tokens` per image
        placeholder (each expands to that many more positions in the LLM), so a text-only record keeps `max_length`,
        as LLaVA truncates at model_max_length. The checks and `_tokenize` all truncate to this."""
        return self.max_length - self.image_extra_tokens * self._placeholders(item)

    def _budget_text(self, item: SourcedRecord) -> str:
        budget = self.text_budget(item)
        if budget == self.max_length:
            return f"max_length={self.max_length} text tokens"
        return (f"{budget} text tokens (max_length={self.max_length} less {self.max_length - budget} positions of "
                "the image's visual tokens)")

    def _messages(self, item: SourcedRecord) -> list[dict]:
        """The messages of a stored record (its placeholder already moved to the front at build): the one place the
        checks and the training tokenisation build them, so they cannot disagree."""
        return llava_to_messages(item.record["conversations"], record_id=item.where)

    def _check_texts(self, item: SourcedRecord) -> list[str]:
        """The texts `_keeps_supervised_token(item)` will likely tokenise; none for a malformed conversation (its
        error is raised in order, by the check itself)."""
        try:
            messages = self._messages(item)
            return self.template.check_texts(messages, self.tokenizer, system=self.system)
        except ValueError:
            return []

    def _keeps_supervised_token(self, item: SourcedRecord, tokenizer=None) -> bool:
        """`_tokenize(item)` keeps a labelled token; decided from a prefix of the conversation (usually up to the
        first answer), as `__getitem__` tokenises the whole record again anyway. Raises what `_tokenize` raises.
        `tokenizer`: a stand-in giving the same ids (`_PretokenizedSegments`), else the dataset's."""
        messages = self._messages(item)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with self._budget_named(item):
            return self.template.keeps_supervised_token(messages, tokenizer, self.text_budget(item),
                                                        self.image_token, system=self.system, record_id=item.where)

    def _tokenize(self, item: SourcedRecord) -> tuple[list[int], list[int]]:
        messages = self._messages(item)
        with self._budget_named(item):
            return self.template.tokenize(messages, self.tokenizer, self.text_budget(item), self.image_token,
                                          system=self.system, record_id=item.where)

    @contextmanager
    def _budget_named(self, item: SourcedRecord):
        """A placeholder cut says which budget truncated the record (an image record's is max_length less its visual
        tokens, not the max_length the template saw) and the setting to raise."""
        try:
            yield
        except PlaceholderCutError as err:
            raise PlaceholderCutError(f"{item.where}: truncating to {self._budget_text(item)} would cut an "
                                      f"{self.image_token!r} placeholder; raise the processor's model_max_length "
                                      "or shorten the text before the image") from err

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        item = self.records[index]
        input_ids, labels = self._tokenize(item)
        pixel_values = None
        if item.image_path is not None:
            try:
                image = load_image(item.image_path)
            except BadImageError as err:  # changed on disk since the check
                raise BadImageError(f"{item.where}: {err}") from err
            pixel_values = self.image_transform(image)  # (3, H, W)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": pixel_values}


@dataclass(frozen=True)
class DataCollator:
    """Right-pad a list of ConversationDataset items into a batch (see module docstring for the layout)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        longest = int(lengths.max())
        batch_size = len(items)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, it in enumerate(items):
            input_ids[row, : len(it["input_ids"])] = it["input_ids"]
            labels[row, : len(it["labels"])] = it["labels"]
        attention_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()  # (B, T)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)  # (n_images, 3, H, W)
        return batch


# --------------------------------------------------------------------------------------- convenience
@dataclass(frozen=True)
class DataConfig:
    """What a training run reads: `--data`, `--data-registry`, `--on-bad-image`, ..."""

    spec: str
    registry: str = str(DEFAULT_REGISTRY)
    data_root: str | None = None
    # LLM positions per record (the model's model_max_length): a text-only record keeps this many text tokens, a
    # record with an image `image_extra_tokens` fewer (the positions its <image> adds beyond the placeholder token,
    # num_image_tokens - 1; 0 counts text tokens only)
    max_length: int = 512
    image_extra_tokens: int = 0
    template: str = "chatml"
    on_bad_image: str = "error"
    bad_data_report: str | None = None  # JSON file for BadDataReport
    seed: int = 0
    # Draw this many records of the mix (`sample_records`: every dataset in proportion, with `seed`) before any
    # check, so a quick run decodes and tokenises only those; skips are counted after the draw, so fewer may remain.
    max_records: int | None = None

    def __post_init__(self):
        if self.max_records is not None:
            _check_record_count(self.max_records)


def build_dataset(config: DataConfig, tokenizer, image_transform=None) -> ConversationDataset:
    """Mix (and draw `max_records` of), check and wrap the datasets of `config`; writes the bad-data report when a
    path is given."""
    with _cyclic_gc_paused():
        return _build_dataset(config, tokenizer, image_transform)


@contextmanager
def _cyclic_gc_paused():
    """Pause the cyclic garbage collector: the build holds many acyclic JSON containers (600k tracked for 200k
    LLaVA records), which collections walk again and again (~17% of the build); refcounting still frees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _build_dataset(config: DataConfig, tokenizer, image_transform=None) -> ConversationDataset:
    records = mix_datasets(config.spec, config.registry, config.data_root, config.seed)
    if config.max_records is not None:
        drawn = sample_records(records, config.max_records, config.seed)
        logger.info("max_records=%d: %d of the mix's %d records drawn (%s)", config.max_records, len(drawn),
                    len(records), ", ".join(f"{name} {n}" for name, n in Counter(r.dataset for r in drawn).items()))
        records = drawn
    dataset = ConversationDataset(records, tokenizer, config.template, config.max_length, image_transform,
                                  config.on_bad_image, image_extra_tokens=config.image_extra_tokens)
    if config.max_records is not None:
        logger.info("max_records=%d: %d records remain after the checks (%s)", config.max_records, len(dataset),
                    dataset.report.counts)
    if config.bad_data_report:
        dataset.report.write(config.bad_data_report)
    return dataset
