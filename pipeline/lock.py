"""One writer per OUT: a run (and `merge`) holds an exclusive flock on OUT/.lock; a `--part`
run holds it shared plus an exclusive lock on its part's own .lock, so the parts of one job run
side by side (several machines on a shared filesystem) but two writers of the same shards never
do. The loser exits with status 2 naming the holder, which the lock file records."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

from pipeline.layout import LOCK_NAME, LockedError, ShardsError, part_dir


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}, {info['what']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def writer_lock(path: str, what: str, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (created if needed) for the block, or raise LockedError naming
    the holder. flock is released by the kernel when the holder dies, so a killed run never
    leaves OUT locked; over NFS, Linux maps it to a lock the server arbitrates."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ShardsError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{os.path.dirname(path)} is being written by another process ({_holder(fd)}); "
                              f"wait for it to finish or stop it, then run again (lock: {path})") from None
        except OSError as e:  # a filesystem without locks: say so, do not refuse to work
            print(f"warning: cannot lock {path} ({e.strerror}); make sure no other writer uses it",
                  file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def out_locks(out: str, part: tuple[int, int]) -> Iterator[None]:
    """A whole run owns OUT; the parts of one job share it, each owning its part."""
    i, n = part
    if n == 1:
        with writer_lock(os.path.join(out, LOCK_NAME), "make shards"):
            yield
        return
    what = f"make shards --part {i}/{n}"
    with (writer_lock(os.path.join(out, LOCK_NAME), what, shared=True),
          writer_lock(os.path.join(part_dir(out, i, n), LOCK_NAME), what)):
        yield
