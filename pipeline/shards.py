"""`make shards`: two unpaired image domains into verified WebDataset tar shards.

    python -m pipeline.shards --src-a A --src-b B --out OUT [--workers N] [--shard-size-mb 256]
        [--max-per-shard N] [--min-side 16] [--max-pixels N] [--max-file-mb 256] [--part i/N]
    python -m pipeline.shards merge OUT      # combine the outputs of --part runs
    python -m pipeline.shards verify OUT     # re-read every shard against index.json + manifest

How a run stays deterministic and resumable:
- Each domain's inputs are listed in a deterministic order and cut into consecutive groups
  (at most --shard-size-mb of input bytes and --max-per-shard inputs each). Group g
  becomes shard g, so a shard's contents depend only on the listing, never on timing.
- A worker writes shard g to a temporary name, renames it into place, then writes the
  shard's record (OUT/.records/<d>/<d>-<g>.json: its inputs with their signatures and the
  sha256 of each input's bytes, samples, rejects, sha256). A rerun skips every shard whose
  record matches the current inputs (paths, sizes, and content: an input whose signature,
  i.e. size/mtime/ctime/inode, changed is hashed again and must hash the same) and the file
  on disk, and rewrites the others, so a run killed at any point completes with the same
  samples, and sources regenerated under the same names and sizes are not left stale.
- Finalising walks the records in shard order: exact duplicates (same stored bytes) of a
  sample in an earlier shard are removed from their shard (the shard is rewritten) and
  quarantined as "duplicate of <key>"; then manifest.parquet and quarantine.parquet are
  written, and index.json last (each to a temporary name, then renamed).
- `--part i/N` (0 <= i < N) processes the groups g with g % N == i, so parts write
  disjoint shard numbers, identical to those of a single run; each part writes its own
  view under OUT/parts/<i>-of-<N>/. `merge OUT` finalises all parts together (cross-part
  duplicates are removed from their shards and quarantined), giving exactly the result
  of a single run.
- index.json names each shard by a path relative to OUT. Readers open an entry only
  through `index_entry_url`, which refuses commands (`pipe:`), absolute paths, other
  schemes and anything resolving outside OUT: an index is data, never a command.
- One writer per OUT: a run holds an exclusive lock on OUT/.lock (merge too); a `--part`
  run holds it shared plus an exclusive lock on OUT/parts/<i>-of-<N>/.lock, so the parts
  of one job run side by side (several machines on a shared filesystem) but two writers
  of the same shards never do. The loser exits with status 2 naming the holder.
- OUT inside a source folder is left out of that folder's walk (the writer never reads its
  own shards back); a source folder that is OUT or lies inside it is refused.
Exit status: 0 every input stored, 3 some inputs quarantined, 2 OUT is in use by another
writer, 1 failure (one-line reason).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import io
import json
import os
import queue as queue_mod
import re
import socket
import stat
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from pipeline.images import Rejected, check_image, reason_category
from pipeline.sources import Input, SourceError, is_url, list_inputs, read_source, source_digest

FORMAT_VERSION = 2  # of records and group fingerprints (2: content checks, upright and 8-bit storage)
DOMAINS = ("a", "b")
RECORDS_DIR = ".records"
PARTS_DIR = "parts"
TAR_MTIME = 1577836800  # fixed member mtime (2020-01-01) so equal inputs give equal shard bytes
LOCK_NAME = ".lock"
EXIT_OK, EXIT_FAIL, EXIT_LOCKED, EXIT_QUARANTINED = 0, 1, 2, 3
INDEX_SCHEMES = ("file", "s3", "gs", "http", "https")  # what an index.json entry may name
MANIFEST_COLUMNS = ["key", "domain", "shard", "source", "sha256", "bytes", "width", "height", "format"]
QUARANTINE_COLUMNS = ["source", "domain", "reason"]


class ShardsError(Exception):
    """A failure that stops the command; its message is the one-line reason."""

    exit_status = EXIT_FAIL


class LockedError(ShardsError):
    """OUT (or the part) is being written by another process."""

    exit_status = EXIT_LOCKED


class IndexEntryError(ValueError):
    """An index.json entry that must not be opened (names the index, the entry and why)."""


@dataclass(frozen=True)
class Settings:
    min_side: int = 16
    max_pixels: int = 64_000_000
    shard_size: int = 256 * 1024 * 1024  # bytes of input per shard (approximate)
    max_per_shard: int | None = None
    max_file_bytes: int = 256 * 1024 * 1024  # larger inputs are quarantined unread

    def limits(self) -> dict:
        """What decides whether an input is stored (recorded with each shard)."""
        return {"min_side": self.min_side, "max_pixels": self.max_pixels, "max_file_bytes": self.max_file_bytes}


@dataclass
class Group:
    """The inputs that become one shard."""

    domain: str
    number: int
    inputs: list[Input]
    fingerprint: str = ""


# ----------------------------------------------------------------------------- naming


def shard_name(domain: str, number: int) -> str:
    return f"{domain}/{domain}-{number:06d}.tar"


def record_path(out: str, domain: str, number: int) -> str:
    return os.path.join(out, RECORDS_DIR, domain, f"{domain}-{number:06d}.json")


def sample_key(domain: str, source: str) -> str:
    """Deterministic key from the source path: hex only (no dots, any source name is fine)."""
    return hashlib.sha1(f"{domain}\0{source}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: "c:" is a drive


def index_entry_url(index_file: str, entry) -> str:
    """What to open for one shard entry of an index.json. Shard URLs in an index are data:
    a relative path that stays inside the index's folder once `..` and symbolic links are
    resolved (returned resolved), or a URL of INDEX_SCHEMES; a file: URL obeys the path rule.
    Never a command (`pipe:`, which only a user's own shard list may hold), an absolute path
    or any other scheme: those raise IndexEntryError naming the index, the entry and why."""
    def refuse(why: str) -> IndexEntryError:
        return IndexEntryError(f"{index_file}: shard entry {json.dumps(entry, default=str)[:300]} refused: {why}")

    url = entry.get("url") if isinstance(entry, dict) else None
    if not isinstance(url, str) or not url.strip() or "\0" in url:
        raise refuse("'url' must be a non-empty string without NUL bytes")
    m = _SCHEME.match(url)
    if m:
        scheme = m.group(1).lower()
        if scheme not in INDEX_SCHEMES:
            raise refuse(f"scheme {scheme!r} is not allowed in an index (only {', '.join(INDEX_SCHEMES)} URLs or "
                         f"relative paths; a pipe: command is run only when given directly as the shard list)")
        if scheme != "file":
            return url
        url = url[len("file://"):] if url.startswith("file://") else url[len(m.group(0)):]
    elif os.path.isabs(url):
        raise refuse("absolute path (an index names its shards relative to its own folder)")
    root = os.path.realpath(os.path.dirname(os.path.abspath(index_file)))
    target = os.path.realpath(os.path.join(root, url))
    if target == root or os.path.commonpath([root, target]) != root:
        raise refuse(f"resolves to {target}, outside the index's folder {root} (through '..', an absolute "
                     f"file: path or a symbolic link)")
    return target


# ----------------------------------------------------------------------------- planning


def plan_groups(domain: str, inputs, settings: Settings):
    """Cut a listing into consecutive groups; each carries a fingerprint of what makes it."""
    limit_n = settings.max_per_shard or sys.maxsize
    batch, size, number = [], 0, 0
    for item in inputs:
        s = max(item.size, 0)
        if batch and (size + s > settings.shard_size or len(batch) >= limit_n):
            yield _finish_group(domain, number, batch, settings)
            batch, size, number = [], 0, number + 1
        batch.append(item)
        size += s
    if batch:
        yield _finish_group(domain, number, batch, settings)


def _finish_group(domain: str, number: int, batch: list[Input], settings: Settings) -> Group:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, domain, number, settings.limits()], sort_keys=True).encode())
    for item in batch:
        h.update(f"\n{item.path}\0{item.size}".encode("utf-8", "surrogateescape"))
    return Group(domain, number, batch, h.hexdigest())


# ----------------------------------------------------------------------------- shard writing


def _tar_header(name: str, size: int) -> bytes:
    """A ustar member header, byte-identical to tarfile's for our fixed metadata (and faster)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    head = (raw.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size
            + b"%011o\0" % TAR_MTIME)
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 155)
    chksum = sum(head) + sum(tail) + 8 * 32
    return (head + b"%06o\0 " % chksum + tail).ljust(512, b"\0")


def _write_tar(path: str, members) -> tuple[int, str]:
    """Write (name, bytes) members to `path` via a temporary name; return (bytes, sha256)."""
    # The pid keeps two writers of one shard (e.g. an orphaned worker of a killed run) apart;
    # both write the same bytes, so whichever rename lands last is right.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    h, n = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        def put(b):
            nonlocal n
            h.update(b)
            f.write(b)
            n += len(b)

        for name, data in members:
            put(_tar_header(name, len(data)))
            put(data)
            if len(data) % 512:
                put(b"\0" * (512 - len(data) % 512))
        end = 1024 + (-(n + 1024)) % (20 * 512)  # two zero blocks, padded to a 10 KiB record
        put(b"\0" * end)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n, h.hexdigest()


_progress_queue = None


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q


def _report(domain: str, n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put((domain, n))


def write_shard(out: str, domain: str, number: int, inputs: list[tuple[str, int, str | None]], fingerprint: str,
                limits: dict, progress=None) -> dict:
    """Validate one group's inputs (path, size, signature) into shard `number` and its record;
    return the record. `limits`: min_side, max_pixels, max_file_bytes (Settings.limits())."""
    samples, rejected, duplicates, seen, keys, digests = [], [], [], set(), set(), []
    pending = 0

    def members():
        nonlocal pending
        for source, *_ in inputs:
            pending += 1
            if pending >= 64:
                (progress or _report)(domain, pending)
                pending = 0
            try:
                raw = read_source(source, limits["max_file_bytes"])
            except Rejected as r:  # missing, not a regular file, too large, I/O error
                digests.append(None)
                rejected.append({"source": source, "reason": r.reason})
                continue
            digests.append(hashlib.sha256(raw).hexdigest())  # what a re-run compares the source with
            try:
                img = check_image(raw, limits["min_side"], limits["max_pixels"])
            except Rejected as r:
                rejected.append({"source": source, "reason": r.reason})
                continue
            sha = hashlib.sha256(img.data).hexdigest()
            if sha in seen:
                duplicates.append({"source": source, "sha256": sha})
                continue
            key = sample_key(domain, source)
            if key in keys:  # the same path listed twice, and its bytes changed in between
                rejected.append({"source": source, "reason": f"duplicate of {key} (same source listed twice)"})
                continue
            seen.add(sha)
            keys.add(key)
            meta = {"source": source, "width": img.width, "height": img.height, "sha256": sha,
                    "domain": domain, "format": img.format}
            yield f"{key}.{img.ext}", img.data
            yield f"{key}.json", json.dumps(meta, sort_keys=True).encode()
            samples.append({"key": key, "source": source, "sha256": sha, "bytes": len(img.data),
                            "width": img.width, "height": img.height, "format": img.format, "ext": img.ext})

    url = shard_name(domain, number)
    os.makedirs(os.path.join(out, domain), exist_ok=True)
    nbytes, sha = _write_tar(os.path.join(out, url), members())
    (progress or _report)(domain, pending)
    record = {"version": FORMAT_VERSION, "domain": domain, "number": number, "url": url,
              "fingerprint": fingerprint, "limits": limits, "inputs": [list(i) for i in inputs],
              "digests": digests, "nsamples": len(samples), "bytes": nbytes, "sha256": sha,
              "samples": samples, "rejected": rejected, "duplicates": duplicates}
    _save_record(out, record)
    return record


def _write_shard_task(*args) -> None:
    """Pool entry point: the record stays on disk instead of travelling back through a pipe."""
    write_shard(*args)


def _save_record(out: str, record: dict) -> None:
    path = record_path(out, record["domain"], record["number"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomic(path, json.dumps(record).encode())


def load_record(out: str, domain: str, number: int) -> dict | None:
    try:
        with open(record_path(out, domain, number), "rb") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    # The record's url is written to and rewritten: only ever the shard it is named after.
    if not isinstance(record, dict) or record.get("url") != shard_name(domain, number):
        return None
    return record


def record_is_current(out: str, record: dict | None, fingerprint: str | None = None) -> bool:
    """A shard counts as done when its record matches the inputs and the file on disk."""
    if record is None or record.get("version") != FORMAT_VERSION:
        return False
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return False
    try:
        return os.path.getsize(os.path.join(out, record["url"])) == record["bytes"]
    except OSError:
        return False


def sources_unchanged(record: dict, inputs: list[Input]) -> bool:
    """Whether every input still has the content the record was made from. An input whose
    listing signature (size, mtime, ctime, inode) matches is unchanged without reading it;
    any other (a regenerated file, a URL without listing metadata) is hashed again."""
    recorded, digests = record.get("inputs", []), record.get("digests", [])
    if len(recorded) != len(inputs) or len(digests) != len(inputs):
        return False
    for item, old, digest in zip(inputs, recorded, digests):
        if item.sig is not None and len(old) > 2 and old[2] == item.sig:
            continue
        if source_digest(item.path, record["limits"]["max_file_bytes"]) != digest:
            return False
    return True


def _rewrite(record: dict, out: str, remove: set[str]) -> dict:
    """Drop the samples whose key is in `remove` from a shard; return the updated record."""
    path = os.path.join(out, record["url"])

    def members():
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.name.split(".", 1)[0] not in remove:
                    yield m.name, tar.extractfile(m).read()

    # Build the new shard fully (under its temporary name) before replacing either file;
    # a crash between the two renames leaves a record/file mismatch, which the next run
    # repairs by rewriting that shard from its inputs.
    kept = [s for s in record["samples"] if s["key"] not in remove]
    dropped = [s for s in record["samples"] if s["key"] in remove]
    nbytes, sha = _write_tar(path, list(members()))
    record = dict(record, samples=kept, nsamples=len(kept), bytes=nbytes, sha256=sha,
                  duplicates=record["duplicates"] + [{"source": s["source"], "sha256": s["sha256"]} for s in dropped])
    _save_record(out, record)
    return record


# ----------------------------------------------------------------------------- finalising


@dataclass
class Totals:
    stored: Counter = field(default_factory=Counter)  # per domain
    shards: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # per reason category
    inputs: Counter = field(default_factory=Counter)  # per domain


def finalize(out: str, numbers: dict[str, list[int]], dest: str, index_extra: dict | None = None) -> Totals:
    """Dedupe the given shards in order and write manifest, quarantine and index (last) to `dest`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(dest, exist_ok=True)
    for stale in glob.glob(os.path.join(dest, ".*.parquet.tmp*")) + glob.glob(os.path.join(dest, "index.json.tmp*")):
        os.remove(stale)  # left by a run killed while finalising
    man_tmp = os.path.join(dest, f".manifest.parquet.tmp{os.getpid()}")
    quar_tmp = os.path.join(dest, f".quarantine.parquet.tmp{os.getpid()}")
    man_schema = pa.schema([("key", pa.string()), ("domain", pa.string()), ("shard", pa.string()),
                            ("source", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                            ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string())])
    quar_schema = pa.schema([("source", pa.string()), ("domain", pa.string()), ("reason", pa.string())])
    totals = Totals()
    shards = []
    with pq.ParquetWriter(man_tmp, man_schema) as man, pq.ParquetWriter(quar_tmp, quar_schema) as quar:
        for domain in DOMAINS:
            first: dict[bytes, str] = {}  # stored sha256 -> key of the sample kept (memory: ~100 B/sample)
            for number in numbers.get(domain, []):
                rec = load_record(out, domain, number)
                if not record_is_current(out, rec):
                    if rec is None or "inputs" not in rec:
                        raise ShardsError(f"shard {shard_name(domain, number)} is not complete (no record); "
                                          f"re-run the command (or the part) that writes it")
                    # The file and its record disagree (a crash mid-rewrite): rebuild from inputs.
                    rec = write_shard(out, domain, number, [tuple(i) for i in rec["inputs"]], rec["fingerprint"],
                                      rec["limits"], progress=lambda d, n: None)
                remove = set()
                for s in rec["samples"]:
                    digest = bytes.fromhex(s["sha256"])
                    if digest in first:
                        remove.add(s["key"])
                    else:
                        first[digest] = s["key"]
                if remove:
                    rec = _rewrite(rec, out, remove)
                rows = [dict((c, s[c]) for c in MANIFEST_COLUMNS if c in s) | {"domain": domain, "shard": rec["url"]}
                        for s in rec["samples"]]
                if rows:
                    man.write_table(pa.Table.from_pylist(rows, schema=man_schema))
                qrows = [{"source": r["source"], "domain": domain, "reason": r["reason"]} for r in rec["rejected"]]
                qrows += [{"source": d["source"], "domain": domain,
                           "reason": f"duplicate of {first[bytes.fromhex(d['sha256'])]}"} for d in rec["duplicates"]]
                if qrows:
                    quar.write_table(pa.Table.from_pylist(qrows, schema=quar_schema))
                for r in qrows:
                    totals.rejected[reason_category(r["reason"])] += 1
                totals.stored[domain] += rec["nsamples"]
                totals.shards[domain] += 1
                totals.bytes[domain] += rec["bytes"]
                totals.inputs[domain] += len(rec["inputs"])
                shards.append({"url": rec["url"], "domain": domain, "nsamples": rec["nsamples"],
                               "bytes": rec["bytes"], "sha256": rec["sha256"]})
    index = {"version": 1, "shards": shards,
             "totals": {d: {"shards": totals.shards[d], "samples": totals.stored[d], "bytes": totals.bytes[d]}
                        for d in DOMAINS}}
    index.update(index_extra or {})
    os.replace(man_tmp, os.path.join(dest, "manifest.parquet"))
    os.replace(quar_tmp, os.path.join(dest, "quarantine.parquet"))
    _write_atomic(os.path.join(dest, "index.json"), json.dumps(index, indent=1).encode())
    return totals


def _remove_stale(out: str, counts: dict[str, int]) -> None:
    """Delete shards, records and temporary files left from an older, longer plan or a crash."""
    for domain in DOMAINS:
        for pattern, sub in ((f"{domain}-*.tar", domain), (f"{domain}-*.json", os.path.join(RECORDS_DIR, domain))):
            for path in glob.glob(os.path.join(out, sub, pattern)):
                try:
                    number = int(os.path.basename(path).split("-")[1].split(".")[0])
                except ValueError:
                    continue
                if number >= counts.get(domain, 0):
                    os.remove(path)
        for path in (glob.glob(os.path.join(out, domain, f".{domain}-*.tar.tmp*"))
                     + glob.glob(os.path.join(out, RECORDS_DIR, domain, "*.json.tmp*"))):
            os.remove(path)


# ----------------------------------------------------------------------------- running


@dataclass
class RunArgs:
    src: dict[str, str]
    out: str
    workers: int = 1
    settings: Settings = field(default_factory=Settings)
    part: tuple[int, int] = (0, 1)
    progress: bool = True


def _check_out(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".probe{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ShardsError(f"cannot write to OUT {out}: {e.strerror or e}") from None


def _check_source(domain: str, src: str) -> None:
    if is_url(src):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(src)
            ok = fs.exists(path)
        except Exception as e:  # noqa: BLE001
            raise ShardsError(f"source {domain.upper()} {src}: cannot reach: {e}") from None
    else:
        ok = os.path.exists(src[7:] if src.startswith("file://") else src)
    if not ok:
        raise ShardsError(f"source {domain.upper()} {src}: no such file or folder")


def _check_not_inside_out(domain: str, src: str, out: str) -> None:
    """A source folder that is OUT, or lies inside it, would list the shards being written."""
    if is_url(src):
        return
    path = os.path.realpath(src[7:] if src.startswith("file://") else src)
    root = os.path.realpath(out)
    if os.path.isdir(path) and os.path.commonpath([path, root]) == root:
        raise ShardsError(f"source {domain.upper()} {src} is OUT {out} or inside it: the writer would read "
                          f"its own shards back as inputs; choose an OUT outside the sources")


# ----------------------------------------------------------------------------- one writer per OUT


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}, {info['what']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def writer_lock(path: str, what: str, shared: bool = False):
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


def _locks(out: str, part: tuple[int, int], stack: contextlib.ExitStack) -> None:
    """A whole run (and merge) owns OUT; the parts of one job share it, each owning its part."""
    i, n = part
    if n == 1:
        stack.enter_context(writer_lock(os.path.join(out, LOCK_NAME), "make shards"))
        return
    stack.enter_context(writer_lock(os.path.join(out, LOCK_NAME), f"make shards --part {i}/{n}", shared=True))
    stack.enter_context(writer_lock(os.path.join(out, PARTS_DIR, f"{i}-of-{n}", LOCK_NAME),
                                    f"make shards --part {i}/{n}"))


# ----------------------------------------------------------------------------- the run


def run(args: RunArgs) -> tuple[int, str]:
    """Write this run's (or part's) shards and outputs; return (exit status, summary)."""
    for d in DOMAINS:
        _check_source(d, args.src[d])
    _check_out(args.out)
    for d in DOMAINS:
        _check_not_inside_out(d, args.src[d], args.out)
    part, nparts = args.part
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        _locks(args.out, args.part, stack)
        counts, listing, mine, processed, skipped = _write_shards(args)
        if nparts == 1:
            _remove_stale(args.out, counts)
            totals = finalize(args.out, mine, args.out)
            where = args.out
        else:
            where = os.path.join(args.out, PARTS_DIR, f"{part}-of-{nparts}")
            totals = finalize(args.out, mine, where, {"part": part, "parts": nparts, "groups": counts,
                                                      "listing": listing})
    return _summarise(totals, time.time() - t0, processed, skipped, where, args.workers,
                      check_empty=(nparts == 1), part=(part, nparts) if nparts > 1 else None)


def _write_shards(args: RunArgs):
    """Plan both domains and write every group of this part whose shard is not current.
    Returns (groups per domain, listing hash per domain, this part's shard numbers,
    inputs processed, shards skipped)."""
    from tqdm import tqdm

    part, nparts = args.part
    counts, listing, mine = {}, {}, {}
    processed = skipped = 0
    # One bar per domain; both domains feed the same pool, so a domain with few shards
    # does not leave workers idle.
    bars = {d: tqdm(desc=f"domain {d}", unit="img", disable=not args.progress, mininterval=0.5, position=k)
            for k, d in enumerate(DOMAINS)}
    pool = _Pool(args.workers, bars)
    index_removed = False
    domain = DOMAINS[0]
    try:
        for domain in DOMAINS:
            listing_hash = hashlib.sha256()
            mine[domain], n_groups = [], 0
            inputs = list_inputs(args.src[domain], skip_dirs=(args.out,))
            for group in plan_groups(domain, inputs, args.settings):
                n_groups += 1
                listing_hash.update(group.fingerprint.encode())
                if group.number % nparts != part:
                    continue
                mine[domain].append(group.number)
                rec = load_record(args.out, domain, group.number)
                if record_is_current(args.out, rec, group.fingerprint) and sources_unchanged(rec, group.inputs):
                    skipped += 1
                    bars[domain].update(len(group.inputs))
                    continue
                if not index_removed:  # shards are about to change: the old index no longer holds
                    for p in (os.path.join(args.out, "index.json"),
                              os.path.join(args.out, PARTS_DIR, f"{part}-of-{nparts}", "index.json")):
                        if os.path.exists(p):
                            os.remove(p)
                    index_removed = True
                processed += len(group.inputs)
                pool.submit((args.out, domain, group.number, [(i.path, i.size, i.sig) for i in group.inputs],
                             group.fingerprint, args.settings.limits()))
            counts[domain], listing[domain] = n_groups, listing_hash.hexdigest()
        pool.finish()
    except SourceError as e:
        raise ShardsError(f"source {domain.upper()}: {e}") from None
    except OSError as e:  # e.g. OUT full or gone: no point going on
        raise ShardsError(f"writing shards failed: {e}") from None
    except BrokenProcessPool as e:
        raise ShardsError(f"a worker process died ({e}); re-run to resume") from None
    finally:
        for bar in bars.values():
            bar.close()
        pool.close()
    return counts, listing, mine, processed, skipped


class _Pool:
    """Writes shards in this process (workers == 1) or in a bounded process pool."""

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


def _summarise(t: Totals, dt: float, processed: int, skipped: int, where: str, workers: int,
               check_empty: bool, part=None) -> tuple[int, str]:
    n_in = sum(t.inputs.values())
    n_rej = sum(t.rejected.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t.rejected.items())) or "none"
    what = f"part {part[0]}/{part[1]}" if part else "shards"
    text = (f"{what}: stored {sum(t.stored.values())} of {n_in} inputs (a: {t.stored['a']}, b: {t.stored['b']}) "
            f"in {sum(t.shards.values())} shards (a: {t.shards['a']}, b: {t.shards['b']}), "
            f"{sum(t.bytes.values()) / 1e6:.1f} MB; rejected {n_rej} ({reasons}); "
            f"validated {processed} inputs in {dt:.2f} s ({processed / max(dt, 1e-9):.0f} images/s, "
            f"{workers} worker{'s' if workers > 1 else ''})"
            + (f", {skipped} shards already complete and skipped" if skipped else "")
            + f"; outputs in {where}" + (" (quarantine.parquet lists the rejects)" if n_rej else "") + ".")
    if check_empty:
        for d in DOMAINS:
            if t.stored[d] == 0:
                raise ShardsError(f"domain {d.upper()}: no valid image among {t.inputs[d]} inputs "
                                  f"(reasons in {os.path.join(where, 'quarantine.parquet')})")
    return (EXIT_QUARANTINED if n_rej else EXIT_OK), text


def merge(out: str) -> tuple[int, str]:
    """Finalise the outputs of all `--part i/N` runs in OUT into one index, manifest and quarantine."""
    t0 = time.time()
    if not os.path.isdir(out):
        raise ShardsError(f"{out}: no such folder")
    with writer_lock(os.path.join(out, LOCK_NAME), "make shards merge"):
        return _merge_locked(out, t0)


def _merge_locked(out: str, t0: float) -> tuple[int, str]:
    found = {}
    for path in sorted(glob.glob(os.path.join(out, PARTS_DIR, "*-of-*", "index.json"))):
        with open(path) as f:
            idx = json.load(f)
        found.setdefault(idx["parts"], {})[idx["part"]] = idx
    if not found:
        raise ShardsError(f"{out}: no finished part (no {PARTS_DIR}/<i>-of-<N>/index.json)")
    if len(found) > 1:
        raise ShardsError(f"{out}: parts from runs with different N: {sorted(found)}")
    (nparts, parts), = found.items()
    missing = sorted(set(range(nparts)) - set(parts))
    if missing:
        raise ShardsError(f"{out}: parts {missing} of {nparts} have not finished")
    first = parts[0]
    for i, idx in sorted(parts.items()):
        if idx["listing"] != first["listing"] or idx["groups"] != first["groups"]:
            raise ShardsError(f"{out}: part {i}/{nparts} listed different inputs than part 0 "
                              f"(sources changed between parts?); re-run it")
    counts = first["groups"]
    _remove_stale(out, counts)
    totals = finalize(out, {d: list(range(counts[d])) for d in DOMAINS}, out)
    return _summarise(totals, time.time() - t0, 0, 0, out, 1, check_empty=True)


# ----------------------------------------------------------------------------- verify


def verify(out: str) -> tuple[list[str], str]:
    """Re-read every shard; return (problems, summary). Each problem names its shard."""
    import pyarrow.parquet as pq

    index_file = os.path.join(out, "index.json")
    try:
        with open(index_file) as f:
            index = json.load(f)
        entries = [e for e in index["shards"] if isinstance(e, dict)]
        manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardsError(f"{out}: cannot read index.json / manifest.parquet: {e}") from None
    by_shard: dict[str, dict[str, dict]] = {}
    for row in manifest:
        by_shard.setdefault(row["shard"], {})[row["key"]] = row
    problems, nsamples, nbytes = [], 0, 0
    if len(entries) != len(index["shards"]):
        problems.append("index.json: a shard entry is not an object")
    listed = {str(e.get("url")) for e in entries}
    for url in sorted(set(by_shard) - listed):
        problems.append(f"{url}: in manifest.parquet but not in index.json")
    for d in DOMAINS:
        for path in sorted(glob.glob(os.path.join(out, d, "*.tar"))):
            if os.path.relpath(path, out) not in listed:
                problems.append(f"{os.path.relpath(path, out)}: shard file not in index.json")
    for entry in entries:
        try:
            data = _read_entry(index_file, entry)
        except ValueError as e:  # refused or unreadable: named, never opened blindly
            problems.append(str(e))
            continue
        bad, n = _check_shard(entry, data, by_shard.get(entry["url"], {}))
        if bad:
            problems.append(f"{entry['url']}: " + "; ".join(bad))
        nsamples += n
        nbytes += len(data)
    for d in DOMAINS:
        tot = index.get("totals", {}).get(d, {})
        n = sum(e.get("nsamples", 0) for e in entries if e.get("domain") == d)
        if tot.get("samples") != n:
            problems.append(f"index.json totals for {d}: {tot.get('samples')} samples, shards add up to {n}")
    summary = (f"verify: {len(entries)} shards, {nsamples} samples, {nbytes / 1e6:.1f} MB re-read; "
               f"{len(problems)} bad" + ("." if not problems else ": see above."))
    return problems, summary


def _read_entry(index_file: str, entry: dict) -> bytes:
    """The bytes of one index entry's shard (a local regular file inside OUT), else ValueError."""
    path = index_entry_url(index_file, entry)  # IndexEntryError is a ValueError
    url = entry["url"]
    if _SCHEME.match(path):
        raise ValueError(f"{url}: a remote shard; verify re-reads local shards only")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{url}: not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{url}: unreadable: {e.strerror}") from None


def _check_shard(entry: dict, data: bytes, rows: dict) -> tuple[list[str], int]:
    """What is wrong with one shard's bytes against index.json and the manifest, and its sample count."""
    bad = []
    if len(data) != entry.get("bytes"):
        bad.append(f"{len(data)} bytes, index.json says {entry.get('bytes')}")
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        bad.append("sha256 differs from index.json")
    try:
        samples = _read_samples(data)
    except (tarfile.TarError, ValueError) as e:
        return bad + [f"not a readable shard: {e}"], 0
    if len(samples) != entry.get("nsamples"):
        bad.append(f"{len(samples)} samples, index.json says {entry.get('nsamples')}")
    if set(samples) != set(rows):
        bad.append(f"keys differ from manifest.parquet ({len(samples)} in shard, {len(rows)} in manifest)")
    for key, (img, meta) in samples.items():
        sha = hashlib.sha256(img).hexdigest()
        if sha != meta.get("sha256") or (key in rows and sha != rows[key]["sha256"]):
            bad.append(f"sample {key}: image sha256 differs from its json/manifest")
            break
    return bad, len(samples)


def _read_samples(data: bytes) -> dict[str, tuple[bytes, dict]]:
    """key -> (image bytes, json meta); members of a sample must be adjacent."""
    out, cur, parts = {}, None, {}

    def close():
        if cur is None:
            return
        metas = [v for k, v in parts.items() if k == "json"]
        imgs = [v for k, v in parts.items() if k != "json"]
        if len(metas) != 1 or len(imgs) != 1:
            raise ValueError(f"sample {cur} has members {sorted(parts)}")
        out[cur] = (imgs[0], json.loads(metas[0]))

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if key != cur:
                close()
                if key in out:
                    raise ValueError(f"sample {key} members are not adjacent")
                cur, parts = key, {}
            parts[ext] = tar.extractfile(m).read()
        close()
    return out


# ----------------------------------------------------------------------------- CLI


def _parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must look like i/N, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need N >= 1 and 0 <= i < N")
    return i, n


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in (["verify"], ["merge"]):
            p = argparse.ArgumentParser(prog=f"python -m pipeline.shards {argv[0]}")
            p.add_argument("out", help="the OUT folder of make shards")
            a = p.parse_args(argv[1:])
            if argv[0] == "verify":
                problems, summary = verify(a.out)
                for line in problems:
                    print(f"BAD {line}", file=sys.stderr)
                print(summary)
                return EXIT_FAIL if problems else EXIT_OK
            status, summary = merge(a.out)
            print(summary)
            return status
        p = argparse.ArgumentParser(prog="python -m pipeline.shards",
                                    description="Two image domains into WebDataset shards "
                                                "(subcommands: verify OUT, merge OUT).")
        p.add_argument("--src-a", required=True, help="domain A: folder, text list of paths, or .parquet (path column)")
        p.add_argument("--src-b", required=True, help="domain B: same forms as --src-a")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--workers", type=_positive, default=1, help="worker processes (default 1)")
        p.add_argument("--shard-size-mb", type=float, default=256, help="input MB per shard (default 256)")
        p.add_argument("--max-per-shard", type=_positive, default=None, help="inputs per shard (default: no limit)")
        p.add_argument("--min-side", type=int, default=16, help="reject images whose smaller side is below this")
        p.add_argument("--max-pixels", type=_positive, default=64_000_000,
                       help="reject images with more pixels (decompression bombs); default 64e6")
        p.add_argument("--max-file-mb", type=float, default=256,
                       help="quarantine inputs larger than this unread (default 256)")
        p.add_argument("--part", type=_parse_part, default=(0, 1), help="process slice i of N (0-based) for merge")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        a = p.parse_args(argv)
        settings = Settings(a.min_side, a.max_pixels, max(1, int(a.shard_size_mb * 1024 * 1024)), a.max_per_shard,
                            max(1, int(a.max_file_mb * 1024 * 1024)))
        status, summary = run(RunArgs({"a": a.src_a, "b": a.src_b}, a.out, a.workers, settings, a.part,
                                      progress=not a.no_progress))
        print(summary)
        return status
    except ShardsError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
