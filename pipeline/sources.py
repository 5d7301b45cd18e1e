"""Input listing for `make shards`: a folder, a text list file or a Parquet file of paths.

A source is one of:
- a folder (local or fsspec URL), walked recursively in sorted order; every regular file
  whose name does not start with a dot is an input (images are recognised by content
  later, whatever their extension; non-images are quarantined, not silently skipped);
- a `.parquet` file with a `path` column;
- any other file: a text list, one path per line (blank lines and lines starting with
  `#` are ignored; relative paths are relative to the list file's folder).
Paths may be local or fsspec URLs (s3://, gs://, http(s)://, ...).

Listings are streamed in a deterministic order, so the same source always yields the
same sequence of inputs: `make shards` derives shard numbers from that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

# Size assumed for a listed remote file whose size would cost a request to learn; it only
# steers how inputs are grouped into shards, so it must be a constant (deterministic).
UNKNOWN_SIZE = 256 * 1024


class SourceError(Exception):
    """A source that cannot be listed at all (missing, wrong format)."""


@dataclass(frozen=True)
class Input:
    path: str  # absolute local path or URL, as recorded in the manifest
    size: int  # bytes on disk (UNKNOWN_SIZE when unknown without a request); -1 if missing


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def list_inputs(source: str) -> Iterator[Input]:
    """Stream the inputs of one source in deterministic order; raise SourceError if unusable."""
    if is_url(source):
        yield from _list_url(source)
        return
    path = os.path.abspath(_local(source))
    if os.path.isdir(path):
        yield from _walk_local(path)
    elif os.path.isfile(path):
        if path.endswith(".parquet"):
            yield from _from_paths(_parquet_paths(path, open), os.path.dirname(path))
        else:
            yield from _from_paths(_text_paths(path, open), os.path.dirname(path))
    else:
        raise SourceError(f"{source}: no such file or folder")


def _walk_local(root: str) -> Iterator[Input]:
    # Manual sorted walk with scandir: one folder's names in memory at a time, and sizes
    # come with the directory entries (no extra stat on most filesystems).
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"{root}: cannot list folder: {e.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=True):
                yield from _walk_local(entry.path)
            elif entry.is_file(follow_symlinks=True):
                yield Input(entry.path, entry.stat(follow_symlinks=True).st_size)
        except OSError:
            yield Input(entry.path, -1)


def _text_paths(path: str, opener) -> Iterator[str]:
    try:
        with opener(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    yield line.strip()
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not a UTF-8 text list of paths (nor a folder or .parquet file)") from None


def _parquet_paths(path: str, opener) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        with opener(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if "path" not in pf.schema_arrow.names:
                raise SourceError(f"{path}: Parquet file has no 'path' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["path"], batch_size=65536):
                for p in batch.column(0).to_pylist():
                    if p:
                        yield str(p)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise SourceError(f"{path}: unreadable Parquet file: {e}") from None


def _from_paths(paths: Iterator[str], base: str) -> Iterator[Input]:
    for p in paths:
        if is_url(p):
            yield Input(p, UNKNOWN_SIZE)
            continue
        p = _local(p)
        full = p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
        try:
            yield Input(full, os.stat(full).st_size)
        except OSError:
            yield Input(full, -1)


def _list_url(source: str) -> Iterator[Input]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source)
        if fs.isdir(root):
            found = fs.find(root, detail=True)
            for name in sorted(found):
                info = found[name]
                if info.get("type") == "file" and not os.path.basename(name).startswith("."):
                    yield Input(fs.unstrip_protocol(name), int(info.get("size") or 0))
            return
        if not fs.isfile(root):
            raise SourceError(f"{source}: no such file or folder")
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own error types
        raise SourceError(f"{source}: cannot list: {e}") from None
    base = source.rsplit("/", 1)[0]
    opener = lambda p, mode: fsspec.open(source, mode)  # noqa: E731
    paths = _parquet_paths(source, opener) if source.endswith(".parquet") else _text_paths(source, opener)
    for p in paths:
        if is_url(p) or os.path.isabs(p):
            yield Input(p, UNKNOWN_SIZE if is_url(p) else _stat_size(p))
        else:
            yield Input(f"{base}/{p}", UNKNOWN_SIZE)


def _stat_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def read_bytes(path: str) -> bytes:
    """The raw bytes of one input (local path or fsspec URL)."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()
