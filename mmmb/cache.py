"""Append-only JSONL prediction cache: one line per answered prompt, flushed and fsynced per batch.

A crash can only cut the last line short; such a tail is dropped (and truncated from the file) on the next run,
which then re-asks exactly the prompts that have no complete line. Every line carries a hash of its prompt and
of its item's image, so a cache built from other data (other images under the same questions included) or another
prompt format is refused instead of being reused silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


class PredictionCache:
    """Completed predictions of one (mode, language), keyed by ``"<index>:<rotation>"``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.dropped_partial_line = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete_end = raw.rfind(b"\n") + 1  # bytes after the last newline are an interrupted write
        if complete_end < len(raw):
            logger.warning("%s: dropping an incomplete last line left by an interrupted run", self.path)
            self.dropped_partial_line = True
            with self.path.open("r+b") as handle:
                handle.truncate(complete_end)
        # Lines end at b"\n" only (as written by `append`): a prediction may hold U+2028 / U+0085 raw, which
        # str.splitlines would take for line ends (shifting the line numbers in errors); each line decoded alone, so
        # bytes that are not UTF-8 are reported with their line.
        for line_number, data in enumerate(raw[:complete_end].split(b"\n"), start=1):
            if not data.strip():
                continue
            try:
                entry = json.loads(data.decode("utf-8"))
                key = entry["key"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}, line {line_number}: corrupt cache entry ({error}); "
                                 "delete the file to recompute") from None
            if not isinstance(key, str):
                raise ValueError(f"{self.path}, line {line_number}: corrupt cache entry (key {key!r} is not text); "
                                 "delete the file to recompute")
            self.entries[key] = entry

    def get(self, key: str, prompt: str, image_sha1: str | None = None) -> dict | None:
        """The cached entry of ``key`` (None if absent); an error if it was made for another prompt or, when
        ``image_sha1`` is given, another image."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.get("prompt_sha1") != prompt_hash(prompt):
            raise ValueError(f"{self.path}: cached prediction for {key} was made for a different prompt "
                             "(other data or prompt format); use another --out or delete the cache")
        if image_sha1 is not None and entry.get("image_sha1") != image_sha1:
            raise ValueError(f"{self.path}: cached prediction for {key} was made for a different image (other data, "
                             "or a cache written without image hashes); use another --out or delete the cache")
        return entry

    def append(self, entries: Iterable[dict]) -> None:
        lines = []
        for entry in entries:
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
            self.entries[entry["key"]] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
