"""One `make shards` run (or `--part`) from sources to outputs, and `merge` of finished parts.

A run checks its sources and OUT, takes OUT's lock, refuses a folder (or other non-file) where
a shard, record or output goes, lists and plans both domains, writes every group of its part
whose shard is not current (a bounded pool shared by both domains), removes what an older,
longer plan or a crash left, and finalises (dedupe, manifest, quarantine, index; a domain with
no valid image fails before index.json). It returns an exit status and the one-paragraph
summary the CLI prints, which counts the inputs of existing shards hashed to check them.

OUT may be a local folder or an fsspec URL: every read, size check, listing and removal under
OUT goes through pipeline.storage and every write through pipeline.atomic, so the same steps
run for both (see pipeline.lock for what a lock means on an object store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.atomic import write_bytes
from pipeline.index import Totals, finalize
from pipeline.layout import (DOMAINS, EXIT_OK, EXIT_QUARANTINED, INDEX_NAME, MANIFEST_NAME, PARTS_DIR,
                             QUARANTINE_NAME, RECORDS_DIR, ShardsError, out_root, part_dir, remove_temps)
from pipeline.lock import out_locks
from pipeline.plan import Group, Settings, plan_groups
from pipeline.records import inputs_unchanged, load_record, record_is_current, refresh_signatures, shard_intact
from pipeline.shardwriter import ShardPool
from pipeline.sources import SourceError, file_kind, folder_inside, list_inputs, source_exists


@dataclass
class RunArgs:
    src: dict[str, str]  # domain -> source (folder, list file, .parquet or URL)
    out: str
    workers: int = 1
    settings: Settings = field(default_factory=Settings)
    part: tuple[int, int] = (0, 1)
    progress: bool = True
    recheck: bool = False  # hash every existing shard against its record (catches same-size damage)


@dataclass
class _Written:
    """What writing one run's (or part's) shards did."""

    counts: dict[str, int] = field(default_factory=dict)  # groups per domain, all parts together
    listing: dict[str, str] = field(default_factory=dict)  # hash of each domain's plan: parts must agree
    mine: dict[str, list[int]] = field(default_factory=dict)  # this part's shard numbers per domain
    processed: int = 0  # inputs validated
    skipped: int = 0  # shards already complete
    hashed: int = 0  # inputs of existing shards read and hashed to tell whether they changed
    rechecked: int = 0  # existing shards hashed (--recheck)
    damaged: int = 0  # of those, shards whose bytes differed from their record: written again
    index_removed: bool = False


def run(args: RunArgs) -> tuple[int, str]:
    """Write this run's (or part's) shards and outputs; return (exit status, summary)."""
    args = dataclasses.replace(args, out=out_root(args.out))
    _check_paths(args)
    part, nparts = args.part
    t0 = time.time()
    with out_locks(args.out, args.part):
        where = args.out if nparts == 1 else part_dir(args.out, part, nparts)
        _check_out_files(args.out, where)  # before anything in OUT is removed or replaced
        if nparts > 1:
            _remove_other_jobs(args.out, nparts)
        done = _write_shards(args)
        if nparts == 1:
            _remove_stale(args.out, done.counts)
            # A domain with no valid image fails the run before index.json is written.
            totals = finalize(args.out, done.mine, where, require_samples=True)
        else:
            totals = finalize(args.out, done.mine, where, {"part": part, "parts": nparts, "groups": done.counts,
                                                           "listing": done.listing})
    return _summarise(totals, time.time() - t0, done, where, args.workers, part=args.part if nparts > 1 else None)


def merge(out: str) -> tuple[int, str]:
    """Finalise the outputs of all `--part i/N` runs in OUT into one index, manifest and quarantine."""
    t0 = time.time()
    out = out_root(out)
    if not storage.is_url(out) and not os.path.isdir(out):  # a URL prefix is no folder: no parts is said below
        raise ShardsError(f"{out}: no such folder")
    _check_store(out)
    with out_locks(out, (0, 1), "make shards merge"):
        counts = _finished_parts(out)
        _check_out_files(out, out)
        _remove_stale(out, counts)
        totals = finalize(out, {d: list(range(counts[d])) for d in DOMAINS}, out, require_samples=True)
        return _summarise(totals, time.time() - t0, _Written(), out, 1)


def _remove_other_jobs(out: str, nparts: int) -> None:
    """Remove OUT/parts/<i>-of-<M> for every M other than this job's `nparts`: this job rewrites
    their shards, and left in place they would stop every later merge ("different N"). Safe
    under out_locks, which refused this run if a part run of another M holds OUT. Said on stderr."""
    mine = f"-of-{nparts}"
    folders = sorted({storage.parent(p) for p in storage.glob(out, PARTS_DIR, "*-of-*", "*")}
                     | set(storage.glob(out, PARTS_DIR, "*-of-*")))
    stale = [f for f in folders if not f.rstrip("/").rsplit("/", 1)[-1].endswith(mine)]
    for folder in stale:
        if storage.is_url(folder):
            for path in storage.glob(folder, "**"):
                storage.remove(path)
        else:
            shutil.rmtree(storage.local_path(folder), ignore_errors=True)
    if stale:
        print(f"note: removed {len(stale)} parts folder(s) of an earlier job with another part count: "
              f"{', '.join(storage.redact(f) for f in stale)}", file=sys.stderr)


def _finished_parts(out: str) -> dict[str, int]:
    """Groups per domain of the job whose parts all finished with the same listing."""
    found = {}
    for path in storage.glob(out, PARTS_DIR, "*-of-*", INDEX_NAME):
        idx = json.loads(storage.read_bytes(path))
        found.setdefault(idx["parts"], {})[idx["part"]] = idx
    if not found:
        raise ShardsError(f"{storage.redact(out)}: no finished part (no {PARTS_DIR}/<i>-of-<N>/index.json)")
    if len(found) > 1:
        folders = sorted({storage.redact(storage.parent(p)) for p in storage.glob(out, PARTS_DIR, "*-of-*", INDEX_NAME)})
        raise ShardsError(f"{storage.redact(out)}: parts from runs with different N: {sorted(found)}; delete the "
                          f"folders of the job not to merge: {', '.join(folders)}")
    (nparts, parts), = found.items()
    missing = sorted(set(range(nparts)) - set(parts))
    if missing:
        raise ShardsError(f"{storage.redact(out)}: parts {missing} of {nparts} have not finished")
    first = parts[0]
    for i, idx in sorted(parts.items()):
        if idx["listing"] != first["listing"] or idx["groups"] != first["groups"]:
            raise ShardsError(f"{storage.redact(out)}: part {i}/{nparts} listed different inputs than part 0 "
                              f"(sources changed between parts?); re-run it")
    return first["groups"]


# ----------------------------------------------------------------------------- checks before writing


def _check_paths(args: RunArgs) -> None:
    """Every source exists, OUT is writable, and no source folder is OUT or inside it (it would
    list the shards being written)."""
    for d in DOMAINS:
        try:
            ok = source_exists(args.src[d])
        except SourceError as e:
            raise ShardsError(f"source {d.upper()} {storage.redact(args.src[d])}: {e}") from None
        if not ok:
            raise ShardsError(f"source {d.upper()} {storage.redact(args.src[d])}: no such file or folder")
    _check_store(args.out)
    try:
        if not storage.is_url(args.out):
            os.makedirs(args.out, exist_ok=True)
        probe = storage.join(args.out, f".probe{os.getpid()}")
        write_bytes(probe, b"", durable=False)
        storage.remove(probe)
    except OSError as e:
        raise ShardsError(f"cannot write to OUT {storage.redact(args.out)}: "
                          f"{e.strerror or storage.error_text(e, args.out)}") from None
    except Exception as e:  # noqa: BLE001 - a store's client raises its own types (no endpoint, no bucket)
        raise ShardsError(f"cannot write to OUT {storage.redact(args.out)}: "
                          f"{type(e).__name__}: {storage.error_text(e, args.out)}") from None
    for d in DOMAINS:
        if folder_inside(args.src[d], args.out) or _url_inside(args.src[d], args.out):
            raise ShardsError(f"source {d.upper()} {storage.redact(args.src[d])} is OUT {storage.redact(args.out)} "
                              f"or inside it: the writer would "
                              f"read its own shards back as inputs; choose an OUT outside the sources")


def _check_store(out: str) -> None:
    """A URL OUT needs its fsspec backend: say which extra installs it, in one line."""
    if storage.is_url(out):
        try:
            storage.filesystem(out)
        except storage.StorageError as e:
            raise ShardsError(str(e)) from None


def _url_inside(source: str, out: str) -> bool:
    """Whether a URL source and a URL OUT overlap (one is the other or lies inside it). A URL
    source's listing cannot leave OUT out as a folder walk does, so both directions are refused."""
    if not (storage.is_url(source) and storage.is_url(out)):
        return False
    # canonical, not redact: s3a://b/x and s3://b/x (gcs:// and gs://) are one location
    a, b = (storage.canonical(u).rstrip("/") + "/" for u in (source, out))
    return a.startswith(b) or b.startswith(a)


# ----------------------------------------------------------------------------- writing


def _write_shards(args: RunArgs) -> _Written:
    """Plan both domains and write every group of this part whose shard is not current."""
    from tqdm import tqdm

    # One bar per domain; both domains feed the same pool, so a domain with few shards
    # does not leave workers idle.
    bars = {d: tqdm(desc=f"domain {d}", unit="img", disable=not args.progress, mininterval=0.5, position=k)
            for k, d in enumerate(DOMAINS)}
    pool = ShardPool(args.workers, bars)
    done = _Written()
    domain = DOMAINS[0]
    try:
        for domain in DOMAINS:
            _write_domain(args, domain, pool, done)
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
    return done


def _write_domain(args: RunArgs, domain: str, pool: ShardPool, done: _Written) -> None:
    """Submit the groups of one domain that belong to this part and are not complete yet."""
    part, nparts = args.part
    listing_hash, n_groups = hashlib.sha256(), 0
    done.mine[domain] = []
    skip = () if storage.is_url(args.out) else (args.out,)
    for group in plan_groups(domain, list_inputs(args.src[domain], skip_dirs=skip), args.settings):
        n_groups += 1
        listing_hash.update(group.fingerprint.encode())
        if group.number % nparts != part:
            continue
        done.mine[domain].append(group.number)
        if _already_done(args, group, done):
            done.skipped += 1
            pool.bars[domain].update(len(group.inputs))
            continue
        if not done.index_removed:  # shards are about to change: the old index no longer holds
            for p in (storage.join(args.out, INDEX_NAME), storage.join(part_dir(args.out, part, nparts), INDEX_NAME)):
                storage.remove(p)
            done.index_removed = True
        done.processed += len(group.inputs)
        pool.submit((args.out, domain, group.number, [(i.path, i.size, i.sig) for i in group.inputs],
                     group.fingerprint, args.settings.limits()))
    done.counts[domain], done.listing[domain] = n_groups, listing_hash.hexdigest()


def _already_done(args: RunArgs, group: Group, done: _Written) -> bool:
    """Whether the shard of `group` is complete: its record matches the group, the file (its size,
    and with --recheck its sha256) and the content of the inputs. Inputs hashed to tell and found
    the same get their new signatures recorded, so a metadata-only change is paid for once."""
    rec = load_record(args.out, group.domain, group.number)
    if not record_is_current(args.out, rec, group.fingerprint):
        return False
    if args.recheck:
        done.rechecked += 1
        if not shard_intact(args.out, rec):
            done.damaged += 1
            return False
    unchanged, hashed = inputs_unchanged(rec, group.inputs)
    done.hashed += hashed
    if unchanged:
        refresh_signatures(args.out, rec, group.inputs)
    return unchanged


def _check_out_files(out: str, dest: str) -> None:
    """Refuse, before anything is removed or written, a local OUT where a shard, a record or an
    output that the run replaces is a folder (or another non-file): its rename would fail with
    a raw errno half way through, after index.json was removed."""
    if storage.is_url(out):
        return  # an object store has no folders in the way of an upload
    found = []
    for d in DOMAINS:
        for folder in (os.path.join(out, d), os.path.join(out, RECORDS_DIR, d)):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise ShardsError(f"{folder} is not a folder; remove it and re-run")
        found += storage.glob(os.path.join(out, d), f"{d}-*.tar")
        found += storage.glob(os.path.join(out, RECORDS_DIR, d), f"{d}-*.json")
    found += [os.path.join(dest, name) for name in (INDEX_NAME, MANIFEST_NAME, QUARANTINE_NAME)]
    for path in found:
        try:
            mode = os.stat(path).st_mode
        except OSError:  # not there, or a broken link: the rename replaces it
            continue
        if not stat.S_ISREG(mode):
            raise ShardsError(f"{path} is not a regular file ({file_kind(mode)}); remove it and re-run")


def _remove_stale(out: str, counts: dict[str, int]) -> None:
    """Delete shards, records and temporary files left from an older, longer plan or a crash.
    OUT's index.json goes first: an index that lists a deleted shard must not outlive a kill
    before finalize writes the new one."""
    index_removed = False
    for domain in DOMAINS:
        for pattern, sub in ((f"{domain}-*.tar", (domain,)), (f"{domain}-*.json", (RECORDS_DIR, domain))):
            folder = storage.join(out, *sub)
            for path in storage.glob(folder, pattern):
                try:
                    number = int(os.path.basename(path).split("-")[1].split(".")[0])
                except ValueError:
                    continue
                if number >= counts.get(domain, 0):
                    if not index_removed:
                        storage.remove(storage.join(out, INDEX_NAME))
                        index_removed = True
                    storage.remove(path)
            remove_temps(folder, pattern)


# ----------------------------------------------------------------------------- the summary


def _summarise(t: Totals, dt: float, done: _Written, where: str, workers: int,
               part: tuple[int, int] | None = None) -> tuple[int, str]:
    """(exit status, summary paragraph). A domain with no valid image failed in finalize already."""
    n_in = sum(t.inputs.values())
    n_rej = sum(t.rejected.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t.rejected.items())) or "none"
    what = f"part {part[0]}/{part[1]}" if part else "shards"

    def per_domain(c) -> str:
        return ", ".join(f"{d}: {c[d]}" for d in DOMAINS)

    text = (f"{what}: stored {sum(t.stored.values())} of {n_in} inputs ({per_domain(t.stored)}) "
            f"in {sum(t.shards.values())} shards ({per_domain(t.shards)}), "
            f"{sum(t.bytes.values()) / 1e6:.1f} MB; rejected {n_rej} ({reasons}); "
            f"validated {done.processed} inputs in {dt:.2f} s ({done.processed / max(dt, 1e-9):.0f} images/s, "
            f"{workers} worker{'s' if workers > 1 else ''})"
            + (f", {done.skipped} shards already complete and skipped" if done.skipped else "")
            + (f", {done.hashed} inputs of existing shards hashed to check them (signature changed or none)"
               if done.hashed else "")
            + (f"; --recheck hashed {done.rechecked} existing shards, {done.damaged} differed from their record "
               f"and were written again" if done.rechecked else "")
            + f"; outputs in {storage.redact(where)}" + (f" ({QUARANTINE_NAME} lists the rejects)" if n_rej else "") + ".")
    return (EXIT_QUARANTINED if n_rej else EXIT_OK), text
