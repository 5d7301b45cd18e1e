"""MLflow tracking for rank 0 that never stops training.

    tracker = Tracker(TrackingConfig(...))
    run_id = tracker.start(run_dir, run_id=None)   # or the id from a checkpoint: resumes that run
    tracker.log_params(nested_dict)                # flattened to "a.b.c" keys
    tracker.log_datasets(shards_dir)               # both domains as mlflow.data dataset inputs
    tracker.log_metrics({"g/total": 1.2}, step)
    tracker.log_image("samples/step-00000100.png", step)
    tracker.end()

Every call only puts a record on a queue; one background thread sends them. When the server
cannot be reached (at start or mid-run) training goes on: one warning, the unsent records stay
in memory and in RUN_DIR/mlflow-buffer.jsonl, and they are sent when the server answers again.
Whatever is still unsent when the process ends can be uploaded later with

    python -m launch.tracking upload --run-dir RUN_DIR [--tracking-uri URI]

With no tracking URI (config or MLFLOW_TRACKING_URI) the store is embedded: SQLite at
RUN_DIR/mlflow/mlflow.db with artifacts in RUN_DIR/mlflow/artifacts, nothing to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUFFER_NAME = "mlflow-buffer.jsonl"
TRACKING_JSON = "tracking.json"
MAX_PARAM_LEN = 6000   # MLflow's limit on a param value
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100

# Short HTTP timeouts while training: the defaults (7 retries with exponential backoff, 120 s
# timeout) would hold the sender thread for minutes per record when the server is gone.
# Only set when the user has not chosen values; they apply to the whole process.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@dataclass
class TrackingConfig:
    enable: bool = True
    """Track to MLflow at all (the trainer passes enable=False on ranks other than 0)."""
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI when set, else the embedded SQLite store under RUN_DIR/mlflow."""
    experiment: str = "unit"
    """Experiment name (created when missing)."""
    run_name: str | None = None
    """Name of a new run; None: the run directory's name."""
    log_system_metrics: bool = True
    """Sample CPU, memory, disk and GPU (when present) as system/* metrics."""
    system_metrics_interval: float | None = None
    """Seconds between system metric samples; None: MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL or 10."""
    retry_interval: float = 5.0
    """Seconds between attempts to reach a server that went away."""
    flush_timeout: float = 30.0
    """How long flush()/end() wait for unsent records before leaving them in the buffer file."""


Config = TrackingConfig


def embedded_uri(run_dir) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow' / 'mlflow.db'}"


def embedded_artifacts(run_dir) -> str:
    return (Path(run_dir).resolve() / "mlflow" / "artifacts").as_uri()


def resolve_uri(run_dir, configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(run_dir)


def read_tracking_json(run_dir) -> dict:
    path = Path(run_dir) / TRACKING_JSON
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": "1", "c": "[1, 2]"}; values as strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            if len(s) > MAX_PARAM_LEN:
                s = s[:MAX_PARAM_LEN - 3] + "..."
            out[key] = s
    return out


def is_transient(exc: BaseException) -> bool:
    """True when the error means 'server not reachable now' rather than 'request rejected'."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        # 4xx: the server answered and refused this record; retrying would never succeed.
        return not (400 <= status < 500)
    return True


# ---------------------------------------------------------------------------------------------
# Dataset lineage


def shard_datasets(shards_dir) -> list[dict]:
    """One dataset record per domain of a `make shards` OUT directory.

    The digest identifies the domain's content: sha256 over its manifest rows (key, sha256),
    sorted by key, so the same samples give the same digest however they are sharded. Without a
    manifest it falls back to the index's shard checksums.
    """
    from launch.export import file_sha256
    root = Path(shards_dir)
    index_path, manifest_path = root / "index.json", root / "manifest.parquet"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no index.json (is {root} an OUT directory of make shards?)")
    index = json.loads(index_path.read_text())
    if not isinstance(index, dict) or "shards" not in index:
        raise ValueError(f"{index_path}: expected an object with a 'shards' list")
    rows = None
    if manifest_path.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(manifest_path, columns=["key", "domain", "sha256"])
        rows = table.to_pydict()
    out = []
    for domain in ("a", "b"):
        shards = [s for s in index["shards"] if s.get("domain") == domain]
        h = hashlib.sha256()
        if rows is not None:
            pairs = sorted((k, s) for k, d, s in zip(rows["key"], rows["domain"], rows["sha256"]) if d == domain)
            for k, s in pairs:
                h.update(f"{k}\t{s}\n".encode())
            n = len(pairs)
        else:
            for s in sorted(shards, key=lambda s: s["url"]):
                h.update(f"{s['url']}\t{s.get('sha256', '')}\n".encode())
            n = sum(int(s.get("nsamples", 0)) for s in shards)
        totals = index.get("totals", {}).get(domain, {})
        out.append({
            "name": f"shards-{domain}",
            "domain": domain,
            "digest": h.hexdigest()[:16],
            "source": str((root / domain).resolve()),
            "profile": {"samples": n, "shards": len(shards),
                        "bytes": int(totals.get("bytes", sum(int(s.get("bytes", 0)) for s in shards)))},
            "manifest_sha256": file_sha256(manifest_path) if manifest_path.is_file() else None,
            "index_sha256": file_sha256(index_path),
        })
    return out


def _dataset_input(rec: dict):
    """An mlflow.data MetaDataset (name, digest, source) with a profile, as a run input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():  # the local source resolves through two equivalent classes
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(rec["source"])
    ent = MetaDataset(source, name=rec["name"], digest=rec["digest"])._to_mlflow_entity()
    ent = Dataset(name=ent.name, digest=ent.digest, source_type=ent.source_type, source=ent.source,
                  schema=ent.schema, profile=json.dumps(rec["profile"]))
    return DatasetInput(ent, tags=[InputTag("mlflow.data.context", "train"), InputTag("domain", rec["domain"])])


# ---------------------------------------------------------------------------------------------
# Sending records


class Sender:
    """Sends buffered records to one tracking URI; owns the MlflowClient (one thread uses it)."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, run_name: str | None = None):
        self.uri, self.experiment, self.run_dir, self.run_name = uri, experiment, run_dir, run_name
        self.run_id: str | None = None
        self._client = None
        self.dropped = 0
        self.progress = 0   # records of the last send() that are done (sent or rejected)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def open_run(self, run_id: str | None) -> str:
        """Resume `run_id` (set it RUNNING) or create a run; writes RUN_DIR/tracking.json."""
        from mlflow.exceptions import MlflowException

        c = self.client
        self.run_id = None
        if run_id:
            try:
                c.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            except MlflowException as e:
                if is_transient(e):
                    raise
                log.warning("MLflow run %s not found at %s (%s); starting a new run", run_id, self.uri, e)
        if self.run_id is None:
            exp = c.get_experiment_by_name(self.experiment)
            if exp is None:
                loc = embedded_artifacts(self.run_dir) if self.uri.startswith("sqlite:") else None
                exp_id = c.create_experiment(self.experiment, artifact_location=loc)
            else:
                exp_id = exp.experiment_id
            run = c.create_run(exp_id, run_name=self.run_name or self.run_dir.name,
                               tags={"run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
        write_json_atomic(self.run_dir / TRACKING_JSON,
                          {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id})
        return self.run_id

    def send(self, records: list[dict]) -> int:
        """Send records in order; returns how many were sent (or dropped as rejected).

        Stops at the first transient failure and re-raises it, so the caller keeps the rest.
        """
        done = self.progress = 0
        while done < len(records):
            rec = records[done]
            if rec["op"] == "metrics":  # merge consecutive metric records into one log_batch
                j, n = done, 0
                while j < len(records) and records[j]["op"] == "metrics" and \
                        records[j].get("run") == rec.get("run") and n + len(records[j]["values"]) <= METRICS_PER_BATCH:
                    n += len(records[j]["values"])
                    j += 1
                j = max(j, done + 1)
                self._guard(self._send_metrics, records[done:j])
                done = self.progress = j
            else:
                self._guard(self._send_one, rec)
                done = self.progress = done + 1
        return done

    def _guard(self, fn, arg) -> None:
        try:
            fn(arg)
        except Exception as e:
            if is_transient(e):
                raise
            self.dropped += 1
            log.warning("MLflow rejected a %s record (%s); dropped", _op_of(arg), str(e).splitlines()[0][:300])

    def _run(self, rec: dict) -> str:
        rid = rec.get("run") or self.run_id
        if rid is None:
            raise ConnectionError("no MLflow run yet")
        return rid

    def _send_metrics(self, recs: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), int(r["ts"]), int(r["step"])) for r in recs for k, v in r["values"].items()]
        self.client.log_batch(self._run(recs[0]), metrics=metrics, synchronous=True)

    def _send_one(self, rec: dict) -> None:
        from mlflow.entities import Param, RunTag

        c, op = self.client, rec["op"]
        if op == "open":  # resume the given run, or create one unless a run is open already
            if rec.get("run") or self.run_id is None:
                self.open_run(rec.get("run"))
        elif op == "params":
            items = list(rec["values"].items())
            for i in range(0, len(items), PARAMS_PER_BATCH):
                chunk = items[i:i + PARAMS_PER_BATCH]
                try:
                    c.log_batch(self._run(rec), params=[Param(k, v) for k, v in chunk], synchronous=True)
                except Exception as e:
                    if is_transient(e):
                        raise
                    # One changed value (e.g. on resume) rejects the whole batch: keep the rest.
                    for k, v in chunk:
                        self._guard(lambda kv: c.log_param(self._run(rec), *kv), (k, v))
        elif op == "tags":
            tags = [RunTag(k, str(v)) for k, v in rec["values"].items()]
            c.log_batch(self._run(rec), tags=tags, synchronous=True)
        elif op == "image":
            from PIL import Image

            with Image.open(rec["path"]) as im:
                c.log_image(self._run(rec), im.convert("RGB"), key=rec["key"], step=int(rec["step"]),
                            timestamp=int(rec["ts"]))
        elif op == "datasets":
            c.log_inputs(self._run(rec), datasets=[_dataset_input(d) for d in rec["datasets"]])
        elif op == "end":
            c.set_terminated(self._run(rec), status=rec["status"], end_time=int(rec["ts"]))
        else:
            raise ValueError(f"unknown record op {op!r}")


def _op_of(arg) -> str:
    return arg[0]["op"] if isinstance(arg, list) else (arg["op"] if isinstance(arg, dict) else "param")


def read_buffer(path: Path) -> list[dict]:
    """Records in a buffer file; a torn last line (crash mid-append) is skipped."""
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON; skipped", path, i + 1)
    return out


def write_buffer(path: Path, records: list[dict]) -> None:
    if not records:
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The tracker


_STOP = object()


class Tracker:
    """Rank-0 MLflow logger; every method returns at once and never raises for MLflow errors."""

    def __init__(self, cfg: TrackingConfig | dict | None = None):
        if cfg is None:
            cfg = TrackingConfig()
        elif isinstance(cfg, dict):
            names = {f.name for f in dataclasses.fields(TrackingConfig)}
            bad = sorted(set(cfg) - names)
            if bad:
                raise ValueError(f"tracking config: unknown key(s) {bad}; allowed: {sorted(names)}")
            cfg = TrackingConfig(**cfg)
        self.cfg = cfg
        self.run_dir: Path | None = None
        self.uri: str | None = None
        self._sender: Sender | None = None
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[dict] = []      # owned by the sender thread
        self._offline = False
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._outstanding = 0               # records put but not yet sent
        self._thread: threading.Thread | None = None
        self._sys_thread: threading.Thread | None = None
        self._sys_stop = threading.Event()
        self._last_step = 0
        self.warnings = 0                   # outages reported (tests read it)

    # -- public API ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.enable) and self.run_dir is not None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the server has been reached once (save it in checkpoints)."""
        return self._sender.run_id if self._sender else None

    @property
    def buffer_path(self) -> Path | None:
        return self.run_dir / BUFFER_NAME if self.run_dir else None

    def start(self, run_dir, run_id: str | None = None) -> str | None:
        """Open (or with `run_id`, resume) the run; returns its id, None when tracking is off or
        the server is unreachable (the run is then created when it answers; see `run_id`)."""
        if not self.cfg.enable:
            return None
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_uri(self.run_dir, self.cfg.tracking_uri)
        if self.uri.startswith(("http://", "https://")):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
        self._sender = Sender(self.uri, self.cfg.experiment, self.run_dir, self.cfg.run_name)
        # Records a previous process could not send (it died while the server was down).
        self._pending = read_buffer(self.buffer_path)
        self._outstanding = len(self._pending)
        try:
            self._sender.open_run(run_id)
        except Exception as e:
            if not is_transient(e):
                raise
            self._went_offline(e)
            # Opening comes first, before any record left from an earlier process.
            self._pending.insert(0, {"op": "open", "run": run_id})
            self._outstanding += 1
            self._sender.run_id = run_id  # records carry the id when resuming; else None for now
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()
        if self.cfg.log_system_metrics:
            self._sys_thread = threading.Thread(target=self._system_loop, name="mlflow-system-metrics",
                                                daemon=True)
            self._sys_thread.start()
        return self.run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self._put({"op": "params", "values": flatten(params)})

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._put({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Numbers only (tensors and numpy scalars are converted); step None: the last step seen."""
        if not self.enabled:
            return
        if step is None:
            step = self._last_step
        self._last_step = int(step)
        values = {}
        for k, v in metrics.items():
            try:
                values[str(k)] = float(v)
            except (TypeError, ValueError):
                continue  # not a number (a string or a dict): metrics hold numbers only
        if values:
            self._put({"op": "metrics", "step": int(step), "ts": _now_ms(), "values": values})

    def log_image(self, image, step: int, key: str = "samples") -> None:
        """A PNG/JPEG path (kept until sent) or a uint8 HWC array (saved under RUN_DIR/mlflow-images)."""
        if not self.enabled:
            return
        if not isinstance(image, (str, os.PathLike)):
            import numpy as np
            from PIL import Image

            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.ndim != 3:
                raise ValueError(f"log_image: expected a path or a uint8 HWC array, got {arr.dtype} {arr.shape}")
            path = self.run_dir / "mlflow-images" / f"{key.replace('/', '_')}-step-{int(step):08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            image = path
        self._put({"op": "image", "path": str(Path(image).resolve()), "key": key, "step": int(step), "ts": _now_ms()})

    def log_datasets(self, shards_dir) -> list[dict]:
        """Log both domains of a `make shards` OUT directory as dataset inputs; returns the records."""
        if not self.enabled:
            return []
        recs = shard_datasets(shards_dir)
        self._put({"op": "datasets", "datasets": recs})
        tags = {f"dataset.{r['domain']}.digest": r["digest"] for r in recs}
        tags["dataset.shards"] = str(Path(shards_dir).resolve())
        self.set_tags(tags)
        return recs

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record is sent (at most `timeout`, default cfg.flush_timeout)."""
        if not self.enabled or self._thread is None:
            return True
        deadline = time.monotonic() + (self.cfg.flush_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self._outstanding == 0:
                return True
            time.sleep(0.05)
        return self._outstanding == 0

    def end(self, status: str = "FINISHED") -> bool:
        """Close the run; returns True when everything reached the server. Unsent records stay in
        RUN_DIR/mlflow-buffer.jsonl for `python -m launch.tracking upload`."""
        if not self.enabled or self._thread is None:
            return True
        self._sys_stop.set()
        if self._sys_thread is not None:
            self._sys_thread.join(timeout=5)
        self._put({"op": "end", "status": status, "ts": _now_ms()})
        self._queue.put(_STOP)
        self._thread.join(timeout=self.cfg.flush_timeout + 5)
        if self._thread.is_alive() or self._pending:
            # A sender still blocked in a request keeps its records in _pending; the file gets
            # everything unsent, and `upload` tolerates the rare record sent twice.
            left = list(self._pending) + _drain(self._queue)
            write_buffer(self.buffer_path, left)
            log.warning("MLflow: %d record(s) not sent; they are in %s. Upload them with "
                        "`python -m launch.tracking upload --run-dir %s`", len(left), self.buffer_path, self.run_dir)
            ok = False
        else:
            ok = True
        self._thread = None
        return ok

    # -- internals ----------------------------------------------------------------------------

    def _put(self, rec: dict) -> None:
        rec.setdefault("run", self._sender.run_id if self._sender else None)
        with self._lock:
            self._outstanding += 1
        self._queue.put(rec)

    def _went_offline(self, exc: BaseException) -> None:
        if not self._offline:
            self._offline = True
            self.warnings += 1
            log.warning("MLflow at %s is unreachable (%s); training goes on, records are kept in %s "
                        "and sent when it answers again (or: python -m launch.tracking upload --run-dir %s)",
                        self.uri, str(exc).splitlines()[0][:200], self.buffer_path, self.run_dir)
        self._next_try = time.monotonic() + self.cfg.retry_interval

    def _loop(self) -> None:
        stopping = False
        while True:
            wait = 0.5
            if self._offline and self._pending:
                wait = min(wait, max(0.05, self._next_try - time.monotonic()))
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            new = []
            while item is not None:
                if item is _STOP:
                    stopping = True
                else:
                    new.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._pending.extend(new)
            if self._offline and new:
                _append_buffer(self.buffer_path, new)
            # At the end, one last attempt even before the retry interval has passed.
            if self._pending and (not self._offline or stopping or time.monotonic() >= self._next_try):
                self._try_send()
            if stopping and (not self._pending or self._offline):
                return  # what is left (offline) is written to the buffer file by end()

    def _try_send(self) -> None:
        sender = self._sender
        try:
            sender.send(self._pending)
            err = None
        except Exception as e:
            err = e
        n = sender.progress
        self._pending = self._pending[n:]
        with self._lock:
            self._outstanding = max(0, self._outstanding - n)
        if err is None:
            if self._offline:
                self._offline = False
                self.buffer_path.unlink(missing_ok=True)
                log.warning("MLflow at %s answers again; the buffered records were sent", self.uri)
            return
        was_offline = self._offline
        self._went_offline(err)
        if not was_offline or n:
            write_buffer(self.buffer_path, self._pending)

    def _system_loop(self) -> None:
        """Sample every interval, and once more at the end so that short runs have a sample too.
        The step is the last training step seen, so system metrics line up with the losses."""
        interval = self.cfg.system_metrics_interval or float(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10.0)
        monitors = _system_monitors()
        while True:
            stopped = self._sys_stop.wait(interval)
            values = {}
            for m in monitors:
                try:
                    m.collect_metrics()
                    values.update(m.aggregate_metrics())
                    m.clear_metrics()
                except Exception:  # a monitor that fails once (e.g. GPU gone) is not worth a crash
                    continue
            if values:
                self._put({"op": "metrics", "step": self._last_step, "ts": _now_ms(),
                           "values": {f"system/{k}": float(v) for k, v in values.items()}})
            if stopped:
                return


def _system_monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor

    monitors = [CPUMonitor(), DiskMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:
        pass  # no NVIDIA GPU or no nvidia-ml-py
    return monitors


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return out
        if item is not _STOP:
            out.append(item)


def _append_buffer(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# CLI: upload a buffer left behind by a run that ended while the server was down


def upload(run_dir, tracking_uri: str | None = None) -> dict:
    """Send RUN_DIR/mlflow-buffer.jsonl to the run's tracking server; returns counts."""
    run_dir = Path(run_dir)
    buf = run_dir / BUFFER_NAME
    records = read_buffer(buf)
    info = read_tracking_json(run_dir)
    uri = tracking_uri or info.get("tracking_uri") or resolve_uri(run_dir, None)
    sender = Sender(uri, info.get("experiment") or "unit", run_dir)
    if not records:
        return {"records": 0, "sent": 0, "run_id": info.get("run_id"), "tracking_uri": uri}
    run_id = next((r["run"] for r in records if r.get("run")), None) or info.get("run_id")
    if run_id:
        sender.run_id = run_id
    elif not any(r["op"] == "open" for r in records):
        sender.open_run(None)  # no run and no record that opens one
    n = sender.send(records)
    write_buffer(buf, records[n:])
    return {"records": len(records), "sent": n - sender.dropped, "dropped": sender.dropped,
            "run_id": sender.run_id, "tracking_uri": uri}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.tracking", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="send the records a run could not send (RUN_DIR/mlflow-buffer.jsonl)")
    up.add_argument("--run-dir", required=True)
    up.add_argument("--tracking-uri", default=None, help="default: the one in RUN_DIR/tracking.json")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"error: --run-dir {args.run_dir}: not a directory", file=sys.stderr)
        return 2
    try:
        res = upload(args.run_dir, args.tracking_uri)
    except Exception as e:
        print(f"error: upload to MLflow failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
              f"the buffer is kept, run the command again when the server answers", file=sys.stderr)
        return 1
    print(f"uploaded {res['sent']} of {res['records']} buffered record(s) to run {res['run_id']} "
          f"at {res['tracking_uri']}" + (f"; {res['dropped']} rejected by the server" if res.get("dropped") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
