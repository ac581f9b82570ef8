"""Scaling out with accelerate: prompts sharded across processes, resumably; particles sharded too.

``accelerate launch`` (or ``torchrun``) starts one process per device and sets the environment;
:func:`process_group` turns that into a :class:`ProcessGroup` (through accelerate's
``PartialState``), and into the trivial one-process group when nothing was launched, so the
one-process path never imports accelerate and does exactly what it did before.

**Prompt sharding** (:class:`ShardedGeneration`). The prompts are cut into chunks of
``items_per_call`` prompts, in order; a chunk is one pipeline call. Pending chunks are dealt to
processes round-robin. Every seed depends only on the global row (``seed + row``, rows laid out
prompt × image × particle, as in one big call), never on the process, so the same command gives the
same images on 1 or 8 processes. It gives them *bit for bit* when each call holds the same prompts,
i.e. for a fixed ``items_per_call``: CPU/GPU kernels can round differently for different batch
sizes. Each process writes its images and its part of the manifest (:mod:`steerkit.io`); process 0
merges the parts into one ``run.json`` at the end. Re-running the same command resumes: chunks whose
images are all recorded as done, with their files present, are skipped.

**Particle sharding** (:class:`ParticleShards`, used by
:class:`~steerkit.smc.sharded.ShardedFKSteering`). The ``K`` particles of every prompt are split
into ``W`` equal blocks, block ``r`` on process ``r``: local row ``p·(K/W) + j`` of process ``r``
is global particle ``r·(K/W) + j`` of prompt ``p``, i.e. global row ``p·K + r·(K/W) + j`` (the
row a one-process run would give it). Resampling all-gathers the small per-particle numbers
(rewards, log-weights, potential history), draws one ancestor vector that is identical on every
process (same generator, same inputs), and then moves each surviving particle's rows to the slots
that continue it with one ``all_to_all`` per tensor, sending only rows that change process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import io

__all__ = ["Chunk", "ParticleShards", "ProcessGroup", "ShardedGeneration", "plan_chunks", "process_group"]

#: Testing only: SIGKILL this process while it saves its N-th chunk of an attempt, after the
#: chunk's images are written and before they are recorded (the worst moment for a crash).
KILL_ENV = "STEERKIT_TEST_KILL_AT_CHUNK"


class ProcessGroup:
    """The processes of one run and the few collectives steerkit needs.

    One process (``world_size == 1``) is the trivial group: every collective returns its input.
    ``bytes_sent`` counts the payload this process sends to *other* processes (an all-gather of
    ``n`` bytes sends ``n`` to each of the ``W − 1`` others), which is what the sharded-particle
    benchmark reports.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", backend: str = "gloo"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank = rank
        self.world_size = world_size
        #: Where this process computes (its own GPU under a launcher).
        self.device = torch.device(device)
        #: Where collectives run: NCCL needs GPU tensors, gloo and MPI take CPU tensors.
        self.comm_device = self.device if backend == "nccl" else torch.device("cpu")
        self.backend = backend
        self.bytes_sent = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"ProcessGroup(rank={self.rank}, world_size={self.world_size}, device={str(self.device)!r}, "
                f"backend={self.backend!r})")

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every process, then tear the launched group down.

        Without this a process that finishes first exits while gloo's threads in the others still
        hold its connection, and they abort at exit ("terminate called without an active
        exception", SIGABRT) although every file was written.
        """
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[W, *tensor.shape]``: every process's ``tensor`` (same shape on all), by rank."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        sent = tensor.detach().to(self.comm_device).contiguous()
        out = [torch.empty_like(sent) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, sent)
        self.bytes_sent += sent.numel() * sent.element_size() * (self.world_size - 1)
        return torch.stack(out).to(tensor.device)

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def exchange_rows(self, rows: torch.Tensor, source_rank: torch.Tensor, source_row: torch.Tensor) -> torch.Tensor:
        """Move rows between processes: row ``j`` of the result on process ``s`` is row
        ``source_row[s, j]`` of process ``source_rank[s, j]``'s ``rows``.

        Args:
            rows: ``[R, ...]`` this process's rows (every process has the same shape).
            source_rank, source_row: ``[W, R]`` integer plans, identical on every process.

        Rows that stay on their process are copied locally; the others travel in one
        ``all_to_all_single`` call.
        """
        me, world = self.rank, self.world_size
        mine_rank, mine_row = source_rank[me], source_row[me]
        local = mine_rank == me
        out = torch.empty_like(rows)
        local_slots = local.nonzero().flatten().to(rows.device)
        out[local_slots] = rows.index_select(0, mine_row[local].to(rows.device))
        if world == 1:
            return out
        flat = rows.reshape(rows.shape[0], -1).to(self.comm_device)
        send_parts, send_sizes, recv_sizes = [], [], []
        for other in range(world):
            picks = source_row[other][source_rank[other] == me] if other != me else source_row[other][:0]
            send_parts.append(flat.index_select(0, picks.to(self.comm_device)))
            send_sizes.append(len(picks))
            recv_sizes.append(0 if other == me else int((mine_rank == other).sum()))
        send = torch.cat(send_parts).contiguous()
        received = torch.empty(sum(recv_sizes), flat.shape[1], dtype=flat.dtype, device=self.comm_device)
        torch.distributed.all_to_all_single(received, send, recv_sizes, send_sizes)
        self.bytes_sent += send.numel() * send.element_size()
        # Each sender packed our rows in our slot order; unpack them in the same order.
        start = 0
        for other, size in enumerate(recv_sizes):
            if size:
                slots = (mine_rank == other).nonzero().flatten().to(rows.device)
                out[slots] = received[start:start + size].to(rows.device).reshape(size, *rows.shape[1:])
                start += size
        return out


def _launched_world_size() -> int:
    """The world size set by a launcher (torchrun / accelerate launch / mpirun), or 1."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def process_group(device: str | None = None) -> ProcessGroup:
    """The process group of this run: accelerate's when launched on several processes, else one process.

    Args:
        device: the requested device (``None``: each process's own accelerator, else the CPU).
            On CPU-only machines or with ``device="cpu"`` processes talk over gloo; on GPUs over
            NCCL, one GPU per process.
    """
    if _launched_world_size() <= 1:
        return ProcessGroup(0, 1, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    state = PartialState(cpu=cpu)
    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    return ProcessGroup(state.process_index, state.num_processes, device, backend=state.backend or "gloo")


# --- prompt sharding ---------------------------------------------------------------------------


def plan_chunks(num_items: int, items_per_call: int | None) -> list[range]:
    """Consecutive item ranges of at most ``items_per_call`` items (``None``: one chunk of all)."""
    if items_per_call is not None and (isinstance(items_per_call, bool) or not isinstance(items_per_call, int)
                                       or items_per_call < 1):
        raise ValueError(f"items_per_call must be None or an integer ≥ 1, got {items_per_call!r}")
    step = items_per_call or max(num_items, 1)
    return [range(start, min(start + step, num_items)) for start in range(0, num_items, step)]


@dataclass
class Chunk:
    """One pipeline call: prompts ``items`` (global indices), all their images and particles.

    Attributes:
        index: the chunk's position in the run.
        items: global prompt indices.
        outputs: global output indices (``item · images_per_item + image``), one image file each.
        rows: global rows (``output · particles + particle``): the seeds are ``seed + row``.
    """

    index: int
    items: range
    outputs: range
    rows: range
    seeds: list[int] = field(default_factory=list)

    def generators(self, device: torch.device | str, rows: Sequence[int] | None = None) -> list[torch.Generator]:
        """One generator per row, seeded ``seed + global row`` (pass as the pipeline's ``generator``).

        ``rows``: only these rows of the call (0-based within it), e.g. one process's share of the
        particles (:meth:`ParticleShards.global_rows`).
        """
        seeds = self.seeds if rows is None else [self.seeds[int(row)] for row in rows]
        return [torch.Generator(device).manual_seed(seed) for seed in seeds]


class ShardedGeneration:
    """A resumable generation of many prompts, sharded across the processes of ``group``.

    >>> with ShardedGeneration(out, prompts, names, items_per_call=4, fingerprint=config) as run:  # doctest: +SKIP
    ...     run.begin({"command": ...})
    ...     for chunk in run.my_chunks():
    ...         out = pipe([prompts[i] for i in chunk.items], generator=chunk.generators(device))
    ...         run.save(chunk, out.images, diagnostics=out.steering.to_dict())
    ...     manifest = run.finish()

    The directory is locked (:class:`~steerkit.io.OutputLock`, held by process 0) from the
    constructor until :meth:`finish` or :meth:`close`: a second run into it raises
    :class:`~steerkit.io.OutputInUse` on every process. Used as a context manager, an exception
    after :meth:`begin` is recorded in the manifest (``status: "failed"`` and ``error``), and the
    lock is released. A later run of the same configuration resumes a failed or killed run; one of
    another configuration replaces it when none of its images was done, and is refused otherwise.

    Args:
        out: output directory (created if needed).
        items: the prompts (or class names), in order.
        file_names: one file name per output (``len(items) · images_per_item``).
        seed: base seed; global row ``r`` uses ``seed + r``.
        images_per_item, particles: the row layout (item × image × particle).
        items_per_call: prompts per pipeline call (``None``: ``⌈items / processes⌉``, one call per
            process; fix it to get the same bytes on any number of processes).
        fingerprint: whatever must match for a resume (the configuration); a directory holding an
            unfinished run with another fingerprint and some images done is refused.
        overwrite: start afresh even if ``out`` holds a run.
        group: the processes (default: :func:`process_group`).
        shard: ``"prompts"`` (default): pending chunks are dealt to the processes round-robin.
            ``"particles"``: every process takes part in every call, each with its share of every
            prompt's particles (:class:`~steerkit.smc.ShardedFKSteering`); the images are the same on
            every process, so only process 0 writes them. ``items_per_call=None`` is then one call.
        command: the command line, named to whoever finds the directory locked (default: ``sys.argv``).

    Attributes:
        resuming: whether ``out`` holds an unfinished run of the same configuration.
        done: global output indices already done (skipped).
        clash: whether ``out`` holds something this run would overwrite without ``overwrite``: a
            finished run, another configuration's unfinished run with images done, or files of the
            same names.
        run_id: this attempt's id (in the manifest's ``attempts``, and in its temporaries' names).
    """

    manifest_name = "run.json"

    def __init__(self, out: Path, items: Sequence[Any], file_names: Sequence[str], *, seed: int = 0,
                 images_per_item: int = 1, particles: int = 1, items_per_call: int | None = None,
                 fingerprint: dict[str, Any] | None = None, overwrite: bool = False,
                 group: ProcessGroup | None = None, shard: str = "prompts", command: Sequence[str] | None = None):
        if shard not in ("prompts", "particles"):
            raise ValueError(f"shard must be 'prompts' or 'particles', got {shard!r}")
        self.shard = shard
        self.out = Path(out)
        self.items = list(items)
        self.file_names = list(file_names)
        if len(self.file_names) != len(self.items) * images_per_item:
            raise ValueError(f"need one file name per output ({len(self.items) * images_per_item}), "
                             f"got {len(self.file_names)}")
        self.seed, self.images_per_item, self.particles = int(seed), images_per_item, particles
        self.items_per_call = items_per_call
        self.fingerprint = fingerprint or {}
        self.group = group or process_group()
        self.started = time.perf_counter()
        self.chunks = []
        # Unset: one call per process, each with its share of the prompts (or, sharding particles,
        # one call that every process takes part in).
        processes = self.group.world_size if shard == "prompts" else 1
        per_call = items_per_call or max(1, -(-len(self.items) // processes))
        for index, items_range in enumerate(plan_chunks(len(self.items), per_call)):
            outputs = range(items_range.start * images_per_item, items_range.stop * images_per_item)
            rows = range(outputs.start * particles, outputs.stop * particles)
            self.chunks.append(Chunk(index, items_range, outputs, rows, [self.seed + r for r in rows]))
        self._lock = io.OutputLock(self.out, command)
        self._fields: dict[str, Any] = {}
        self._began = False
        # Process 0 holds the lock for everyone; every process fails alike if it is taken.
        refusal = None
        if self.group.is_main:
            try:
                self._lock.acquire()
            except io.OutputInUse as error:
                refusal = str(error)
        refusal = self.group.broadcast_object(refusal)
        if refusal is not None:
            raise io.OutputInUse(refusal)
        try:
            self.run_id = self.group.broadcast_object(io.new_run_id())
            self._read_previous(overwrite)
        except BaseException:
            self.close()
            raise

    def _read_previous(self, overwrite: bool) -> None:
        """What ``out`` holds, and so what this run resumes, replaces or refuses to touch."""
        # Read everything before any process writes (begin() starts with a barrier).
        manifest, records, self._old_chunks, last_attempt = io.read_records(self.out, self.manifest_name)
        self.attempt = last_attempt + 1
        self.previous = manifest
        # Lock held: a manifest that says "running" is a run that was killed (or interrupted).
        unfinished = manifest is not None and manifest.get("status") in ("running", "failed")
        self.differences = sorted(
            key for key in set(self.fingerprint) | set((manifest or {}).get("fingerprint", {}))
            if self.fingerprint.get(key) != (manifest or {}).get("fingerprint", {}).get(key))
        self.resuming = bool(unfinished and not overwrite and not self.differences)
        self._stale_run_ids = _recorded_run_ids(manifest, self._old_chunks)
        # What the unfinished run finished, by its own file names (it may have had other ones).
        self.previously_done = sorted(index for index, record in records.items()
                                      if record.get("status") == "done" and isinstance(record.get("file"), str)
                                      and (self.out / record["file"]).is_file())
        self.done = set()
        if self.resuming:
            self.done = {index for index in self.previously_done
                         if 0 <= index < len(self.file_names) and records[index]["file"] == self.file_names[index]}
            self._records = {index: records[index] for index in self.done}
        else:
            self._records = {}
            self._old_chunks = []
        # An unfinished run that finished no image holds nothing worth keeping: its manifest is replaced.
        abandoned = unfinished and not self.previously_done
        existing = [name for name in self.file_names if (self.out / name).exists()]
        if (self.out / self.manifest_name).exists() and not abandoned:
            existing.append(self.manifest_name)
        self.clash = not overwrite and not self.resuming and bool(existing)
        self.existing = existing
        self.pending = [chunk for chunk in self.chunks if not set(chunk.outputs) <= self.done]
        self._mine: list[dict] = []
        self._saved = 0

    def describe_clash(self) -> str:
        """Why ``out`` cannot be used as it is (for an error message)."""
        previous = self.previous or {}
        if previous.get("status") in ("running", "failed") and self.differences:
            done = (f"{len(self.previously_done)} of its {len(previous.get('images', [])) or '?'} images done")
            if previous.get("status") == "failed":
                error = " ".join(str(previous.get("error", "unknown error")).split())
                how = f"it failed ({error}); pass --overwrite to replace it, or choose another --out"
            else:
                how = ("it was interrupted; rerun its command (run.json's \"command\") to resume it, or pass "
                       "--overwrite, or choose another --out")
            return (f"{self.out} holds an unfinished run with a different configuration (differs in: "
                    f"{', '.join(self.differences)}), {done}: {how}")
        return (f"{self.out / self.existing[0]} already exists ({len(self.existing)} output files would be "
                "replaced); pass --overwrite or choose another --out")

    def begin(self, manifest_fields: dict[str, Any] | None = None) -> None:
        """Process 0 clears what a killed run left behind and records the run as started."""
        self._fields = dict(manifest_fields or {})
        self.group.barrier()
        if self.group.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            io.remove_stale_temporaries(self.out, self._stale_run_ids)
            if not self.resuming:
                io.remove_parts(self.out)
            io.atomic_write_json(self.out / self.manifest_name,
                                 self._manifest("running", self._fields, self._records, self._old_chunks), self.run_id)
            if self.resuming:  # the manifest now holds every record of earlier attempts
                io.remove_parts(self.out, before_attempt=self.attempt)
        self._began = True
        self.group.barrier()

    def my_chunks(self) -> list[Chunk]:
        """This process's pending chunks: every ``W``-th pending chunk, starting at its rank (every
        pending chunk when sharding particles)."""
        if self.shard == "particles":
            return list(self.pending)
        return self.pending[self.group.rank::self.group.world_size]

    def save(self, chunk: Chunk, images: Sequence[Any], selected_rows: Sequence[int] | None = None,
             diagnostics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
             image_fields: Sequence[dict[str, Any]] | None = None) -> None:
        """Write a chunk's images atomically, then record them as done in this process's part file.

        Args:
            chunk: the chunk the images belong to.
            images: one PIL image per output of the chunk, in order.
            selected_rows: the call's row (0-based within the call) behind each image, when a
                method picked one particle per image; default: the first particle of each.
            diagnostics: the call's diagnostics (``RunTrace.to_dict()``), kept per chunk.
            extra: more fields for the chunk record.
            image_fields: more fields for each image's record (e.g. its reward), one dict per image.

        Sharding particles, every process calls this with the same images and only process 0 writes.
        """
        if len(images) != len(chunk.outputs):
            raise ValueError(f"chunk {chunk.index} has {len(chunk.outputs)} outputs, got {len(images)} images")
        if self.shard == "particles" and not self.group.is_main:
            return
        for output, image in zip(chunk.outputs, images):
            io.atomic_write(self.out / self.file_names[output], lambda tmp, image=image: image.save(tmp, format="PNG"),
                            self.run_id)
        self._saved += 1
        if os.environ.get(KILL_ENV) == str(self._saved):
            os.kill(os.getpid(), signal.SIGKILL)
        p = self.particles
        rows = list(selected_rows) if selected_rows is not None else [i * p for i in range(len(chunk.outputs))]
        fields = list(image_fields) if image_fields is not None else [{}] * len(chunk.outputs)
        if len(fields) != len(chunk.outputs):
            raise ValueError(f"chunk {chunk.index} has {len(chunk.outputs)} outputs, got {len(fields)} image_fields")
        records = []
        for output, local_row, more in zip(chunk.outputs, rows, fields):
            row = chunk.rows.start + int(local_row)
            first = (row // p) * p
            records.append({"index": output, "file": self.file_names[output],
                            "item": self.items[output // self.images_per_item], "row": row,
                            "seed": self.seed + row, "particle_seeds": [self.seed + r for r in range(first, first + p)],
                            **more, "status": "done", "rank": self.group.rank, "chunk": chunk.index,
                            "attempt": self.attempt})
        self._mine.append({"chunk": chunk.index, "attempt": self.attempt, "run_id": self.run_id, "rank": self.group.rank,
                           "outputs": [chunk.outputs.start, chunk.outputs.stop], "images": records,
                           "diagnostics": diagnostics, **(extra or {})})
        part = io.part_path(self.out, self.attempt, self.group.rank)
        part.parent.mkdir(exist_ok=True)
        io.atomic_write_json(part, {"attempt": self.attempt, "rank": self.group.rank, "chunks": self._mine}, self.run_id)

    def finish(self, manifest_fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait for every process; process 0 merges the parts into the manifest and releases the lock.
        Returns the manifest (on every process)."""
        self.group.barrier()
        manifest = None
        if self.group.is_main:
            _, records, chunks, _ = io.read_records(self.out, self.manifest_name)
            complete = all(records.get(i, {}).get("status") == "done" for i in range(len(self.file_names)))
            fields = {**self._fields, **(manifest_fields or {})}
            manifest = self._manifest("complete" if complete else "running", fields, records, chunks)
            io.atomic_write_json(self.out / self.manifest_name, manifest, self.run_id)
            if complete:
                io.remove_parts(self.out)
        manifest = self.group.broadcast_object(manifest)
        self.close()
        return manifest

    def fail(self, error: BaseException | str) -> None:
        """Record the run as failed, with ``error`` as the reason (process 0; no collective: the others
        may be gone). What was done stays recorded, so rerunning the same command resumes it."""
        if not (self.group.is_main and self._began):
            return
        reason = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, BaseException):
            reason = f"{type(error).__name__}: {reason}"
        _, records, chunks, _ = io.read_records(self.out, self.manifest_name)
        manifest = self._manifest("failed", {**self._fields, "error": reason}, records, chunks)
        io.atomic_write_json(self.out / self.manifest_name, manifest, self.run_id)

    def close(self) -> None:
        """Release the directory's lock (idempotent; :meth:`finish` does it)."""
        self._lock.release()

    def __enter__(self) -> ShardedGeneration:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            # A kill or Ctrl-C (not an Exception) leaves "running": an interrupted run, resumable.
            if isinstance(error, Exception):
                try:
                    self.fail(error)
                except OSError:
                    pass  # e.g. the disk is full: the manifest then keeps saying "running"
        finally:
            self.close()

    def _manifest(self, status: str, fields: dict[str, Any], records: dict[int, dict], chunks: list[dict]) -> dict:
        unique = {(c["attempt"], c["chunk"]): c for c in chunks}
        chunks = [unique[key] for key in sorted(unique)]
        attempts = list((self.previous or {}).get("attempts", [])) if self.resuming else []
        attempts = [a for a in attempts if a.get("attempt") != self.attempt]
        attempts.append({"attempt": self.attempt, "run_id": self.run_id, "processes": self.group.world_size,
                         "wall_time_s": time.perf_counter() - self.started})
        for attempt in attempts:  # counted from the chunk records: a killed attempt never updated its entry
            done = [c for c in chunks if c["attempt"] == attempt["attempt"]]
            attempt.update(chunks_done=len(done), images_done=sum(len(c["images"]) for c in done))
        images = []
        for index, name in enumerate(self.file_names):
            record = records.get(index)
            if record is None or record.get("status") != "done":
                record = {"index": index, "file": name, "item": self.items[index // self.images_per_item],
                          "status": "pending"}
            images.append(record)
        diagnostics = _combined_diagnostics(chunks, len(self.chunks))
        if len(self.chunks) == 1:  # one call: its diagnostics are the run's, kept once
            chunks = [{k: v for k, v in c.items() if k != "diagnostics"} for c in chunks]
        return {**fields, "status": status, "fingerprint": self.fingerprint, "items_per_call": self.items_per_call,
                "chunk_count": len(self.chunks), "images": images, "attempts": attempts,
                "diagnostics": diagnostics, "chunks": chunks}


def _recorded_run_ids(manifest: dict | None, chunks: list[dict]) -> list[str]:
    """The run ids that ``out``'s records name: whose temporaries are provably steerkit's."""
    ids = [attempt.get("run_id") for attempt in (manifest or {}).get("attempts", []) if isinstance(attempt, dict)]
    ids += [chunk.get("run_id") for chunk in chunks]
    return sorted({run_id for run_id in ids if isinstance(run_id, str)})


def _combined_diagnostics(chunks: list[dict], total_chunks: int) -> dict[str, Any] | None:
    """One call's diagnostics as they are; for several calls, their totals (each is in ``chunks``)."""
    traces = [c.get("diagnostics") for c in chunks if c.get("diagnostics") is not None]
    if total_chunks == 1 and len(traces) == 1:
        return traces[0]
    nfe: dict[str, int] = {}
    for trace in traces:
        for branch, count in (trace.get("nfe") or {}).items():
            nfe[branch] = nfe.get(branch, 0) + count
    return {"nfe": nfe, "total_nfe": sum(nfe.values()), "calls": len(traces),
            "model_calls": sum(int(t.get("model_calls", 0)) for t in traces),
            "note": "one pipeline call per chunk; each call's diagnostics are in chunks[i].diagnostics"}


# --- particle sharding -------------------------------------------------------------------------


class ParticleShards:
    """The layout of ``K`` particles per prompt split into equal blocks over ``W`` processes.

    Args:
        num_prompts: ``P``.
        local_particles: ``K/W``, the particles of every prompt on each process.
        group: the processes.
    """

    def __init__(self, num_prompts: int, local_particles: int, group: ProcessGroup):
        self.num_prompts, self.local_particles, self.group = num_prompts, local_particles, group
        self.num_particles = local_particles * group.world_size

    def global_rows(self, rank: int | None = None) -> torch.Tensor:
        """``[P·K/W]``: the global row of each local row of process ``rank`` (default: this one)."""
        rank = self.group.rank if rank is None else rank
        p = torch.arange(self.num_prompts)[:, None]
        j = torch.arange(self.local_particles)[None, :]
        return (p * self.num_particles + rank * self.local_particles + j).reshape(-1)

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Per-row ``[P·K/W, ...]`` tensors of every process → the global ``[P·K, ...]``, in global row order."""
        stacked = self.group.all_gather(local)  # [W, P*K/W, ...]
        world, p, kl, rest = self.group.world_size, self.num_prompts, self.local_particles, local.shape[1:]
        return stacked.reshape(world, p, kl, *rest).transpose(0, 1).reshape(p * world * kl, *rest)

    def gather_objects(self, local: Sequence[Any]) -> list[Any]:
        """Per-row Python objects (e.g. PIL images) of every process → all ``P·K`` of them, in global row order."""
        ordered: list[Any] = [None] * (self.num_prompts * self.num_particles)
        for rank, share in enumerate(self.group.all_gather_object(list(local))):
            for row, item in zip(self.global_rows(rank).tolist(), share):
                ordered[row] = item
        return ordered

    def gather_weights(self, local: torch.Tensor) -> torch.Tensor:
        """``[P, K/W]`` per-prompt weights of every process → the global ``[P, K]``."""
        return self.group.all_gather(local).permute(1, 0, 2).reshape(self.num_prompts, self.num_particles)

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows ``[P·K/W, ...]`` of a global per-row ``[P·K, ...]`` tensor."""
        p, kl, rest = self.num_prompts, self.local_particles, full.shape[1:]
        return full.reshape(p, self.group.world_size, kl, *rest)[:, self.group.rank].reshape(p * kl, *rest).contiguous()

    def local_weights(self, full: torch.Tensor) -> torch.Tensor:
        """This process's columns ``[P, K/W]`` of global ``[P, K]`` weights."""
        kl, rank = self.local_particles, self.group.rank
        return full[:, rank * kl:(rank + 1) * kl].contiguous()

    def plan(self, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(source_rank, source_row)`` ``[W, P·K/W]`` for global ancestors ``[P·K]`` (see :meth:`ProcessGroup.exchange_rows`)."""
        world, p, kl, k = self.group.world_size, self.num_prompts, self.local_particles, self.num_particles
        parents = ancestors.to("cpu", torch.int64).reshape(p, world, kl).transpose(0, 1)  # [W, P, K/W]
        particle = parents % k
        prompt = torch.arange(p)[None, :, None]
        return (particle // kl).reshape(world, -1), (prompt * kl + particle % kl).reshape(world, -1)

    def plan_copies(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A plan that puts global row ``chosen[p]`` in prompt ``p``'s first local slot on every process.

        Every other slot keeps its own row, so only the chosen rows travel (to the processes that
        do not hold them).
        """
        k, kl = self.num_particles, self.local_particles
        ancestors = torch.arange(self.num_prompts * k)
        firsts = ancestors.view(self.num_prompts, k)[:, ::kl].clone()  # [P, W]: each process's first slot per prompt
        ancestors[firsts.reshape(-1)] = chosen.to("cpu", torch.int64).repeat_interleave(self.group.world_size)
        return self.plan(ancestors)

    def exchange(self, rows: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.group.exchange_rows(rows, *plan)

