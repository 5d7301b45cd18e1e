"""Corpus mode of launch.release.translate: WebDataset shards in, translated shards out.

    python -m launch.release.translate --model M --direction a2b --in SHARDS --out OUT [--ext png] [--size N]
    torchrun --nproc_per_node 4 -m launch.release.translate ...           (any number of ranks)
    deepspeed --num_gpus 4 --module launch.release.translate ...

SHARDS: a `make shards` OUT folder or its index.json (then the source domain's shards: a for
a2b, b for b2a), a brace pattern, or tar URLs. OUT is what `make shards` writes (docs/contracts.md):

    OUT/b/b-000000.tar ...   input shard i translated: shard i of the target domain (b for a2b), the
                             same keys in the same order, `<key>.<ext>` + `<key>.json` ({"source":
                             "<input shard>#<key>", "source_key", "source_shard", "origin" (the input
                             sample's own source), "width", "height", "sha256", "domain", "format",
                             "direction", "model": {"uri", "name", "version", "run_id" | "export",
                             "weights_sha256"}})
    OUT/index.json, manifest.parquet, quarantine.parquet   (pipeline.index.finalize); index.json
                             also holds "translation": {model, direction, source, ext, size}
    OUT/.records/b/b-000000.json   per-shard completion records (pipeline.records)
    OUT/.unit-translate.json marks OUT as written by this command (another non-empty OUT is refused)
                             and holds the job's model ("model": the identity above, an alias pinned)

Resuming: a shard is written under a temporary name and renamed into place
(pipeline.shardwriter.write_tar), then its completion record is written. A rerun skips every
shard whose record matches the file on disk and the shard's fingerprint (the model, direction,
--ext, --size, the limits, the input shard's URL and its sha256 from the index or its file
signature), so after a kill, SIGKILL included, no finished shard is written again and the
unfinished ones are written once, whole. An input shard that changed is translated again.

Ranks: rank r of WORLD_SIZE (RANK and WORLD_SIZE from the environment, as torchrun and the
deepspeed launcher set them; no process group) writes the shards whose number is r modulo
WORLD_SIZE, on cuda:LOCAL_RANK when there is a GPU. Rank 0 then waits for every shard's record
(its progress bar counts every rank's images) and finalises under OUT/.lock: files of an older,
longer job are removed, then manifest.parquet, quarantine.parquet and index.json (last) are
written. A job whose rank 0 was killed is finished by any rerun, on any number of ranks.
Finalising is make shards' own, except that outputs are never deduplicated: translations that are
byte-identical (a constant translator, say) all keep their keys.

One model per job: a registry alias (models:/name@alias) is resolved once per OUT. The first rank
to start records the version it resolved in OUT/.unit-translate.json (under OUT/.lock); every
other rank, and a rerun finishing the job, translates with that version (loading
models:/name/<version>) even if the alias has moved since, and says so on stderr. Once index.json
names that version the job is complete, and the next run resolves the alias anew. Each shard's
record names its model: rank 0 stops with exit status 2, naming both models, when another rank
writes a shard with another one (different --model values, or an export changed between the
ranks' starts) instead of waiting for a record it would never accept.

Samples that cannot be used (no image, a key too long for a tar member or unsafe as one: absolute,
with a `..` component, a backslash or a control character; a damaged image, above
--max-pixels, below the model's minimum side, failing in the model) are left out of their shard
and listed in quarantine.parquet with the reason, and the exit status of rank 0 is 3. An input
shard that cannot be read to its end keeps the samples read before the damage and is listed
by its URL.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import posixpath
import re
import stat
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from launch.release.evaluate import printable
from launch.release.translate import WINDOW_MB, Limits, encode_image, translate_window, windows
from pipeline import storage
from pipeline.atomic import TEMP_NAME, write_json
from pipeline.hashing import sha256_bytes, sha256_json
from pipeline.imageio import ImageRejected, check_size, pil_limit_off, upright_rgb
from pipeline.index import Totals, finalize
from pipeline.layout import (DOMAINS, FORMAT_VERSION, INDEX_NAME, LOCK_NAME, MANIFEST_NAME, QUARANTINE_NAME,
                             RECORDS_DIR, LockedError, ShardsError, record_path, remove_temps, shard_name)
from pipeline.loader import Shard, resolve_shards
from pipeline.tarindex import IMAGE_EXTS
from pipeline.lock import writer_lock
from pipeline.records import load_record, record_is_current, save_record
from pipeline.shardwriter import write_tar
from pipeline.sources import stat_signature

MARKER = ".unit-translate.json"
SOURCE = {"a2b": "a", "b2a": "b"}  # the domain read
TARGET = {"a2b": "b", "b2a": "a"}  # the domain written
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
TAR_SUFFIXES = (".tar",)
MAX_MEMBER_NAME = 100  # ustar
MAX_MEMBER_BYTES = 256 * 2**20  # a larger member is not read (make shards' default --max-file-mb)
# An input key becomes an output member name: one that an extractor would place outside its folder
# (absolute, `..`, a Windows separator) or that breaks a listing (control characters) is refused.
# make shards' own keys are hex (pipeline.layout.sample_key), so there is no pattern to share.
_UNSAFE_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
LOCK_WAIT_S = 60.0


def is_corpus(inputs: list[str]) -> bool:
    """Whether --in names shards (several values, a folder with index.json, an index.json, a tar,
    a brace pattern or a URL) rather than one folder of images."""
    if len(inputs) != 1:
        return True
    x = inputs[0]
    if os.path.isdir(x):
        return os.path.isfile(os.path.join(x, INDEX_NAME))
    return (x.endswith(".json") or x.endswith(TAR_SUFFIXES) or "{" in x
            or (storage.scheme(x) or "file") != "file")


@dataclass
class CorpusJob:
    """What one rank of a corpus translation does."""

    fn: Callable | None
    """uint8 NHWC images, direction -> uint8 NHWC translations."""
    direction: str
    shards: list[Shard]
    """The source domain's input shards, in order: shard i becomes output shard i."""
    out: str
    source: str
    """What --in named (for index.json)."""
    model: dict = field(default_factory=dict)
    """The model's identity, written into every sample's JSON and the fingerprints."""
    model_spec: str = ""
    limits: Limits = field(default_factory=Limits)
    batch_size: int = 16
    ext: str | None = None
    """jpg, png or webp; None: each sample's own format."""
    size: int | None = None
    rank: int = 0
    world: int = 1
    progress: bool = True
    started_ns: int = field(default_factory=time.time_ns)
    """When this rank's run began, before its model was loaded: a record another rank writes with
    another model from then on is this job's (ModelMismatch), an older one a past job's."""

    @property
    def target(self) -> str:
        return TARGET[self.direction]

    def describe(self) -> dict:
        return {"model": self.model, "direction": self.direction, "source": self.source, "ext": self.ext,
                "size": self.size}


# ---------------------------------------------------------------------------------------------
# Before translating: the inputs, the default format, OUT


def source_shards(inputs: list[str], direction: str) -> list[Shard]:
    """The source domain's shards named by --in (pipeline.loader.resolve_shards); ValueError when none."""
    return resolve_shards(inputs[0] if len(inputs) == 1 else list(inputs), SOURCE[direction])


def default_ext(inputs: list[str], target: str) -> str | None:
    """The target domain's most frequent format in the manifest.parquet beside the input's index.json
    (the format a reader of that domain expects); None without one."""
    x = inputs[0]
    index = os.path.join(x, INDEX_NAME) if os.path.isdir(x) else x
    if len(inputs) != 1 or not index.endswith(".json") or storage.scheme(index) is not None:
        return None
    manifest = os.path.join(os.path.dirname(os.path.abspath(index)), MANIFEST_NAME)
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(manifest, columns=["domain", "format"])
        counts = pc.value_counts(table.filter(pc.equal(table["domain"], target))["format"]).to_pylist()
    except Exception:  # noqa: BLE001 - no manifest, or not one of ours: fall back to each sample's format
        return None
    if not counts:
        return None
    fmt = max(counts, key=lambda c: c["counts"])["values"]
    ext = {"jpeg": "jpg"}.get(fmt, fmt)
    return ext if ext in PIL_FORMAT else None


def check_out(job: CorpusJob) -> None:
    """Refuse an OUT that holds anything but a translation (a `make shards` OUT, say) or that holds
    an input shard. Creates nothing (mark_out does, once the model is loaded)."""
    out = job.out
    if storage.scheme(out) is not None:
        raise ValueError(f"--out {out}: corpus mode writes to a local folder")
    if os.path.isdir(out):
        names = sorted(n for n in os.listdir(out) if not TEMP_NAME.match(n) and n != LOCK_NAME)
        if names and MARKER not in names:
            raise ValueError(f"--out {out}: not empty and not written by launch.release.translate (it holds "
                             f"{', '.join(names[:5])}); choose a new or empty folder")
    elif os.path.exists(out):
        raise ValueError(f"--out {out}: not a folder")
    root = os.path.realpath(out)
    for s in job.shards:
        if storage.scheme(s.url) is None and os.path.commonpath([root, os.path.realpath(s.url)]) == root:
            raise ValueError(f"--in shard {s.url} lies inside --out {out}: the outputs would replace it; "
                             "choose an output folder outside the input")


class ModelMismatch(ShardsError):
    """Ranks of one job translate with different models: nothing is finalised."""

    exit_status = 2


def is_alias(spec: str) -> bool:
    return spec.startswith("models:/") and "@" in spec


def mark_out(job: CorpusJob) -> dict:
    """Create OUT (when needed), mark it as a translation output and return the model this job
    translates with: job.model, or for an alias the version the job's first rank pinned (see the
    module's docstring). Every rank does this before writing anything, so another rank's first
    files never make OUT look foreign to check_out."""
    os.makedirs(job.out, exist_ok=True)
    path = os.path.join(job.out, MARKER)

    def pin() -> dict:
        try:
            with open(path, encoding="utf-8") as f:
                pinned = json.load(f).get("model")
        except (OSError, ValueError, AttributeError):  # none yet, or an older marker without a model
            pinned = None
        if (not is_alias(job.model_spec) or not isinstance(pinned, dict) or pinned.get("uri") != job.model_spec
                or finished_with(job.out, pinned)):
            pinned = job.model  # a new job (or no alias): this rank's model is the job's
            write_json(path, {"format": 1, "written_by": "launch.release.translate", "model": pinned})
        return pinned

    return _locked(job, "launch.release.translate (starting)", pin)


def finished_with(out: str, model: dict) -> bool:
    """Whether OUT's index.json says its job with `model` is complete."""
    try:
        with open(os.path.join(out, INDEX_NAME), encoding="utf-8") as f:
            return json.load(f)["translation"]["model"] == model
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _locked(job: CorpusJob, what: str, fn: Callable):
    """fn() under OUT/.lock, waiting for another holder at most LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            with writer_lock(os.path.join(job.out, LOCK_NAME), what):
                return fn()
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def shown_model(model: dict) -> str:
    """A model identity in a message: models:/name/version, or the export folder."""
    where = (f"models:/{model['name']}/{model['version']}" if model.get("version") else
             model.get("export") or model.get("uri", "?"))
    return f"{where} (weights sha256 {str(model.get('weights_sha256', '?'))[:12]})"


def model_identity(spec: str, info: dict, meta: dict | None) -> dict:
    """What every sample's JSON says about the model: registry URI, name, version and run, or the
    export folder; and the weights' sha256 when known."""
    ident = {"uri": spec} if info.get("kind") != "export" else {"export": os.path.abspath(info["path"])}
    ident.update({k: str(info[k]) for k in ("name", "version", "run_id") if info.get(k)})
    if meta and meta.get("weights_sha256"):
        ident["weights_sha256"] = meta["weights_sha256"]
    return ident


def fingerprints(job: CorpusJob) -> list[str]:
    """Per input shard, what its output depends on: a record with another fingerprint is stale."""
    common = sha256_json({"format": 1, "model": job.model, "direction": job.direction, "ext": job.ext,
                          "size": job.size, "limits": dataclasses.asdict(job.limits)})
    out = []
    for s in job.shards:
        ident = s.sha256
        if ident is None and storage.scheme(s.url) is None:
            try:
                ident = stat_signature(os.stat(s.url))
            except OSError:
                ident = None
        out.append(sha256_json([common, s.url, ident]))
    return out


# ---------------------------------------------------------------------------------------------
# Reading input shards


def _open_stream(url: str):
    scheme = storage.scheme(url)
    if scheme is None:
        if not stat.S_ISREG(os.stat(url).st_mode):  # a FIFO or device would block or never end
            raise OSError(f"{url} is not a regular file")
        return open(url, "rb")
    if scheme == "pipe":  # only from the user's own pattern or list: an index never yields one
        import webdataset as wds

        return wds.gopen(url)
    import fsspec

    return fsspec.open(url, "rb").open()


class _Tail:
    """Reads through a file, counting the bytes and keeping the last TAIL_BYTES of them: tarfile
    ends a stream quietly at a truncated or garbled header, so the end is checked here."""

    TAIL_BYTES = 32 * 1024  # more than tarfile reads past the block it stops at (a 10 KiB record)

    def __init__(self, f):
        self.f, self.total, self.tail = f, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.TAIL_BYTES:]
        return data

    def ends_at(self, offset: int) -> bool:
        """Whether the tar's end-of-archive block (512 zero bytes) lies at `offset` and only zeros
        follow it (reads to the end). The block is taken before the rest is read: a writer's
        padding to its record size (GNU tar -b 256: 128 KiB records) can be longer than the tail."""
        while self.total < offset + 512 and self.read(1 << 16):
            pass
        start = self.total - len(self.tail)
        if offset < start:  # tarfile reads at most a record past its offset: cannot happen
            return False
        rest = self.tail[offset - start:]
        if len(rest) < 512:
            return False
        while rest:  # the block at `offset`, then the padding: all zeros
            if rest.count(0) != len(rest):
                return False
            rest = self.read(1 << 16)
        return True


def read_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a tar, streamed: one sample in memory. Keys are
    webdataset's: the member path up to the first dot of its base name; members are adjacent. A
    member over MAX_MEMBER_BYTES is not read (its value is None). A tar cut short or damaged raises
    tarfile.ReadError after the samples read before the damage."""
    with _open_stream(url) as f:
        raw = _Tail(f)
        with tarfile.open(fileobj=raw, mode="r|") as tar:
            key, members = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                folder, base = posixpath.split(m.name)
                if "." not in base:
                    continue
                k, ext = base.split(".", 1)
                k = f"{folder}/{k}" if folder else k
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext.lower()] = tar.extractfile(m).read() if m.size <= MAX_MEMBER_BYTES else None
            if key is not None:
                yield key, members
            if not raw.ends_at(tar.offset):
                raise tarfile.ReadError(f"truncated or damaged after byte {tar.offset} (no end-of-archive block "
                                        "there, or data other than zero padding after it)")


def decode_rgb(data: bytes, name: str, limits: Limits, size: int | None = None) -> np.ndarray:
    """pipeline.imageio.read_rgb for image bytes out of a shard: uint8 [H, W, 3], upright; the pixel
    cap checked on the header before decoding, the model's minimum side on the image's own size
    (unless `size`: then the shortest side is resized to it and the centre cropped). ImageRejected."""
    from PIL import Image, ImageOps

    with pil_limit_off():  # --max-pixels (check_size below) is the cap, not PIL's global one
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - unidentified or broken header: the data's fault
            raise ImageRejected(name, f"not a readable image ({type(e).__name__}: {e})") from None
        with im:
            check_size(name, *im.size, max_pixels=limits.max_pixels, min_side=1 if size else limits.min_side)
            try:
                rgb = upright_rgb(im)  # make shards' conversion: 16-bit, alpha
                if size and rgb.size != (size, size):
                    rgb = ImageOps.fit(rgb, (size, size), method=Image.BICUBIC)
                return np.asarray(rgb, dtype=np.uint8).copy()
            except Exception as e:  # noqa: BLE001 - truncated data, broken chunks, odd modes
                raise ImageRejected(name, f"damaged or truncated ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Writing one output shard


@dataclass
class _Found:
    """What translating one input shard found, in input order."""

    samples: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    keys: set = field(default_factory=set)

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append({"source": source, "reason": reason})


@dataclass
class _Sample:
    key: str
    source: str
    origin: str | None
    ext: str
    image: np.ndarray
    shard: str  # the input shard's URL as shown (credentials redacted)


WINDOW_BYTES = WINDOW_MB << 20  # decoded pixels held for batching (not --window-mb: part of no fingerprint)


def write_translated_shard(job: CorpusJob, number: int, fingerprint: str, tick: Callable[[int], object]) -> dict:
    """Translate input shard `number` into output shard `number` and write its completion record;
    returns the record. `tick(n)`: n more input samples handled."""
    shard, found, t0 = job.shards[number], _Found(), time.time()
    url = shard_name(job.target, number)
    nbytes, sha = write_tar(os.path.join(job.out, url), _members(job, shard, found, tick))
    record = {"version": FORMAT_VERSION, "domain": job.target, "number": number, "url": url,
              "fingerprint": fingerprint, "limits": dataclasses.asdict(job.limits), "inputs": found.inputs,
              "digests": [], "nsamples": len(found.samples), "bytes": nbytes, "sha256": sha,
              "samples": found.samples, "rejected": found.rejected, "duplicates": [],
              "source_shard": storage.redact(shard.url), "model": job.model, "seconds": round(time.time() - t0, 3)}
    save_record(job.out, record)
    return record


def _members(job: CorpusJob, shard: Shard, found: _Found, tick) -> Iterator[tuple[str, bytes]]:
    """The output tar's members, translated a window of samples at a time: at most WINDOW x
    batch_size of them and WINDOW_MB MiB of decoded pixels (one larger image alone)."""
    for window in windows(_decoded(job, shard, found, tick), lambda s: s.image.nbytes, job.batch_size, WINDOW_BYTES):
        yield from _translated(job, window, found, tick)


def _decoded(job: CorpusJob, shard: Shard, found: _Found, tick) -> Iterator[_Sample]:
    """The input shard's usable samples, decoded; the others are noted in `found`."""
    shown = storage.redact(shard.url)
    samples = read_samples(shard.url)
    while True:
        try:
            key, members = next(samples)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - unreadable or truncated: keep what was read, name the shard
            found.reject(shown, f"unreadable shard: {type(e).__name__}: "
                               f"{storage.redact_text(' '.join(str(e).split()))[:300]}")
            return
        source = f"{shown}#{key}"
        found.inputs.append([source])
        sample = _decode_sample(job, key, source, members, found)
        if sample is None:
            tick(1)
        else:
            yield sample


def _is_utf8(key: str) -> bool:
    """Whether `key` is text: a tar member name that is not UTF-8 reaches us as lone surrogates,
    which no output member name, manifest or report can hold."""
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def _decode_sample(job: CorpusJob, key: str, source: str, members: dict, found: _Found) -> _Sample | None:
    """The sample's image, decoded, or None with the reason noted in `found`."""
    if key in found.keys:
        found.reject(source, "duplicate key: the shard holds this key twice")
        return None
    found.keys.add(key)
    if not _is_utf8(key):  # before anything encodes it: a latin-1 tar member name must not stop the job
        found.reject(printable(source), "key is not UTF-8: the member name's bytes are no UTF-8 text")
        return None
    if len(f"{key}.json".encode()) > MAX_MEMBER_NAME - 1:
        found.reject(source, f"key too long: tar member names hold at most {MAX_MEMBER_NAME} bytes")
        return None
    if key.startswith("/") or ".." in key.split("/") or _UNSAFE_KEY_CHARS.search(key):
        found.reject(source, f"unsafe member name {key + '.' + next(iter(members))!r}: absolute, with a `..` "
                             "component, a backslash or a control character")
        return None
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        found.reject(source, f"no image: the sample holds {', '.join(sorted(members))}")
        return None
    if members[ext] is None:
        found.reject(source, f"too large: the .{ext} member is over {MAX_MEMBER_BYTES >> 20} MB (not read)")
        return None
    try:
        image = decode_rgb(members[ext], source, job.limits, job.size)
    except ImageRejected as e:
        found.reject(source, f"unusable image: {e.reason}")
        return None
    try:
        origin = json.loads(members["json"]).get("source")
    except Exception:  # noqa: BLE001 - no JSON, or not ours: the origin is unknown
        origin = None
    shard = source[:len(source) - len(key) - 1]
    return _Sample(key, source, origin if isinstance(origin, str) else None, ext, image, shard)


def _translated(job: CorpusJob, pending: list[_Sample], found: _Found, tick) -> Iterator[tuple[str, bytes]]:
    outs = translate_window(job.fn, job.direction, [s.image for s in pending], job.batch_size, job.limits)
    for s, y in zip(pending, outs):
        tick(1)
        if isinstance(y, Exception):
            found.reject(s.source, f"translation failed: {type(y).__name__}: {str(y)[:200]}")
            continue
        ext = job.ext or {"jpeg": "jpg"}.get(s.ext, s.ext)
        data = encode_image(y, PIL_FORMAT[ext])
        sha, fmt, (h, w) = sha256_bytes(data), {"jpg": "jpeg"}.get(ext, ext), y.shape[:2]
        meta = {"source": s.source, "source_key": s.key, "source_shard": s.shard,
                "origin": s.origin, "width": w, "height": h, "sha256": sha, "domain": job.target, "format": fmt,
                "direction": job.direction, "model": job.model}
        yield f"{s.key}.{ext}", data
        yield f"{s.key}.json", json.dumps(meta, sort_keys=True).encode()
        found.samples.append({"key": s.key, "source": s.source, "sha256": sha, "bytes": len(data),
                              "width": w, "height": h, "format": fmt, "ext": ext})
    pending.clear()


# ---------------------------------------------------------------------------------------------
# One rank's shards, rank 0's wait, finalising


@dataclass
class RankWork:
    written: int = 0
    skipped: int = 0
    images: int = 0
    counted: set = field(default_factory=set)  # shards whose images the progress bar has counted
    seen: dict = field(default_factory=dict)  # record path -> mtime when rank 0 last read it
    index_dropped: bool = False
    started_ns: int = field(default_factory=time.time_ns)  # records written since: this job's


def write_mine(job: CorpusJob, fps: list[str], bar) -> RankWork:
    """Write this rank's shards (number % world == rank) that are not complete yet."""
    # The job's start, not this call's: a record another rank wrote while this one loaded its model
    # must count as this job's, or rank 0 waits forever for a shard written with another model.
    work = RankWork(started_ns=job.started_ns)
    for i in range(job.rank, len(job.shards), job.world):
        rec = load_record(job.out, job.target, i)
        if not record_is_current(job.out, rec, fps[i]):
            if not work.index_dropped:  # shards are about to change: the old index no longer holds
                _remove(os.path.join(job.out, INDEX_NAME))
                work.index_dropped = True
            rec = write_translated_shard(job, i, fps[i], bar.update)
            work.written += 1
            work.images += len(rec["inputs"])
        else:
            work.skipped += 1
            bar.update(len(rec["inputs"]))
        work.counted.add(i)
        if job.rank == 0:
            poll_others(job, fps, bar, work)
    return work


def poll_others(job: CorpusJob, fps: list[str], bar, work: RankWork) -> None:
    """Count into rank 0's bar the shards other ranks have completed since the last look."""
    for i in range(len(job.shards)):
        if i in work.counted:
            continue
        path = record_path(job.out, job.target, i)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            continue
        if work.seen.get(i) == mtime:
            continue
        work.seen[i] = mtime
        rec = load_record(job.out, job.target, i)
        if record_is_current(job.out, rec, fps[i]):
            work.counted.add(i)
            bar.update(len(rec["inputs"]))
        elif rec and mtime >= work.started_ns and isinstance(rec.get("model"), dict) and rec["model"] != job.model:
            # Written during this job by a rank with another model: it will never be current.
            raise ModelMismatch(
                f"{path}: shard {i} was written by another rank with {shown_model(rec['model'])}, but rank 0 "
                f"translates with {shown_model(job.model)}: the ranks do not share one model (another --model, "
                "or an export changed between their starts); nothing is finalised. Run every rank with the same "
                "--model (models:/<name>/<version> names one version)")


def wait_for_all(job: CorpusJob, fps: list[str], bar, work: RankWork, poll_s: float = 0.5) -> None:
    """Rank 0: until every shard's record is current (the launcher stops rank 0 when another rank fails)."""
    while True:
        poll_others(job, fps, bar, work)
        missing = len(job.shards) - len(work.counted)
        if not missing:
            return
        bar.set_postfix_str(f"waiting for {missing} shard(s) of other ranks", refresh=True)
        time.sleep(poll_s)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_stale(job: CorpusJob) -> None:
    """Delete shards and records beyond this job's (an older job with more input shards, or the other
    direction) and temporary files of writes killed before their rename."""
    for domain in DOMAINS:
        keep = len(job.shards) if domain == job.target else 0
        for folder in (os.path.join(job.out, domain), os.path.join(job.out, RECORDS_DIR, domain)):
            for path in glob.glob(os.path.join(folder, f"{domain}-*.*")):
                number = os.path.basename(path)[len(domain) + 1:].split(".")[0]
                if number.isdigit() and int(number) >= keep:
                    _remove(path)
            remove_temps(folder, f"{domain}-*")


def finish(job: CorpusJob) -> Totals:
    """Rank 0, once every shard is complete: index.json, manifest.parquet and quarantine.parquet
    (pipeline.index.finalize), under OUT/.lock (waiting for another finaliser, at most LOCK_WAIT_S)."""
    def final() -> Totals:
        remove_stale(job)
        return finalize(job.out, {job.target: list(range(len(job.shards)))}, job.out,
                        {"translation": job.describe()}, dedupe=False)  # keep every key

    return _locked(job, "launch.release.translate (finalising)", final)


def run_corpus(job: CorpusJob) -> tuple[int, str]:
    """This rank's shards; on rank 0 also the wait and the outputs. Returns (exit status, summary)."""
    from tqdm import tqdm

    t0 = time.time()
    fps = fingerprints(job)
    known = [s.nsamples for s in job.shards]
    bar = tqdm(total=sum(known) if None not in known else None, unit="img", desc=f"translate {job.direction}",
               disable=job.rank != 0 or not job.progress, mininterval=0.5)
    try:
        work = write_mine(job, fps, bar)
        if job.rank == 0:
            wait_for_all(job, fps, bar, work)
    finally:
        bar.close()
    dt = time.time() - t0
    mine = (f"rank {job.rank} of {job.world} wrote {work.written} shard(s) ({work.images} images) in {dt:.1f} s "
            f"({work.images / max(dt, 1e-9):.1f} img/s) and found {work.skipped} complete already")
    if job.rank != 0:
        return 0, f"{mine}; rank 0 writes index.json and manifest.parquet in {job.out} once every rank is done."
    totals = finish(job)
    return summarise(job, totals, mine)


def summarise(job: CorpusJob, t: Totals, mine: str) -> tuple[int, str]:
    n_rej = sum(t.rejected.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t.rejected.items())) or "none"
    d = job.target
    text = (f"Translated {t.stored[d]} of {t.inputs[d]} image(s) {job.direction} with {job.model_spec} from "
            f"{len(job.shards)} input shard(s) into {t.shards[d]} shard(s) of domain {d} "
            f"({t.bytes[d] / 1e6:.1f} MB, {job.ext or 'each source image format'}) in {job.out}; {mine}; "
            f"quarantined {n_rej} ({reasons})" + (f", listed in {QUARANTINE_NAME}" if n_rej else "")
            + f"; {INDEX_NAME} and {MANIFEST_NAME} beside the shards.")
    return (3 if n_rej else 0), text


# ---------------------------------------------------------------------------------------------
# The command (called by launch.release.translate.main)


def main(a) -> int:
    """Corpus mode for parsed arguments; exit status (2: bad arguments or model, raised as ValueError)."""
    from launch.release.translate import load

    started_ns = time.time_ns()  # before the inputs are read and the model loaded (see CorpusJob.started_ns)
    if a.report:
        raise ValueError("--report is for folder mode; in corpus mode the quarantine is OUT/quarantine.parquet")
    shards = source_shards(a.inputs, a.direction)
    job = CorpusJob(None, a.direction, shards, a.out_dir, " ".join(storage.redact(x) for x in a.inputs), model_spec=a.model,
                    batch_size=a.batch_size, ext=a.ext or default_ext(a.inputs, TARGET[a.direction]), size=a.size,
                    rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                    progress=not a.no_progress, started_ns=started_ns)
    if not 0 <= job.rank < job.world:
        raise ValueError(f"RANK={job.rank} WORLD_SIZE={job.world}: need 0 <= RANK < WORLD_SIZE")
    check_out(job)  # before loading the model: fail fast
    job.fn, meta, info, job.limits = load(a)
    job.model = model_identity(a.model, info, meta)
    try:
        pinned = mark_out(job)
        if pinned != job.model:
            load_pinned(job, a, pinned)
        code, text = run_corpus(job)
    except ShardsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    print(text, flush=True)
    return code


def load_pinned(job: CorpusJob, a, pinned: dict) -> None:
    """Load the version of job.model_spec (an alias) that the job's first rank pinned."""
    from launch.release.translate import load

    if not pinned.get("name") or not pinned.get("version"):
        raise ModelMismatch(f"{os.path.join(job.out, MARKER)}: names no registered version for {job.model_spec}")
    version = f"models:/{pinned['name']}/{pinned['version']}"
    print(f"note: {job.model_spec} names version {job.model.get('version')} now; this job in {job.out} was "
          f"started with version {pinned['version']} and is finished with it ({version}). For the newer version, "
          "translate into another --out.", file=sys.stderr, flush=True)
    job.fn, meta, info, job.limits = load(argparse_copy(a, model=version))
    job.model = model_identity(job.model_spec, info, meta)
    if job.model != pinned:
        raise ModelMismatch(f"{version}: its weights are not those this job in {job.out} was started with "
                            f"({shown_model(job.model)}, not {shown_model(pinned)}); translate into another --out")


def argparse_copy(a, **changes):
    """The parsed arguments with `changes` (a Namespace is a plain attribute bag)."""
    return type(a)(**{**vars(a), **changes})
