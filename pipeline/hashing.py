"""sha256 digests: of files (read in chunks), of bytes, and of JSON-able objects (canonical form)."""
from __future__ import annotations

import hashlib
import json
import os

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """The digest of `obj` as canonical JSON (sorted keys, no spaces): equal objects, equal digests."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))
