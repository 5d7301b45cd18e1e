"""Writing shards: one group of inputs validated into one WebDataset tar and its completion
record, in this process or in a bounded pool of worker processes.

A sample is `<key>.<ext>` (the stored image bytes) then `<key>.json` (source, size, sha256,
domain, format), adjacent in the tar. The tar is written under a temporary name and renamed
into place (pipeline.atomic), its sha256 computed while it streams out; members carry fixed
metadata, so equal inputs give equal shard bytes. For a URL OUT the tar is written to a local
temporary file and uploaded in one go when complete, and its record only after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue as queue_mod
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from pipeline import storage
from pipeline.atomic import replacing
from pipeline.hashing import sha256_bytes
from pipeline.images import Checked, Rejected, check_image
from pipeline.layout import FORMAT_VERSION, ShardsError, record_path, sample_key, shard_name, valid_text
from pipeline.records import save_record
from pipeline.sources import read_source

TAR_MTIME = 1577836800  # fixed member mtime (2020-01-01) so equal inputs give equal shard bytes
PROGRESS_EVERY = 64  # inputs between progress reports (a worker's reports cross a process queue)

Progress = Callable[[str, int], None]  # (domain, inputs done since the last call)


# ----------------------------------------------------------------------------- tar files


def tar_header(name: str, size: int) -> bytes:
    """A ustar member header, byte-identical to tarfile's for our fixed metadata (and faster)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    head = (raw.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size
            + b"%011o\0" % TAR_MTIME)
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 155)
    chksum = sum(head) + sum(tail) + 8 * 32
    return (head + b"%06o\0 " % chksum + tail).ljust(512, b"\0")


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """Write (name, bytes) members to `path` via a temporary name; return (bytes, sha256)."""
    # Two writers of one shard (e.g. an orphaned worker of a killed run) each get their own
    # temporary name; both write the same bytes, so whichever rename lands last is right.
    h, n = hashlib.sha256(), 0
    with replacing(path) as tmp, open(tmp, "wb") as f:
        def put(b: bytes) -> None:
            nonlocal n
            h.update(b)
            f.write(b)
            n += len(b)

        for name, data in members:
            put(tar_header(name, len(data)))
            put(data)
            if len(data) % 512:
                put(b"\0" * (512 - len(data) % 512))
        put(b"\0" * (1024 + (-(n + 1024)) % (20 * 512)))  # two zero blocks, padded to a 10 KiB record
    return n, h.hexdigest()


# ----------------------------------------------------------------------------- one shard


@dataclass
class _Found:
    """What validating one group's inputs found, in input order."""

    samples: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    digests: list[str | None] = field(default_factory=list)  # of each input's bytes: what a rerun compares
    seen: set[str] = field(default_factory=set)  # sha256 of the stored images
    keys: set[str] = field(default_factory=set)
    pending: int = 0  # inputs not reported to the progress bar yet


def write_shard(out: str, domain: str, number: int, inputs: list[tuple[str, int, str | None]], fingerprint: str,
                limits: dict, progress: Progress | None = None) -> dict:
    """Validate one group's inputs (path, size, signature) into shard `number` and its record;
    return the record. `limits`: min_side, max_pixels, max_file_bytes (Settings.limits())."""
    report = progress or _report
    found = _Found()
    url = shard_name(domain, number)
    nbytes, sha = write_tar(storage.join(out, url), _members(domain, inputs, limits, found, report))
    report(domain, found.pending)
    record = {"version": FORMAT_VERSION, "domain": domain, "number": number, "url": url,
              "fingerprint": fingerprint, "limits": limits, "inputs": [list(i) for i in inputs],
              "digests": found.digests, "nsamples": len(found.samples), "bytes": nbytes, "sha256": sha,
              "samples": found.samples, "rejected": found.rejected, "duplicates": found.duplicates}
    save_record(out, record)
    return record


def shown_source(source: str) -> str:
    """What the shard, its record and the reports name for `source`: a presigned URL's query and a
    user:password@ are credentials, left out; a name that is not UTF-8 is shown as \\xNN."""
    return valid_text(storage.redact(source))


def _members(domain: str, inputs, limits: dict, found: _Found, report: Progress) -> Iterator[tuple[str, bytes]]:
    """The tar members of a group's storable inputs; every input's fate is noted in `found`."""
    for source, *_ in inputs:
        found.pending += 1
        if found.pending >= PROGRESS_EVERY:
            report(domain, found.pending)
            found.pending = 0
        shown = shown_source(source)  # the key still comes from the full source
        img = _read_checked(source, shown, limits, found)
        if img is None:
            continue
        sha = sha256_bytes(img.data)
        if sha in found.seen:
            found.duplicates.append({"source": shown, "sha256": sha})
            continue
        key = sample_key(domain, source)
        if key in found.keys:  # the same path listed twice, and its bytes changed in between
            found.rejected.append({"source": shown, "reason": f"duplicate of {key} (same source listed twice)"})
            continue
        found.seen.add(sha)
        found.keys.add(key)
        meta = {"source": shown, "width": img.width, "height": img.height, "sha256": sha,
                "domain": domain, "format": img.format}
        yield f"{key}.{img.ext}", img.data
        yield f"{key}.json", json.dumps(meta, sort_keys=True).encode()
        found.samples.append({"key": key, "source": shown, "sha256": sha, "bytes": len(img.data),
                              "width": img.width, "height": img.height, "format": img.format, "ext": img.ext})


def _read_checked(source: str, shown: str, limits: dict, found: _Found) -> Checked | None:
    """The validated image of one input, or None with the reason noted in `found` (as `shown`)."""
    try:
        raw = read_source(source, limits["max_file_bytes"])
    except Rejected as r:  # missing, not a regular file, too large, I/O error
        found.digests.append(None)
        found.rejected.append({"source": shown, "reason": r.reason})
        return None
    found.digests.append(sha256_bytes(raw))
    try:
        return check_image(raw, limits["min_side"], limits["max_pixels"])
    except Rejected as r:
        found.rejected.append({"source": shown, "reason": r.reason})
        return None


def rewrite_shard(record: dict, out: str, remove: set[str]) -> dict:
    """Drop the samples whose key is in `remove` from a shard; return the updated record."""
    path = storage.join(out, record["url"])

    def members():
        # An object is read whole: the kept members are held in memory below anyway.
        with (tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path)), mode="r:") if storage.is_url(path)
              else tarfile.open(path, "r:")) as tar:
            for m in tar:
                if not m.isfile():  # not one of ours: the shard was changed after its record
                    raise ShardsError(f"{storage.redact(path)}: member {m.name!r} is not a regular file; "
                                      f"delete the shard and re-run to write it again")
                if m.name.split(".", 1)[0] not in remove:
                    yield m.name, tar.extractfile(m).read()

    # Build the new shard fully (under its temporary name) before replacing either file.
    kept = [s for s in record["samples"] if s["key"] not in remove]
    dropped = [s for s in record["samples"] if s["key"] in remove]
    new_members = list(members())
    # The old record goes before the new tar replaces the old one: the tar is padded to 10 KiB,
    # so the old record could still match its size (record_is_current compares only that) and a
    # kill between the two writes would leave it "done" listing a sample the tar lacks. With no
    # record, the next run writes this shard again from its inputs.
    storage.remove(record_path(out, record["domain"], record["number"]))
    nbytes, sha = write_tar(path, new_members)
    # The duplicates in input order: a merge drops a shard's duplicates in two passes (its part's
    # finalize, then the merge), a single run in one, and the quarantine must list them alike
    position = {shown_source(p): i for i, (p, *_) in reversed(list(enumerate(record["inputs"])))}
    duplicates = sorted(record["duplicates"] + [{"source": s["source"], "sha256": s["sha256"]} for s in dropped],
                        key=lambda d: position.get(d["source"], len(position)))
    record = dict(record, samples=kept, nsamples=len(kept), bytes=nbytes, sha256=sha, duplicates=duplicates)
    save_record(out, record)
    return record


# ----------------------------------------------------------------------------- the pool


_progress_queue = None  # in a worker process: where its progress reports go


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q


def _report(domain: str, n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put((domain, n))


def _write_shard_task(*args) -> None:
    """Pool entry point: the record stays on disk instead of travelling back through a pipe."""
    write_shard(*args)


class ShardPool:
    """Writes shards in this process (workers == 1) or in a bounded process pool; progress
    goes to one tqdm bar per domain."""

    def __init__(self, workers: int, bars: dict):
        self.workers, self.bars, self.running = workers, bars, set()
        self.executor = self.progress = None
        if workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # no fork: the parent may hold pyarrow/fsspec threads
            self.progress = ctx.Queue()
            self.executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(self.progress,))

    def submit(self, task: tuple) -> None:
        """`task`: write_shard's arguments up to `limits`."""
        if self.executor is None:
            write_shard(*task, progress=lambda d, n: self.bars[d].update(n))
            return
        while len(self.running) >= 2 * self.workers:  # bounded queue: stream, never list everything
            self.drain(0.2)
        self.running.add(self.executor.submit(_write_shard_task, *task))

    def drain(self, block: float) -> None:
        done, _ = wait(self.running, timeout=block, return_when=FIRST_COMPLETED)
        for fut in done:
            self.running.discard(fut)
            fut.result()  # re-raise a worker's failure here
        while self.progress is not None:
            try:
                d, n = self.progress.get_nowait()
            except queue_mod.Empty:
                break
            self.bars[d].update(n)

    def finish(self) -> None:
        while self.running:
            self.drain(0.2)
        if self.progress is not None:
            time.sleep(0.05)
            self.drain(0)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
