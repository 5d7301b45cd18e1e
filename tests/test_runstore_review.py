"""Run store defects found in review: the fluent run MLflow's exit hook ends, one training in two
MLflow runs, the buffer file rewritten per record, racing run-directory claims, upload's target run.
All against the embedded SQLite store (no server)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import launch.runstore.tracking as tracking
from launch.runstore import rundir
from launch.runstore.records import BUFFER_NAME, write_buffer
from launch.runstore.store import embedded_uri, fluent_uri
from launch.runstore.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]

CRASH = """
import sys
from launch.runstore.tracking import Tracker
t = Tracker(uri=sys.argv[2] or None, system_metrics=True)
print(t.start(sys.argv[1]), flush=True)
raise RuntimeError("loss is NaN")   # training fails: Tracker.end() never runs
"""


@pytest.mark.parametrize("where", ["configured", "environment"])
def test_a_crashed_run_is_failed_on_its_own_store_and_leaves_no_stray_db(tmp_path, where):
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if where == "environment":
        env["MLFLOW_TRACKING_URI"] = store
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "run"), store if where == "configured" else ""],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "loss is NaN" in r.stderr, r.stderr[-2000:]
    run_id = r.stdout.split()[-1]
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"
    assert list(cwd.iterdir()) == []   # no ./mlflow.db from MLflow's exit hook


def test_server_answering_during_end_does_not_restart_system_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    run_dir = tmp_path / "run"
    t = Tracker(system_metrics=True)
    run_id = t.start(run_dir)
    try:
        assert mlflow.active_run() is not None
        with t._lock:   # as after an outage whose probe has just got an answer
            t._offline = t._back = True
        t.end("FAILED")
        assert mlflow.active_run() is None
        assert not any(th.name.startswith("SystemMetricsMonitor") for th in threading.enumerate())
        assert MlflowClient(embedded_uri(run_dir)).get_run(run_id).info.status == "FAILED"
    finally:
        if mlflow.active_run() is not None:   # keep other tests' fluent state clean
            with fluent_uri(embedded_uri(run_dir)):
                mlflow.end_run()


def test_a_run_opened_after_the_last_checkpoint_is_resumed_not_opened_again(tmp_path, monkeypatch):
    """The checkpoint has no run id (the server was away when it was written); tracking.json has
    the run the probe opened later: a restart resumes that run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    rundir.claim_run_dir(run_dir)
    first = Tracker(system_metrics=False)
    run_y = first.start(run_dir)
    first.log_metrics({"loss": 1.0}, 1)
    assert first.flush(10)   # then the process dies: no end()
    again = Tracker(system_metrics=False)
    assert again.start(run_dir, run_id=None) == run_y
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run_y
    assert again.end()
    c = MlflowClient(embedded_uri(run_dir))
    assert len(c.search_runs([c.get_experiment_by_name("unit").experiment_id])) == 1

    # Another run directory's tracking.json (a copy of the file, another run_uid) is not followed.
    other = tmp_path / "other"
    rundir.claim_run_dir(other)
    (other / "tracking.json").write_text((run_dir / "tracking.json").read_text())
    t = Tracker(uri=embedded_uri(run_dir), system_metrics=False)
    assert t.start(other) not in (None, run_y)
    assert t.end()


def test_a_mid_run_outage_rewrites_the_buffer_once_not_per_record(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 60.0)
    run_dir = tmp_path / "run"
    t = Tracker(system_metrics=False)
    t.start(run_dir)
    release, writes = threading.Event(), []

    def gone(*args, synchronous=True, **kwargs):   # the server went away: no answer to anything
        if synchronous:
            release.wait(30)
        raise ConnectionError("connection refused")

    monkeypatch.setattr(t._client, "log_batch", gone)
    monkeypatch.setattr(t._client, "get_run", gone)
    monkeypatch.setattr(tracking, "write_buffer", lambda path, recs: (writes.append(len(recs)),
                                                                      write_buffer(path, recs)))
    n = 300
    for step in range(n):   # all handed to MLflow before the first answer fails
        t.log_metrics({"loss": float(step)}, step)
    release.set()
    assert t.flush(1.0) is False
    assert t.warnings == 1
    assert len(writes) <= 5, len(writes)   # was one rewrite per failed record
    kept = [json.loads(line) for line in (run_dir / BUFFER_NAME).read_text().splitlines()]
    assert sorted(r["step"] for r in kept) == list(range(n))


def test_racing_claims_get_one_run_uid(tmp_path, monkeypatch):
    """The second claim read no marker (the first had not written it yet): it must take the
    winner's run_uid, not replace the marker with its own."""
    run_dir = tmp_path / "run"
    first = rundir.claim_run_dir(run_dir)
    real, calls = rundir.read_run_marker, []

    def not_yet(root):
        calls.append(root)
        return None if len(calls) == 1 else real(root)

    monkeypatch.setattr(rundir, "read_run_marker", not_yet)
    assert rundir.claim_run_dir(run_dir)["run_uid"] == first["run_uid"]
    assert real(run_dir)["run_uid"] == first["run_uid"]
    assert sorted(p.name for p in run_dir.iterdir()) == [rundir.RUN_MARKER]   # no temporary file left


def test_upload_sends_each_record_to_its_own_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    c = tracking.make_client(embedded_uri(run_dir))
    exp = c.create_experiment("unit")
    x, y = (c.create_run(exp).info.run_id for _ in range(2))
    recs = [{"op": "metrics", "run": x, "step": 1, "ts": 1, "values": {"loss": 1.0}},
            {"op": "metrics", "run": y, "step": 2, "ts": 2, "values": {"loss": 2.0}},
            {"op": "params", "run": y, "values": {"lr": "0.1"}},
            {"op": "end", "run": x, "status": "KILLED", "ts": 3}]
    write_buffer(run_dir / BUFFER_NAME, recs)
    res = tracking.upload(run_dir)
    assert res["sent"] == 4 and not (run_dir / BUFFER_NAME).exists()
    assert [m.step for m in c.get_metric_history(x, "loss")] == [1]
    assert [m.step for m in c.get_metric_history(y, "loss")] == [2]
    assert c.get_run(y).data.params == {"lr": "0.1"} and c.get_run(x).data.params == {}
    assert c.get_run(x).info.status == "KILLED" and c.get_run(y).info.status == "RUNNING"


# ---------------------------------------------------------------- a second live launch into one run directory

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from launch.runstore import rundir
rundir.claim_run_dir({run!r})
rundir.hold_run_lock({run!r})
print("held", flush=True)
time.sleep(60)
"""


def test_a_run_directory_that_is_training_refuses_a_second_launch(tmp_path, capsys):
    import subprocess
    import sys

    from launch.runstore import rundir

    run = tmp_path / "run"
    assert rundir.run_lock_holder(run) is None  # no lock file yet, and none is made by asking
    assert not (run / rundir.RUN_LOCK).exists()
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), run=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rundir.run_lock_holder(run)
        assert busy and f"pid {holder.pid}" in busy and "another launch is training" in busy
        with pytest.raises(rundir.RunDirError, match=f"pid {holder.pid}"):
            rundir.hold_run_lock(run)
        # make train's check before any rank starts: exit 2 naming the holder
        from launch.config import main as check_config
        from trainutil import make_corpus, write_config

        config = write_config(tmp_path / "c.yaml", make_corpus(tmp_path / "corpus"), run)
        capsys.readouterr()
        assert check_config([str(config)]) == 2
        assert "another launch is training" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the relaunch takes it, and keeps it once per process
    assert rundir.run_lock_holder(run) is None
    rundir.hold_run_lock(run)
    rundir.hold_run_lock(run)
    assert rundir.run_lock_holder(run) is None  # this process's own lock is no other launch's
