"""Checkpoint folders: atomic publication, keep-last-k rotation, and finding the one to resume from.

A checkpoint is written into `<output_dir>/.staging-checkpoint-<step>/` and only renamed to
`<output_dir>/checkpoint-<step>` once every file is on disk (flushed with fsync, so that after a power loss too the
rename never outlives the data), so a crash mid-save never leaves a folder that looks complete. A rename within one
file system is atomic (POSIX `rename(2)`). Deleting works the other way round: a checkpoint is first renamed to
`.deleting-checkpoint-<step>` and then removed, so a crash mid-delete never leaves a half-deleted folder under a
published name. The next run removes what such crashes leave (`remove_stale_staging`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger("parrot.train")

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-checkpoint-"
DELETING_PREFIX = ".deleting-"
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # folders too: their entries (the names) are flushed like file data
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk (a rename must not outrun the data)."""
    folder = Path(folder)
    for path in [*folder.rglob("*"), folder]:
        if not path.is_symlink():
            _fsync(path)


def discard(path: Path) -> None:
    """Remove a folder without ever leaving it half-deleted under its name: rename it to `.deleting-<name>` (atomic),
    then delete that. A folder that cannot be deleted is left under the `.deleting-` name with a warning (the next
    run retries)."""
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    _fsync(path.parent)
    try:
        shutil.rmtree(doomed)
    except OSError as err:
        logger.warning("could not delete %s (%s); it no longer counts as a checkpoint", doomed, err)


def publish(staged: Path, final: Path) -> Path:
    """Move a fully written checkpoint folder to its final name (replacing an older one of the same step)."""
    fsync_tree(staged)
    if final.exists():
        discard(final)
    staged.rename(final)
    _fsync(final.parent)
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
    """Remove what a crash leaves: half-written staging folders (checkpoints, final model) and folders renamed
    for deletion (they are never resumed from)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    stale = [p for pattern in (f"{STAGING_PREFIX}*", f"{DELETING_PREFIX}*", FINAL_STAGING)
             for p in output_dir.glob(pattern) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path)
    return stale
