"""Atomic file writes: the one way this project writes a file that another process reads.

Shards, indexes, manifests, checkpoint metadata, exports, reports: each is written under a
temporary name beside its final one and renamed into place, so a reader (or a crash) sees the
old file or the new one, never half of one. Durable writes also fsync the file before the rename
and the folder after it, so the rename survives a power cut.

A URL destination (s3://, gs://, memory://, ...: pipeline.storage) gets the object-store form of
the same guarantee: the file is written to a local temporary file and uploaded in one go when
complete, and an object store makes an object visible only when its upload completes. The local
temporaries for the URL folder F live in `staging_dir(F)` (made 0700; refused when another user
could have planted it: private_dir) under the same `.<name>.<random>.tmp` names, so what a killed
run left is found and removed as it is beside a local file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline import storage

MODE = 0o644  # read by other users and servers (mkstemp would leave 0600)
# `.<name>.<random>.tmp`: what a write left behind if it was killed before the rename.
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")
# The name part of a temporary is cut to this many bytes: a file system takes names of at most 255
# bytes (NAME_MAX), and the temporary adds 14 to the final name (".", ".<8 random>", ".tmp"), so a
# final name of 242-255 bytes (80 CJK characters and .png) could not be written otherwise. Names up
# to this long keep their whole name, which remove_temps's `.<name>.*.tmp` glob relies on.
TEMP_STEM_BYTES = 200


def temp_prefix(name: str) -> str:
    """mkstemp's prefix for a temporary of the file `name`: `.<name>.`, the name cut (at a
    character, never inside one) to TEMP_STEM_BYTES bytes."""
    cut = name[:TEMP_STEM_BYTES]
    while len(os.fsencode(cut)) > TEMP_STEM_BYTES:
        cut = cut[:-1]
    return f".{cut}."


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def staging_dir(folder_url: str) -> Path:
    """The local folder (this user's, under the temporary directory) where files bound for the URL
    folder `folder_url` are written before their upload; named by a hash of the URL, credentials
    and query left out."""
    key = hashlib.sha256(storage.canonical(folder_url).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"unit-upload-{os.getuid()}" / key


def private_dir(folder: str | os.PathLike) -> None:
    """Make `folder` (mode 0700; its parent must exist) unless it is there, and refuse it
    (PermissionError naming it) when it is a symbolic link, not a folder, not this user's, or writable by group or
    others. Our folders in the shared temporary directory have predictable names: another user
    could make one first and plant links in it (a lock opened there would overwrite their target)
    or swap a staged file before its upload."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)  # lstat: a link is judged itself, not by what it points to
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.getuid():
        problem = f"is owned by user id {st.st_uid}, not by this user ({os.getuid()})"
    elif st.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise PermissionError(f"{folder} {problem}: another user may have made it; refusing to use it "
                          f"(remove it, or set TMPDIR to a folder of your own)")


@contextlib.contextmanager
def _uploading(url: str) -> Iterator[Path]:
    """Yield a local temporary path; when the block ends without an error it is uploaded to `url`
    in one go (storage.put_file). The temporary is removed either way."""
    folder = staging_dir(storage.parent(url))
    private_dir(folder.parent)  # checked first: whoever owns it could swap the folder below
    private_dir(folder)
    name = posixpath.basename(storage.split_url(url).path)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        storage.put_file(str(tmp), url)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int = MODE, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error the file there
    is fsynced (if `durable`), given `mode` and renamed to `path`. On an error it is removed.
    A URL `path` yields a local temporary file that is uploaded to it instead (`mode` and
    `durable` are the store's business then)."""
    if storage.is_url(path):
        with _uploading(path) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = MODE, durable: bool = True) -> Path | str:
    """`data` into `path` (a URL is returned as given, a local path as a Path)."""
    with replacing(path, mode, durable) as tmp:
        tmp.write_bytes(data)
    return path if storage.is_url(path) else Path(path)


def write_text(path: str | os.PathLike, text: str, mode: int = MODE, durable: bool = True) -> Path | str:
    return write_bytes(path, text.encode("utf-8"), mode, durable)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, mode: int = MODE,
               durable: bool = True) -> Path | str:
    """`obj` as JSON with sorted keys (stable bytes for equal objects)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True), mode, durable)
