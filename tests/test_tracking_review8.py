"""Tracking review 8: a trainer stopped by SIGTERM (the launcher stopping the job, preemption, docker
stop) records its run FAILED, or leaves a FAILED "end" record when the server is away, and still
ends by SIGTERM; a SIGTERM handler someone else set stays theirs; `tracking upload` never sets an
ended run RUNNING, so an upload stopped midway leaves it as it was."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import launch.runstore.tracking as tracking
from launch.runstore.records import BUFFER_NAME, append_buffer, metrics_record, read_buffer
from launch.runstore.store import embedded_uri
from launch.runstore.tracking import Tracker, upload

ROOT = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"   # nothing listens on the discard port: refused at once


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.2)


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "OMP_NUM_THREADS": "1"}


# 1. SIGTERM

TERMINATED = """
import os, signal, sys, time
from launch.runstore.tracking import Tracker
t = Tracker(uri=sys.argv[2] or None, system_metrics=False)
print(t.start(sys.argv[1]), flush=True)
t.log_metrics({"loss": 1.0}, 1)
if sys.argv[3] == "flush":
    t.flush(30)
os.kill(os.getpid(), signal.SIGTERM)   # what the launcher does to rank 0 when another rank failed
time.sleep(30)
print("not stopped", flush=True)
"""


def run_terminated(tmp_path, uri: str, flush: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TERMINATED, str(tmp_path / "run"), uri, "flush" if flush else "-"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=180)


def test_a_run_stopped_by_sigterm_is_failed_and_the_process_still_ends_by_sigterm(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    r = run_terminated(tmp_path, store)
    assert r.returncode == -signal.SIGTERM, r.stderr[-2000:]   # the launcher still sees "killed by SIGTERM"
    assert "not stopped" not in r.stdout
    info = MlflowClient(store).get_run(r.stdout.split()[0]).info
    assert info.status == "FAILED" and info.end_time   # before: RUNNING for ever
    assert not (tmp_path / "run" / BUFFER_NAME).exists()


def test_records_still_in_mlflows_hands_at_sigterm_are_sent_before_the_run_ends(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    r = run_terminated(tmp_path, store, flush=False)
    assert r.returncode == -signal.SIGTERM, r.stderr[-2000:]
    c = MlflowClient(store)
    run_id = r.stdout.split()[0]
    assert c.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [1]


def test_sigterm_while_the_server_is_away_leaves_a_failed_end_record(tmp_path):
    r = run_terminated(tmp_path, DEAD, flush=False)   # flush() would wait for a server that is away
    assert r.returncode == -signal.SIGTERM, r.stderr[-2000:]
    records = read_buffer(tmp_path / "run" / BUFFER_NAME)
    assert (records[-1]["op"], records[-1]["status"]) == ("end", "FAILED")   # before: no "end" record
    assert [r["step"] for r in records if r["op"] == "metrics"] == [1]


THEIRS = """
import os, signal, sys, time
def theirs(signum, frame):
    print("their handler", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, theirs)
from launch.runstore.tracking import Tracker
t = Tracker(uri=sys.argv[2], system_metrics=False)
t.start(sys.argv[1])
print("kept" if signal.getsignal(signal.SIGTERM) is theirs else "replaced", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""


def test_a_sigterm_handler_someone_else_set_is_kept(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    r = subprocess.run([sys.executable, "-c", THEIRS, str(tmp_path / "run"), store], cwd=tmp_path,
                       env=child_env(), capture_output=True, text=True, timeout=180)
    assert r.stdout.split() == ["kept", "their", "handler"], (r.stdout, r.stderr[-2000:])
    assert r.returncode == 3
    c = MlflowClient(store)
    (run,) = c.search_runs([c.get_experiment_by_name("unit").experiment_id])
    assert run.info.status == "FAILED"   # their handler exits normally: atexit records it


ENDED = """
import signal, sys
from launch.runstore.tracking import Tracker
signal.signal(signal.SIGTERM, signal.SIG_DFL)   # whatever the parent left: the default, as in a rank
t = Tracker(uri=sys.argv[2], system_metrics=False)
t.start(sys.argv[1])
during = signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
ended = t.end()
print(during, ended, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


def test_end_puts_the_default_sigterm_action_back(tmp_path):
    """In a child process of its own: a test worker (pytest-xdist's) has its own SIGTERM handler."""
    r = subprocess.run([sys.executable, "-c", ENDED, str(tmp_path / "run"), f"sqlite:///{tmp_path / 'store.db'}"],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=180)
    assert r.stdout.split() == ["True", "True", "True"], (r.stdout, r.stderr[-2000:])


# 2. upload into an ended run

def finished_run(run_dir: Path, status: str = "FINISHED") -> tuple[MlflowClient, str]:
    run_dir.mkdir(parents=True)
    c = MlflowClient(embedded_uri(run_dir))
    run_id = c.create_run(c.create_experiment("unit")).info.run_id
    c.set_terminated(run_id, status=status, end_time=1_700_000_000_000)
    return c, run_id


def test_upload_logs_into_an_ended_run_without_setting_it_running(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    c, run_id = finished_run(run_dir)
    append_buffer(run_dir / BUFFER_NAME, [{**metrics_record({"loss": 0.5}, 2), "run": run_id},
                                          {"op": "params", "run": run_id, "values": {"lr": "0.1"}},
                                          {"op": "tags", "run": run_id, "values": {"note": "late"}}])
    seen = []
    real = tracking.send_group

    def watching(client, rid, group):
        seen.append(c.get_run(rid).info.status)   # what a kill at this moment would leave
        return real(client, rid, group)

    monkeypatch.setattr(tracking, "send_group", watching)
    res = upload(run_dir)
    assert res["sent"] == 3 and res["run_id"] == run_id
    assert seen and set(seen) == {"FINISHED"}   # before: RUNNING while sending
    run = c.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("FINISHED", 1_700_000_000_000)
    # the real store takes records logged to a finished run
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [2]
    assert run.data.params["lr"] == "0.1" and run.data.tags["note"] == "late"


KILLED_UPLOAD = """
import os, signal, sys
import launch.runstore.tracking as tr
real, n = tr.send_group, [0]
def killed_midway(*a, **k):
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)   # `timeout`, a cancelled CI job, a node going down
    return real(*a, **k)
tr.send_group = killed_midway
tr.upload(sys.argv[1])
"""


def test_an_upload_killed_midway_leaves_the_run_finished_and_the_next_one_too(tmp_path):
    run_dir = tmp_path / "run"
    c, run_id = finished_run(run_dir)
    append_buffer(run_dir / BUFFER_NAME, [{**metrics_record({"loss": 0.5}, 2), "run": run_id},
                                          {"op": "tags", "run": run_id, "values": {"note": "x"}},
                                          {**metrics_record({"loss": 0.4}, 3), "run": run_id}])
    r = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, str(run_dir)], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == -signal.SIGTERM, r.stderr[-2000:]
    assert c.get_run(run_id).info.status == "FINISHED"   # before: RUNNING
    upload(run_dir)
    info = c.get_run(run_id).info
    assert (info.status, info.end_time) == ("FINISHED", 1_700_000_000_000)   # before: RUNNING for good
    assert sorted({m.step for m in c.get_metric_history(run_id, "loss")}) == [2, 3]


def test_upload_to_a_deleted_run_still_opens_a_new_one(tmp_path):
    run_dir = tmp_path / "run"
    c, run_id = finished_run(run_dir)
    c.delete_run(run_id)
    append_buffer(run_dir / BUFFER_NAME, [{**metrics_record({"loss": 0.5}, 2), "run": run_id}])
    res = upload(run_dir)
    assert res["run_id"] != run_id and res["sent"] == 1
    assert [m.step for m in c.get_metric_history(res["run_id"], "loss")] == [2]
