"""Durable outputs: atomic writes, and a manifest that lets an interrupted run resume.

A run writes many files over a long time, possibly from several processes, and may be killed at
any moment. Two rules keep its output directory trustworthy:

- **Every file appears whole or not at all.** :func:`atomic_write` writes to a temporary file in
  the same directory and renames it over the target (``os.replace`` is atomic on POSIX and
  Windows). A kill leaves at most a hidden ``.NAME.XXXX.tmp`` file, which the next run removes
  (:func:`remove_stale_temporaries`).
- **A file counts as done only once the manifest says so.** Each process records the items it
  finished in its own part file (``.steerkit-parts/attempt-A-rank-R.json``, rewritten atomically
  after each chunk), so processes never write the same file. :func:`read_records` merges the
  final manifest with every part file; an item whose record says ``done`` *and* whose file exists
  is skipped on resume. An image written just before a kill, but not yet recorded, is simply
  generated again (to the same bytes: seeds depend only on the item's global index).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["PARTS_DIR", "atomic_write", "atomic_write_json", "part_path", "read_json", "read_records",
           "remove_parts", "remove_stale_temporaries"]

#: Where processes keep their part of the manifest while a run is in progress.
PARTS_DIR = ".steerkit-parts"
_PART_NAME = re.compile(r"^attempt-(\d+)-rank-(\d+)\.json$")


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, default=str)))


def read_json(path: Path) -> Any | None:
    """The JSON value in ``path``, or ``None`` if it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete temporaries that a killed :func:`atomic_write` left behind for any of ``names``.

    Only files named ``.NAME.<random>.tmp`` for a ``NAME`` in ``names`` are touched, so nothing a
    user put in the directory is ever removed. Returns the removed paths.
    """
    directory = Path(directory)
    wanted = set(names)
    removed = []
    for candidate in [*directory.glob(".*.tmp"), *(directory / PARTS_DIR).glob(".*.tmp")]:
        target = candidate.name[1:].rsplit(".", 2)[0]
        if target in wanted or _PART_NAME.match(target):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def part_path(directory: Path, attempt: int, rank: int) -> Path:
    return Path(directory) / PARTS_DIR / f"attempt-{attempt:03d}-rank-{rank:03d}.json"


def _parts(directory: Path) -> list[tuple[int, int, Path]]:
    found = []
    for path in (Path(directory) / PARTS_DIR).glob("attempt-*-rank-*.json"):
        match = _PART_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)


def read_records(directory: Path, manifest_name: str = "run.json") -> tuple[dict | None, dict[int, dict], list[dict], int]:
    """Everything recorded so far in ``directory``.

    Returns ``(manifest, images, chunks, last_attempt)``: the manifest (``None`` if there is
    none), the latest record of every image by global index (from the manifest, then from part
    files in attempt order, so later attempts win), the chunk records of the part files, and the
    highest attempt number seen (0 if none).
    """
    manifest = read_json(Path(directory) / manifest_name)
    images: dict[int, dict] = {}
    chunks: list[dict] = []
    last_attempt = 0
    if isinstance(manifest, dict):
        for record in manifest.get("images", []):
            if isinstance(record, dict) and isinstance(record.get("index"), int):
                images[record["index"]] = record
        chunks += [c for c in manifest.get("chunks", []) if isinstance(c, dict)]
        last_attempt = max([last_attempt, *(a.get("attempt", 0) for a in manifest.get("attempts", []))])
    else:
        manifest = None
    for attempt, _, path in _parts(directory):
        part = read_json(path)
        if not isinstance(part, dict):
            continue  # a part file is replaced whole, so this is not ours; ignore it
        last_attempt = max(last_attempt, attempt)
        for chunk in part.get("chunks", []):
            chunks.append(chunk)
            for record in chunk.get("images", []):
                images[record["index"]] = record
    return manifest, images, chunks, last_attempt


def remove_parts(directory: Path, before_attempt: int | None = None) -> None:
    """Delete part files (of attempts before ``before_attempt``, or all), once the manifest holds them."""
    for attempt, _, path in _parts(directory):
        if before_attempt is None or attempt < before_attempt:
            path.unlink(missing_ok=True)
    parts = Path(directory) / PARTS_DIR
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
