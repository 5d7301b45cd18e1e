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

The run directory is owned: `RUN_DIR/.unit-run.json` (written once, when a run starts in a new
or empty folder) says it is a run directory and holds the run's identity, `run_uid`. Training
refuses a non-empty folder without it, and `/`, system folders and the home folder. Every
checkpoint's COMPLETE and meta.json carry the run_uid; resuming and pruning look only at the
run's own checkpoints, found by that identity, not by the absolute path, so a run directory
that was moved or copied resumes. Pruning deletes only folders that hold nothing but the files
written here.

DeepSpeed's own files are pickles that it loads with `weights_only=False`: a checkpoint is
loaded from inside the run directory, or from a path outside it only with
`trust_resume_path: true` (plan_resume).
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.runstore.artifacts import load_safetensors, save_safetensors
from launch.runstore.rundir import RUN_MARKER, RunDirError, check_run_dir, read_json, read_run_marker
from pipeline.atomic import TEMP_NAME, write_json

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# What save() leaves in a step folder (and the temporary names it writes through); DeepSpeed adds
# its conversion scripts at ZeRO >= 1.
_OURS = re.compile(r"^(G|D|meta\.json|ema\.safetensors|COMPLETE|rank-\d{5}\.json|zero_to_fp32\.py|zero_to_torch\.py)$")
@dataclass
class TrainState:
    """The trainer's own progress, saved in every checkpoint's meta.json beside the engines, the
    EMA, and each rank's loader position and RNG (rank-NNNNN.json)."""

    step: int = 0
    """Optimizer steps done."""
    run_uid: str = ""
    """The run directory's identity (RUN_DIR/.unit-run.json); only its checkpoints are resumed."""
    run_id: str | None = None
    """The MLflow run id, so a resumed run logs into the same MLflow run."""
    nonfinite_total: int = 0
    """Steps skipped because a loss was NaN/inf, over the whole run."""
    nonfinite_run: int = 0
    """Such steps in a row up to this one: a streak goes on across a resume, so train.max_nonfinite
    stops a run that fails again right after every relaunch."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def is_own(self, meta: dict) -> bool:
        """Whether checkpoint meta `meta` was written by this run directory's run."""
        return meta.get("run_uid") == self.run_uid

    def load_state_dict(self, meta: dict) -> None:
        """From a checkpoint's meta.json; the run_uid stays the run directory's. The MLflow run id only
        from the run's own checkpoint: one of another run directory (resume=PATH with
        trust_resume_path) names that run's MLflow run, which this run must not log into; the
        tracker then opens a new one (tagged with the run the weights came from: trainer.restore)."""
        self.step = int(meta["step"])
        self.run_id = meta.get("run_id") if self.is_own(meta) else None
        self.nonfinite_total = int(meta.get("nonfinite_total", 0))
        self.nonfinite_run = int(meta.get("nonfinite_run", 0))  # absent in checkpoints of earlier versions


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "ckpt" / f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def complete_checkpoints(run_dir: str | Path, run_uid: str | None = None) -> list[Path]:
    """Marked checkpoints (real folders, not links), oldest first; only run `run_uid`'s when given."""
    root = Path(run_dir) / "ckpt"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and not p.is_symlink() and (p / MARKER).is_file()]
    if run_uid is not None:
        found = [(s, p) for s, p in found if (read_json(p / MARKER) or {}).get("run_uid") == run_uid]
    return [p for _, p in sorted(found)]


def latest_complete(run_dir: str | Path, run_uid: str | None = None) -> Path | None:
    ckpts = complete_checkpoints(run_dir, run_uid)
    return ckpts[-1] if ckpts else None


def only_ours(folder: Path) -> bool:
    """True when `folder` is a real folder holding only what save() writes (so it may be deleted)."""
    return folder.is_dir() and not folder.is_symlink() and all(
        _OURS.match(p.name) or TEMP_NAME.match(p.name) for p in folder.iterdir())


def checkpoint_problems(path: Path) -> list[str]:
    """What makes `path` not a complete checkpoint written by save() (empty: it is one)."""
    if not path.is_dir():
        return ["no such folder" if not path.exists() else "not a folder"]
    missing = [n for n in (MARKER, "meta.json") if not (path / n).is_file()]
    missing += [f"{n}/" for n in ("G", "D") if not (path / n).is_dir()]
    return [f"no {', '.join(missing)}"] if missing else []


def plan_resume(run_dir: str | Path, resume: str, trust_path: bool = False) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), or RunDirError saying why not.

    Reads only, so every rank can call it before any rank writes: `never` refuses a folder that
    already holds a run; `auto` takes the run's newest complete checkpoint; a path must be a
    complete checkpoint inside the run directory, or outside it with `trust_path`.
    """
    root = Path(run_dir)
    marker = check_run_dir(root)
    own = complete_checkpoints(root, marker["run_uid"]) if marker else []
    if resume == "auto":
        return _newest_usable(own)
    if resume == "never":
        if marker:
            newest = f"its newest complete checkpoint is {own[-1]}" if own else "no complete checkpoint yet"
            raise RunDirError(f"config key resume = 'never': run_dir {str(root)!r} already holds a run ({newest}); "
                              "starting over there would mix two runs. Use resume=auto to continue it, or a new "
                              "run_dir (or delete that folder)")
        return None
    return _explicit_checkpoint(root, Path(resume), own, trust_path)


def _newest_usable(own: list[Path], warn: bool = True) -> Path | None:
    """The newest of `own` that holds everything save() writes: a marked one missing G/ or D/ (a
    damaged copy) would fail only after both engines are built. Passed over with a warning; when
    none is usable, RunDirError (starting over at step 0 would meet the marked folders on the way).
    With `warn` False (write_failure's hint): neither the warnings nor the error, None instead."""
    for path in reversed(own):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        if warn:
            print(f"warning: resume=auto passes over {path}: not a complete checkpoint ({'; '.join(problems)})",
                  file=sys.stderr, flush=True)
    if not warn:
        return None
    if own:
        names = ", ".join(p.name for p in own)
        raise RunDirError(f"resume=auto: none of the run's marked checkpoints is complete ({names}); "
                          "move them away to start over, or resume= a complete checkpoint")
    return None


def _explicit_checkpoint(root: Path, path: Path, own: list[Path], trust_path: bool) -> Path:
    shown = f"config key resume = {str(path)!r}"
    problems = checkpoint_problems(path)
    if problems:
        hint = ""
        if (path / RUN_MARKER).is_file():
            newest = latest_complete(path, (read_run_marker(path) or {}).get("run_uid"))
            hint = (f"; that is a run directory: set run_dir={path} resume=auto to continue it"
                    + (f", or resume={newest}" if newest else ""))
        raise RunDirError(f"{shown}: not a checkpoint ({'; '.join(problems)}); expected a folder "
                          f"RUN_DIR/ckpt/step-NNNNNNNN holding {MARKER}, meta.json, G/ and D/, or 'auto' or 'never'{hint}")
    inside = path.resolve().is_relative_to(root.resolve())
    if not inside and not trust_path:
        raise RunDirError(f"{shown}: outside run_dir {str(root)!r}. DeepSpeed checkpoints are pickles and loading "
                          "one runs the code in it: set trust_resume_path=true if you trust where it came from, "
                          "or copy it into the run directory")
    # its step from its marker (a link or a copy under another name is the same checkpoint)
    step = (read_json(path / MARKER) or {}).get("step")
    if isinstance(step, int) or _STEP_DIR.match(path.resolve().name):
        step = step if isinstance(step, int) else step_of(path.resolve())
        newer = [p.name for p in own if step_of(p) > step and p.resolve() != path.resolve()]
        if newer:
            raise RunDirError(f"{shown}: run_dir {str(root)!r} holds newer complete checkpoints ({', '.join(newer)}); "
                              "going back to an older one would mix two histories in one run. Resume into a new "
                              "run_dir, or move the newer checkpoints away")
    return path


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


def _rank0_shares(value):
    """Rank 0's `value` on every rank, so all take the same branch around DeepSpeed's collective save."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _rank0_says(flag: bool) -> bool:
    return bool(_rank0_shares(flag))


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (full disk, file-size limit, I/O error); the message says why and
    which complete checkpoint is left to resume from."""


class CheckpointFolderError(CheckpointWriteError):
    """The step folder a checkpoint goes to is taken (another run's checkpoint, a user's file): not
    a disk problem, and raised on every rank (rank 0 alone would leave the others in a barrier)."""


def _folder_verdict(d: Path, run_uid: str | None) -> str:
    """Rank 0: what save() does with step folder `d`: "write" (absent), "keep" (the run's own
    complete checkpoint of this step), "rewrite" (a leftover: unmarked, or marked but damaged, and
    holding only save()'s files), else the error message naming the folder."""
    if not d.exists() and not d.is_symlink():
        return "write"
    if d.is_symlink() or not d.is_dir():
        return f"{d} exists and is not a folder this trainer wrote (a link or a file); move it away"
    marker = read_json(d / MARKER) if (d / MARKER).is_file() else None
    if marker is not None and marker.get("run_uid") != run_uid:  # prune leaves it: so does save
        return (f"{d} holds another run's checkpoint (run_uid {marker.get('run_uid')!r}, this run is "
                f"{run_uid!r}); move it away")
    if marker is not None and not checkpoint_problems(d):
        return "keep"
    if not only_ours(d):
        strays = sorted(p.name for p in d.iterdir() if not (_OURS.match(p.name) or TEMP_NAME.match(p.name)))
        return f"{d} exists and holds files this trainer did not write ({', '.join(strays[:5])}); move them away"
    return "rewrite"


def save(run_dir: str | Path, step: int, eng_g, eng_d, *, rank: int, rank_state: dict,
         meta: dict | None, ema_state: dict | None, keep: int) -> Path:
    """Every rank calls this (DeepSpeed hangs if rank 0 saves alone). meta["run_uid"] marks the
    checkpoint as the run's own (for resuming and pruning)."""
    d = step_dir(run_dir, step)
    run_uid = (meta or {}).get("run_uid")
    # Decided by rank 0 before the collective and shared, so every rank returns or raises together.
    verdict = _rank0_shares(_folder_verdict(d, run_uid) if rank == 0 else None)
    # "keep": a relaunch of a finished run (already at max_steps) saves the step it resumed from; that
    # complete checkpoint holds this state already, and deleting it to rewrite it would leave no copy
    # of the step (none at all with keep 1) if the rewrite failed (full disk, crash).
    if verdict == "keep":
        return d
    if verdict not in ("write", "rewrite"):
        raise CheckpointFolderError(verdict)
    if rank == 0 and verdict == "rewrite":
        shutil.rmtree(d)  # a leftover of a crash at this very step, or a damaged copy: rewrite it
    _barrier()
    d.mkdir(parents=True, exist_ok=True)
    eng_g.save_checkpoint(str(d), tag="G", save_latest=False)
    eng_d.save_checkpoint(str(d), tag="D", save_latest=False)
    write_json(d / f"rank-{rank:05d}.json", rank_state)
    if rank == 0:
        write_json(d / "meta.json", meta or {})
        if ema_state:
            save_ema(d / "ema.safetensors", ema_state)
    _barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        write_json(d / MARKER, {"step": step, "run_uid": run_uid})
        prune(run_dir, keep, run_uid)
    _barrier()
    return d


def _first_oserror(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def write_failure(run_dir: str | Path, step: int, exc: BaseException, run_uid: str | None = None) -> str:
    """One line naming the checkpoint, the cause and the way out; the checkpoint left to resume from
    is the one resume=auto would take (the run's own `run_uid`, by default the run directory's).

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
    if run_uid is None:
        run_uid = (read_run_marker(run_dir) or {}).get("run_uid")
    prev = _newest_usable(complete_checkpoints(run_dir, run_uid), warn=False)
    # free space is the way out only when the filesystem said no
    again = "free space and run again" if cause is not None else "remove the cause and run again"
    keep = (f"the last complete checkpoint {prev} is intact; {again} to resume from it"
            if prev is not None else "there is no earlier complete checkpoint")
    return f"writing checkpoint {d} failed: {reason} ({free}{limit}); it is not marked complete and " \
           f"will never be resumed from; {keep}"


def prune(run_dir: str | Path, keep: int, run_uid: str | None = None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (of run `run_uid` when given); drop older ones and
    unmarked leftovers below them. Only folders holding nothing but save()'s files are deleted:
    anything else (another run's checkpoint, a user's file) is left, with a warning."""
    done = complete_checkpoints(run_dir, run_uid)
    if not done:
        return []
    newest = step_of(done[-1])
    drop = set(done[:-keep]) if keep > 0 else set()
    for p in (Path(run_dir) / "ckpt").iterdir():
        m = _STEP_DIR.match(p.name)
        if m and not (p / MARKER).exists() and int(m.group(1)) < newest:
            drop.add(p)
    dropped = []
    for p in sorted(drop):
        if only_ours(p):
            shutil.rmtree(p, ignore_errors=True)
            dropped.append(p)
        else:
            print(f"warning: not pruning {p}: it holds files this trainer did not write", file=sys.stderr, flush=True)
    return dropped


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
    save_safetensors(path, state["shadow"], {"decay": repr(float(state["decay"])),
                                             "num_updates": str(int(state["num_updates"]))})


def load_ema(path: Path) -> dict:
    shadow, meta = load_safetensors(path)
    return {"decay": float(meta["decay"]), "num_updates": int(meta["num_updates"]), "shadow": shadow}
