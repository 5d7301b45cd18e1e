"""Two-domain streaming loader: unpaired {a, b} batches from WebDataset shards, forever,
for any number of ranks and workers, with exact resumption.

How a stream is made (one per domain, per rank, per worker):
  chunk i of stream (seed, domain, rank, worker) is one shard drawn with replacement by an
  RNG seeded with (seed, domain, rank, worker, i) (webdataset's "resampled" shards), whose
  samples are visited in an order shuffled by that same RNG; each sample also gets its own
  augmentation seed from it. So a stream is a pure function of those numbers, and a position
  in it is (chunk, offset). Any number of ranks x workers works with any number of shards.

Batches come round-robin from the DataLoader workers (torch's in-order delivery), each
worker building whole batches from its own two streams. Every batch carries, under private
keys that the loader strips, the logical worker id, that worker's (chunk, offset) after the
batch, and counter deltas; the loader keeps the latest position per worker. Resuming with
the same world size and num_workers restarts each worker at its position (opening the shard
and seeking, nothing consumed is decoded again) and rotates the worker ids so the worker due
next comes first: the batches are exactly those of an uninterrupted run.

Resuming with another world size or num_workers (a reshaped job): every new stream starts at
chunk max(saved chunks) + 1 of its own (seed, domain, rank, worker) sequence, offset 0, the
maximum over every old rank's streams (reshaped_state merges their states). No
rank restarts from the beginning, no chunk drawn before is replayed (chunk RNGs are keyed by
index), and each chunk is still a uniform shard draw with a fresh shuffle, so the sampling
distribution is unchanged; only the exact sample order differs from the old layout.

Shard URLs read from an index.json are data, never commands: each entry must be a relative
path inside the index's folder or a file/s3/gs/http(s) URL (pipeline.index.index_entry_url),
checked for every entry when the loader is built, before any worker starts. `pipe:` URLs
run only when the caller passes them directly (a brace pattern or a list).

Shards may live in object storage or behind HTTP: an OUT folder or index.json given as a URL
(s3://, gs://, http(s)://) is read through pipeline.storage, its relative entries become URLs
under the index's folder. A remote shard is fetched whole (retried after transient errors with
backoff, counted in stats["retries"]), into memory or the size-bounded ShardCache; one that
stays unreachable is skipped as unreadable_shard and the stream draws the next chunk. Where
bytes come from never changes what a stream yields, so resumption is exact whatever the store.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import logging
import os
import re
import stat
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.atomic import write_bytes
from pipeline.augment import AugmentConfig, Augmenter, TooManyPixels, to_chw_uint8
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.images import MAX_PIXELS
from pipeline import storage
from pipeline.index import index_entry_url, index_of, read_index
from pipeline.layout import DOMAINS
from pipeline.tarindex import ShardIndex, index_tar

log = logging.getLogger(__name__)

# Tar indexes one worker keeps (a few hundred bytes a sample each); a corpus with more shards per
# worker than this reads each drawn shard's headers again (pipeline.tarindex: about 6 µs a sample).
INDEXES_KEPT = 256

# Each domain's number in its streams' seeds: a -> 1, b -> 2 (changing it changes every stream).
_DOMAIN_SEED = {d: i + 1 for i, d in enumerate(DOMAINS)}
REASONS = ("corrupt_sample", "truncated_shard", "unreadable_shard", "checksum_mismatch", "empty_shard",
           "too_many_pixels")


@dataclass
class Shard:
    """One shard: where it is and what index.json says about it (when known)."""

    url: str
    nsamples: int | None = None
    sha256: str | None = None


# ----------------------------------------------------------------------------- shard lists


def _is_remote(url: str) -> bool:
    return storage.scheme(url) is not None  # a one-letter "scheme" is a Windows drive: a path


def _from_index(index_file: str, domain: str) -> list[Shard]:
    """The shards of `domain` an index.json (a path or URL) lists, each entry checked."""
    index, _ = read_index(index_file)
    entries = index["shards"]
    if not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{storage.redact(index_file)}: not a readable shard index.json (an entry is not an object)")
    # Every entry is checked, whatever its domain: one hostile entry means the index is not trusted.
    urls = [index_entry_url(index_file, e) for e in entries]
    shards = [Shard(url, e.get("nsamples"), e.get("sha256")) for url, e in zip(urls, entries)
              if e.get("domain") == domain]
    if not shards:
        raise ValueError(f"{storage.redact(index_file)}: no shards of domain {domain!r}")
    return shards


def resolve_shards(spec, domain: str) -> list[Shard]:
    """Shard list from an OUT folder of `make shards` or an index.json, local or at a URL (the
    entries of `domain`; pipeline.index.index_of tells a folder URL from a shard URL, which ends
    in .tar), a brace pattern, one shard URL, or a list of URLs (paths, pipe:, fsspec URLs).
    An index is read through pipeline.storage (retried) and its entries are checked by
    pipeline.index.index_entry_url (ValueError naming the index, the entry and why); a pattern
    or list is the caller's own and taken as given."""
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        index_file = index_of(spec)
        if index_file is not None:
            return _from_index(index_file, domain)
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    elif isinstance(spec, (list, tuple)):
        urls = [os.fspath(u) for u in spec]
    else:
        raise TypeError(f"shards for domain {domain!r}: expected a path, pattern or list, got {type(spec).__name__}")
    if not urls:
        raise ValueError(f"shards for domain {domain!r}: empty list")
    for u in urls:
        if not _is_remote(u) and not os.path.exists(u):
            raise ValueError(f"shard {u!r} (domain {domain!r}) does not exist")
    return [Shard(u) for u in urls]


def default_rank_world() -> tuple[int, int]:
    """torch.distributed's rank/world size when initialised, else RANK/WORLD_SIZE, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------- shard access


class ShardError(Exception):
    """A shard could not be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def _fetch_bytes(url: str, on_retry=None) -> bytes:
    """A remote shard's bytes: a pipe: command's output, or through pipeline.storage (fsspec),
    tried again after transient errors (timeouts, resets, 5xx) with backoff; `on_retry(error)`
    is called before each new attempt. A missing object or refused access is not retried."""
    if storage.scheme(url) == "pipe":
        import webdataset as wds

        with wds.gopen(url) as f:  # raises on a non-zero exit status when closed
            return f.read()
    return storage.read_bytes(url, on_retry=on_retry)


STALE_TEMP_S = 600  # a cache file still under its temporary name after this long was abandoned
CACHE_SUBDIR = "unit-shard-cache"  # under data.cache_dir: the only folder ShardCache writes or trims
# ShardCache.path's names (`<16 hex>-<basename>`) and atomic.write_bytes's temporaries of them
COPY_NAME = re.compile(r"^[0-9a-f]{16}-.+$")
COPY_TEMP_NAME = re.compile(r"^\.[0-9a-f]{16}-.+\.[A-Za-z0-9_]{6,}\.tmp$")


class ShardCache:
    """Local copies of remote shards within `max_bytes`, least recently used removed first.
    Files are named by a hash of the URL and the index's sha256 (a re-made OUT with other bytes
    under the same URL is not served from an old copy) plus the URL's basename, written to a
    temporary name and renamed into place, so concurrent workers and ranks share the directory.
    Use is recorded in the access time (set explicitly, whatever the mount's atime setting), so
    a file's modification time stays what it was written with."""

    def __init__(self, cache_dir: str, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"cache_bytes={max_bytes} must be >= 1")
        # Copies live in a subfolder this class owns: data.cache_dir may be a disk's root holding
        # other data (/local/nvme, lost+found), and trimming must never remove a file it did not write.
        self.dir = os.path.join(cache_dir, CACHE_SUBDIR)
        self.max_bytes = int(max_bytes)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, url: str, sha256: str | None = None) -> str:
        # the hash names the copy; the shard's name (cut short: a key may be longer than a file
        # name may be) only helps a person looking into the folder
        base = os.path.basename(storage.split_url(url.split()[-1]).path)[-80:] or "shard"
        key = hashlib.sha1(f"{url}\0{sha256 or ''}".encode()).hexdigest()[:16]
        return os.path.join(self.dir, f"{key}-{base}")

    def open(self, url: str, fetch, sha256: str | None = None) -> io.BufferedIOBase:
        """The shard's bytes as an open file: the cached copy, else `fetch()`ed and stored. A shard
        larger than the whole cache is kept in memory only, so the directory stays within the bound."""
        dest = self.path(url, sha256)
        try:
            f = open(dest, "rb")
        except FileNotFoundError:  # not cached, or trimmed by another worker meanwhile
            f = None
        if f is not None:
            try:  # recently used; best effort: another user's copy, or a read-only mount, refuses
                st = os.fstat(f.fileno())  # it, and the copy is as readable as it was
                os.utime(dest, ns=(time.time_ns(), st.st_mtime_ns))
            except OSError as e:
                log.debug("shard cache %s: cannot mark %s used (%s)", self.dir, dest, e)
            return f
        data = fetch()
        if len(data) <= self.max_bytes:
            try:
                write_bytes(dest, data, durable=False)  # a cache: a lost file is fetched again
                self._trim(keep=dest)
            except OSError as e:  # a full or unwritable cache folder: the shard is read all the same
                log.warning("shard cache %s: cannot keep a copy (%s); reading it from memory", self.dir, e)
        return io.BytesIO(data)

    def has(self, url: str, sha256: str | None = None) -> bool:
        return os.path.exists(self.path(url, sha256))

    def drop(self, url: str, sha256: str | None = None) -> None:
        """Forget a copy (its bytes did not match the index): the next use fetches it again."""
        try:
            os.remove(self.path(url, sha256))
        except FileNotFoundError:
            pass

    def _trim(self, keep: str) -> None:
        """Remove least recently used copies until the folder is within max_bytes. Only regular
        files named like a copy (or a copy's temporary) are counted or removed; anything else
        (a folder, a link, another program's file) is left alone, and one file that cannot be
        removed does not stop the trimming of the others."""
        files, now = [], time.time()
        for name in os.listdir(self.dir):
            p = os.path.join(self.dir, name)
            try:
                st = os.lstat(p)  # lstat: a link is not followed, so never removed through
            except FileNotFoundError:
                continue  # removed by another process
            if not stat.S_ISREG(st.st_mode):
                continue
            if COPY_TEMP_NAME.match(name):
                # a copy is written from bytes already in memory, in seconds: one this old was
                # left by a worker killed while writing it, and would hold its space for ever
                if now - st.st_mtime > STALE_TEMP_S:
                    self._remove(p)
                continue  # else another worker's copy in flight: not ours to remove
            if COPY_NAME.match(name):
                files.append((st.st_atime_ns, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep and self._remove(p):  # a worker reading it keeps its open file
                total -= size

    def _remove(self, path: str) -> bool:
        """Remove one cached file; False (with a warning) when it cannot be removed."""
        try:
            os.remove(path)
        except FileNotFoundError:
            pass  # removed by another worker: its space is free all the same
        except OSError as e:
            log.warning("shard cache %s: cannot remove %s (%s)", self.dir, path, e)
            return False
        return True


class ShardReader:
    """Opens shards for one worker: local files directly, remote ones fetched (retried) into the
    cache or memory; optionally checks sha256 against the index, for every source: a local or
    cached file once per (file, size, mtime), bytes fetched into memory each time they are
    fetched (a remote shard may change between fetches). Keeps tar indexes of recent files."""

    def __init__(self, verify: bool, cache: ShardCache | None, keep_indexes: int | None = None):
        self.verify = verify
        self.cache = cache
        self.verified: dict[tuple, bool] = {}
        self.indexes: collections.OrderedDict[tuple, ShardIndex] = collections.OrderedDict()
        self.keep = INDEXES_KEPT if keep_indexes is None else keep_indexes
        self._fetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[str, concurrent.futures.Future] = {}  # url -> its bytes, being fetched

    def prefetch(self, shard: Shard, counters: "Counters | None" = None) -> concurrent.futures.Future | None:
        """Start fetching a remote shard that is not cached, in a background thread: a stream
        knows its next shard in advance (chunk RNGs), so the request's latency hides behind the
        decoding of the current one. Holds at most one shard per stream in memory."""
        url = shard.url
        if not _is_remote(url) or (self.cache is not None and self.cache.has(url, shard.sha256)):
            return None
        if url in self._pending:
            return self._pending[url]
        if self._fetcher is None:
            self._fetcher = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="shard-prefetch")
        on_retry = None if counters is None else (lambda e: counters.retry(url, e))
        self._pending[url] = self._fetcher.submit(_fetch_bytes, url, on_retry)
        return self._pending[url]

    def open(self, shard: Shard, counters: "Counters | None" = None) -> tuple[io.BufferedIOBase, ShardIndex]:
        """(open file, its tar index); ShardError("unreadable_shard" or "checksum_mismatch")
        when the shard cannot be used. Retries of transient errors are counted in `counters`."""
        url = shard.url
        on_retry = None if counters is None else (lambda e: counters.retry(url, e))
        try:
            f = self._bytes(shard, on_retry)
        except Exception as e:  # any failure to reach the bytes, retries spent: skip the shard, go on
            raise ShardError("unreadable_shard", f"{storage.redact(url)}: cannot read "
                             f"({type(e).__name__}: {storage.error_text(e, url)})") from e
        try:
            if self.verify and shard.sha256 and not self._matches(f, shard.sha256):
                if self.cache is not None and _is_remote(url):
                    self.cache.drop(url, shard.sha256)
                raise ShardError("checksum_mismatch", f"{storage.redact(url)}: sha256 differs from index.json")
            return f, self._index(f)
        except BaseException:
            f.close()
            raise

    def _bytes(self, shard: Shard, on_retry) -> io.BufferedIOBase:
        url = shard.url
        if not _is_remote(url):
            if not stat.S_ISREG(os.stat(url).st_mode):  # a FIFO or device would block or never end
                raise OSError(f"{url} is not a regular file")
            return open(url, "rb")
        pending = self._pending.pop(url, None)
        fetch = pending.result if pending is not None else (lambda: _fetch_bytes(url, on_retry))
        if self.cache is not None:
            return self.cache.open(url, fetch, shard.sha256)
        return io.BytesIO(fetch())

    @staticmethod
    def _file_key(f) -> tuple | None:
        """What identifies a file's bytes without reading them; None for bytes in memory."""
        if isinstance(f, io.BytesIO):
            return None
        st = os.fstat(f.fileno())
        return f.name, st.st_ino, st.st_size, st.st_mtime_ns

    def _matches(self, f, expected: str) -> bool:
        key = self._file_key(f)
        ok = self.verified.get(key) if key is not None else None
        if ok is None:
            digest = sha256_bytes(f.getbuffer()) if key is None else sha256_file(f.name)
            ok = digest == expected
            if key is not None:
                self.verified[key] = ok
        return ok

    def _index(self, f) -> ShardIndex:
        key = self._file_key(f)
        index = self.indexes.get(key) if key is not None else None
        if index is None:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            index = index_tar(f, size)  # headers only: cheap for bytes in memory, so never kept
            if key is not None:
                self.indexes[key] = index
                if len(self.indexes) > self.keep:
                    self.indexes.popitem(last=False)
        else:
            self.indexes.move_to_end(key)
        return index


# ----------------------------------------------------------------------------- streams


class Counters:
    """Per-worker counters; `take()` returns and clears what accumulated since last time."""

    def __init__(self):
        self.samples = 0
        self.bytes = 0
        self.retries = 0  # requests tried again after a transient error (the shard may still be read)
        self.skipped: collections.Counter = collections.Counter()
        self.warned: set[tuple[str, str]] = set()

    def _warn_once(self, url: str, what: str, msg: str) -> None:
        if (url, what) not in self.warned:  # once per shard and reason, never sleeps
            self.warned.add((url, what))
            log.warning("%s in shard %s: %s", what, storage.redact(url), msg)

    def skip(self, reason: str, url: str, msg: str) -> None:
        self.skipped[reason] += 1
        self._warn_once(url, f"skipping ({reason})", msg)

    def retry(self, url: str, error: BaseException) -> None:
        self.retries += 1
        self._warn_once(url, "retrying a transient error", f"{type(error).__name__}: {storage.error_text(error, url)}")

    def take(self) -> dict:
        d = {"samples": self.samples, "bytes": self.bytes, "retries": self.retries, "skipped": dict(self.skipped)}
        self.samples, self.bytes, self.retries = 0, 0, 0
        self.skipped.clear()
        return d


def chunk_rng(seed: int, domain: str, rank: int, worker: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DOMAIN_SEED[domain], rank, worker, chunk])


def read_at(f):
    """read(offset, size) for an open shard: one pread for a file (half the time of seek and read,
    a measurable part of a 64 px sample), seek and read for bytes in memory."""
    try:
        fd = f.fileno()
    except (OSError, ValueError):  # io.BytesIO: no file descriptor
        def read(off: int, size: int) -> bytes:
            f.seek(off)
            return f.read(size)
        return read
    return lambda off, size: os.pread(fd, size, off)


def decode_sample(read, sample, url: str, augmenter, draw, seed, counters):
    """One sample (key, offset, size) read with `read` (read_at), decoded and augmented: HWC uint8 in
    the augmenter's channel order, counted; None, counted under its reason, for a decompression
    bomb or a sample that cannot be read or decoded: a bad image never stops a stream."""
    key, off, size = sample
    try:
        img = augmenter(read(off, size), draw, seed)
    except TooManyPixels as e:  # a decompression bomb: skipped before any pixel is decoded
        counters.skip("too_many_pixels", url, f"{key}: {e}")
        return None
    except Exception as e:  # a bad image must never stop training
        counters.skip("corrupt_sample", url, f"{key}: {type(e).__name__}: {e}")
        return None
    counters.samples += 1
    counters.bytes += size
    return img


def sample_stream(shards, domain, seed, rank, worker, start, reader, augmenter, counters):
    """Yield (image HWC uint8, (chunk, offset) of the next sample) forever from
    `start = (chunk, offset)`. Skipped samples still advance the position."""
    chunk, offset = start
    barren = 0  # consecutive chunks that gave nothing: stop instead of spinning forever
    failing: set[str] = set()  # shards that gave nothing since the last sample: all of them, and it stops
    while True:
        rng = chunk_rng(seed, domain, rank, worker, chunk)
        shard = shards[int(rng.integers(len(shards)))]
        produced = 0
        try:
            f, index = reader.open(shard, counters)
        except ShardError as e:
            counters.skip(e.reason, shard.url, str(e))
            f, index = None, None
        nxt_rng = chunk_rng(seed, domain, rank, worker, chunk + 1)  # the next chunk's shard, fetched meanwhile
        reader.prefetch(shards[int(nxt_rng.integers(len(shards)))], counters)
        if f is not None:
            with f:
                n = len(index.samples)
                if index.truncated:
                    counters.skip("truncated_shard", shard.url, "truncated tar; using the complete samples")
                elif shard.nsamples is not None and n < shard.nsamples:  # cut at a member boundary
                    counters.skip("truncated_shard", shard.url, f"{n} of the {shard.nsamples} samples index.json "
                                  "lists; using those")
                if n == 0 and not index.truncated:
                    counters.skip("empty_shard", shard.url, "no image members")
                # As Python lists: indexing a numpy array per sample costs more than the lookups.
                order = rng.permutation(n).tolist()
                seeds = rng.integers(0, 2**63, size=n).tolist()
                draws = rng.random((n, 3)).tolist()  # crop y, crop x, flip: one row per sample
                samples, read = index.samples, read_at(f)
                for j in range(offset, n):
                    img = decode_sample(read, samples[order[j]], shard.url, augmenter, draws[j], seeds[j], counters)
                    if img is None:
                        continue
                    produced += 1
                    nxt = (chunk, j + 1) if j + 1 < n else (chunk + 1, 0)
                    yield img, nxt
        barren = 0 if produced or offset else barren + 1
        failing = set() if produced else failing | {shard.url}
        # Only when every shard failed since the last sample: with one readable shard among many
        # unreadable ones a long run of bad draws happens by chance, and training must go on.
        if barren > 4 * len(shards) + 32 and len(failing) == len({s.url for s in shards}):
            raise RuntimeError(f"domain {domain!r}: no readable sample in {barren} shard draws; every one of its "
                               f"{len(shards)} shards failed (e.g. {storage.redact(shard.url)}); see warnings")
        chunk, offset = chunk + 1, 0


class _Batches(IterableDataset):
    """Yields whole batches; each DataLoader worker plays the logical worker
    (physical id + rotate) % num_workers and starts at that worker's saved position."""

    def __init__(self, loader: "UnpairedLoader", positions: dict, rotate: int):
        self.l = loader
        self.positions = positions
        self.rotate = rotate

    def __iter__(self):
        l = self.l
        info = get_worker_info()
        if info is None:
            worker = 0
        else:
            worker = (info.id + self.rotate) % info.num_workers
            import cv2

            cv2.setNumThreads(1)  # the workers are the parallelism
        augmenter = Augmenter(l.augment, l.image_size, l.max_pixels)
        reader = ShardReader(l.verify_shards, l._cache)
        counters = Counters()
        start = self.positions.get(worker, {d: (0, 0) for d in DOMAINS})
        streams = {d: sample_stream(l._shards[d], d, l.seed, l.rank, worker, tuple(start[d]),
                                    reader, augmenter, counters) for d in DOMAINS}
        while True:
            batch, pos = {}, {}
            for d, stream in streams.items():
                imgs = []
                for _ in range(l.batch_size):
                    img, pos[d] = next(stream)
                    imgs.append(img)
                batch[d] = torch.from_numpy(to_chw_uint8(imgs, augmenter.bgr))
            batch["_worker"] = worker
            batch["_pos"] = pos
            batch["_stats"] = counters.take()
            yield batch


# ----------------------------------------------------------------------------- the loader


def reshaped_state(states: list[dict]) -> dict:
    """The loader state to resume from at another world size, from every old rank's (rank 0's
    first): rank 0's, with the chunk positions of all of them, so that the chunk every stream
    restarts at (load_state_dict) lies past the last one any old rank delivered, not only rank 0.
    Ranks move through chunks at their own pace (shards of other sizes, skipped samples)."""
    if not states:
        raise ValueError("no loader state to resume from")
    every = [p for s in states for p in s["positions"].values()]
    return {**states[0], "positions": {str(i): p for i, p in enumerate(every)}}


@contextlib.contextmanager
def one_opencv_thread():
    """OpenCV's thread pool does not survive fork: once this process has decoded or resized in
    parallel (a large image decoded in-process, as the colour statistics before training do), a
    DataLoader worker forked from it hangs at its first OpenCV call that touches the pool
    (cv2.setNumThreads, forever). With one thread while the workers start, there is no pool to
    inherit; the caller's setting comes back after."""
    import cv2

    n = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(n)


class UnpairedLoader:
    """Iterating yields {"a", "b"}: uint8 [B,3,H,W] RGB, independent domains, forever.

    Batches stay uint8 to the device (a quarter of float32's bytes through the worker queue and
    the host-to-device copy, and no float pass in the workers, which cost more than decoding at
    256 px); `pipeline.tensors.normalize` makes them [-1, 1] floats there. With `pin_memory`
    (the trainer sets it on GPUs) they arrive in pinned memory, so `.to(device, non_blocking=True)`
    overlaps the copy with compute.

    `stats` has samples, bytes, retries (requests tried again after a transient error) and
    skipped-by-reason totals of the batches delivered so far (each worker sends its counter
    deltas inside the batch, so they aggregate across worker processes without shared memory). Events of prefetched, not yet delivered batches appear
    when those batches do; warnings name the shard once per worker process.

    `max_pixels` caps what one image may decode to (after JPEG DCT scaling), judged from its
    header before decoding: a larger image is skipped as "too_many_pixels", so a decompression
    bomb in a shard costs no memory. The default equals `make shards --max-pixels`'s.
    """

    def __init__(self, shards_a, shards_b, batch_size: int, image_size: int, seed: int = 0,
                 num_workers: int = 2, augment: AugmentConfig | dict | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 verify_shards: bool = False, cache_dir: str | None = None,
                 cache_bytes: int = 20 * 2**30, prefetch_factor: int = 2,
                 pin_memory: bool = False, multiprocessing_context=None, max_pixels: int = MAX_PIXELS):
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size={batch_size} and image_size={image_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if max_pixels < 1:
            raise ValueError(f"max_pixels={max_pixels} must be >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:  # numpy's generators take no negative seed
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        self.max_pixels = int(max_pixels)
        r, w = default_rank_world()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is not in [0, world_size={self.world_size})")
        self._shards = {d: resolve_shards(spec, d) for d, spec in zip(DOMAINS, (shards_a, shards_b))}
        self.batch_size, self.image_size, self.seed = int(batch_size), int(image_size), int(seed)
        self.num_workers = int(num_workers)
        self.augment = AugmentConfig.from_any(augment)
        Augmenter(self.augment, self.image_size, self.max_pixels)  # its checks here, not in the first batch's worker
        self.verify_shards = verify_shards
        self._cache = ShardCache(cache_dir, cache_bytes) if cache_dir else None
        self._dl_kwargs = dict(prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                               multiprocessing_context=multiprocessing_context)
        self._batches = 0
        self._positions: dict[int, dict] = {}  # logical worker -> {"a": (chunk, offset), "b": ...}
        self._stats = {"batches": 0, "samples": 0, "bytes": 0, "retries": 0, "skipped": collections.Counter()}

    @property
    def shards(self) -> dict[str, list[Shard]]:
        return self._shards

    @property
    def stats(self) -> dict:
        s = dict(self._stats)
        s["skipped"] = {r: s["skipped"].get(r, 0) for r in REASONS}
        return s

    def __iter__(self):
        w = max(self.num_workers, 1)
        ds = _Batches(self, dict(self._positions), self._batches % w)
        if self.num_workers == 0:
            batches = iter(ds)
        else:
            dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, **self._dl_kwargs)
            with one_opencv_thread():
                batches = iter(dl)  # the workers start here
        for batch in batches:
            worker = int(batch.pop("_worker"))
            self._positions[worker] = {d: tuple(int(v) for v in p) for d, p in batch.pop("_pos").items()}
            delta = batch.pop("_stats")
            self._batches += 1
            self._stats["batches"] += 1
            self._stats["samples"] += int(delta["samples"])
            self._stats["bytes"] += int(delta["bytes"])
            self._stats["retries"] += int(delta.get("retries", 0))
            self._stats["skipped"].update({k: int(v) for k, v in delta["skipped"].items()})
            yield batch

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's streams (save one per rank)."""
        return {
            "version": 1, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.num_workers, "batch_size": self.batch_size, "batches": self._batches,
            "positions": {str(k): {d: list(p) for d, p in v.items()} for k, v in self._positions.items()},
            "stats": {"samples": self._stats["samples"], "bytes": self._stats["bytes"],
                      "retries": self._stats["retries"], "skipped": dict(self._stats["skipped"])},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: exactly, when rank, world size, num_workers and batch size
        match; otherwise every stream starts at chunk max(saved chunks) + 1 (module doc)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"loader state: expected a dict with version 1, got {str(state)[:200]}")
        if state.get("seed") != self.seed:
            log.warning("loader state was saved with seed %s, this loader has seed %s",
                        state.get("seed"), self.seed)
        positions = {int(k): {d: (int(p[0]), int(p[1])) for d, p in v.items()}
                     for k, v in state["positions"].items()}
        same = all(state.get(k) == getattr(self, k) for k in ("rank", "world_size", "num_workers", "batch_size"))
        if same:
            self._positions = positions
            self._batches = int(state["batches"])
        else:
            top = max([p[0] for v in positions.values() for p in v.values()], default=-1) + 1
            w = max(self.num_workers, 1)
            self._positions = {k: {d: (top, 0) for d in DOMAINS} for k in range(w)}
            self._batches = 0
            log.warning("loader state from rank %s/%s with %s workers resumed on rank %s/%s with %s "
                        "workers: every stream continues at chunk %d", state.get("rank"),
                        state.get("world_size"), state.get("num_workers"), self.rank,
                        self.world_size, self.num_workers, top)
        saved = state.get("stats", {})
        self._stats = {"batches": int(state.get("batches", 0)), "samples": int(saved.get("samples", 0)),
                       "bytes": int(saved.get("bytes", 0)), "retries": int(saved.get("retries", 0)),
                       "skipped": collections.Counter(saved.get("skipped", {}))}
