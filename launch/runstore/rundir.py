"""The run directory: where a run lives, and the proof that a folder is one.

`RUN_DIR/.unit-run.json` (written once, when a run starts in a new or empty folder) says the
folder is a run directory and holds the run's identity, `run_uid`. Training refuses a non-empty
folder without it, and `/`, system folders and the home folder. Training writes into a run
directory and release reads from it; both find its files through the names here.

    RUN_DIR/.unit-run.json  config.yaml  metrics.jsonl  samples/  ckpt/  export/
    RUN_DIR/tracking.json   mlflow/ (embedded store)    mlflow-buffer.jsonl  .unit-run.lock

A launch's rank 0 holds a flock on RUN_DIR/.unit-run.lock (hold_run_lock) from its claim to its
exit: a second launch into a run directory that is training (a requeue while the first still
runs, a command typed twice) is refused naming the holder, instead of resuming beside it.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

from pipeline.atomic import TEMP_NAME, write_json, write_text
from pipeline.layout import LockedError
from pipeline.lock import writer_lock

RUN_MARKER = ".unit-run.json"
RUN_LOCK = ".unit-run.lock"
_HELD: dict[str, contextlib.ExitStack] = {}  # run directories this process holds (released at exit)
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
EXPORT_DIR = "export"
SAMPLES_DIR = "samples"
# Folders no run may own (pruning and overwriting there would damage the system).
SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev",
               "/proc", "/sys", "/var/lib", "/var/log")


class RunDirError(ValueError):
    """run_dir or resume refused; the message names the key, the value and what to do instead."""


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_run_marker(run_dir: str | Path) -> dict | None:
    """RUN_DIR/.unit-run.json, or None when the folder is not (yet) a run directory."""
    path = Path(run_dir) / RUN_MARKER
    if not path.exists():
        return None
    marker = read_json(path)
    if not marker or not isinstance(marker.get("run_uid"), str):
        raise RunDirError(f"config key run_dir = {str(run_dir)!r}: {path} is damaged (expected JSON with a "
                          "run_uid); restore it from a copy of the run, or use a new run_dir")
    return marker


def claim_run_dir(run_dir: str | Path) -> dict:
    """Rank 0, after plan_resume: make `run_dir` a run directory (if it is not one) and return its marker."""
    root = Path(run_dir)
    marker = read_run_marker(root)
    if marker is not None:
        return marker
    root.mkdir(parents=True, exist_ok=True)
    marker = {"format": 1, "run_uid": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "created_at": str(root.resolve())}  # informational: a moved run keeps its identity
    # Written whole under a temporary name, then linked into place: a link, unlike a rename, fails
    # when the marker exists, so of two launches claiming at once one wins and the other takes its
    # run_uid (a rename would let the second replace the first's marker after it was read).
    tmp = write_json(root / f".{RUN_MARKER}.{uuid.uuid4().hex[:12]}.tmp", marker)
    try:
        os.link(tmp, root / RUN_MARKER)
    except FileExistsError:
        marker = read_run_marker(root)
    finally:
        tmp.unlink(missing_ok=True)
    return marker


def unsafe_run_dir(run_dir: str | Path) -> str | None:
    """Why `run_dir` may never be a run directory (the root, a system folder, home), or None."""
    p = Path(run_dir).resolve()
    if p == Path(p.anchor):
        return "is the file system root"
    for d in SYSTEM_DIRS:
        if p == Path(d) or p.is_relative_to(d):
            return f"is inside the system folder {d}"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home directory known
        return None
    if home.is_relative_to(p):
        return "is your home folder" if p == home else f"contains your home folder {home}"
    return None


def check_run_dir(root: Path) -> dict | None:
    """The run marker, or None for a new or empty folder; refuses anything else."""
    shown = f"config key run_dir = {str(root)!r}"
    why = unsafe_run_dir(root)
    if why:
        raise RunDirError(f"{shown}: {why}; use a folder of its own, e.g. runs/NAME")
    if root.exists() and not root.is_dir():
        raise RunDirError(f"{shown}: exists and is not a folder")
    marker = read_run_marker(root)
    if marker is None and root.is_dir() and any(not TEMP_NAME.match(p.name) for p in root.iterdir()):
        raise RunDirError(f"{shown}: the folder is not empty and holds no {RUN_MARKER}, so it is not a run "
                          "directory (training there would overwrite config.yaml, export/ and samples/ and "
                          "prune ckpt/); use a new or empty folder")
    return marker


def write_config(run_dir: str | Path, text: str) -> Path:
    """RUN_DIR/config.yaml: the resolved config the run was started with (YAML `text`), its URLs
    without a password. The file is 0644 and copied with the run, as tracking.json is, so every
    URL value (tracking.uri, shard URLs) is cut as tracking.json's URI is (store.without_password:
    the user:password@'s password and the query parameters that name a secret): registering and
    resuming get the secrets from the environment again. Resuming compares the checkpoint's own
    config (meta.json), not this file; the keys registering reads (config_hash's) hold no URL."""
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:  # not ours to judge: written as given
        cfg = None
    if isinstance(cfg, dict):
        cleaned = config_without_passwords(cfg)
        if cleaned != cfg:
            text = yaml.safe_dump(cleaned, sort_keys=False)
    return write_text(Path(run_dir) / CONFIG_NAME, text)


def config_without_passwords(v):
    """`v` (a loaded config) with every string that is a URL passed through store.without_password."""
    from launch.runstore.store import without_password

    if isinstance(v, dict):
        return {k: config_without_passwords(x) for k, x in v.items()}
    if isinstance(v, list):
        return [config_without_passwords(x) for x in v]
    return without_password(v) if isinstance(v, str) and "://" in v else v


def hold_run_lock(run_dir: str | Path, what: str = "training") -> None:
    """Rank 0, right after claim_run_dir: hold RUN_DIR/.unit-run.lock until this process ends (the
    kernel releases a flock when its holder dies, so a killed launch leaves nothing to clean up).
    RunDirError naming the holder when another process holds it. Held once per process: a trainer
    built again in the same process (tests, a notebook) keeps the lock it has."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(writer_lock(str(Path(run_dir) / RUN_LOCK), what))
    except LockedError as e:
        raise RunDirError(_busy(run_dir, e)) from None
    _HELD[key] = stack


def run_lock_holder(run_dir: str | Path) -> str | None:
    """Before launching: the error hold_run_lock would raise now for another process's lock, else
    None (the lock is taken and released at once; nothing is created in a folder without one)."""
    if not (Path(run_dir) / RUN_LOCK).exists() or str(Path(run_dir).resolve()) in _HELD:
        return None
    try:
        with writer_lock(str(Path(run_dir) / RUN_LOCK), "checking"):
            return None
    except LockedError as e:
        return _busy(run_dir, e)


def _busy(run_dir, e: LockedError) -> str:
    return f"config key run_dir = {str(run_dir)!r}: another launch is training in it: {e}"
