"""Checkpoint folders: atomic publication, keep-last-k rotation, and finding the one to resume from.

A checkpoint is written into `<output_dir>/.staging-checkpoint-<step>/` and only renamed to
`<output_dir>/checkpoint-<step>` once every file is on disk (flushed with fsync, so that after a power loss too the
rename never outlives the data), so a crash mid-save never leaves a folder that looks complete. A rename within one
file system is atomic (POSIX `rename(2)`). Deleting works the other way round: a checkpoint is first renamed to
`.deleting-checkpoint-<step>` and then removed, so a crash mid-delete never leaves a half-deleted folder under a
published name. The next run removes what such crashes leave (`remove_stale_staging`).

Single files (reports, statistics, plots, markers) are replaced the same way, one file at a time: `atomic_file` /
`atomic_write_text` write a temporary file beside the target, flush it, rename it over the target and flush the
folder, so a reader (or the disk after a crash) sees the old file or the new one, whole, never a truncated one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("parrot.train")

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-checkpoint-"
DELETING_PREFIX = ".deleting-"
REPLACED_PREFIX = ".replaced-"  # a complete folder moved aside by `publish` until its replacement is in place
FINAL_STAGING = ".staging-final-model"  # the final model's files before they move into the output folder
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{STAGING_PREFIX}{step}"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Published checkpoints, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


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
        logger.warning("could not delete %s (%s); it no longer counts as a checkpoint", doomed, err)


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


def rotate(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all), oldest first; returns the deleted
    folders. Only ever called after a newer checkpoint is published, so the folder a run resumed from is deleted
    only once a newer complete one exists."""
    if keep_last <= 0:
        return []
    doomed = list_checkpoints(output_dir)[:-keep_last]
    for path in doomed:
        discard(path)
    return doomed


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Clean up what a crash leaves: a folder `publish` had moved aside (`.replaced-<name>`) goes back under its name
    if that is empty (the crash came before the new folder's rename), else it is removed like the half-written
    staging folders (checkpoints, final model) and folders renamed for deletion (never resumed from). Returns the
    removed folders."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    for aside in output_dir.glob(f"{REPLACED_PREFIX}*"):
        original = aside.with_name(aside.name[len(REPLACED_PREFIX):])
        if aside.is_dir() and not original.exists():
            aside.rename(original)
            fsync(output_dir)
            logger.warning("restored %s: a crash interrupted its replacement", original)
    stale = [p for pattern in (f"{STAGING_PREFIX}*", f"{DELETING_PREFIX}*", f"{REPLACED_PREFIX}*", FINAL_STAGING)
             for p in output_dir.glob(pattern) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path)
    return stale
