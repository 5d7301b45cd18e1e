"""Atomic file writes: the one way this project writes a file that another process reads.

Shards, indexes, manifests, checkpoint metadata, exports, reports: each is written under a
temporary name beside its final one and renamed into place, so a reader (or a crash) sees the
old file or the new one, never half of one. Durable writes also fsync the file before the rename
and the folder after it, so the rename survives a power cut.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

MODE = 0o644  # read by other users and servers (mkstemp would leave 0600)
# `.<name>.<random>.tmp`: what a write left behind if it was killed before the rename.
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


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


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int = MODE, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error the file there
    is fsynced (if `durable`), given `mode` and renamed to `path`. On an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = MODE, durable: bool = True) -> Path:
    with replacing(path, mode, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, mode: int = MODE, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode, durable)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, mode: int = MODE,
               durable: bool = True) -> Path:
    """`obj` as JSON with sorted keys (stable bytes for equal objects)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True), mode, durable)
