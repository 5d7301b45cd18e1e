"""Tracking review 7: a full disk does not stop training and a torn buffer line does not swallow the
next record; 401/403/429 keep records instead of dropping them; a crashed run is FAILED without
system metrics too; `tracking upload` keeps an ended run's status; a resumed process sends its
leftover records to the run that replaced an unknown one; restarting system metrics after an outage
does not hold up the caller; `tracking upload` neither races a live trainer nor erases its appends."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import launch.runstore.tracking as tracking
from launch.runstore.records import BUFFER_NAME, append_buffer, metrics_record, read_buffer
from launch.runstore.store import embedded_uri, fluent_uri, is_transient, make_client, open_run
from launch.runstore.tracking import Tracker, upload

ROOT = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"   # nothing listens on the discard port: refused at once


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.2)


def steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["op"] == "metrics"]


# 1. a full disk, a torn line

def test_a_full_disk_does_not_stop_training_and_the_records_are_written_later(tmp_path, monkeypatch, caplog):
    t = Tracker(uri=DEAD, system_metrics=False)
    t.start(tmp_path / "run")
    real_append, real_write = tracking.append_buffer, tracking.write_buffer
    full = {"on": True}

    def refusing(real):
        def write(path, records):
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, records)
        return write

    monkeypatch.setattr(tracking, "append_buffer", refusing(real_append))
    monkeypatch.setattr(tracking, "write_buffer", refusing(real_write))
    with caplog.at_level(logging.WARNING, logger="launch.runstore.tracking"):
        for step in range(5):
            t.log_metrics({"loss": float(step)}, step)   # before: OSError out of log_metrics
        t.log_image(np.zeros((4, 4, 3), np.uint8), 1)    # the image's own file: refused too
    assert sum("not written" in r.getMessage() for r in caplog.records) == 1   # warned once
    full["on"] = False
    time.sleep(0.3)                     # past the pause between attempts to write the file
    t.log_metrics({"loss": 5.0}, 5)     # the file is written whole again
    assert steps(read_buffer(t.buffer_path)) == [0, 1, 2, 3, 4, 5]
    assert t.end(timeout=0) is False
    assert [r["op"] for r in read_buffer(t.buffer_path)][-1] == "end"


def test_an_image_the_disk_refuses_is_left_out_not_raised(tmp_path, monkeypatch, caplog):
    t = Tracker(uri=DEAD, system_metrics=False)
    t.start(tmp_path / "run")

    def refused(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracking, "replacing", refused)
    with caplog.at_level(logging.WARNING, logger="launch.runstore.tracking"):
        t.log_image(np.zeros((4, 4, 3), np.uint8), 7)
    assert "of step 7 not saved" in caplog.text
    assert not [r for r in read_buffer(t.buffer_path) if r["op"] == "image"]
    t.end(timeout=0)


def test_a_record_appended_after_a_torn_line_is_kept(tmp_path):
    path = tmp_path / BUFFER_NAME
    path.write_text(json.dumps({"op": "tags", "values": {"a": "1"}}) + '\n{"op": "metrics", "step": 1, "val')
    append_buffer(path, [metrics_record({"loss": 2.0}, 2)])
    assert [r["op"] for r in read_buffer(path)] == ["tags", "metrics"]
    assert steps(read_buffer(path)) == [2]   # before: glued to the torn line, skipped with it
    append_buffer(tmp_path / "new.jsonl", [metrics_record({"loss": 1.0}, 1)])   # a new file: no empty line
    assert (tmp_path / "new.jsonl").read_text().startswith("{")


# 2. 401 / 403 / 429

def refusal(code: str) -> MlflowException:
    from mlflow.protos import databricks_pb2

    return MlflowException("refused", error_code=getattr(databricks_pb2, code))


def test_credentials_and_rate_limits_are_transient_other_refusals_not():
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"):
        assert is_transient(refusal(code)), code
    for code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"):
        assert not is_transient(refusal(code)), code


class FakeServer:
    """An MLflow REST server in miniature: run r1 exists; `refuse` answers 401 to paths containing
    any of its strings; every request's path is listed in `paths`."""

    def __init__(self):
        self.refuse: tuple[str, ...] = ()
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_one(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.paths.append(self.path)
                code, body = server.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.httpd.server_port}"

    def answer(self, path: str) -> tuple[int, dict]:
        if any(p in path for p in self.refuse):
            return 401, {"error_code": "UNAUTHENTICATED", "message": "You are not authenticated"}
        info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "0", "status": "RUNNING",
                "lifecycle_stage": "active", "artifact_uri": "mlflow-artifacts:/0/r1/artifacts"}
        if "/runs/get" in path:
            return 200, {"run": {"info": info, "data": {}}}
        if "/runs/update" in path:
            return 200, {"run_info": info}
        return 200, {}


@pytest.fixture
def fake_server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()


def test_credentials_expiring_mid_run_keep_the_records(tmp_path, fake_server, caplog):
    t = Tracker(uri=fake_server.uri, system_metrics=False)
    assert t.start(tmp_path / "run", run_id="r1") == "r1"
    fake_server.refuse = ("log-batch",)
    with caplog.at_level(logging.WARNING, logger="launch.runstore.tracking"):
        for step in range(3):
            t.log_metrics({"loss": float(step)}, step)
        assert t.end(timeout=1.0) is False   # before: True, every record dropped
    assert steps(read_buffer(t.buffer_path)) == [0, 1, 2]
    assert "refuses the credentials" in caplog.text and "left out" not in caplog.text


def test_credentials_refused_at_start_do_not_stop_the_launch(tmp_path, fake_server, caplog):
    fake_server.refuse = ("/",)
    t = Tracker(uri=fake_server.uri, system_metrics=False)
    with caplog.at_level(logging.WARNING, logger="launch.runstore.tracking"):
        assert t.start(tmp_path / "run") is None   # before: MlflowException out of start()
        t.log_metrics({"loss": 1.0}, 1)
        assert t.end(timeout=0) is False
    assert [r["op"] for r in read_buffer(t.buffer_path)] == ["open", "metrics", "end"]
    assert "refuses the credentials" in caplog.text


def test_a_401_on_resume_is_no_reason_for_a_new_run(tmp_path, fake_server):
    fake_server.refuse = ("/",)
    with pytest.raises(MlflowException):
        open_run(make_client(fake_server.uri), tmp_path, "unit", "r1")   # before: "not found", a new run
    # before: read as "not found": on to the experiment and a new run (refused here only by chance)
    assert fake_server.paths and not any("/experiments/" in p or "/runs/create" in p for p in fake_server.paths)
    assert not (tmp_path / "tracking.json").exists()


# 3. a crash without system metrics

CRASH = """
import sys
from launch.runstore.tracking import Tracker
t = Tracker(uri=sys.argv[2], system_metrics=False)
print(t.start(sys.argv[1]), flush=True)
t.log_metrics({"loss": 1.0}, 1)
t.flush()
raise RuntimeError("loss is NaN")
"""


def test_a_crashed_run_without_system_metrics_is_failed(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "run"), store], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "loss is NaN" in r.stderr, r.stderr[-2000:]
    assert MlflowClient(store).get_run(r.stdout.split()[-1]).info.status == "FAILED"   # before: RUNNING


def test_a_crash_while_the_server_is_away_leaves_a_failed_end_record(tmp_path):
    t = Tracker(uri=DEAD, system_metrics=False)
    t.start(tmp_path / "run")
    t.log_metrics({"loss": 1.0}, 1)
    t._at_exit()   # what atexit runs when the process ends without end()
    last = read_buffer(t.buffer_path)[-1]
    assert (last["op"], last["status"]) == ("end", "FAILED")
    assert steps(read_buffer(t.buffer_path)) == [1]


# 4. upload keeps an ended run's status

@pytest.mark.parametrize("status", ["FAILED", "FINISHED"])
def test_upload_without_an_end_record_keeps_the_runs_status(tmp_path, status):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    uri = embedded_uri(run_dir)
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("unit")).info.run_id
    c.set_terminated(run_id, status=status, end_time=1_700_000_000_000)
    rec = {**metrics_record({"loss": 0.5}, 2), "run": run_id}
    append_buffer(run_dir / BUFFER_NAME, [rec])
    assert upload(run_dir, uri)["sent"] == 1
    info = c.get_run(run_id).info
    assert (info.status, info.end_time) == (status, 1_700_000_000_000)   # before: RUNNING
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [2]


# 5. leftovers of a run the store does not know

def test_a_resumed_process_sends_its_leftovers_to_the_run_that_replaced_an_unknown_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = "0123456789abcdef0123456789abcdef"
    append_buffer(run_dir / BUFFER_NAME, [{**metrics_record({"loss": float(s)}, s), "run": old} for s in range(3)])
    store = f"sqlite:///{tmp_path / 'store.db'}"
    t = Tracker(uri=store, system_metrics=False)
    new = t.start(run_dir, run_id=old)   # the id from the checkpoint
    t.log_metrics({"loss": 3.0}, 3)
    assert t.end() is True
    assert new != old
    assert sorted(m.step for m in MlflowClient(store).get_metric_history(new, "loss")) == [0, 1, 2, 3]


# 6. system metrics restart on the worker

def test_restarting_system_metrics_after_an_outage_does_not_hold_up_the_caller(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    t = Tracker(system_metrics=True)
    run_id = t.start(run_dir)
    real, threads = mlflow.start_run, []

    def slow_start_run(*args, **kwargs):   # a slow server
        threads.append(threading.current_thread().name)
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "start_run", slow_start_run)
    try:
        with t._lock:   # as after an outage whose probe has just got an answer
            t._offline = t._back = True
        t0 = time.monotonic()
        t.log_metrics({"loss": 1.0}, 1)
        assert time.monotonic() - t0 < 0.5   # before: waited for the restart
        assert t.flush(timeout=10)
        for _ in range(50):
            if threads:
                break
            time.sleep(0.1)
        assert threads and threads[0].startswith("mlflow-tracker")
        assert t.end() is True
        assert MlflowClient(embedded_uri(run_dir)).get_run(run_id).info.status == "FINISHED"
        time.sleep(0.5)   # the sampler sees the run ended within one interval
        assert not any(th.name.startswith("SystemMetricsMonitor") and th.is_alive() for th in threading.enumerate())
    finally:
        if mlflow.active_run() is not None:   # keep other tests' fluent state clean
            with fluent_uri(embedded_uri(run_dir)):
                mlflow.end_run()


# 7. upload while a trainer runs

def test_upload_keeps_what_the_trainer_appends_meanwhile(tmp_path, monkeypatch):
    t = Tracker(uri=DEAD, system_metrics=False)
    t.start(tmp_path / "run")
    for step in range(3):
        t.log_metrics({"loss": float(step)}, step)
    real, fired = tracking.send_group, []

    def send_group(client, run_id, group):   # the trainer logs steps 3, 4 while the upload sends
        if not fired:
            fired.append(1)
            t.log_metrics({"loss": 3.0}, 3)
            t.log_metrics({"loss": 4.0}, 4)
        return real(client, run_id, group)

    monkeypatch.setattr(tracking, "send_group", send_group)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    res = upload(t.buffer_path.parent, store)
    assert res["sent"] == 4   # open and steps 0-2
    assert steps(read_buffer(t.buffer_path)) == [3, 4]   # before: erased
    assert sorted(m.step for m in MlflowClient(store).get_metric_history(res["run_id"], "loss")) == [0, 1, 2]


HOLD = """
import sys, time
from launch.runstore.rundir import hold_run_lock
hold_run_lock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_upload_is_refused_while_a_trainer_holds_the_run_directory(tmp_path, capsys):
    t = Tracker(uri=DEAD, system_metrics=False)
    run_dir = tmp_path / "run"
    t.start(run_dir)
    t.log_metrics({"loss": 1.0}, 1)
    before = (run_dir / BUFFER_NAME).read_text()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        store = f"sqlite:///{tmp_path / 'store.db'}"
        assert tracking.main(["upload", "--run-dir", str(run_dir), "--tracking-uri", store]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert "still training" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / BUFFER_NAME).read_text() == before
    assert not (tmp_path / "store.db").exists()
    t.end(timeout=0)
