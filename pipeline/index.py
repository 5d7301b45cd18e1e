"""OUT's three summaries and how an index is read safely.

- `finalize` walks the completion records in shard order, removes exact duplicates (same stored
  bytes) of a sample in an earlier shard from their shard (quarantined as "duplicate of <key>"),
  then writes manifest.parquet and quarantine.parquet, and index.json last, each under a
  temporary name renamed into place: index.json present means the outputs are complete (a run
  or merge with a domain that stored no sample fails before it, so writes none).
- `index_entry_url` is the one way a reader turns an index.json entry into something to open:
  shard URLs in an index are data, never commands. The index may be local or at a URL.
- `index_of(spec)` says which index.json a shard spec names (an OUT folder or an index file, local
  or URL); `read_index` reads one through pipeline.storage.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.atomic import replacing, write_text
from pipeline.images import reason_category
from pipeline.layout import (DOMAINS, INDEX_NAME, MANIFEST_NAME, QUARANTINE_NAME, ShardsError, remove_temps,
                             shard_name)
from pipeline.records import load_record, record_is_current
from pipeline.shardwriter import rewrite_shard, write_shard

INDEX_SCHEMES = ("file", "s3", "gs", "http", "https")  # what an index.json entry may name
_MANIFEST_TYPES = (("key", "string"), ("domain", "string"), ("shard", "string"), ("source", "string"),
                   ("sha256", "string"), ("bytes", "int64"), ("width", "int32"), ("height", "int32"),
                   ("format", "string"))
_QUARANTINE_TYPES = (("source", "string"), ("domain", "string"), ("reason", "string"))
MANIFEST_COLUMNS = [name for name, _ in _MANIFEST_TYPES]
QUARANTINE_COLUMNS = [name for name, _ in _QUARANTINE_TYPES]


# ----------------------------------------------------------------------------- reading entries


class IndexEntryError(ValueError):
    """An index.json entry that must not be opened (names the index, the entry and why)."""


def index_entry_url(index_file: str, entry) -> str:
    """What to open for one shard entry of an index.json. Shard URLs in an index are data:
    a relative path that stays inside the index's folder once `..` (and, for a local index,
    symbolic links) are resolved, or a URL of INDEX_SCHEMES. For a local index the result is
    the resolved path and a file: URL obeys the path rule; for an index at a URL a relative
    entry becomes a URL under the index's URL folder, and a file: URL is refused (remote data
    must not name this machine's files). Never a command (`pipe:`, which only a user's own shard
    list may hold), an absolute path or any other scheme: those raise IndexEntryError naming the
    index (credentials redacted), the entry and why."""
    def refuse(why: str) -> IndexEntryError:
        # The entry is shown as written (what was refused), less any credential in a URL in it.
        shown = dict(entry, url=storage.redact_text(entry["url"])) if isinstance(entry, dict) and isinstance(
            entry.get("url"), str) else entry
        return IndexEntryError(f"{storage.redact(index_file)}: shard entry {json.dumps(shown, default=str)[:300]} "
                               f"refused: {why}")

    url = entry.get("url") if isinstance(entry, dict) else None
    if not isinstance(url, str) or not url.strip() or "\0" in url:
        raise refuse("'url' must be a non-empty string without NUL bytes")
    scheme = storage.scheme(url)
    remote = storage.is_url(index_file)
    if scheme is not None:
        if scheme not in INDEX_SCHEMES:
            raise refuse(f"scheme {scheme!r} is not allowed in an index (only {', '.join(INDEX_SCHEMES)} URLs or "
                         f"relative paths; a pipe: command is run only when given directly as the shard list)")
        if scheme != "file":
            return url
        if remote:
            raise refuse("a file: URL in an index read from a URL (it would name this machine's files)")
        url = url[len("file://"):] if url.startswith("file://") else url[len(scheme) + 1:]
    elif os.path.isabs(url) or url.startswith(("/", "\\")):
        raise refuse("absolute path (an index names its shards relative to its own folder)")
    if remote:
        return _entry_under_url(index_file, url, refuse)
    root = os.path.realpath(os.path.dirname(os.path.abspath(index_file)))
    target = os.path.realpath(os.path.join(root, url))
    if target == root or os.path.commonpath([root, target]) != root:
        raise refuse(f"resolves to {target}, outside the index's folder {root} (through '..', an absolute "
                     f"file: path or a symbolic link)")
    return target


def _entry_under_url(index_url: str, rel: str, refuse) -> str:
    """A relative entry of an index at a URL, as a URL under the index's folder (query kept, as
    storage.join keeps it). Checked as written and percent-decoded: a server decodes %2e%2e as ..
    In a web URL `?` and `#` end the path, so '..?x=1' would name the folder above: refused there
    (an object store's key holds them as characters: storage.KEY_SCHEMES)."""
    parts = storage.split_url(index_url)
    if parts.scheme.lower() not in storage.KEY_SCHEMES and any(c in rel for c in "?#"):
        raise refuse("'?' or '#' in a relative entry of an index at a web URL (it would end the path there; "
                     "write them as %3F and %23)")
    folder = posixpath.dirname(parts.path)
    inside = folder.rstrip("/") + "/"
    for form in (rel, urllib.parse.unquote(rel)):
        target = posixpath.normpath(posixpath.join(folder or "/", form.replace("\\", "/")))
        if not target.startswith(inside):
            raise refuse(f"resolves to {target}, outside the index's URL folder {folder or '/'} (through '..')")
    target = posixpath.normpath(posixpath.join(folder or "/", rel))
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, target, parts.query, ""))
    # the URL as it will be read again (split_url) must still name a path under the folder
    if not storage.split_url(url).path.startswith(inside):
        raise refuse(f"the URL it makes, {storage.redact(url)}, is not under the index's URL folder {folder or '/'}")
    return url


SHARD_SUFFIX = ".tar"  # what a single shard's name ends with; a URL ending otherwise names a folder


def index_of(spec: str) -> str | None:
    """The index.json a shard spec names, or None when it names shards directly. An index file
    (name ending .json) is itself; an OUT folder (a local directory, or a URL whose path ends
    neither in .tar nor .json and holds no brace pattern) gives its index.json, whether or not
    it exists; a shard, brace pattern or pipe: command gives None."""
    if storage.scheme(spec) == "pipe":
        return None
    if storage.is_url(spec):
        path = storage.split_url(spec).path
        if "{" in path or path.endswith(SHARD_SUFFIX):
            return None
        return spec if path.endswith(".json") else storage.join(spec, INDEX_NAME)
    local = storage.local_path(spec)
    if os.path.isdir(local):
        return os.path.join(local, INDEX_NAME)
    return local if local.endswith(".json") else None


def read_index(index_file: str) -> tuple[dict, bytes]:
    """(parsed index.json, its bytes), read through pipeline.storage (retried when a read fails
    transiently). ValueError naming the index (redacted) when it is missing or not an index."""
    try:
        data = storage.read_bytes(index_file)
    except FileNotFoundError:
        where = storage.parent(index_file)
        raise ValueError(f"{storage.redact(index_file)}: no {INDEX_NAME} there (is {storage.redact(where)} an "
                         f"OUT folder of `make shards`? a single shard's name ends in {SHARD_SUFFIX})") from None
    except Exception as e:  # noqa: BLE001 - each backend has its own errors; retries are spent
        raise ValueError(f"{storage.redact(index_file)}: cannot read ({type(e).__name__}: "
                         f"{storage.error_text(e, index_file)})") from None
    try:
        index = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{storage.redact(index_file)}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{storage.redact(index_file)}: not a shard index (expected an object with a 'shards' list)")
    return index, data


# ----------------------------------------------------------------------------- finalising


@dataclass
class Totals:
    stored: Counter = field(default_factory=Counter)  # per domain
    shards: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # per reason category
    inputs: Counter = field(default_factory=Counter)  # per domain

    def add(self, domain: str, record: dict, quarantined: list[dict]) -> None:
        for r in quarantined:
            self.rejected[reason_category(r["reason"])] += 1
        self.stored[domain] += record["nsamples"]
        self.shards[domain] += 1
        self.bytes[domain] += record["bytes"]
        self.inputs[domain] += len(record["inputs"])


def _schemas():
    import pyarrow as pa  # here, not at the top: the loader and the workers never need it

    def schema(types):
        return pa.schema([(name, getattr(pa, t)()) for name, t in types])

    return schema(_MANIFEST_TYPES), schema(_QUARANTINE_TYPES)


def finalize(out: str, numbers: dict[str, list[int]], dest: str, index_extra: dict | None = None,
             dedupe: bool = True, require_samples: bool = False) -> Totals:
    """Dedupe the given shards in order (unless `dedupe` is False: outputs that must keep every
    key, such as translations) and write manifest, quarantine and index (last) to `dest`. With
    `require_samples` (a whole run or merge), a domain that stored no sample is a failure: the
    quarantine says why, and no index.json is written (its presence means a complete OUT)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in (MANIFEST_NAME, QUARANTINE_NAME, INDEX_NAME):
        remove_temps(dest, name)  # left by a run killed while finalising
    man_schema, quar_schema = _schemas()
    totals, entries = Totals(), []
    # The manifest's rename comes first (inner block), then the quarantine's; index.json last.
    # For a URL `dest` each is uploaded in one go when complete, in the same order.
    with (replacing(storage.join(dest, QUARANTINE_NAME)) as quar_tmp,
          replacing(storage.join(dest, MANIFEST_NAME)) as man_tmp,
          pq.ParquetWriter(str(man_tmp), man_schema) as man, pq.ParquetWriter(str(quar_tmp), quar_schema) as quar):
        for domain in DOMAINS:
            first: dict[bytes, str] = {}  # stored sha256 -> key of the sample kept (memory: ~100 B/sample)
            for number in numbers.get(domain, []):
                rec = _current_record(out, domain, number)
                if dedupe and _lost_originals(rec, first):
                    rec = _rebuild(out, dest, rec)
                rec = _drop_duplicates(out, rec, first) if dedupe else rec
                rows, qrows = _table_rows(domain, rec, first)
                if rows:
                    man.write_table(pa.Table.from_pylist(rows, schema=man_schema))
                if qrows:
                    quar.write_table(pa.Table.from_pylist(qrows, schema=quar_schema))
                totals.add(domain, rec, qrows)
                entries.append({"url": rec["url"], "domain": domain, "nsamples": rec["nsamples"],
                                "bytes": rec["bytes"], "sha256": rec["sha256"]})
    index = {"version": 1, "shards": entries,
             "totals": {d: {"shards": totals.shards[d], "samples": totals.stored[d], "bytes": totals.bytes[d]}
                        for d in DOMAINS}}
    index.update(index_extra or {})
    if require_samples:
        _require_samples(dest, totals)
    write_text(storage.join(dest, INDEX_NAME), json.dumps(index, indent=1))
    return totals


def _require_samples(dest: str, totals: Totals) -> None:
    """ShardsError, with no index.json left in `dest`, when a domain stored no sample."""
    for d in DOMAINS:
        if totals.stored[d] == 0:
            storage.remove(storage.join(dest, INDEX_NAME))  # one from an earlier run no longer holds
            raise ShardsError(f"domain {d.upper()}: no valid image among {totals.inputs[d]} inputs "
                              f"(reasons in {storage.redact(storage.join(dest, QUARANTINE_NAME))}); "
                              f"no {INDEX_NAME} written")


def _current_record(out: str, domain: str, number: int) -> dict:
    """Shard `number`'s record; the shard is rebuilt from its inputs first when the file and its
    record disagree (a crash mid-rewrite)."""
    rec = load_record(out, domain, number)
    if record_is_current(out, rec):
        return rec
    if rec is None or "inputs" not in rec:
        raise ShardsError(f"shard {shard_name(domain, number)} is not complete (no record); "
                          f"re-run the command (or the part) that writes it")
    return _write_again(out, rec)


def _write_again(out: str, rec: dict) -> dict:
    """Shard `rec` written again from its inputs; its new record."""
    return write_shard(out, rec["domain"], rec["number"], [tuple(i) for i in rec["inputs"]], rec["fingerprint"],
                       rec["limits"], progress=lambda d, n: None)


def _lost_originals(rec: dict, first: dict[bytes, str]) -> bool:
    """Whether a duplicate left out of this shard copies a sample that neither an earlier shard
    (`first`) nor this one holds any more: that copy was edited, deleted or rejected since an
    earlier finalize dropped the duplicate, or lies in another part's shard. The shard's record
    still matches its unchanged inputs, so only rebuilding it brings the duplicate back."""
    own = {s["sha256"] for s in rec["samples"]}
    return any(d["sha256"] not in own and bytes.fromhex(d["sha256"]) not in first for d in rec["duplicates"])


def _rebuild(out: str, dest: str, rec: dict) -> dict:
    """Write a shard again from its inputs during finalize. An index that lists it (OUT's, from
    an earlier run or merge, and `dest`'s) no longer holds once it changes: removed first, as
    shardrun removes it before writing shards."""
    for index in {storage.join(out, INDEX_NAME), storage.join(dest, INDEX_NAME)}:
        storage.remove(index)
    return _write_again(out, rec)


def _drop_duplicates(out: str, rec: dict, first: dict[bytes, str]) -> dict:
    """Remove from a shard the samples whose stored bytes an earlier one holds; `first` (sha256 ->
    key kept) is updated with this shard's samples."""
    remove = set()
    for s in rec["samples"]:
        digest = bytes.fromhex(s["sha256"])
        if digest in first:
            remove.add(s["key"])
        else:
            first[digest] = s["key"]
    return rewrite_shard(rec, out, remove) if remove else rec


def _table_rows(domain: str, rec: dict, first: dict[bytes, str]) -> tuple[list[dict], list[dict]]:
    """A shard's manifest rows and quarantine rows (its rejects, then its duplicates). Sources
    and reasons are redacted here too: a record written before shardwriter redacted them may
    still hold a signed URL."""
    rows = [{c: s[c] for c in MANIFEST_COLUMNS if c in s} | {"domain": domain, "shard": rec["url"],
                                                            "source": storage.redact(s["source"])}
            for s in rec["samples"]]
    qrows = [{"source": storage.redact(r["source"]), "domain": domain, "reason": storage.redact_text(r["reason"])}
             for r in rec["rejected"]]
    qrows += [{"source": storage.redact(d["source"]), "domain": domain,
               "reason": f"duplicate of {first[bytes.fromhex(d['sha256'])]}"} for d in rec["duplicates"]]
    return rows, qrows
