"""Checkpoint folders: atomic publication, keep-last-k rotation, and finding the one to resume from.

A checkpoint is written into `<output_dir>/.staging-checkpoint-<step>/` and only renamed to
`<output_dir>/checkpoint-<step>` once every file is on disk (flushed with fsync, so that after a power loss too the
rename never outlives the data), so a crash mid-save never leaves a folder that looks complete. A rename within one
file system is atomic (POSIX `rename(2)`). Deleting works the other way round: a checkpoint is first renamed to
`.deleting-checkpoint-<step>` and then removed, so a crash mid-delete never leaves a half-deleted folder under a
published name. The next run removes what such crashes leave (`remove_stale_staging`).

The file-system steps (flush, publish a staged folder, discard one, replace a single file whole) live in
`parrot.fileio`, shared with the other writers (exports, reports, statistics).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ..fileio import DELETING_PREFIX, REPLACED_PREFIX, discard, fsync

logger = logging.getLogger("parrot.train")

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-checkpoint-"
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
