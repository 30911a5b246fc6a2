"""Checkpoint folders: atomic publication, keep-last-k rotation, and finding the one to resume from.

A checkpoint is written into `<output_dir>/.staging-checkpoint-<step>/` and only renamed to
`<output_dir>/checkpoint-<step>` once every file is on disk, so a crash mid-save never leaves a folder that looks
complete. A rename within one file system is atomic (POSIX `rename(2)`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-checkpoint-"
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


def publish(staged: Path, final: Path) -> Path:
    """Move a fully written checkpoint folder to its final name (replacing an older one of the same step)."""
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    return final


def rotate(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all); returns the deleted folders."""
    if keep_last <= 0:
        return []
    doomed = list_checkpoints(output_dir)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Remove half-written staging folders left by a crash (they are never resumed from)."""
    output_dir = Path(output_dir)
    stale = [p for p in output_dir.glob(f"{STAGING_PREFIX}*") if p.is_dir()] if output_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale
