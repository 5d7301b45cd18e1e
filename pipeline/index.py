"""OUT's three summaries and how an index is read safely.

- `finalize` walks the completion records in shard order, removes exact duplicates (same stored
  bytes) of a sample in an earlier shard from their shard (quarantined as "duplicate of <key>"),
  then writes manifest.parquet and quarantine.parquet, and index.json last, each under a
  temporary name renamed into place: index.json present means the outputs are complete.
- `index_entry_url` is the one way a reader turns an index.json entry into something to open:
  shard URLs in an index are data, never commands.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

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


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: "c:" is a drive


def url_scheme(url: str) -> str | None:
    """The scheme a shard URL names, lower case ("pipe", "s3", "file", ...); None for a path."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else None


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
    scheme = url_scheme(url)
    if scheme is not None:
        if scheme not in INDEX_SCHEMES:
            raise refuse(f"scheme {scheme!r} is not allowed in an index (only {', '.join(INDEX_SCHEMES)} URLs or "
                         f"relative paths; a pipe: command is run only when given directly as the shard list)")
        if scheme != "file":
            return url
        url = url[len("file://"):] if url.startswith("file://") else url[len(scheme) + 1:]
    elif os.path.isabs(url):
        raise refuse("absolute path (an index names its shards relative to its own folder)")
    root = os.path.realpath(os.path.dirname(os.path.abspath(index_file)))
    target = os.path.realpath(os.path.join(root, url))
    if target == root or os.path.commonpath([root, target]) != root:
        raise refuse(f"resolves to {target}, outside the index's folder {root} (through '..', an absolute "
                     f"file: path or a symbolic link)")
    return target


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
             dedupe: bool = True) -> Totals:
    """Dedupe the given shards in order (unless `dedupe` is False: outputs that must keep every
    key, such as translations) and write manifest, quarantine and index (last) to `dest`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in (MANIFEST_NAME, QUARANTINE_NAME, INDEX_NAME):
        remove_temps(dest, name)  # left by a run killed while finalising
    man_schema, quar_schema = _schemas()
    totals, entries = Totals(), []
    # The manifest's rename comes first (inner block), then the quarantine's; index.json last.
    with (replacing(os.path.join(dest, QUARANTINE_NAME)) as quar_tmp,
          replacing(os.path.join(dest, MANIFEST_NAME)) as man_tmp,
          pq.ParquetWriter(str(man_tmp), man_schema) as man, pq.ParquetWriter(str(quar_tmp), quar_schema) as quar):
        for domain in DOMAINS:
            first: dict[bytes, str] = {}  # stored sha256 -> key of the sample kept (memory: ~100 B/sample)
            for number in numbers.get(domain, []):
                rec = _current_record(out, domain, number)
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
    write_text(os.path.join(dest, INDEX_NAME), json.dumps(index, indent=1))
    return totals


def _current_record(out: str, domain: str, number: int) -> dict:
    """Shard `number`'s record; the shard is rebuilt from its inputs first when the file and its
    record disagree (a crash mid-rewrite)."""
    rec = load_record(out, domain, number)
    if record_is_current(out, rec):
        return rec
    if rec is None or "inputs" not in rec:
        raise ShardsError(f"shard {shard_name(domain, number)} is not complete (no record); "
                          f"re-run the command (or the part) that writes it")
    return write_shard(out, domain, number, [tuple(i) for i in rec["inputs"]], rec["fingerprint"],
                       rec["limits"], progress=lambda d, n: None)


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
    """A shard's manifest rows and quarantine rows (its rejects, then its duplicates)."""
    rows = [{c: s[c] for c in MANIFEST_COLUMNS if c in s} | {"domain": domain, "shard": rec["url"]}
            for s in rec["samples"]]
    qrows = [{"source": r["source"], "domain": domain, "reason": r["reason"]} for r in rec["rejected"]]
    qrows += [{"source": d["source"], "domain": domain,
               "reason": f"duplicate of {first[bytes.fromhex(d['sha256'])]}"} for d in rec["duplicates"]]
    return rows, qrows
