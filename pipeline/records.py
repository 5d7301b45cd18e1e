"""Per-shard completion records (OUT/.records/<d>/<d>-<g>.json): what makes a shard done.

A record is written after its shard is renamed into place and holds the shard's inputs (path,
size, listing signature), the sha256 of each input's bytes, the samples stored, the inputs
rejected or found duplicate, and the shard's size and sha256. A rerun skips a shard whose record
matches the current inputs and the file on disk (its size; its sha256 too with --recheck), so a
run killed at any point resumes. Inputs whose signature changed are hashed; when their content
is the same, the record is written again with the new signatures, so they are hashed only once.

OUT may be a URL (pipeline.storage): records are then objects, uploaded after their shard, and
"the file on disk" is the shard's object, whose size the store reports.
"""

from __future__ import annotations

import json
import os
import stat

from pipeline import storage
from pipeline.atomic import write_json
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.layout import FORMAT_VERSION, record_path, shard_name
from pipeline.sources import Input, source_digest


RECORD_MODE = 0o600  # a record names its inputs, and an input URL may carry user:password@ or a signature
RECORDS_DIR_MODE = 0o700


def save_record(out: str, record: dict) -> None:
    """Write a shard's record, readable by this user only (shards and index.json stay 0644: they
    name inputs redacted, while a record keeps the full source a rerun compares against)."""
    path = record_path(out, record["domain"], record["number"])
    if not storage.is_url(path):
        _private_folders(os.path.dirname(os.path.dirname(path)), os.path.dirname(path))
    write_json(path, record, indent=None, mode=RECORD_MODE)


def _private_folders(*folders: str) -> None:
    """Make each folder (0700), and set an existing one of ours (an older run's, 0755) to 0700."""
    for folder in folders:
        os.makedirs(folder, RECORDS_DIR_MODE, exist_ok=True)
        st = os.stat(folder)
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != RECORDS_DIR_MODE:
            os.chmod(folder, RECORDS_DIR_MODE)


def load_record(out: str, domain: str, number: int) -> dict | None:
    try:
        record = json.loads(storage.read_bytes(record_path(out, domain, number)))
    except (OSError, ValueError):  # none yet, or cut short: the shard is written again
        return None
    # The record's url is written to and rewritten: only ever the shard it is named after.
    if not isinstance(record, dict) or record.get("url") != shard_name(domain, number):
        return None
    return record


def record_is_current(out: str, record: dict | None, fingerprint: str | None = None) -> bool:
    """A shard counts as done when its record matches the inputs and the file (or object) in OUT.
    Only the size is compared here (cheap); `shard_intact` compares the bytes."""
    if record is None or record.get("version") != FORMAT_VERSION:
        return False
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return False
    return storage.size(storage.join(out, record["url"])) == record["bytes"]


def shard_intact(out: str, record: dict) -> bool:
    """Whether the shard's bytes still hash to the record's sha256 (`make shards --recheck`): a
    same-size change (bit rot, a bad copy) passes `record_is_current` but not this."""
    path = storage.join(out, record["url"])
    try:
        digest = sha256_bytes(storage.read_bytes(path)) if storage.is_url(path) else sha256_file(path)
    except OSError:  # gone or unreadable since the size check: written again
        return False
    return digest == record.get("sha256")


def inputs_unchanged(record: dict, inputs: list[Input]) -> tuple[bool, int]:
    """(whether every input still has the content the record was made from, how many inputs were
    read and hashed to tell). An input whose listing signature (size, mtime, ctime, inode) matches
    is unchanged without reading it; any other (a regenerated file, a URL without listing metadata)
    is hashed again. An input the listing found missing (size -1: a broken link, a list file's
    path that is not there, an unlistable folder) has no bytes to read: it is unchanged when the
    record has no digest for it either, and not counted as hashed, since the writer rejects it
    without reading a byte (counting it would report it hashed on every rerun, forever)."""
    recorded, digests = record.get("inputs", []), record.get("digests", [])
    if len(recorded) != len(inputs) or len(digests) != len(inputs):
        return False, 0
    hashed = 0
    for item, old, digest in zip(inputs, recorded, digests):
        if item.sig is not None and len(old) > 2 and old[2] == item.sig:
            continue
        if item.size == -1:
            if digest is not None:  # it had content when the shard was made: gone since
                return False, hashed
            continue
        hashed += 1
        if source_digest(item.path, record["limits"]["max_file_bytes"]) != digest:
            return False, hashed
    return True, hashed


def refresh_signatures(out: str, record: dict, inputs: list[Input]) -> bool:
    """After `inputs_unchanged` found the content the same, write the record again (atomically)
    with the inputs' current signatures, when any differs from the recorded one: else a
    metadata-only change (chmod -R, touch, a copy to a new disk) would have every later rerun
    read and hash those inputs again. Whether the record was rewritten."""
    current = [[i.path, i.size, i.sig] for i in inputs]
    if current == [list(i) for i in record["inputs"]]:
        return False
    save_record(out, dict(record, inputs=current))
    return True
