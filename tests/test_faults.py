"""Faults during real `deepspeed launch/train.py` runs (CPU ranks, tiny preset, 32 px; the session's
`corpus`, 6 shards of 8 samples per domain):
a rank killed and a node frozen on one of two nodes, a checkpoint interrupted mid-write, shards vanishing or
truncated mid-run, a full disk while checkpointing, and the MLflow server going away."""
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launch.runstore.records import BUFFER_NAME
from trainutil import delete_namespaces, finish_nodes, free_port, kill_group, last_step, launch, launch_cmd, \
    metrics, rank_processes, resumed_step, start, start_nodes, two_nodes, wait_for, write_config

pytestmark = pytest.mark.slow


def marked(run_dir: Path) -> list[int]:
    root = run_dir / "ckpt"
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "COMPLETE").is_file()) if root.is_dir() else []


def tree_digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------- a rank dies, then a node freezes

def test_rank_killed_then_node_frozen_on_two_nodes_each_ends_the_job_then_resumes(corpus, tmp_path):
    """One two-node run, three launches of both nodes (each launch costs most of the time here):
    1. node 1's rank is killed: both launchers end, node 0's too, its rank seeing the peer's
       connection drop (not by its watchdog);
    2. the relaunch resumes from the last complete checkpoint; then node 1 freezes: SIGSTOP keeps its
       sockets open, as a lost host or a partition does, where gloo alone would wait for its
       30-minute timeout, and node 0's stall watchdog ends it after train.stall_timeout_s;
    3. the relaunch resumes from the last complete checkpoint again and finishes."""
    nodes = two_nodes(f"f{os.getpid() % 100000}")
    procs = []
    try:
        run_dir = tmp_path / "run"
        cfg = write_config(tmp_path / "c.yaml", corpus, run_dir, max_steps=400, ckpt_every=3, stall_timeout_s=10)
        killed_at, last_marked, logged = kill_a_rank_on_node_1(nodes, cfg, run_dir, tmp_path)
        last_marked = resume_then_freeze_node_1(nodes, cfg, run_dir, tmp_path, killed_at, last_marked, logged)

        # 3. The relaunch resumes from the last complete checkpoint and finishes.
        procs = start_nodes(nodes, cfg, f"train.max_steps={last_marked + 2}", port=free_port(), tmp=tmp_path)
        outs = finish_nodes(procs)
        assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:]
        assert resumed_step(outs[0]) == last_marked
        assert [m["step"] for m in metrics(run_dir)][-2:] == [last_marked + 1, last_marked + 2]
    finally:
        for p in procs:
            kill_group(p)
        delete_namespaces(nodes.namespaces)


def kill_a_rank_on_node_1(nodes, cfg: Path, run_dir: Path, tmp_path: Path) -> tuple[int, int, int]:
    """1. Node 1's rank is killed after a checkpoint and step 5: both launchers end, node 0's too.
    Returns (the step reached, the last complete checkpoint's step, metric lines logged)."""
    procs = start_nodes(nodes, cfg, port=free_port(), tmp=tmp_path)
    try:
        wait_for(lambda: marked(run_dir) and last_step(run_dir) >= 5, 240, procs, "a checkpoint and step 5")
        victims = rank_processes(procs[1])
        assert len(victims) == 1
        victims[0].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        outs = finish_nodes(procs, timeout=120)
        took = time.monotonic() - t_kill
    finally:
        for p in procs:
            kill_group(p)
    # Both launchers fail, node 0's too: its rank sees the peer's connection drop and exits.
    assert procs[0].returncode != 0 and procs[1].returncode != 0, outs[0][-3000:]
    assert "no training step finished in" not in outs[0], outs[0][-3000:]  # not the watchdog's doing
    assert took < 60, f"launchers took {took:.0f} s to exit after the kill"
    killed_at = last_step(run_dir)
    assert killed_at < 400
    print(f"rank 1 killed at step {killed_at}; both launchers exited {took:.1f} s later")
    return killed_at, marked(run_dir)[-1], len(metrics(run_dir))


def resume_then_freeze_node_1(nodes, cfg: Path, run_dir: Path, tmp_path: Path, killed_at: int,
                              last_marked: int, logged: int) -> int:
    """2. The relaunch of both nodes resumes from the last complete checkpoint and writes one of its
    own; then node 1 freezes and node 0's watchdog ends the job. Returns the new last checkpoint."""
    procs = start_nodes(nodes, cfg, port=free_port(), tmp=tmp_path)
    try:
        # (Checkpoints are written after their step's metric line: launch 1's are all <= killed_at.)
        wait_for(lambda: marked(run_dir)[-1] > killed_at, 240, procs, "a checkpoint of the resumed run")
        frozen = rank_processes(procs[1])
        assert len(frozen) == 1
        frozen[0].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            kill_group(p)
    assert procs[0].returncode != 0
    assert resumed_step(out) == last_marked
    assert "no training step finished in" in out and "train.stall_timeout_s=10" in out, out[-3000:]
    assert took < 60, f"node 0 took {took:.0f} s to give up on the frozen node"
    steps = [m["step"] for m in metrics(run_dir)]
    # the resume dropped the killed launch's lines after its checkpoint: each step once, in order
    assert logged >= last_marked and steps == sorted(set(steps)) and last_marked in steps, steps
    resumed = [s for s in steps if s > last_marked]
    assert resumed == list(range(last_marked + 1, last_marked + 1 + len(resumed))), resumed  # numbering continues
    return marked(run_dir)[-1]


# ---------------------------------------------------------------- killed while writing a checkpoint

def test_checkpoint_interrupted_mid_write_is_never_resumed(corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", corpus, run_dir, max_steps=60, ckpt_every=1, keep_ckpts=4)
    proc = start(launch_cmd(cfg))
    caught, nxt = {}, [2]  # from step 2 on, so that a complete checkpoint precedes it

    def half_written() -> bool:
        # The next step directory has engine files being written and no marker yet. Two stat calls
        # per poll: a glob every millisecond would slow the run it watches.
        d = run_dir / "ckpt" / f"step-{nxt[0]:08d}"
        if (d / "COMPLETE").exists():
            nxt[0] += 1  # written completely before we looked: watch the next one
            return False
        if not (d / "G").is_dir():
            return False
        # Freeze the whole job at once (launcher and rank share the process group), so the state
        # seen here is the state it dies in.
        os.killpg(proc.pid, signal.SIGSTOP)
        if (d / "COMPLETE").exists():  # finished between the check and the stop: try the next one
            os.killpg(proc.pid, signal.SIGCONT)
            nxt[0] += 1
            return False
        caught["dir"] = d
        return True

    try:
        wait_for(half_written, 240, [proc], "a checkpoint caught mid-write", poll=0.001)
    finally:
        kill_group(proc)
    bad = caught["dir"]
    step = int(bad.name[5:])
    assert not (bad / "COMPLETE").exists()
    prev = run_dir / "ckpt" / f"step-{marked(run_dir)[-1]:08d}"
    assert marked(run_dir)[-1] == step - 1  # the previous checkpoint is complete and kept
    before = tree_digest(prev)

    r = launch(cfg, f"train.max_steps={step + 1}")
    assert resumed_step(r.stdout) == step - 1, "resumed from a half-written checkpoint"
    assert tree_digest(prev) == before  # loading it changed nothing
    assert (bad / "COMPLETE").is_file()  # the step was redone and written completely this time
    assert [m["step"] for m in metrics(run_dir)][-2:] == [step, step + 1]


# ---------------------------------------------------------------- shards vanish mid-run

def test_shards_deleted_or_truncated_mid_run_are_skipped_and_counted(corpus, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(corpus / "shards", shards)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tmp_path, run_dir, max_steps=40, ckpt_every=1000)
    proc = start(launch_cmd(cfg))
    try:
        wait_for(lambda: last_step(run_dir) >= 2, 240, [proc], "step 2")
        # Half of each domain's shards go bad while the loader is streaming them.
        for i in (1, 3, 5):
            (shards / "a" / f"a-{i:06d}.tar").unlink()
            p = shards / "b" / f"b-{i:06d}.tar"
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 3)
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-4000:]
    rows = metrics(run_dir)
    assert rows[-1]["step"] == 40  # training went on to the end
    skipped = {k: v for k, v in rows[-1].items() if k.startswith("loader/skipped/") and v}
    assert skipped.get("loader/skipped/unreadable_shard", 0) > 0, skipped  # the deleted ones
    assert skipped.get("loader/skipped/truncated_shard", 0) + skipped.get("loader/skipped/corrupt_sample", 0) > 0, \
        skipped  # the truncated ones (truncated when opened fresh, corrupt samples when indexed earlier)
    assert "skipping (unreadable_shard)" in out


# ---------------------------------------------------------------- full disk while checkpointing

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs for the run directory, filled on demand; where mounting is not permitted, the
    disk "fills" by a 1 MB file-size limit (RLIMIT_FSIZE) set on the running ranks (said, not skipped).
    Yields (directory, fill(launcher), mode)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.environ.get("UNIT_TEST_TMPFS", "1") == "0":  # to exercise the fallback on purpose
        r = subprocess.CompletedProcess([], 1, "", "UNIT_TEST_TMPFS=0 is set")
    else:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
    if r.returncode == 0:
        def fill(proc):  # leave 1 MB: less than one checkpoint, enough for the metric lines
            with open(mnt / "filler", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(mnt).free - (1 << 20)))

        yield mnt, fill, "tmpfs"
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        return
    print(f"mounting a tmpfs is not permitted here ({(r.stderr or r.stdout).strip()}); "
          f"using a file-size limit (RLIMIT_FSIZE) on the ranks instead")

    def fill(proc):
        for p in rank_processes(proc):
            p.rlimit(psutil.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    yield mnt, fill, "rlimit"


def test_full_disk_while_checkpointing_fails_clearly_and_keeps_the_previous_one(corpus, tmp_path, small_disk):
    disk, fill, mode = small_disk
    run_dir = disk / "run"
    cfg = write_config(tmp_path / "c.yaml", corpus, run_dir, max_steps=4, ckpt_every=2)
    proc = start(launch_cmd(cfg))
    try:
        # Step 2 is checkpointed (about 5 MB); then the disk fills up before step 4's checkpoint.
        wait_for(lambda: marked(run_dir) == [2], 240, [proc], "the checkpoint at step 2")
        os.killpg(proc.pid, signal.SIGSTOP)
        assert last_step(run_dir) < 4
        fill(proc)
        os.killpg(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode != 0, out[-4000:]
    err = [line for line in out.splitlines() if line.startswith("error:")]
    assert err, out[-4000:]
    print(f"[{mode}] {err[-1]}")
    assert "checkpoint" in err[-1] and "step-00000004" in err[-1], err
    assert ("No space left on device (ENOSPC)" if mode == "tmpfs" else "file-size limit") in err[-1], err
    assert "step-00000002 is intact" in err[-1], err
    assert marked(run_dir) == [2]  # the interrupted one is not marked ...
    before = tree_digest(run_dir / "ckpt" / "step-00000002")

    (disk / "filler").unlink(missing_ok=True)  # space is back: the run resumes from the intact checkpoint
    r = launch(cfg)
    assert resumed_step(r.stdout) == 2
    assert marked(run_dir) == [2, 4]
    assert tree_digest(run_dir / "ckpt" / "step-00000002") == before  # ... and it was intact


# ---------------------------------------------------------------- the MLflow server goes away

def test_mlflow_server_killed_mid_run_training_goes_on_and_metrics_arrive(corpus, tmp_path, server_up):
    from mlflow import MlflowClient

    server = server_up
    run_dir = tmp_path / "run"
    steps = 120
    cfg = write_config(tmp_path / "c.yaml", corpus, run_dir, max_steps=steps, ckpt_every=1000,
                       tracking={"enable": True, "uri": server.uri, "experiment": "faults", "system_metrics": False})
    proc = start(launch_cmd(cfg))
    try:
        wait_for(lambda: last_step(run_dir) >= 3 and (run_dir / "tracking.json").is_file(), 240, [proc], "step 3")
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies without a goodbye
        server.proc.wait(timeout=30)
        server.proc = None
        down_at = last_step(run_dir)
        # the server stays away until the tracker has noticed (its buffer file): restarted sooner, an
        # HTTP retry can bridge the outage and nothing is "unreachable" (seen on a fast machine)
        wait_for(lambda: last_step(run_dir) >= down_at + 5 and (run_dir / BUFFER_NAME).is_file(), 120, [proc],
                 "steps while the server is down, and the tracker keeping its records")
        during = list(range(down_at + 1, last_step(run_dir) + 1))
        server.start()
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "unreachable" in out
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, steps + 1))
    import json
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    hist = MlflowClient(tracking_uri=server.uri).get_metric_history(run_id, "g/total")
    got = sorted(m.step for m in hist)
    assert set(during) <= set(got), (during, got)
    assert got == list(range(1, steps + 1))
