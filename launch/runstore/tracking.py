"""MLflow tracking for rank 0 that never stops training.

    tracker = Tracker(enable=True, uri=None, experiment="unit", run_name=None, system_metrics=True)
    run_id = tracker.start(run_dir, run_id=None)     # or the id from a checkpoint: resumes that run
                                                     # (None: the one RUN_DIR/tracking.json records, if any)
    tracker.log_params(nested_dict)                  # "a.b.c" keys, values as strings (runstore.params)
    tracker.log_datasets(shards=OUT)                 # or shards_a=..., shards_b=... (pipeline.lineage)
    tracker.log_metrics({"g/total": 1.2}, step)
    tracker.log_image("samples/step-00000100.png", step)
    tracker.flush(); tracker.end()

Metrics, params and tags go through MLflow's own asynchronous logging (MlflowClient.log_batch with
synchronous=False). One worker thread waits for MLflow's answers and sends what has no asynchronous
form (images, dataset inputs, the end of the run), so no call waits for the server. System metrics
are MLflow's own (a run started with log_system_metrics=True).

When the server cannot be reached (at start or mid-run) training goes on: one warning, and every
record the server has not confirmed is kept, in memory and in RUN_DIR/mlflow-buffer.jsonl (format:
launch/runstore/records.py), then sent when the server answers again (asked every RETRY_SECONDS).
Nothing bounds the buffer but the outage: one line (and one entry in memory) per logging call, about
100 bytes plus 40 a metric, so a day away at one log_metrics call a second with 20 metrics is about
80 MB; no record is dropped to keep it smaller. While away the file is appended to, and rewritten
(to leave out what the server confirmed after all) at most once per call into the Tracker.
Answers that refuse the credentials or the pace (401, 403, 429: a token that expired mid-run) count as
the server being away, with a warning that says so: records are kept, not dropped. A buffer file the
disk refuses (full, a file size limit) costs one warning; the records stay in memory and the file is
written whole again when it can be. A process that ends without end() records its run FAILED (an
"end" record in the file when the server is away), a process stopped by SIGTERM too (the launcher
stopping the job, preemption, docker stop: start() sets a handler when SIGTERM has none, which then
ends the process as SIGTERM would have). What is still unsent when the process ends can be
sent later with

    python -m launch.runstore.tracking upload --run-dir RUN_DIR [--tracking-uri URI]

(refused while a trainer still holds RUN_DIR; a run that had ended keeps its status when the file holds
no "end" record).

With no tracking URI (argument or MLFLOW_TRACKING_URI) the store is embedded: SQLite at
RUN_DIR/mlflow/mlflow.db with artifacts in RUN_DIR/mlflow/artifacts, nothing to start.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launch.runstore.params import as_params
from launch.runstore.records import (BATCH_OPS, BUFFER_NAME, append_buffer, batch, first_line, groups,
                                     metrics_record, now_ms, read_buffer, retarget, send, send_group,
                                     without_sent, write_buffer)
from launch.runstore.rundir import run_lock_holder
from launch.runstore.store import (connect_error, fluent_uri, is_transient, make_client, open_run, recorded_run,
                                   refuses_credentials, resolve_uri, run_tracking, without_password)
from pipeline.atomic import replacing
from pipeline.storage import redact, redact_uncaught

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0    # between attempts to reach a server that went away
FLUSH_SECONDS = 30.0   # how long flush()/end() wait by default for records to be confirmed
SIGTERM_FLUSH_SECONDS = 5.0   # on SIGTERM, how long records in MLflow's hands may take before the file keeps them

# Short HTTP timeouts while training: MLflow's defaults (7 retries with exponential backoff, 120 s
# timeout) would hold a request for minutes when the server is gone. Set only where the user has
# not chosen values; they apply to the whole process.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class Tracker:
    """Rank-0 MLflow logger; no method waits for the server or raises for its errors."""

    def __init__(self, enable: bool = True, uri: str | None = None, experiment: str = "unit",
                 run_name: str | None = None, system_metrics: bool = True):
        self.enable, self.experiment, self.run_name = bool(enable), experiment, run_name
        self.system_metrics = bool(system_metrics)
        self.configured_uri = uri
        self.uri: str | None = None          # resolved by start()
        self.run_dir: Path | None = None
        self.warnings = 0                    # outages reported (tests read it)
        self._run_id: str | None = None
        self._opened = False                 # the run exists on the server
        self._client = None
        self._waiter: ThreadPoolExecutor | None = None
        # reentrant: the SIGTERM handler runs in the main thread, maybe while it holds the lock
        self._lock = threading.RLock()
        self._unconfirmed: dict[int, dict] = {}   # handed to MLflow, no answer yet
        self._kept: list[dict] = []               # waiting for the server to answer again
        self._seq = 0
        self._offline = self._back = self._probing = self._buffered = self._closed = False
        self._next_try = 0.0
        self._last_step = 0
        self._fluent_run = False             # the run MLflow samples system metrics for
        self._ending = False                 # end() began: system metrics never start again
        self._dirty = False                  # the buffer file lists records confirmed since, or lacks some
        self._write_failed = False           # the last write of the buffer file failed (warned once)
        self._next_write = 0.0               # after a failed write, rewrite no sooner than this
        self._final = False                  # _at_exit wrote the last buffer file: nothing rewrites it
        self._sigterm = None                 # the SIGTERM handler start() set, if any
        self._terminating = False            # that handler is running

    @property
    def enabled(self) -> bool:
        return self.enable and self.run_dir is not None and not self._closed

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the server has been reached once (save it in checkpoints)."""
        return self._run_id

    @property
    def buffer_path(self) -> Path | None:
        return self.run_dir / BUFFER_NAME if self.run_dir else None

    def start(self, run_dir, run_id: str | None = None) -> str | None:
        """Open (or with `run_id`, resume) the run; returns its id, None when tracking is off or the
        server is unreachable (the run is then opened when it answers; see `run_id`). Without
        `run_id`, the run RUN_DIR/tracking.json records for this run directory and server is resumed
        (store.recorded_run). Records an earlier process left in the buffer file are sent too."""
        if not self.enable:
            return None
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_uri(self.run_dir, self.configured_uri)
        if self.uri.startswith(("http://", "https://")):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
        self._client = make_client(self.uri)
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="mlflow-tracker")
        # A process that ends without end() (an exception, Ctrl-C) records its run FAILED, with or
        # without system metrics. mlflow registered its own exit hook on import (make_client): ours
        # runs first (last in, first out), ends the fluent run against our URI and leaves it nothing.
        atexit.register(self._at_exit)
        self._handle_sigterm()
        # What an earlier process of this run could not send; this process opens and ends the run.
        left = [r for r in read_buffer(self.buffer_path) if r["op"] not in ("open", "end")]
        self._buffered = self.buffer_path.exists()
        # No id in the checkpoint: the run may still exist (opened after the last checkpoint)
        run_id = run_id or recorded_run(self.run_dir, self.uri)
        self._run_id = run_id
        try:
            down = connect_error(self.uri)   # refused at once, not after MLflow's retries
            if down:
                raise down
            self._run_id = open_run(self._client, self.run_dir, self.experiment, run_id, self.run_name)
        except Exception as e:
            if not is_transient(e):
                atexit.unregister(self._at_exit)
                self._release_sigterm()
                raise
            # the server it was set up for, without a password: `tracking upload` sends it there later
            opening = {"op": "open", "run": run_id, "experiment": self.experiment, "run_name": self.run_name,
                       "tracking_uri": without_password(self.uri)}
            with self._lock:
                self._kept = [opening, *left]
                self._went_offline(e)
            return self._run_id
        self._opened = True
        self._start_system_metrics()
        for rec in retarget(left, run_id, self._run_id):  # a new run replaced the one they name
            self._submit(rec)
        return self._run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self._log({"op": "params", "values": as_params(params)})

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._log({"op": "tags", "values": {str(k): str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Numbers only (tensors and numpy scalars are converted); step None: the last step seen."""
        if not self.enabled:
            return
        self._last_step = int(self._last_step if step is None else step)
        rec = metrics_record(metrics, self._last_step)
        if rec:
            self._log(rec)

    def log_image(self, image, step: int, key: str = "samples") -> None:
        """A PNG/JPEG path (kept until sent) or a uint8 HWC array (saved under RUN_DIR/mlflow-images)."""
        if not self.enabled:
            return
        if not isinstance(image, (str, os.PathLike)):
            try:
                image = self._save_image(image, step, key)
            except OSError as e:  # a full disk: the image is lost, training goes on
                log.warning("MLflow: image %s of step %d not saved (%s); not logged", key, step, first_line(e))
                return
        path = Path(image).resolve()
        rec = {"op": "image", "path": str(path), "key": key, "step": int(step), "ts": now_ms()}
        if path.is_relative_to(self.run_dir.resolve()):  # upload finds it there after the folder moved
            rec["rel"] = str(path.relative_to(self.run_dir.resolve()))
        self._log(rec)

    def log_datasets(self, shards=None, shards_a=None, shards_b=None) -> list[dict]:
        """Log the training data as dataset inputs, one per domain, as the config names it: an OUT
        folder of `make shards` (`shards`), or per domain an OUT folder, index.json, brace pattern
        or URL list; returns the lineage records (pipeline.lineage)."""
        if not self.enabled:
            return []
        from launch.runstore.datasets import dataset_tags
        from pipeline.lineage import domain_dataset

        recs = []
        specs = {"a": shards_a if shards_a is not None else shards, "b": shards_b if shards_b is not None else shards}
        for domain, spec in specs.items():  # one domain's failure must not cost the other its lineage
            if spec is None:
                continue
            try:
                recs.append(domain_dataset(spec, domain))
            except Exception as e:  # noqa: BLE001 - the loader reads the shards; lineage is extra
                log.warning("dataset lineage of domain %s not logged: %s", domain, first_line(e))
        if recs:
            self._log({"op": "datasets", "datasets": recs})
            self.set_tags(dataset_tags(recs))
        return recs

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the server has confirmed every record (at most `timeout`, default FLUSH_SECONDS)."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + (FLUSH_SECONDS if timeout is None else timeout)
        while True:
            self._tick()
            with self._lock:
                left = len(self._unconfirmed) + len(self._kept)
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Close the run; True when everything reached the server. Unsent records stay in
        RUN_DIR/mlflow-buffer.jsonl for `python -m launch.runstore.tracking upload`."""
        if not self.enabled:
            return True
        self._ending = True  # the server answering during the flush below must not restart them
        self._stop_system_metrics(status)
        self._waiter.submit(self._stop_worker_metrics, status)  # one restarted after an outage runs there
        self._log({"op": "end", "status": status, "ts": now_ms()})
        ok = self.flush(timeout)
        atexit.unregister(self._at_exit)
        self._release_sigterm()
        with self._lock:
            self._closed = True
            left = list(self._unconfirmed.values()) + self._kept
            if left:
                self._write(write_buffer, left)
        if left:
            log.warning("MLflow: %d record(s) not sent; they are in %s. Upload them with "
                        "`python -m launch.runstore.tracking upload --run-dir %s`", len(left), self.buffer_path,
                        self.run_dir)
        self._waiter.shutdown(wait=False, cancel_futures=True)
        return ok and not left

    # -- the caller's side ------------------------------------------------------------------------

    def _save_image(self, image, step: int, key: str) -> Path:
        import numpy as np
        from PIL import Image

        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise ValueError(f"log_image: expected a path or a uint8 HWC array, got {arr.dtype} {arr.shape}")
        path = self.run_dir / "mlflow-images" / f"{key.replace('/', '_')}-step-{int(step):08d}.png"
        with replacing(path, durable=False) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        return path

    def _log(self, rec: dict) -> None:
        rec.setdefault("run", self._run_id if self._opened else None)
        self._tick()
        with self._lock:
            if self._offline:
                self._kept.append(rec)
                self._buffered = True
                if not self._write(append_buffer, [rec]):
                    self._dirty = True  # kept in memory; the next save writes the file whole
                return
        self._submit(rec)

    def _submit(self, rec: dict) -> None:
        """Hand a record to MLflow (asynchronously where it can) and its answer to the worker."""
        if rec["op"] == "open":
            return  # the run is open by now
        rec["run"] = rec.get("run") or self._run_id
        ops = None
        if rec["op"] in BATCH_OPS:
            try:
                ops = self._client.log_batch(rec["run"], **batch(rec), synchronous=False)
            except Exception:
                ops = None  # the worker sends it and learns why
        with self._lock:
            self._seq += 1
            key = self._seq
            self._unconfirmed[key] = rec
        self._waiter.submit(self._settle, key, rec, ops)

    def _tick(self) -> None:
        """Resume sending once a probe got an answer; while away, ask the server every RETRY_SECONDS
        and rewrite the buffer file (at most once a tick) when records were confirmed meanwhile."""
        with self._lock:
            if self._dirty and self._offline and time.monotonic() >= self._next_write:
                self._save()
        if self._back:
            self._resume()
        elif self._offline and not self._probing and time.monotonic() >= self._next_try and not self._closed:
            self._probing = True
            self._waiter.submit(self._probe)

    def _resume(self) -> None:
        with self._lock:
            self._back = self._offline = False
            kept, self._kept = self._kept, []
        log.warning("MLflow at %s answers again; sending the %d record(s) kept meanwhile", redact(self.uri), len(kept))
        if self.system_metrics:  # the worker starts it again: that waits for the server
            self._waiter.submit(self._restart_system_metrics)
        for rec in kept:
            self._submit(rec)
        with self._lock:
            self._settled()

    def _start_system_metrics(self) -> None:
        """MLflow samples system metrics for a run started through its fluent API with
        log_system_metrics=True (in this thread; _stop_system_metrics ends it)."""
        if not self.system_metrics or self._fluent_run or self._ending:
            return
        import mlflow

        try:
            with fluent_uri(self.uri):
                mlflow.start_run(run_id=self._run_id, log_system_metrics=True)
            self._fluent_run = True
        except Exception as e:
            log.warning("MLflow system metrics not started: %s", first_line(e))

    def _restart_system_metrics(self) -> None:
        """(worker) MLflow's sampler stops for good when the server does not answer: a new one once
        it answers again, started here since that waits for the server. MLflow keeps a fluent run
        per thread: end() ends the caller's, and with it the sampler it keeps per run id (this one)."""
        if self._ending:
            return
        import mlflow

        try:
            with fluent_uri(self.uri):
                mlflow.end_run("RUNNING")   # this thread's run of an earlier restart, if any
                mlflow.start_run(run_id=self._run_id, log_system_metrics=True)
            self._fluent_run = True
        except Exception as e:
            log.warning("MLflow system metrics not started again: %s", first_line(e))

    def _stop_worker_metrics(self, status: str) -> None:
        """(worker) End the fluent run _restart_system_metrics started in this thread, if any."""
        import mlflow

        if mlflow.active_run() is None:   # MLflow's active run is this thread's
            return
        try:
            with fluent_uri(self.uri):
                mlflow.end_run(status)
        except Exception as e:  # the server is away: the "end" record closes the run later
            log.debug("mlflow.end_run: %s", first_line(e))

    def _handle_sigterm(self) -> None:
        """Python's default SIGTERM action ends the process without atexit, so without end() and
        _at_exit the run would stay RUNNING. Set only in the main thread (the only one that may) and
        only where SIGTERM has its default action: a handler someone else set is theirs."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return
            self._sigterm = self._on_sigterm
            signal.signal(signal.SIGTERM, self._sigterm)
        except (ValueError, OSError) as e:  # an embedded interpreter without signals
            self._sigterm = None
            log.debug("SIGTERM handler not set: %s", e)

    def _release_sigterm(self) -> None:
        """Put SIGTERM's default action back, if the handler is still ours (end(), a failed start)."""
        mine, self._sigterm = self._sigterm, None
        if mine is None or threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) == mine:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except (ValueError, OSError):
            pass

    def _on_sigterm(self, signum, frame) -> None:
        """SIGTERM: the run ends FAILED as on any exit without end() (records MLflow holds get a few
        seconds first), then the process ends by SIGTERM as it would have without this handler, so
        the launcher sees the status it expects. Killed during end(): what end() has not sent yet,
        its own "end" record with it, goes to the buffer file for `tracking upload`. A second SIGTERM
        while this runs (the handler is called again, nested) ends the process at once."""
        again, self._terminating = self._terminating, True
        try:
            if not again and self.enable and self.run_dir is not None and not self._closed:
                if self._ending:
                    with self._lock:
                        self._final = True
                        left = list(self._unconfirmed.values()) + self._kept
                        if left:
                            self._write(write_buffer, left)
                else:
                    if self._opened and not self._offline:
                        self.flush(SIGTERM_FLUSH_SECONDS)
                    self._at_exit()
        except BaseException as e:  # noqa: BLE001 - the process ends by SIGTERM whatever happened here
            log.warning("MLflow: run %s not ended on SIGTERM (%s)", self._run_id, first_line(e))
        finally:
            atexit.unregister(self._at_exit)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _at_exit(self) -> None:
        """atexit: the process ends without end() (an exception, Ctrl-C); the run is recorded FAILED
        here and now (Python has stopped the worker by then), or, with the server away or records
        unsent, by an "end" record in the buffer file for `tracking upload`."""
        if not self.enabled or self._ending:
            return
        self._ending = self._closed = True
        self._stop_system_metrics("FAILED")
        rec = {"op": "end", "status": "FAILED", "ts": now_ms(), "run": self._run_id if self._opened else None}
        with self._lock:
            self._final = True   # the worker (still there on SIGTERM) must not rewrite or remove the file
            left = list(self._unconfirmed.values()) + self._kept
        if self._opened and not self._offline and not left:
            try:
                return send(self._client, self._run_id, rec)
            except Exception as e:  # noqa: BLE001 - the process is ending; the file keeps the record
                log.warning("MLflow: run %s not ended as FAILED (%s)", self._run_id, first_line(e))
        self._write(write_buffer, left + [rec])

    def _stop_system_metrics(self, status: str) -> None:
        if not self._fluent_run:
            return
        import mlflow

        self._fluent_run = False
        try:
            with fluent_uri(self.uri):
                mlflow.end_run(status)
        except Exception as e:  # the server is away: the "end" record closes the run later
            log.debug("mlflow.end_run: %s", first_line(e))

    # -- the worker's side ---------------------------------------------------------------------

    def _settle(self, key: int, rec: dict, ops) -> None:
        """Wait for MLflow's answer to one record; keep it when the server is away."""
        try:
            if ops is None or not answered(ops):
                if self._offline:
                    raise ConnectionError("MLflow is unreachable")
                send(self._client, rec["run"], rec)  # again, waiting: RunOperations does not say why it failed
        except Exception as e:
            with self._lock:
                self._unconfirmed.pop(key, None)
                if is_transient(e):
                    self._kept.append(rec)
                    self._went_offline(e)
                    return
                self._settled()
            log.warning("MLflow refused a %s record (%s); left out", rec["op"], first_line(e))
            return
        with self._lock:
            self._unconfirmed.pop(key, None)
            self._settled()

    def _probe(self) -> None:
        try:
            with self._lock:
                opening = any(r["op"] == "open" for r in self._kept)
            if opening:
                asked = self._run_id
                self._run_id = open_run(self._client, self.run_dir, self.experiment, asked, self.run_name)
                with self._lock:  # a new run replaced the one the earlier process's records name
                    self._kept = retarget(self._kept, asked, self._run_id)
                self._opened = True
            else:
                self._client.get_run(self._run_id)
            self._back = True
        except Exception:
            self._next_try = time.monotonic() + RETRY_SECONDS
        finally:
            self._probing = False

    def _went_offline(self, exc: BaseException) -> None:
        """(lock held) One warning per outage; the file gets every record not yet confirmed, once
        per outage: a record that fails later is in it already (or, submitted just as the outage
        began, is written by the next _tick)."""
        self._next_try = time.monotonic() + RETRY_SECONDS
        if self._offline:
            self._dirty = True
            return
        self._offline = True
        self.warnings += 1
        why = ("refuses the credentials (check MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
               if refuses_credentials(exc) else "is unreachable")
        log.warning("MLflow at %s %s (%s); training goes on, records are kept in %s and sent "
                    "when it answers again (or: python -m launch.runstore.tracking upload --run-dir %s)",
                    redact(self.uri), why, first_line(exc), self.buffer_path, self.run_dir)
        self._save()

    def _settled(self) -> None:
        """(lock held) Keep the buffer file true: while away it lists what is unconfirmed (rewritten
        by the next _tick, not once per record: that was quadratic); once all is confirmed it goes."""
        if not self._buffered or self._final:
            return
        if self._offline:
            self._dirty = True
        elif not self._unconfirmed and not self._kept:
            self.buffer_path.unlink(missing_ok=True)
            self._buffered = False

    def _save(self) -> None:
        if self._final:
            return
        ok = self._write(write_buffer, list(self._unconfirmed.values()) + self._kept)
        self._buffered, self._dirty = True, not ok

    def _write(self, write, records: list[dict]) -> bool:
        """write(buffer path, records) (append_buffer or write_buffer); False when the file system
        refused (a full disk, a file size limit): warned once, the records stay in memory and the
        file is written whole again RETRY_SECONDS later (_tick), not once per call."""
        try:
            write(self.buffer_path, records)
        except OSError as e:
            self._next_write = time.monotonic() + RETRY_SECONDS
            if not self._write_failed:
                log.warning("MLflow: %s not written (%s); training goes on, records are kept in memory and "
                            "written when it can be", self.buffer_path, first_line(e))
            self._write_failed = True
            return False
        self._write_failed = False
        return True


def answered(ops) -> bool:
    """Whether MLflow's asynchronous operations succeeded (waits for them)."""
    try:
        ops.wait()
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Outside a training process


def log_run_metrics(run_dir, metrics: dict, step: int = 0, tracking_uri: str | None = None) -> str:
    """Log `metrics` (numbers) into the run RUN_DIR/tracking.json names, waiting for the server;
    returns the run id."""
    uri, info = run_tracking(run_dir, tracking_uri)
    if not info.get("run_id"):
        raise ValueError(f"{Path(run_dir) / 'tracking.json'}: no MLflow run recorded (tracking off or never reached)")
    rec = metrics_record(metrics, step)
    if rec:
        send(make_client(uri), info["run_id"], rec)
    return info["run_id"]


def moved_image(run_dir: Path, rec: dict) -> dict:
    """An image record whose file is gone from its absolute path but is in RUN_DIR where the record's
    path relative to the run directory says (the folder was moved or copied): the record with that path."""
    if rec.get("op") != "image" or not rec.get("rel") or Path(rec["path"]).exists():
        return rec
    here = run_dir / rec["rel"]
    return {**rec, "path": str(here)} if here.is_file() and here.resolve().is_relative_to(run_dir.resolve()) else rec


def upload(run_dir, tracking_uri: str | None = None) -> dict:
    """Send RUN_DIR/mlflow-buffer.jsonl to the run's tracking server (resuming the run, or creating
    it when it never reached a server); each record goes to the run it names (groups() keeps runs
    apart), one that names none to that run. Returns counts; what is not sent stays in the file."""
    run_dir = Path(run_dir)
    path = run_dir / BUFFER_NAME
    records = read_buffer(path)
    opening = next((r for r in records if r["op"] == "open"), {})
    uri, info = run_tracking(run_dir, tracking_uri, configured=opening.get("tracking_uri"))
    if not records:
        return {"records": 0, "sent": 0, "dropped": 0, "run_id": info.get("run_id"), "tracking_uri": uri}
    client = make_client(uri)
    asked = next((r["run"] for r in records if r.get("run")), None) or info.get("run_id")
    # A run that has ended takes the records as it is (MLflow logs to a finished run): set RUNNING
    # here, an upload stopped midway (killed, the server gone) would leave it RUNNING for good.
    was = ended(client, asked)
    run_id = open_run(client, run_dir, opening.get("experiment") or info.get("experiment") or "unit", asked,
                      opening.get("run_name"), keep_status=bool(was))
    sent = dropped = done = 0
    try:
        # a run the server does not know was replaced by a new one: its records go there, not refused
        for group in groups([moved_image(run_dir, r) for r in retarget(records, asked, run_id)]):
            try:
                send_group(client, group[0].get("run") or run_id, group)  # None: the run opened here
                sent += len(group)
            except Exception as e:
                if is_transient(e):
                    raise
                dropped += len(group)
                log.warning("MLflow refused a %s record (%s); left out", group[0]["op"], first_line(e))
            done += len(group)
    finally:
        # read again: a trainer may have appended meanwhile; only what was sent (or refused) goes
        write_buffer(path, without_sent(read_buffer(path), records[:done]))
    return {"records": len(records), "sent": sent, "dropped": dropped, "run_id": run_id, "tracking_uri": uri}


def ended(client, run_id: str | None) -> tuple[str, int] | None:
    """(status, end time) of a run that has ended, else None (running, unknown to the server)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        info = client.get_run(run_id).info
    except MlflowException as e:
        if is_transient(e):
            raise
        return None
    return (info.status, info.end_time) if info.status in ("FINISHED", "FAILED", "KILLED") else None


def main(argv=None) -> int:
    redact_uncaught()  # an error no branch below expects must not print a password either
    p = argparse.ArgumentParser(prog="python -m launch.runstore.tracking", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="send the records a run could not send (RUN_DIR/mlflow-buffer.jsonl)")
    up.add_argument("--run-dir", required=True)
    up.add_argument("--tracking-uri", default=None, help="default: the one in RUN_DIR/tracking.json")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"error: --run-dir {args.run_dir}: not a directory", file=sys.stderr)
        return 2
    busy = run_lock_holder(args.run_dir)   # its trainer still appends to the buffer and sends it itself
    if busy:
        print(f"error: --run-dir {args.run_dir}: still training ({busy}); the trainer sends the buffer "
              "when the server answers; upload what is left after it ends", file=sys.stderr)
        return 2
    try:
        res = upload(args.run_dir, args.tracking_uri)
    except Exception as e:
        print(f"error: upload to MLflow failed ({type(e).__name__}: {first_line(e)}); "
              f"the buffer is kept, run the command again when the server answers", file=sys.stderr)
        return 1
    print(f"uploaded {res['sent']} of {res['records']} buffered record(s) to run {res['run_id']} "
          f"at {redact(res['tracking_uri'])}" + (f"; {res['dropped']} refused by the server" if res["dropped"] else ""))
    return 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
