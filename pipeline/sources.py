"""Input listing for `make shards`: a folder, a text list file or a Parquet file of paths.

A source is one of:
- a folder (local or fsspec URL), walked recursively in sorted order; every entry that is
  not a folder and whose name does not start with a dot is an input (images are recognised
  by content later, whatever their extension; non-images, FIFOs, devices and broken links
  are quarantined by the writer, not silently skipped). Symbolic links are followed, but
  each folder and each file is visited once, by identity (device, inode): a link loop ends
  where it closes, and a file reached by two paths is one input (the first in walk order).
  Folders passed as `skip_dirs` (the writer's own OUT) are not walked;
- a `.parquet` file with a `path` column;
- any other file: a text list, one path per line (blank lines and lines starting with
  `#` are ignored; relative paths are relative to the list file's folder).
Paths may be local or fsspec URLs (s3://, gs://, http(s)://, ...).

Listings are streamed in a deterministic order, so the same source always yields the
same sequence of inputs: `make shards` derives shard numbers from that order.

Reading (`read_source`) takes regular files only, up to a size cap, so a FIFO, a device
such as /dev/zero or a huge file is rejected without blocking or filling memory (a broken
link as "not a regular file: a broken link"). Each input carries a signature (size, mtime,
ctime and inode, or the remote listing's metadata) so a re-run can tell cheaply whether a
source may have changed; when it may have, the content hash (`source_digest`) decides. A URL
whose listing has no such metadata (an http(s) folder, a list file's URLs) has no signature
and is hashed on every re-run, and its size, unknown, counts as UNKNOWN_SIZE for grouping.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import stat
import urllib.parse
from dataclasses import dataclass
from typing import Iterator

from pipeline import storage
from pipeline.hashing import sha256_bytes
from pipeline.images import Rejected

# Size assumed for a listed remote file whose size would cost a request to learn; it only
# steers how inputs are grouped into shards, so it must be a constant (deterministic).
UNKNOWN_SIZE = 256 * 1024


class SourceError(Exception):
    """A source that cannot be listed at all (missing, wrong format)."""


@dataclass(frozen=True)
class Input:
    path: str  # absolute local path or URL, as recorded in the manifest
    size: int  # bytes on disk (UNKNOWN_SIZE when unknown without a request); -1 if missing
    sig: str | None = None  # metadata signature when the listing had it (see stat_signature)


def source_exists(source: str) -> bool:
    """Whether a source (folder, list file or URL) names something that exists; SourceError
    ("cannot reach: ...") when the store behind a URL cannot be asked."""
    if not storage.is_url(source):
        return os.path.exists(storage.local_path(source))
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
        return fs.exists(path)
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own error types
        raise SourceError(f"cannot reach: {e}") from None


def folder_inside(source: str, root: str) -> bool:
    """Whether `source` is a local folder that is `root` or lies inside it (links resolved)."""
    if storage.is_url(source):
        return False
    path, root = os.path.realpath(storage.local_path(source)), os.path.realpath(root)
    return os.path.isdir(path) and os.path.commonpath([path, root]) == root


def stat_signature(st: os.stat_result) -> str:
    """What changes whenever a local file's content may have: ctime and inode cannot be set
    back by a user (cp -p or touch keep the mtime, not the ctime)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _info_signature(info: dict) -> str | None:
    """A remote listing entry's signature, or None when the entry says nothing that changes with
    the content. Listings carry ETag / generation / mtime fields that differ per backend: any
    change of them counts (a false alarm only costs a content hash). An entry with a name, a
    type and at most a size (an http(s) folder's listing: no size, no date) cannot tell a
    replaced file from the old one, so it gets no signature and a rerun hashes the file."""
    fields = {k: v for k, v in info.items() if k != "name"}
    if all(v is None for k, v in fields.items() if k not in ("type", "size")):
        return None
    return "remote:" + hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def list_inputs(source: str, skip_dirs: tuple[str, ...] = ()) -> Iterator[Input]:
    """Stream the inputs of one source in deterministic order; raise SourceError if unusable.
    Local folders in `skip_dirs` (and everything below them) are left out of a folder walk."""
    if storage.is_url(source):
        yield from _list_url(source)
        return
    path = os.path.abspath(storage.local_path(source))
    if os.path.isdir(path):
        seen = set()
        for d in skip_dirs:
            try:
                st = os.stat(d)
                seen.add((st.st_dev, st.st_ino))
            except OSError:
                pass
        yield from _walk_local(path, seen)
    elif os.path.isfile(path):
        if path.endswith(".parquet"):
            yield from _from_paths(_parquet_paths(path, open), os.path.dirname(path))
        else:
            yield from _from_paths(_text_paths(path, open), os.path.dirname(path))
    else:
        raise SourceError(f"{source}: no such file or folder")


def _walk_local(root: str, seen: set) -> Iterator[Input]:
    """Sorted walk with scandir (one folder's names in memory at a time). `seen` holds the
    (device, inode) of every folder and file visited so far: links are followed, but a
    folder or file already reached by another path (a loop, a second link) is not again."""
    try:
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"{root}: cannot list folder: {e.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            est = entry.stat(follow_symlinks=True)
        except OSError:
            yield Input(entry.path, -1)  # a broken link: the writer quarantines it
            continue
        if stat.S_ISDIR(est.st_mode):
            try:
                yield from _walk_local(entry.path, seen)
            except SourceError:
                yield Input(entry.path, -1)  # an unlistable subfolder: reported, not fatal
            continue
        ident = (est.st_dev, est.st_ino)
        if ident in seen:
            continue  # the same file under another path: one input
        seen.add(ident)
        yield Input(entry.path, est.st_size, stat_signature(est))


def _text_paths(path: str, opener) -> Iterator[str]:
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f):
                # utf-8-sig on the first line: a list saved by Notepad or Excel starts with a
                # byte-order mark, which would otherwise become part of the first path
                line = raw.decode("utf-8-sig" if n == 0 else "utf-8").rstrip("\r\n")
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
        if storage.is_url(p):
            yield Input(p, UNKNOWN_SIZE)
            continue
        p = storage.local_path(p)
        full = p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
        try:
            st = os.stat(full)  # stat never opens: a FIFO or device named here cannot block
        except OSError:
            yield Input(full, -1)
            continue
        yield Input(full, st.st_size, stat_signature(st))


def _list_url(source: str) -> Iterator[Input]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source)
        if fs.isdir(root):
            found = fs.find(root, detail=True)
            for name in sorted(found):
                info = found[name]
                # dot-names skipped, folders too, as the local walk skips them
                rel = name[len(root):] if name.startswith(root) else os.path.basename(name)
                if info.get("type") == "file" and not any(c.startswith(".") for c in rel.split("/")):
                    # A listing without sizes (http) groups as a text list's URLs do: by a
                    # constant, so --shard-size-mb still cuts the domain into shards.
                    size = info.get("size")
                    yield Input(fs.unstrip_protocol(name), UNKNOWN_SIZE if size is None else int(size),
                                _info_signature(info))
            return
        if not fs.isfile(root):
            raise SourceError(f"{source}: no such file or folder")
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own error types
        raise SourceError(f"{source}: cannot list: {e}") from None
    opener = lambda p, mode: fsspec.open(source, mode)  # noqa: E731
    paths = _parquet_paths(source, opener) if source.endswith(".parquet") else _text_paths(source, opener)
    for p in paths:
        if storage.is_url(p):
            yield Input(p, UNKNOWN_SIZE)
        elif os.path.isabs(p):
            yield from _from_paths(iter([p]), "/")
        else:
            yield Input(_beside(source, p), UNKNOWN_SIZE)


def _beside(list_url: str, entry: str) -> str:
    """The URL of a list's relative `entry`, resolved against the list's folder and normalised
    ("./x.jpg", "../images/x.png"), as a local list's entries are: an object store has no "."
    or ".." keys. An entry climbing above the bucket (or host) root is refused."""
    u = storage.split_url(list_url)
    # normalised without the leading "/": posixpath would silently drop ".." at the root
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(u.path).lstrip("/"), entry))
    if rel == ".." or rel.startswith("../"):
        raise SourceError(f"{storage.redact(list_url)}: entry {entry!r} climbs above the root of "
                          f"{u.scheme}://{u.hostname or ''}")
    return urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + rel, "", ""))


# ----------------------------------------------------------------------------- reading


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file's names: 'a FIFO (named pipe)', 'a folder', ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise Rejected(f"not a regular file: {file_kind(mode)}")


def _stat_input(path: str) -> os.stat_result:
    """stat() of a local input, following links. A link whose target is missing, or a link loop,
    is not a regular file (the README's reason for it), unlike a path that is not there at all."""
    try:
        return os.stat(path)
    except OSError as e:
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            is_link = False
        if is_link and e.errno == errno.ENOENT:
            raise Rejected("not a regular file: a broken link") from None
        if is_link and e.errno == errno.ELOOP:
            raise Rejected("not a regular file: a symbolic link loop") from None
        raise


def _too_large(size: int, max_bytes: int) -> Rejected:
    return Rejected(f"too large: {size} bytes > {max_bytes} bytes (--max-file-mb)")


def read_source(path: str, max_bytes: int) -> bytes:
    """The raw bytes of one input (local path or fsspec URL). Only a regular file of at most
    `max_bytes` is read; anything else raises `Rejected` with the reason, before a byte is read."""
    if storage.is_url(path):
        return _read_url(path, max_bytes)
    path = storage.local_path(path)
    try:
        _check_regular(_stat_input(path).st_mode)  # before open(): opening a FIFO blocks for a writer
        # O_NONBLOCK: should the path become a FIFO between stat and open, open still returns.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            _check_regular(st.st_mode)
            if st.st_size > max_bytes:
                raise _too_large(st.st_size, max_bytes)
            data = f.read(st.st_size)
            if f.read(1):  # grew since fstat (or a /proc-like file that reports size 0)
                raise Rejected(f"unreadable: the file changed size while being read ({st.st_size} bytes at open)")
    except FileNotFoundError:
        raise Rejected("unreadable: no such file") from None
    except OSError as e:  # permissions, I/O errors: this input only
        raise Rejected(f"unreadable: {type(e).__name__}: {e}") from None
    return data


def _read_url(url: str, max_bytes: int) -> bytes:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if size is not None and size > max_bytes:
                raise _too_large(size, max_bytes)
            data = f.read(max_bytes + 1)
    except Rejected:
        raise
    except FileNotFoundError:
        raise Rejected("unreadable: no such file") from None
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own error types
        # The reason is written to the quarantine: no signed query or password the error quotes.
        raise Rejected(f"unreadable: {type(e).__name__}: {storage.error_text(e, url)}") from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def source_digest(path: str, max_bytes: int) -> str | None:
    """sha256 of what `read_source` would read now; None when it would reject the input."""
    try:
        data = read_source(path, max_bytes)
    except Rejected:
        return None
    return sha256_bytes(data)
