"""One writer per OUT: a run (and `merge`) holds an exclusive flock on OUT/.lock; a `--part`
run holds it shared plus an exclusive lock on its part's own .lock, so the parts of one job run
side by side (several machines on a shared filesystem) but two writers of the same shards never
do. The loser exits with status 2 naming the holder, which the lock file records.

An object store (OUT an s3://, gs://, ... URL) has no locks, and a lock object in the bucket
could not be released by a killed holder. So for a URL the flock is taken on a local file named
after the URL (lock_file), in a folder of this user's alone (atomic.private_dir: a planted folder or
link is refused, never followed): writers on this host, for this user, exclude each other exactly as on
disk, but writers on other hosts do not see it, and the run says so in a one-line warning. The
parts of one job on several hosts stay safe (they write disjoint shards); what is not caught is a
second run of the same OUT (or part), or a merge, started on another host meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from typing import Iterator

from pipeline import storage
from pipeline.atomic import private_dir
from pipeline.layout import LOCK_NAME, PARTS_DIR, LockedError, ShardsError, part_dir


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}, {info['what']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_file(path: str) -> str:
    """The local file to flock for the lock `path`: the path itself, or for a URL a file in this
    user's temporary directory named by a hash of the URL (credentials and query left out)."""
    if not storage.is_url(path):
        return storage.local_path(path)
    key = hashlib.sha256(storage.canonical(path).encode()).hexdigest()[:32]
    return os.path.join(tempfile.gettempdir(), f"unit-translate-locks-{os.getuid()}", f"{key}.lock")


@contextlib.contextmanager
def writer_lock(path: str, what: str, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (created if needed; for a URL on its local lock_file) for the block,
    or raise LockedError naming the holder. flock is released by the kernel when the holder dies,
    so a killed run never leaves OUT locked; over NFS, Linux maps it to a lock the server arbitrates."""
    folder = storage.redact(storage.parent(path))  # what the messages name
    in_tmp, path = storage.is_url(path), lock_file(path)
    try:
        if in_tmp:  # a folder in the shared temporary directory: ours alone, or refused
            private_dir(os.path.dirname(path))
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        # O_NOFOLLOW: the lock is truncated and rewritten, so a planted link must not be followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "it is a symbolic link (refused)" if e.errno == errno.ELOOP else e.strerror or e
        raise ShardsError(f"cannot create the lock file {path}: {why}") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{folder} is being written by another process ({_holder(fd)}); "
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
def out_locks(out: str, part: tuple[int, int], what: str = "make shards") -> Iterator[None]:
    """A whole run (or merge) owns OUT; the parts of one job share it, each owning its part."""
    i, n = part
    if storage.is_url(out):
        print(f"warning: {storage.redact(out)} is in an object store, which has no locks: other writers on this "
              f"host are excluded, writers on other hosts are not; run one writer per OUT (and per part)",
              file=sys.stderr)
    if n == 1:
        with writer_lock(storage.join(out, LOCK_NAME), what):
            yield
        return
    what = f"{what} --part {i}/{n}"
    # The parts of one job share OUT, but parts of jobs with another N write the same shard
    # numbers (--part 0/2 and --part 0/3 both write shard 0): each part run holds its N's lock
    # shared, then refuses when a run of another N holds its own.
    with (writer_lock(storage.join(out, LOCK_NAME), what, shared=True),
          writer_lock(count_lock(out, n), what, shared=True),
          writer_lock(storage.join(part_dir(out, i, n), LOCK_NAME), what)):
        _refuse_other_counts(out, n)
        yield


def count_lock(out: str, n: int) -> str:
    """The local file that `--part i/n` runs of OUT hold shared: OUT/parts/.lock-N<n>, or for a URL
    a file in this user's lock folder named by a hash of OUT/parts (lock_file's folder)."""
    if not storage.is_url(out):
        return os.path.join(storage.local_path(storage.join(out, PARTS_DIR)), f".lock-N{n}")
    parts = lock_file(storage.join(out, PARTS_DIR))
    private_dir(os.path.dirname(parts))  # ours alone, or refused (as writer_lock does for URLs)
    return f"{parts[:-len('.lock')]}-N{n}.lock"


def _refuse_other_counts(out: str, n: int) -> None:
    """Raise LockedError when a part run with a count other than `n` holds its count lock: a
    non-blocking exclusive probe of each other count's lock file, released at once. Two runs
    starting together each hold their own lock before probing, so at least one is refused."""
    mine = count_lock(out, n)
    stem = mine[:mine.rindex("-N") + 2]
    for other in sorted(glob.glob(glob.escape(stem) + "*")):
        if other == mine or not other[len(stem):].removesuffix(".lock").isdigit():
            continue
        try:
            fd = os.open(other, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not ours to open: nobody can hold it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            m = other[len(stem):].removesuffix(".lock")
            raise LockedError(f"{storage.redact(out)} is being written by --part runs of {m} parts ({_holder(fd)}); "
                              f"a --part run of {n} parts would write the same shards: wait for them to finish "
                              f"or stop them, or run --part i/{m} (lock: {other})") from None
        except OSError:  # a filesystem without locks: writer_lock has warned already
            pass
        finally:
            os.close(fd)
