"""Scaling out: prompt sharding with resume, and FK with particles sharded across processes.

The multi-process tests start 2 CPU processes (gloo) with ``accelerate launch`` or torchrun, as a
user would, on the bundled fashion-flow model (prompt sharding) and on the exact Gaussian-mixture
denoiser of test_smc_gmm.py (sharded particles). Each call of a sharded run holds the same prompts
as in the one-process run (``--items-per-call 1``), so results must be equal byte for byte.

Byte equality holds for equal thread settings only (on some CPUs 1 and 2 intra-op threads round
differently, and an FK resampling decision then flips), so every run compared here is a separate
process started with the same ``OMP_NUM_THREADS``: the one-process reference too, never this
pytest process. The README's cases run under 1 and 2 threads.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from distributed_worker import gmm_fk
from test_smc_gmm import ExactGMM, tilted_target, value

from steerkit import io
from steerkit.cli import main
from steerkit.distributed import KILL_ENV, ParticleShards, ProcessGroup, ShardedGeneration, plan_chunks
from steerkit.protocols import RunContext
from steerkit.smc import FKSteering, ShardedFKSteering
from steerkit.state import ParticleState

TESTS = Path(__file__).parent
CLASSES = ["Sneaker", "Bag", "Dress", "Coat"]
GENERATE = ["generate", *CLASSES, "--method", "fk", "--particles", "2", "--steps", "4", "--items-per-call", "1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(launcher: list[str], args: list[str], extra_env: dict[str, str] | None = None,
            threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=TESTS)


def one_process(args, **kwargs):
    """The command in one fresh process, without a launcher (under the same thread settings as the launched ones)."""
    return _launch([], args, **kwargs)


def accelerate_launch(args, **kwargs):
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs steerkit then
    # runs each process on the CPU over gloo (`--cpu` alone would start one process, not two).
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return _launch(launcher, args, **kwargs)


def torchrun(args, **kwargs):
    return _launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())],
                   args, **kwargs)


def pngs(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.png"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(threads)``: the output of GENERATE run by one process with ``threads`` threads (made once)."""
    runs: dict[int, Path] = {}

    def run(threads: int = 1) -> Path:
        if threads not in runs:
            out = tmp_path_factory.mktemp(f"one-process-{threads}-threads") / "out"
            result = one_process(["-m", "steerkit", *GENERATE, "--out", str(out)], threads=threads)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[threads] = out
        return runs[threads]

    return run


@pytest.fixture(scope="module")
def one_process_run(reference):
    return reference(1)


# --- prompt sharding and resume ------------------------------------------------------------------


def test_chunks_cover_the_items_in_order():
    assert plan_chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_chunks(3, None) == [range(0, 3)]
    with pytest.raises(ValueError, match="items_per_call must be None or an integer ≥ 1, got 0"):
        plan_chunks(3, 0)


class PretendGroup(ProcessGroup):
    """Process ``rank`` of ``world_size`` for planning only: collectives return this process's value."""

    def broadcast_object(self, value, src=0):
        return value


def test_seeds_follow_the_global_row_and_chunks_are_dealt_round_robin(tmp_path):
    names = [f"{i}.png" for i in range(6)]
    shards = [ShardedGeneration(tmp_path / "a", ["a", "b", "c"], names, seed=10, images_per_item=2, particles=3,
                                items_per_call=1, group=PretendGroup(rank, 2)) for rank in range(2)]
    assert [c.index for c in shards[0].my_chunks()] == [0, 2] and [c.index for c in shards[1].my_chunks()] == [1]
    chunk = shards[1].my_chunks()[0]  # item "b": outputs 2, 3; rows 6..11
    assert list(chunk.outputs) == [2, 3] and chunk.seeds == [16, 17, 18, 19, 20, 21]
    assert [g.initial_seed() for g in chunk.generators("cpu")] == chunk.seeds
    # Unset items_per_call: one call per process, each with its share of the prompts.
    shards = [ShardedGeneration(tmp_path / "b", ["a", "b", "c"], names[:3], group=PretendGroup(rank, 2)) for rank in range(2)]
    assert [[list(c.items) for c in s.my_chunks()] for s in shards] == [[[0, 1]], [[2]]]


def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def crash(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_only_our_stale_temporaries_are_removed(tmp_path):
    run_id, other_run = io.new_run_id(), io.new_run_id()
    ours = tmp_path / f".000-bag.png.steerkit-{run_id}.k2j4h1.tmp"
    parts = tmp_path / io.PARTS_DIR
    parts.mkdir()
    our_part = parts / f".attempt-001-rank-000.json.steerkit-{run_id}.x1y2z3ab.tmp"
    # A user's files named like temporaries of our outputs, and another (unrecorded) run's, stay.
    theirs = [tmp_path / ".000-bag.png.k2j4h1.tmp", tmp_path / ".run.json.backup.tmp", tmp_path / ".notes.txt.abc.tmp",
              tmp_path / f".000-bag.png.steerkit-{other_run}.k2j4h1.tmp"]
    for path in (ours, our_part, *theirs, tmp_path / "000-bag.png"):
        path.write_text("x")
    assert io.remove_stale_temporaries(tmp_path, [run_id]) == [ours, our_part]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in theirs), "000-bag.png", io.PARTS_DIR])
    # atomic_write names its temporary after the run, which is what cleanup matches.
    seen = []
    io.atomic_write(tmp_path / "a.txt", lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_text("a"), run_id)
    assert seen[0].startswith(f".a.txt.steerkit-{run_id}.") and seen[0].endswith(".tmp")


def test_an_interrupted_run_resumes_and_a_different_configuration_is_refused(tmp_path, capsys, monkeypatch):
    argv = ["generate", "Sneaker", "Bag", "Dress", "--steps", "2", "--items-per-call", "1"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "interrupted"
    original, calls = ShardedGeneration.save, []

    def interrupted_save(self, chunk, *args, **kwargs):
        calls.append(chunk.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(ShardedGeneration, "save", interrupted_save)
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.setattr(ShardedGeneration, "save", original)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running" and [im["status"] for im in record["images"]] == ["pending"] * 3
    assert sorted(p.name for p in out.glob("*.png")) == ["000-sneaker.png"]
    capsys.readouterr()
    # Another configuration must not mix into this directory.
    assert main(["generate", "Sneaker", "Bag", "Dress", "--steps", "3", "--items-per-call", "1", "--out", str(out)]) == 2
    assert "unfinished run with a different configuration (differs in: steps)" in capsys.readouterr().err
    # The same command resumes: only the two missing images are generated.
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and [im["status"] for im in record["images"]] == ["done"] * 3
    assert [(a["attempt"], a["chunks_done"]) for a in record["attempts"]] == [(1, 1), (2, 2)]
    assert [im["seed"] for im in record["images"]] == [0, 1, 2]
    assert pngs(out) == pngs(tmp_path / "whole")
    assert not (out / io.PARTS_DIR).exists() and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_readme_distributed_cases_write_the_same_images_as_one_process(reference, tmp_path, threads):
    """Prompts dealt to 2 processes (accelerate launch), and particles split over 2 (torchrun), under
    1 and 2 threads per process: the bytes of one process with the same threads."""
    single_dir = reference(threads)
    single = json.loads((single_dir / "run.json").read_text())
    assert single["reproducibility"]["torch_threads"] == threads
    keys = ("index", "file", "item", "row", "seed", "particle_seeds", "status")
    out = tmp_path / "two-processes"
    result = accelerate_launch(["-m", "steerkit", *GENERATE, "--out", str(out)], threads=threads)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 4 image(s)" in result.stdout
    assert pngs(out) == pngs(single_dir) and len(pngs(out)) == 4
    sharded = json.loads((out / "run.json").read_text())
    assert sharded["status"] == "complete" and sharded["attempts"][0]["processes"] == 2
    assert [im["rank"] for im in sharded["images"]] == [0, 1, 0, 1]
    assert [[im[k] for k in keys] for im in sharded["images"]] == [[im[k] for k in keys] for im in single["images"]]
    assert sharded["diagnostics"]["nfe"] == single["diagnostics"]["nfe"] == {"cond": 32, "uncond": 32}
    # What a rerun needs to reproduce the bytes, for every process.
    assert [p["torch_threads"] for p in sharded["reproducibility"]["processes"]] == [threads, threads]
    out = tmp_path / "particles"
    result = torchrun(["-m", "steerkit", *GENERATE, "--shard-particles", "--out", str(out)], threads=threads)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pngs(out) == pngs(single_dir)
    sharded = json.loads((out / "run.json").read_text())
    assert sharded["status"] == "complete" and sharded["resolved"]["particle_processes"] == 2
    assert [[im[k] for k in keys] for im in sharded["images"]] == [[im[k] for k in keys] for im in single["images"]]


def test_a_killed_sharded_run_resumes_with_nothing_lost_or_duplicated(one_process_run, tmp_path):
    out = tmp_path / "killed"
    # Each process kills itself while saving its 2nd chunk: images written, not yet recorded.
    result = torchrun(["-m", "steerkit", *GENERATE, "--out", str(out)], extra_env={KILL_ENV: "2"})
    assert result.returncode != 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running"
    recorded = [im for part in (out / io.PARTS_DIR).glob("attempt-*.json")
                for chunk in json.loads(part.read_text())["chunks"] for im in chunk["images"]]
    assert 1 <= len(recorded) <= 2  # each process recorded its first chunk at most
    # As if killed in the middle of a write: a temporary named after the killed run goes; a user's
    # file that looks like one of our temporaries stays.
    killed_run = record["attempts"][0]["run_id"]
    (out / f".003-coat.png.steerkit-{killed_run}.x8k2l1ab.tmp").write_bytes(b"half a png")
    (out / ".003-coat.png.mine.tmp").write_bytes(b"the user's")
    # Resume with one process: a different number of processes is the same run.
    result = one_process(["-m", "steerkit", *GENERATE, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {4 - len(recorded)} image(s)" in result.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert [im["index"] for im in record["images"]] == [0, 1, 2, 3]
    assert [im["status"] for im in record["images"]] == ["done"] * 4
    assert [a["processes"] for a in record["attempts"]] == [2, 1]
    assert sum(a["images_done"] for a in record["attempts"]) == 4  # every image recorded once
    assert pngs(out) == pngs(one_process_run)
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs(one_process_run), "run.json", ".003-coat.png.mine.tmp"])


def test_two_processes_sharing_particles_write_the_same_images_as_one(one_process_run, tmp_path):
    out = tmp_path / "particles"
    result = torchrun(["-m", "steerkit", *GENERATE, "--shard-particles", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert pngs(out) == pngs(one_process_run) and len(pngs(out)) == 4
    sharded, single = (json.loads((d / "run.json").read_text()) for d in (out, one_process_run))
    # Each process ran 1 of the 2 particles of every prompt; the chunk's NFEs are both processes'.
    chunk = sharded["chunks"][0]["diagnostics"]
    assert chunk["nfe_per_process"] == [{"cond": 4, "uncond": 4}] * 2 and chunk["nfe"] == {"cond": 8, "uncond": 8}
    assert sharded["diagnostics"]["nfe"] == single["diagnostics"]["nfe"]
    assert chunk["extras"]["fk"]["sharded"]["processes"] == 2
    # Every particle (--select all): each process's share, gathered in the one-process order.
    every = [*GENERATE, "--select", "all", "--shard-particles"]
    result = torchrun(["-m", "steerkit", *every, "--out", str(tmp_path / "all-2")])
    assert result.returncode == 0, result.stderr[-3000:]
    result = one_process(["-m", "steerkit", *GENERATE, "--select", "all", "--out", str(tmp_path / "all-1")])
    assert result.returncode == 0, result.stderr[-3000:]  # plain FK, one process
    assert pngs(tmp_path / "all-2") == pngs(tmp_path / "all-1") and len(pngs(tmp_path / "all-1")) == 8
    # Killed while process 0 saves its 2nd chunk, then resumed by one process: nothing lost.
    killed = tmp_path / "killed"
    result = torchrun(["-m", "steerkit", *GENERATE, "--shard-particles", "--out", str(killed)], extra_env={KILL_ENV: "2"})
    assert result.returncode != 0 and json.loads((killed / "run.json").read_text())["status"] == "running"
    result = one_process(["-m", "steerkit", *GENERATE, "--shard-particles", "--out", str(killed)])
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((killed / "run.json").read_text())
    assert record["status"] == "complete" and [a["images_done"] for a in record["attempts"]] == [1, 3]
    assert pngs(killed) == pngs(one_process_run)


def test_particles_that_do_not_split_over_the_processes_are_refused(monkeypatch, tmp_path, capsys):
    import steerkit.distributed

    monkeypatch.setattr(steerkit.distributed, "process_group", lambda device=None: ProcessGroup(0, 2))
    argv = ["generate", "Sneaker", "--method", "fk", "--particles", "3", "--shard-particles", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--particles 3 does not split over 2 processes; give a multiple of 2" in capsys.readouterr().err


# --- sharded particles -----------------------------------------------------------------------------


def test_particle_layout_matches_one_big_call():
    shards = ParticleShards(num_prompts=2, local_particles=2, group=ProcessGroup(1, 2))  # K = 4, this is rank 1
    assert shards.global_rows().tolist() == [2, 3, 6, 7]
    full = torch.arange(8.0)
    assert shards.local_rows(full).tolist() == [2.0, 3.0, 6.0, 7.0]
    assert shards.local_weights(full.view(2, 4)).tolist() == [[2.0, 3.0], [6.0, 7.0]]
    # Prompt 0: every slot continues global particle 3 (rank 1, local row 1); prompt 1: identity.
    source_rank, source_row = shards.plan(torch.tensor([3, 3, 3, 3, 4, 5, 6, 7]))
    assert source_rank.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert source_row.tolist() == [[1, 1, 2, 3], [1, 1, 2, 3]]


def test_sharded_fk_on_one_process_is_fk():
    rows = torch.arange(4 * 16)
    fk, sharded = FKSteering, ShardedFKSteering
    options = dict(reward=value, lmbda=0.5, resample_at=(10, 90, 10), select="all")
    plain_hook, sharded_hook = fk(**options), sharded(**options, group=ProcessGroup())
    plain, _ = gmm_fk(plain_hook, 4, 16, 3, rows)
    state, trace = gmm_fk(sharded_hook, 4, 16, 3, rows)
    assert torch.equal(state.latents, plain.latents)
    assert torch.equal(sharded_hook.final_log_weights, plain_hook.final_log_weights)
    assert all(step["exchanged_bytes"] == [0] for step in trace.extras["fk"]["sharded"]["traffic"])


@pytest.mark.parametrize("select", ["best", "sample"])
def test_sharded_fk_selection_on_one_process_is_fk_selection(select):
    rows = torch.arange(4 * 16)
    options = dict(reward=value, lmbda=0.5, resample_at=(10, 90, 10), select=select, seed=7)
    plain_hook, sharded_hook = FKSteering(**options), ShardedFKSteering(**options, group=ProcessGroup())
    plain, plain_trace = gmm_fk(plain_hook, 4, 16, 3, rows)
    state, trace = gmm_fk(sharded_hook, 4, 16, 3, rows)
    plain_rows = plain_hook.select(plain)
    # Global rows in the diagnostics; the chosen latent sits in each prompt's first slot.
    assert trace.extras["selected_rows"] == plain_rows.tolist()
    assert sharded_hook.select(state).tolist() == [0, 16, 32, 48]
    assert torch.equal(state.latents.index_select(0, sharded_hook.select(state)), plain.latents.index_select(0, plain_rows))
    assert plain_rows.tolist() != [0, 16, 32, 48]  # otherwise the test could not tell the two apart


def test_sharded_fk_refuses_solver_history():
    hook = ShardedFKSteering(reward=value, select="all", group=ProcessGroup())
    scheduler = DPMSolverMultistepScheduler()
    run = RunContext(ExactGMM(DDPMScheduler()), 1, 2, [None], 10, torch.device("cpu"), scheduler)
    with pytest.raises(ValueError, match="without solver history .* got DPMSolverMultistepScheduler"):
        hook.start(run, ParticleState(torch.zeros(2, 1), 1, 2))


def test_sharded_fk_on_two_processes_equals_one_process_and_the_tilted_target(tmp_path):
    prompts, particles, seed = 16, 256, 1
    result = torchrun([str(TESTS / "distributed_worker.py"), str(tmp_path / "fk.pt"), str(prompts), str(particles),
                       str(seed)])
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(tmp_path / "fk.pt")
    assert sharded["world_size"] == 2
    # The same seeds per global row give the one-process run exactly (the denoiser is row-wise).
    hook = FKSteering(reward=value, lmbda=0.5, potential="difference", resample_at=(10, 90, 10), select="all")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state, trace = gmm_fk(hook, prompts, particles, seed, torch.arange(prompts * particles))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(sharded["latents"], state.latents)
    assert torch.equal(sharded["final_log_weights"], hook.final_log_weights)
    assert sharded["fk"]["resampled_steps"] == list(range(10, 91, 10))
    # And so the weighted particles match the closed-form tilt, with test_smc_gmm.py's tolerance:
    # 4 standard errors across independent prompts plus the O(1/K) self-normalisation bias.
    target_weight, target_mean = tilted_target()
    weights = sharded["final_log_weights"].exp()
    x = sharded["latents"].double().view(prompts, particles)
    mode_weight, mean = (weights * (x > 0)).sum(1), (weights * x).sum(1)
    assert abs(float(mean.mean()) - target_mean) < 4 * float(mean.std()) / math.sqrt(prompts) + 0.02
    assert abs(float(mode_weight.mean()) - target_weight) < 4 * float(mode_weight.std()) / math.sqrt(prompts) + 0.02
    # Communication: per resampling step, each process sends its rewards, weights and potential
    # history (5 float64 per particle) and, for each row it hands over, 36 bytes: latent, x̂0,
    # prediction (float32 each) and three float64 statistics.
    local = prompts * particles // 2
    traffic = sharded["fk"]["sharded"]["traffic"]
    assert [step["gathered_bytes"] for step in traffic] == [[5 * 8 * local] * 2] * 9
    assert all(sum(step["exchanged_bytes"]) == 36 * sum(step["rows_received"]) for step in traffic)
    assert sum(sum(step["rows_received"]) for step in traffic) > 0
    # With select="best" / "sample": every process returns the one-process run's chosen particles,
    # and only the chosen rows a process does not hold travel (4 bytes each).
    torch.set_num_threads(1)
    try:
        for select in ("best", "sample"):
            hook = FKSteering(reward=value, lmbda=0.5, potential="difference", resample_at=(10, 90, 10), select=select)
            state, _ = gmm_fk(hook, prompts, particles, seed, torch.arange(prompts * particles))
            rows = hook.select(state)
            chosen = sharded["chosen"][select]
            assert chosen["selected_rows"] == rows.tolist()
            expected = state.latents.index_select(0, rows)
            assert torch.equal(chosen["latents"], torch.stack([expected, expected]))
            held_by = (rows % particles) // (particles // 2)
            assert chosen["selection_bytes"] == [4 * int((held_by == rank).sum()) for rank in (0, 1)]
    finally:
        torch.set_num_threads(previous)
