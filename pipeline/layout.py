"""What lives where in a `make shards` OUT folder, how its parts are named, and the errors and
exit statuses of the commands that write it (see docs/contracts.md, Shards).

    OUT/a/a-000000.tar ...            shards, distinct basenames per domain
    OUT/index.json, manifest.parquet, quarantine.parquet
    OUT/.records/<d>/<d>-<g>.json     per-shard completion records
    OUT/.lock                         one writer per OUT
    OUT/parts/<i>-of-<N>/             a --part run's own outputs until `merge`

OUT may be a local folder or an fsspec URL (s3://bucket/prefix, ...): every name here is joined
with pipeline.storage.join, so one code path serves both.
"""

from __future__ import annotations

import glob
import hashlib
import os

from pipeline import storage
from pipeline.atomic import TEMP_NAME, private_dir, staging_dir

DOMAINS = ("a", "b")  # the two image domains, in the order every output lists them
FORMAT_VERSION = 2  # of records and group fingerprints (2: content checks, upright and 8-bit storage)
RECORDS_DIR = ".records"
PARTS_DIR = "parts"
LOCK_NAME = ".lock"
INDEX_NAME, MANIFEST_NAME, QUARANTINE_NAME = "index.json", "manifest.parquet", "quarantine.parquet"
EXIT_OK, EXIT_FAIL, EXIT_LOCKED, EXIT_QUARANTINED = 0, 1, 2, 3


class ShardsError(Exception):
    """A failure that stops the command; its message is the one-line reason."""

    exit_status = EXIT_FAIL


class LockedError(ShardsError):
    """OUT (or the part) is being written by another process."""

    exit_status = EXIT_LOCKED


def shard_name(domain: str, number: int) -> str:
    """Shard `number` of `domain`, relative to OUT (as index.json names it)."""
    return f"{domain}/{domain}-{number:06d}.tar"


def out_root(out: str | os.PathLike) -> str:
    """OUT as every module joins it: a URL without its trailing '/', a local path (file:// too) as a path."""
    out = os.fspath(out)
    return out.rstrip("/") if storage.is_url(out) else storage.local_path(out)


def record_path(out: str, domain: str, number: int) -> str:
    return storage.join(out, RECORDS_DIR, domain, f"{domain}-{number:06d}.json")


def part_dir(out: str, part: int, nparts: int) -> str:
    """Where a `--part part/nparts` run keeps its own index, manifest, quarantine and lock."""
    return storage.join(out, PARTS_DIR, f"{part}-of-{nparts}")


def valid_text(name: str) -> str:
    """`name` as valid UTF-8 text. A file system name can hold bytes that are not UTF-8, which
    Python lists as lone surrogates (surrogateescape); the JSON, Parquet and logs that show a
    source name cannot hold those, so each such byte is written as \\xNN instead."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def sample_key(domain: str, source: str) -> str:
    """Deterministic key from the source path: hex only (no dots, any source name is fine)."""
    return hashlib.sha1(f"{domain}\0{source}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


def remove_temps(folder: str, name_glob: str) -> None:
    """Delete what writes of the files `name_glob` in `folder` left when killed before their
    rename (pipeline.atomic names a file's temporary `.<name>.<random>.tmp`; for a URL folder it
    lies in the folder's local staging_dir, never in the store)."""
    local = os.fspath(folder)
    if storage.is_url(folder):
        local = staging_dir(folder)
        if not os.path.lexists(local):
            return
        private_dir(local.parent)  # a folder another user planted is refused, not cleaned (atomic.private_dir)
        private_dir(local)
    for path in glob.glob(os.path.join(glob.escape(local), f".{name_glob}.*.tmp")):
        if TEMP_NAME.match(os.path.basename(path)):
            os.remove(path)
