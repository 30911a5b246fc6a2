"""File steps shared by every writer and reader (checkpoints, final models, exports, reports, plots, settings).

- `atomic_file` / `atomic_write_text`: replace one file whole: write a temporary file beside it, flush it, rename it
  over the target, flush the folder; a reader (or the disk after a crash) sees the old file or the new one.
- `publish`: move a fully written staging folder to its name (flushed first, so the rename never outlives the
  data; a rename within one file system is atomic, POSIX `rename(2)`), replacing an older folder of that name.
- `discard`: delete a folder without ever leaving it half-deleted under its name.
- `output_folder_problem` / `staged_folder`: a command that writes a new model folder (conversion, export) checks
  that its output is new and apart from its inputs, then writes everything into a staging folder published whole.
- `fsync`, `fsync_tree`, `remove_file`: the flushes these are made of.
- `read_json_mapping`: a JSON object file, with errors naming the file and what it should hold.
- `decode_utf8`, `iter_jsonl`: text and JSONL files read strictly, errors carrying the line (and column).
- `load_yaml`: a YAML settings file (training config, dataset registry, model recipe) read strictly: a key given
  twice in one mapping, text that is not UTF-8 and invalid YAML are a `YAMLFileError` naming the file and line.
- `is_whole_number` / `is_finite_number`: the value checks of settings read from JSON / YAML (a bool is neither).
- `positive_int` / `non_negative_int`: argparse types for counts, sizes and seeds; a bad value is an argparse error
  naming the flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

logger = logging.getLogger("parrot")

DELETING_PREFIX = ".deleting-"  # a folder being deleted (`discard`): never counts under its name again
REPLACED_PREFIX = ".replaced-"  # a complete folder moved aside by `publish` until its replacement is in place


def fsync(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the names: after a rename or unlink), to disk."""
    fd = os.open(path, os.O_RDONLY)  # folders too: their entries (the names) are flushed like file data
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Replace the file `path` whole: the caller writes the new content to the yielded temporary path (beside
    `path`, same suffix so writers that infer the format from it still work); on success it is flushed, renamed
    over `path` (atomic) and the folder flushed. If the body raises (disk full, a crash in the writer), the
    temporary file is removed and `path` keeps its old content: a reader never sees a truncated file."""
    path = Path(path)
    staged = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield staged
        fsync(staged)
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) all or nothing (`atomic_file`)."""
    path = Path(path)
    with atomic_file(path) as staged:
        staged.write_text(text, encoding="utf-8")
    return path


def remove_file(path: str | Path) -> None:
    """Unlink a file (if there) and flush its folder, so the removal is on disk before whatever comes next."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fsync(path.parent)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk (a rename must not outrun the data)."""
    folder = Path(folder)
    for path in [*folder.rglob("*"), folder]:
        if not path.is_symlink():
            fsync(path)


def discard(path: Path) -> None:
    """Remove a folder without ever leaving it half-deleted under its name: rename it to `.deleting-<name>` (atomic),
    then delete that. A folder that cannot be deleted is left under the `.deleting-` name with a warning (the next
    run retries)."""
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    fsync(path.parent)
    try:
        shutil.rmtree(doomed)
    except OSError as err:
        logger.warning("could not delete %s (%s); it no longer counts under its name", doomed, err)


def publish(staged: Path, final: Path) -> Path:
    """Move a fully written folder (a checkpoint, a saved model) to its final name, replacing an older folder of
    that name. The older one is renamed aside (whole) to `.replaced-<name>` first and deleted only once the new one
    is in place, so a crash never leaves a mix of both under the name. A crash between the two renames leaves the
    name empty and the old folder complete under `.replaced-<name>`: `remove_stale_staging` renames it back."""
    fsync_tree(staged)
    replaced = final.with_name(f"{REPLACED_PREFIX}{final.name}")
    if final.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        final.rename(replaced)
        fsync(final.parent)
    staged.rename(final)
    fsync(final.parent)
    if replaced.exists():
        discard(replaced)
    return final


def output_folder_problem(dst: Path, inputs: dict[str, Path | None]) -> str | None:
    """Why `dst` cannot take a new folder made from `inputs` ({"--src": folder, ...}; None values are skipped), or
    None: it must not be (or lie inside) an input, whose files it would replace or mix with, and it must be new or
    empty (such commands never overwrite files)."""
    resolved = dst.resolve()
    for flag, folder in inputs.items():
        if folder is None:
            continue
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents:
            return (f"--dst {dst}: is (or lies inside) the {flag} folder {folder}; writing there would replace or mix "
                    "with the files the output is made from. Choose a new folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        return (f"--dst {dst}: exists and is not empty; choose a new folder or delete this one first (nothing is "
                "overwritten)")
    return None


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """A fresh staging folder beside `dst` (`.<name>.partial-<pid>`) to write a whole folder into: published as `dst`
    (`publish`: flushed, then renamed) when the block ends, removed when it raises. A failed or interrupted writer
    leaves no `dst`, never a half-written folder that looks complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        publish(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_json_mapping(path: Path, what: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `path` (UTF-8, a leading BOM allowed): a run's saved settings, a training record, a
    checkpoint's config. `error` (ValueError by default) naming the file and `what` it should hold when it cannot be
    read, is not UTF-8 (line and column), not JSON or not an object."""
    try:
        value = json.loads(decode_utf8(path.read_bytes()))
    except (OSError, ValueError) as err:  # NotUTF8Error and json.JSONDecodeError are ValueErrors
        raise error(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from err
    if not isinstance(value, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------ text
class NotUTF8Error(ValueError):
    """Bytes that are not UTF-8 text: `line` / `column` (1-based) and the value of the first bad byte. Callers name
    the file: `f"{path}:{err.line}: {err}"`."""

    def __init__(self, line: int, column: int, byte: int):
        super().__init__(f"not UTF-8 text (byte 0x{byte:02x} at column {column}); re-encode the file as UTF-8")
        self.line, self.column, self.byte = line, column, byte


def decode_utf8(data: bytes, first_line: int = 1) -> str:
    """`data` as UTF-8 text, a leading byte-order mark dropped when `data` starts a file (`first_line` 1; a later
    piece, e.g. one JSONL line, gives its own line number). NotUTF8Error naming the first bad byte's line / column."""
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        decoded = err.object  # without the BOM that utf-8-sig drops: err.start counts from there
        line = first_line + decoded.count(b"\n", 0, err.start)
        column = err.start - (decoded.rfind(b"\n", 0, err.start) + 1) + 1
        raise NotUTF8Error(line, column, decoded[err.start]) from None


class JSONLineError(ValueError):
    """A JSONL line that is not JSON; `line` is its 1-based number. Callers name the file."""

    def __init__(self, line: int, err: json.JSONDecodeError):
        super().__init__(f"invalid JSON ({err.msg} at column {err.colno})")
        self.line = line


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file, read one line at a time (UTF-8, a BOM
    allowed on the first). Lines end at "\n" only: JSON strings may hold U+2028, U+2029 and U+0085 raw
    (`json.dumps(..., ensure_ascii=False)` writes them so), which `str.splitlines` would take for line ends.
    NotUTF8Error / JSONLineError, both with the `line`, for a bad line."""
    with Path(path).open("rb") as file:
        for lineno, raw in enumerate(file, start=1):
            line = decode_utf8(raw, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise JSONLineError(lineno, err) from err


# ------------------------------------------------------------------------------------------------ YAML
class YAMLFileError(ValueError):
    """A YAML file that cannot be used as written; the message names the file (and the line where known)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose mappings refuse a key given twice (PyYAML, like the YAML 1.1 loaders generally, keeps
    the last value silently, so `seed: 1` ... `seed: 2` trains with seed 2 without a word). Keys merged in with
    `<<: *anchor` may still be overridden by the mapping's own keys, as YAML's merge rule says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader itself refuses an unhashable key, naming it
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _DuplicateKeyError(key, line, first_line[key])
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"key {key!r} given twice")
        self.key, self.line, self.first_line = key, line, first_line


def load_yaml(path: str | Path) -> Any:
    """The value of the YAML file `path` (None for an empty file), read with `yaml.safe_load`'s rules except that a
    key given twice in one mapping is refused. YAMLFileError (a ValueError) naming the file, and the line where
    known, for a duplicate key, text that is not UTF-8, or invalid YAML; OSError (naming the file) when it cannot
    be read at all."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = decode_utf8(data)
    except NotUTF8Error as err:
        raise YAMLFileError(f"{path}:{err.line}: {err}") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)  # error marks read 'in "<path>", line N' instead of '"<unicode string>"'
    try:
        return loader.get_single_data()
    except _DuplicateKeyError as err:
        raise YAMLFileError(f"{path}:{err.line}: key {err.key!r} given twice in one mapping (first at line "
                            f"{err.first_line}); YAML would silently keep only the last value, remove one") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None:  # e.g. a ReaderError (a control character), whose text gives the position
            raise YAMLFileError(f"{path}: invalid YAML ({err})") from None
        reason = ": ".join(part for part in (getattr(err, "context", None), err.problem) if part)
        raise YAMLFileError(f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML ({reason})") from None
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------------------ values
def is_whole_number(value: Any) -> bool:
    """An integer that is not a bool (JSON / YAML `true` is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number, not a bool, neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ command line
def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse `type=` for a count or size that must be >= 1; argparse reports a bad value naming the flag
    ("argument --max-turns: must be >= 1, got 0")."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse `type=` for a count that may be 0, or a seed (numpy refuses negative seeds); the flag is named
    in argparse's error as for `positive_int`."""
    return _whole_number(text, 0)
