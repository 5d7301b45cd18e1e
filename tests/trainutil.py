"""Helpers for tests that drive the real `deepspeed launch/train.py`: a tiny corpus, configs,
single- and two-node launches, and two "nodes" as network namespaces joined by a veth pair."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from ports import ephemeral_low, free_port, handed_out  # noqa: E402,F401  (tests import them from here)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEEPSPEED = str(BIN / "deepspeed")
NODE_NAMES = ("unit-node-0", "unit-node-1")  # 10.213.0.1 and 10.213.0.2 inside the namespaces
# No version check over the network at import (there is no network inside the namespaces).
QUIET = {"NO_ALBUMENTATIONS_UPDATE": "1"}


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def make_corpus(d: Path, n_train: int = 48, per_shard: int = 8, n_test: int = 4) -> Path:
    """Demo corpus at 32 px and its shards (n_train/per_shard shards per domain). Most tests take
    the session's `corpus` fixture (tests/conftest.py) instead of making their own."""
    run([sys.executable, "-m", "pipeline.demo", "--out", d / "demo", "--n-train", n_train, "--n-test", n_test,
         "--size", "32", "--seed", "0"])
    run([sys.executable, "-m", "pipeline.shards", "--src-a", d / "demo" / "trainA", "--src-b", d / "demo" / "trainB",
         "--out", d / "shards", "--workers", "1", "--max-per-shard", per_shard, "--no-progress"])
    return d


def write_config(path: Path, corpus: Path, run_dir: Path, *, tracking: dict | None = None, **train) -> Path:
    """The tiny preset at 32 px, batch 2, one loader worker, no registry; tracking off unless given."""
    cfg = {"run_dir": str(run_dir), "seed": 1,
           "data": {"shards": str(corpus / "shards"), "image_size": 32, "batch_size": 2, "num_workers": 1},
           "model": {"preset": "tiny"},
           "train": {"max_steps": 6, "log_every": 1, "sample_every": 1000, "ckpt_every": 3, "threads": 1,
                     **train},
           "tracking": tracking or {"enable": False}, "registry": {"enable": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


_SHM = Path("/dev/shm")
_SHM_NAME = re.compile(r"^deepspeed_allreduce_buffer_\d+_.+_(\d+)_\d+$")  # ..._<uid>_<addr>_<port>_<rank>


def remove_deepspeed_shm() -> list[Path]:
    """Remove what DeepSpeed's CPU shared-memory op left in /dev/shm for the launches of this
    session: every rank creates deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (about 70 MB
    of memory) and nothing ever removes it, so a session would hold on to gigabytes. Only files
    named by a port handed out here (free_port) that no live process still maps."""
    found = [p for p in _SHM.glob("deepspeed_allreduce_buffer_*")
             if (m := _SHM_NAME.match(p.name)) and int(m.group(1)) in handed_out()]
    if not found:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(None, 5)[-1].strip() for line in maps.read_text().splitlines()
                          if "/dev/shm/deepspeed_allreduce_buffer" in line)
        except (OSError, IndexError):  # a process that ended meanwhile, or not ours to read
            pass
    removed = []
    for p in found:
        if str(p) not in mapped:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def launch_cmd(config: Path, *extra, ranks: int = 1) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py",
            "--config", str(config), *map(str, extra)]


def launch(config: Path, *extra, ranks: int = 1, env=None, check=True, timeout=300, preexec_fn=None):
    """One single-node launch to completion; returns the CompletedProcess (stdout and stderr merged)."""
    r = subprocess.run(launch_cmd(config, *extra, ranks=ranks), cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, env={**os.environ, **QUIET, **(env or {})},
                       preexec_fn=preexec_fn)
    if check:
        assert r.returncode == 0, f"training failed ({r.returncode}):\n{r.stdout[-5000:]}"
    return r


class Background:
    """Independent launches run in the background, `parallel` at a time, in the order queued.

    A launch is mostly single-threaded work (the `deepspeed` runner and then its launcher starting
    up, each process's teardown at the end), so two launches at a time fill the two cores that one
    launch leaves half idle. Only for launches whose outcome does not depend on timing; a test that
    injects faults runs its own launches with `slot()` held, so that at most `parallel - 1` queued
    ones run beside it. `result(key)` waits for one launch: a CompletedProcess (stdout and stderr
    apart) with `.seconds`, its wall time."""

    def __init__(self, parallel: int = 2):
        self._specs: dict[str, tuple] = {}
        self._queue: list[str] = []
        self._done: dict[str, threading.Event] = {}
        self._results: dict[str, object] = {}
        self._started: set[str] = set()
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(parallel)
        self._procs: set[subprocess.Popen] = set()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(parallel)]
        for w in self._workers:
            w.start()

    def define(self, key: str, make_cmd, env: dict | None = None, timeout: float = 300,
               after: str | None = None) -> None:
        """A launch that may be needed: `make_cmd()` builds its command when it starts (ports are
        picked then); with `after`, it starts once that launch has ended."""
        self._specs[key] = (make_cmd, env, timeout, after)
        self._done[key] = threading.Event()

    def queue(self, *keys: str) -> None:
        with self._cond:
            for k in keys:
                after = self._specs[k][3]
                if after is not None and after not in self._queue and after not in self._started:
                    self._queue.append(after)
                if k not in self._queue and k not in self._started:
                    self._queue.append(k)
            self._cond.notify_all()

    def result(self, key: str, timeout: float = 900) -> subprocess.CompletedProcess:
        with self._cond:  # never queued (a test selected on its own): next in line
            if key not in self._queue and key not in self._started:
                after = self._specs[key][3]
                self._queue[:0] = [k for k in (after, key) if k is not None and k not in self._queue
                                   and k not in self._started]
                self._cond.notify_all()
        assert self._done[key].wait(timeout), f"background launch {key} did not finish within {timeout:.0f} s"
        r = self._results[key]
        if isinstance(r, BaseException):
            raise r
        return r

    @contextlib.contextmanager
    def slot(self):
        """Hold one of the `parallel` places while the caller runs launches of its own."""
        with self._slots:
            yield

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
            procs = list(self._procs)
        for p in procs:
            kill_group(p)
        for w in self._workers:
            w.join(timeout=30)

    def _next(self) -> str | None:
        """The first queued launch that may start (the one it must follow has ended)."""
        for i, key in enumerate(self._queue):
            after = self._specs[key][3]
            if after is None or self._done[after].is_set():
                return self._queue.pop(i)
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (key := self._next()) is None:
                    self._cond.wait()
                if self._closed:
                    return
                self._started.add(key)
            make_cmd, env, timeout, _ = self._specs[key]
            with self._slots:
                try:
                    self._results[key] = self._launch(make_cmd, env, timeout)
                except BaseException as e:  # handed to the test that asks for it
                    self._results[key] = e
            with self._cond:
                self._done[key].set()
                self._cond.notify_all()

    def _launch(self, make_cmd, env, timeout) -> subprocess.CompletedProcess:
        cmd = [str(c) for c in make_cmd()]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            with self._cond:
                if self._closed:
                    raise RuntimeError("closed before it started")
                t0 = time.monotonic()
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, start_new_session=True,
                                        env={**os.environ, **QUIET, **(env or {})})
                self._procs.add(proc)
            try:
                proc.wait(timeout=timeout)
            finally:
                kill_group(proc)
                with self._cond:
                    self._procs.discard(proc)
            seconds = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            r = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
        r.seconds = seconds
        return r


def start(cmd, env=None, **kw) -> subprocess.Popen:
    """A launcher in its own process group (so a test can stop or kill it with all its ranks)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **QUIET, **(env or {})}, start_new_session=True, **kw)


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def last_step(run_dir: Path) -> int:
    rows = metrics(run_dir)
    return max((r["step"] for r in rows), default=0)


def wait_for(pred, timeout: float, procs=(), what: str = "condition", poll: float = 0.05) -> None:
    """Poll `pred` until true; fail early when one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read() if p.stdout else ""
                raise AssertionError(f"process exited ({p.returncode}) before {what}:\n{out[-5000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def resumed_step(out: str) -> int:
    """The step a launch said it resumed from ('resumed from .../step-00000004 at step 4')."""
    assert "resumed from " in out, out[-4000:]
    return int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])


# ---------------------------------------------------------------- two nodes

@dataclass
class Nodes:
    """How to run a command on each of two "nodes": a command prefix and environment per node."""
    master_addr: str
    prefix: list[list[str]]
    env: list[dict]
    ifname: list[str | None]
    namespaces: list[str] = field(default_factory=list)
    why_loopback: str | None = None

    @property
    def isolated(self) -> bool:
        return bool(self.namespaces)

    def tx_bytes(self, node: int) -> int:
        """Bytes sent by the node's veth end (0 on loopback)."""
        if not self.isolated:
            return 0
        out = subprocess.run(["ip", "netns", "exec", self.namespaces[node], "cat",
                              f"/sys/class/net/{self.ifname[node]}/statistics/tx_bytes"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip())


def _ip(*args) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise OSError(f"`ip {' '.join(args)}` failed: {(r.stderr or r.stdout).strip()}")


def _ensure_iproute2() -> None:
    if subprocess.run(["which", "ip"], capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "install", "-y", "-q", "iproute2"], capture_output=True, timeout=300)


def make_namespaces(tag: str) -> tuple[list[str], list[str]]:
    """Two network namespaces joined by a veth pair, 10.213.0.1/24 (node 0) and 10.213.0.2/24 (node 1).
    Raises OSError with the reason when that is not possible here."""
    _ensure_iproute2()
    ns = [f"unit-{tag}-n0", f"unit-{tag}-n1"]
    veth = [f"u{tag}a"[:15], f"u{tag}b"[:15]]
    created = []
    try:
        for n in ns:
            _ip("netns", "add", n)
            created.append(n)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i in (0, 1):
            _ip("link", "set", veth[i], "netns", ns[i])
            _ip("-n", ns[i], "addr", "add", f"10.213.0.{i + 1}/24", "dev", veth[i])
            _ip("-n", ns[i], "link", "set", veth[i], "up")
            _ip("-n", ns[i], "link", "set", "lo", "up")
            # `ip netns exec` bind-mounts /etc/netns/NAME/hosts over /etc/hosts: node names resolve
            # in each node as on a cluster (node.sh waits for MASTER_ADDR to resolve).
            etc = Path("/etc/netns") / ns[i]
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(Path("/etc/hosts").read_text() + "".join(
                f"10.213.0.{j + 1} {NODE_NAMES[j]}\n" for j in (0, 1)))
    except (OSError, subprocess.SubprocessError) as e:
        delete_namespaces(created)
        raise OSError(str(e)) from e
    return ns, veth


def delete_namespaces(ns: list[str]) -> None:
    import shutil
    for n in ns:  # deleting a namespace removes its veth end, and with it the pair
        subprocess.run(["ip", "netns", "delete", n], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)


def two_nodes(tag: str) -> Nodes:
    """Namespaces when they can be made; else both nodes on 127.0.0.1, with the reason printed
    and raised as a warning (the test still runs the two-node launch)."""
    try:
        if os.environ.get("UNIT_TEST_NETNS", "1") == "0":  # to exercise the fallback on purpose
            raise OSError("UNIT_TEST_NETNS=0 is set")
        ns, veth = make_namespaces(tag)
    except OSError as e:
        why = f"network namespaces unavailable ({e}); running both nodes over 127.0.0.1 instead"
        print(why, flush=True)
        warnings.warn(why)
        return Nodes("127.0.0.1", [[], []], [{}, {}], [None, None], why_loopback=why)
    # gloo binds to the veth address in each node, never to a loopback or the host's interfaces.
    return Nodes(NODE_NAMES[0], [["ip", "netns", "exec", n] for n in ns],
                 [{"GLOO_SOCKET_IFNAME": v} for v in veth], list(veth), namespaces=ns)


def start_nodes(nodes: Nodes, config: Path, *overrides, port: int, tmp: Path, env=None) -> list[subprocess.Popen]:
    """One `infra/launch/node.sh` launcher per node (1 CPU rank each), node rank 0 and 1."""
    procs = []
    for r in (0, 1):
        e = {**os.environ, "NNODES": "2", "GPUS_PER_NODE": "1", "NODE_RANK": str(r),
             "MASTER_ADDR": nodes.master_addr, "MASTER_PORT": str(port), "CONFIG": str(config),
             "TMPDIR": str(tmp), "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_WAIT_S": "60", **QUIET,
             **nodes.env[r], **(env or {})}
        procs.append(subprocess.Popen([*nodes.prefix[r], "bash", "infra/launch/node.sh", *map(str, overrides)],
                                      cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def finish_nodes(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for both launchers; returns their outputs (kills both on timeout)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            kill_group(p)
    return outs


def rank_processes(proc: subprocess.Popen) -> list:
    """The training processes (rank processes, started with --local_rank=N) under a launcher."""
    import psutil
    def is_rank(p) -> bool:
        return any(a.startswith("--local_rank=") for a in p.cmdline())

    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:  # loader workers are forked from a rank and share its command line
            if is_rank(p) and not is_rank(p.parent()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
