"""Checkpoints that resume everything: both engines, every rank's stream and RNG, EMA, step, run id.

Layout of one checkpoint (`RUN_DIR/ckpt/step-00000100/`):

    G/ D/               the two DeepSpeed engines (separate tags, so neither overwrites the other)
    rank-00000.json     per-rank state: loader position and RNG states (client_state is rank 0's only)
    meta.json           step, config, config hash, tracking run id, world size (rank 0)
    ema.safetensors     EMA of the generator side, when enabled (rank 0)
    COMPLETE            written by rank 0 after a barrier: only marked checkpoints are resumed from

DeepSpeed writes its files in place and its `latest` file is not atomic, so the marker is what
makes a checkpoint count; a crash mid-save leaves an unmarked directory that is never loaded
and is pruned later, and the previous marked checkpoint is untouched.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class CheckpointConfig:
    every: int = 200
    """Steps between checkpoints; one is always written at the end."""
    keep: int = 3
    """Complete checkpoints kept; older ones (and unmarked leftovers) are deleted."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "ckpt" / f"step-{step:08d}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Marked checkpoints, oldest first."""
    root = Path(run_dir) / "ckpt"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_complete(run_dir: str | Path) -> Path | None:
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------- RNG state as JSON

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# ---------------------------------------------------------------- save / load

def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(run_dir: str | Path, step: int, eng_g, eng_d, *, rank: int, rank_state: dict,
         meta: dict | None, ema_state: dict | None, keep: int) -> Path:
    """Every rank calls this (DeepSpeed hangs if rank 0 saves alone)."""
    d = step_dir(run_dir, step)
    if rank == 0 and d.exists():
        shutil.rmtree(d)  # a leftover of a crash at this very step: never marked, rewrite it
    _barrier()
    d.mkdir(parents=True, exist_ok=True)
    eng_g.save_checkpoint(str(d), tag="G", save_latest=False)
    eng_d.save_checkpoint(str(d), tag="D", save_latest=False)
    write_json_atomic(d / f"rank-{rank:05d}.json", rank_state)
    if rank == 0:
        write_json_atomic(d / "meta.json", meta or {})
        if ema_state:
            save_ema(d / "ema.safetensors", ema_state)
    _barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        write_json_atomic(d / MARKER, {"step": step})
        prune(run_dir, keep)
    _barrier()
    return d


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (full disk, file-size limit, I/O error); the message says why and
    which complete checkpoint is left to resume from."""


def _first_oserror(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def write_failure(run_dir: str | Path, step: int, exc: BaseException) -> str:
    """One line naming the checkpoint, the cause and the way out.

    torch.save reports a full disk as a bare RuntimeError ("unexpected pos ...", "iostream error"),
    so the cause is found by asking the filesystem: a 1 MiB probe write next to the checkpoint,
    the free space, and the process's file-size limit (ulimit -f).
    """
    import errno as errno_mod
    import resource

    d = step_dir(run_dir, step)
    where = d if d.exists() else d.parent if d.parent.exists() else Path(run_dir)
    cause = _first_oserror(exc)
    if cause is None:
        probe = where / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            cause = e
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
    if cause is not None:
        reason = f"{os.strerror(cause.errno)} ({errno_mod.errorcode.get(cause.errno, cause.errno)})"
    else:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    try:
        free = f"{shutil.disk_usage(where).free / 2 ** 20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = "" if soft == resource.RLIM_INFINITY else f", file-size limit (ulimit -f) {soft} bytes"
    prev = latest_complete(run_dir)
    keep = (f"the last complete checkpoint {prev} is intact; free space and run again to resume from it"
            if prev is not None else "there is no earlier complete checkpoint")
    return f"writing checkpoint {d} failed: {reason} ({free}{limit}); it is not marked complete and " \
           f"will never be resumed from; {keep}"


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; drop older ones and unmarked leftovers below them."""
    done = complete_checkpoints(run_dir)
    if not done:
        return []
    newest = int(_STEP_DIR.match(done[-1].name).group(1))
    drop = set(done[:-keep]) if keep > 0 else set()
    for p in (Path(run_dir) / "ckpt").iterdir():
        m = _STEP_DIR.match(p.name)
        if m and not (p / MARKER).is_file() and int(m.group(1)) < newest:
            drop.add(p)
    for p in drop:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(drop)


def load(path: Path, eng_g, eng_d, *, rank: int) -> tuple[dict, dict | None, dict | None]:
    """Load a marked checkpoint into both engines; returns (meta, this rank's state or None, EMA tensors)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise RuntimeError(f"checkpoint {path} has no {MARKER} marker: it was not completely written")
    for eng, tag in ((eng_g, "G"), (eng_d, "D")):
        loaded, _ = eng.load_checkpoint(str(path), tag=tag)
        if loaded is None:  # DeepSpeed only warns when nothing was found
            raise RuntimeError(f"checkpoint {path}/{tag} could not be loaded by DeepSpeed")
    meta = json.loads((path / "meta.json").read_text())
    rank_file = path / f"rank-{rank:05d}.json"
    rank_state = json.loads(rank_file.read_text()) if rank_file.is_file() else None
    ema = load_ema(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return meta, rank_state, ema


def save_ema(path: Path, state: dict) -> None:
    """model.ema.EMA.state_dict() as safetensors: the shadow tensors, decay and count as metadata."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state["shadow"].items()}, str(tmp),
              metadata={"decay": repr(float(state["decay"])), "num_updates": str(int(state["num_updates"]))})
    os.replace(tmp, path)


def load_ema(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shadow = {k: f.get_tensor(k) for k in f.keys()}
    return {"decay": float(meta["decay"]), "num_updates": int(meta["num_updates"]), "shadow": shadow}
