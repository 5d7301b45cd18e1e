"""Shared fixtures: the small demo corpus, a PostgreSQL database and a real `mlflow server` on it,
one per test session; and the session's housekeeping (PATH, DeepSpeed's shared-memory files).

The corpus, database and server are created only when a test asks for them. The server runs in
its own process group on a free port; `mlflow_server.stop()` / `.start()` let a test take it away
and bring it back on the same port and store mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

# Each rank JIT-loads DeepSpeed's CPU shared-memory op, built once (about a minute on two cores)
# and then cached. Two things made launches rebuild it over and over:
# - Two ninja versions (the venv's pip one, a system one) do not read each other's build log, so
#   alternating between them rebuilt the op on every other launch: every process the suite starts
#   finds the virtualenv's tools first, whether or not `make test` runs with it activated.
# - The compile command names the virtualenv's paths, so two checkouts (or a fresh clone) sharing
#   ~/.cache/torch_extensions rebuilt it for each other: each virtualenv has its own folder, inside
#   it, where `make setup` builds the op (launch/training/ops.py) and the Makefile points
#   TORCH_EXTENSIONS_DIR (kept when set already).
# The ranks do the same themselves (launch.training.ops.use_this_environment); here it covers every
# process the suite starts.
from launch.training.ops import use_this_environment  # noqa: E402  (the standard library only, at import)

use_this_environment()

from trainutil import free_port, remove_deepspeed_shm  # noqa: E402  (after PATH; tests import it from here too)


# The files that take longest, longest first (by each file's summed test durations on a 2-core
# AVX2-only AMD EPYC, 7 December: launches, servers, fresh virtualenvs, compiles). `make test`
# hands whole files to its two workers in collection order (--dist loadfile
# --no-loadscope-reorder), so these start first and the short files fill in around them, and no
# long file starting late can leave one worker running it alone at the end. xdist's own order
# (most tests first) started them last, the one-test multi-node file last of all; on that EPYC
# both workers stayed busy to the end either way (18 min 36 s of pytest before, 18 min 38 s
# after), so this bounds the tail rather than shortening that run. A file not listed keeps its
# place after them; a wrong guess here costs time, never a result.
LONGEST_FIRST = ("test_faults.py", "test_train.py", "test_gpu_matrix.py", "test_tracking.py",
                 "test_init_from.py", "test_registry.py", "test_consumer.py", "test_multinode.py",
                 "test_model.py", "test_tracking_review8.py", "test_loader_remote.py", "test_hostile_launch.py",
                 "test_training_review.py", "test_gate_review.py", "test_consumer_review8.py",
                 "test_precision.py", "test_runstore_review.py", "test_infra_static.py", "test_runstore_review7.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_shm():
    """After each module, remove the shared-memory files its DeepSpeed launches left behind."""
    yield
    remove_deepspeed_shm()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process started with start_new_session=True, and its children (same group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The small demo corpus at 32 px and its shards, made once per session: 48 training scenes
    per domain in 6 shards of 8, and 8 test scenes (the fewest the two-sample test runs on,
    launch.release.c2st.MIN_IMAGES). Tests only read it; one that damages shards copies them first."""
    from trainutil import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=48, per_shard=8, n_test=8)


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this session (dropped at the end); yields its SQLAlchemy URI."""
    import psycopg2

    name = f"mlflow_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        # psycopg2 spelled out: SQLAlchemy 2.1's plain postgresql:// wants psycopg 3.
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


class MlflowServer:
    """`mlflow server` on PostgreSQL with proxied artifacts; stop()/start() keep port and store."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        env = dict(os.environ)
        # The job runner spawns several huey consumer processes; this suite has no use for them
        # and the machine has two cores.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        wait_http(f"{self.uri}/health", timeout, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def mlflow_server(pg_database, tmp_path_factory):
    """A running `mlflow server` (PostgreSQL backend, --serve-artifacts) shared by the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(pg_database, root / "artifacts", root / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_up(mlflow_server):
    """The shared server, (re)started if an earlier test left it stopped."""
    if not mlflow_server.running:
        mlflow_server.start()
    return mlflow_server


# ----------------------------------------------------------------------------- object storage


class S3Server:
    """`moto_server` (moto in server mode: the S3-compatible server s3fs tests itself against) on
    `host`, in its own process group; run inside network namespace `netns` when given."""

    def __init__(self, log: Path, host: str = "127.0.0.1", netns: str | None = None):
        self.host, self.netns, self.log = host, netns, log
        self.port = free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", self.host, "-p", str(self.port)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        if self.netns is None:
            wait_http(f"{self.endpoint}/moto-api/", timeout, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


# What the S3 tests' processes see: the standard AWS variables (s3fs, through botocore, reads them),
# with a secret key no test ever writes anywhere else, so a leak of it can be searched for.
S3_SECRET = f"s3-secret-{uuid.uuid4().hex}"


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "unit-test-key", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


def make_bucket(endpoint: str, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key="unit-test-key", secret=S3_SECRET, endpoint_url=endpoint,
                           skip_instance_cache=True)
    fs.mkdir(bucket)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running S3-compatible server on 127.0.0.1 with one bucket for this session; its AWS_*
    variables are set in this process's environment (so every process a test starts inherits them).
    `s3_server.url("prefix")` is s3://<bucket>/prefix."""
    root = tmp_path_factory.mktemp("s3-server")
    server = S3Server(root / "moto.log")
    server.start()
    server.bucket = f"unit-{uuid.uuid4().hex[:10]}"
    server.url = lambda prefix="": f"s3://{server.bucket}/{prefix}".rstrip("/")
    saved = {k: os.environ.get(k) for k in s3_env(server.endpoint)}
    os.environ.update(s3_env(server.endpoint))
    try:
        make_bucket(server.endpoint, server.bucket)
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """Python's http.server (threaded) serving a folder on 127.0.0.1, read-only shards over HTTP:
    `http_server.root` is the folder, `http_server.url` its base URL."""
    root = tmp_path_factory.mktemp("http-root")
    port = free_port()
    log = root.parent / "http.log"
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                                 "--directory", str(root)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        (root / "ping").write_text("ok")
        wait_http(f"http://127.0.0.1:{port}/ping", 30, proc, log)
        yield type("HttpServer", (), {"root": root, "url": f"http://127.0.0.1:{port}", "proc": proc})
    finally:
        stop_group(proc)
