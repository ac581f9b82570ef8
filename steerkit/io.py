"""Durable outputs: atomic writes, an exclusive lock, and a manifest that lets an interrupted run resume.

A run writes many files over a long time, possibly from several processes, and may be killed at
any moment. Three rules keep its output directory trustworthy:

- **One run at a time.** :class:`OutputLock` holds an exclusive lock on the directory for the
  whole run (an OS file lock, so a killed run releases it). A second run into the same directory
  is refused with :class:`OutputInUse`, whose message names the holder: process id, host, start
  time and command.
- **Every file appears whole or not at all.** :func:`atomic_write` writes to a temporary file in
  the same directory and renames it over the target (``os.replace`` is atomic on POSIX and
  Windows). A kill leaves at most a hidden ``.NAME.steerkit-RUN.XXXX.tmp`` file, where ``RUN`` is
  the run id recorded in the manifest; the next run removes the temporaries of recorded runs, and
  nothing else (:func:`remove_stale_temporaries`).
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
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "PARTS_DIR", "OutputInUse", "OutputLock", "atomic_write", "atomic_write_json", "new_run_id",
           "part_path", "read_json", "read_records", "remove_parts", "remove_stale_temporaries"]

#: Where processes keep their part of the manifest while a run is in progress.
PARTS_DIR = ".steerkit-parts"
#: The lock file of a directory in use (removed when the run ends).
LOCK_NAME = ".steerkit.lock"
_PART_NAME = re.compile(r"^attempt-(\d+)-rank-(\d+)\.json$")
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")
# What atomic_write(..., run_id=RUN) names its temporaries: .TARGET.steerkit-RUN.RANDOM.tmp
_OUR_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.steerkit-(?P<run>[0-9a-f]{12})\.[A-Za-z0-9_]+\.tmp$")


def new_run_id() -> str:
    """A fresh run id (12 hex digits): it names a run's temporaries, so cleanup can prove they are its own."""
    return uuid.uuid4().hex[:12]


def atomic_write(path: Path, write: Callable[[str], Any], run_id: str | None = None) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``.

    ``run_id`` (from :func:`new_run_id`, recorded by the caller) goes into the temporary's name, so
    that :func:`remove_stale_temporaries` can later tell a temporary of that run from anyone else's.
    """
    path = Path(path)
    if run_id is not None and not _RUN_ID.match(run_id):
        raise ValueError(f"run_id must be 12 lower-case hex digits (new_run_id()), got {run_id!r}")
    owner = f"steerkit-{run_id}." if run_id is not None else ""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner}", suffix=".tmp")
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


def atomic_write_json(path: Path, value: Any, run_id: str | None = None) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, default=str)), run_id)


def read_json(path: Path) -> Any | None:
    """The JSON value in ``path``, or ``None`` if it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def remove_stale_temporaries(directory: Path, run_ids: Iterable[str]) -> list[Path]:
    """Delete the temporaries that killed runs ``run_ids`` left behind in ``directory`` (and its part files).

    Only files named ``.NAME.steerkit-RUN.XXXX.tmp`` with ``RUN`` in ``run_ids`` are touched: the
    caller passes the ids its manifest recorded, and holds the directory's :class:`OutputLock`, so
    no live run's temporary and nothing a user put in the directory is ever removed. Returns the
    removed paths.
    """
    directory = Path(directory)
    ours = set(run_ids)
    removed = []
    for candidate in sorted([*directory.glob(".*.tmp"), *(directory / PARTS_DIR).glob(".*.tmp")]):
        match = _OUR_TEMPORARY.match(candidate.name)
        if match and match.group("run") in ours and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


# --- the lock ------------------------------------------------------------------------------------


class OutputInUse(RuntimeError):
    """Another run holds the output directory's lock; the message names it."""


class OutputLock:
    """An exclusive lock on an output directory, held for a whole run.

    It is an OS file lock (``flock``) on ``DIRECTORY/.steerkit.lock``, so it is released when the
    holder exits, however it ends (``kill -9`` included), and a stale lock file never blocks
    anyone. The holder writes its process id, host, start time and command into the file for the
    message of whoever is refused. The file is removed on :meth:`release`.

    >>> with OutputLock("out", command=["steerkit", "generate", "Bag"]):   # doctest: +SKIP
    ...     ...   # write into out/

    Args:
        directory: the output directory (created if needed).
        command: what the holder runs, for the refusal message (default: ``sys.argv``).
    """

    def __init__(self, directory: Path | str, command: Sequence[str] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = [str(part) for part in (sys.argv if command is None else command)]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock, or raise :class:`OutputInUse` at once (never waits)."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks to build on
            import warnings

            warnings.warn(f"no file locking on this platform: nothing stops a second run from writing into "
                          f"{self.directory} at the same time", RuntimeWarning, stacklevel=2)
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputInUse(f"{self.directory} is in use by another run ({self._holder()}); wait for it to "
                                  "end, or write somewhere else") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file when it ends; if it did so between our open and
            # our flock, we locked a file nobody else can see. Lock the one at the path instead.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        else:  # pragma: no cover - 100 holders ending exactly in between is not a thing that happens
            raise OutputInUse(f"{self.directory}: could not take its lock (it kept being replaced)")
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(self.command)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        """Who holds the lock, in words (it writes that just after locking, so wait briefly for it)."""
        for _ in range(20):
            holder = read_json(self.path)
            if isinstance(holder, dict):
                command = " ".join(str(holder.get("command", "")).split())
                if len(command) > 200:
                    command = command[:197] + "..."
                return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
                        f"{command}")
            time.sleep(0.05)
        return f"its lock file {self.path} names no holder"

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see acquire()
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


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
