"""`make shards verify OUT`: re-read every shard against index.json and manifest.parquet.

Each shard's bytes are checked against its index entry (size, sha256, sample count), its samples
against the manifest (keys) and their own json (image sha256); files and rows that the index
does not list, index totals that do not add up, and a domain with no sample in an OUT of a whole
`make shards` run (one that failed; a translation's OUT holds one domain) are problems too.
Entries are opened only through `index_entry_url`, so a hostile index is reported, never followed.
The summary says how to repair: delete the bad shards and re-run make shards (it writes a missing
shard again), or re-run with --recheck, which also rewrites a shard whose bytes differ from its
record (a same-size change that a plain re-run, which compares sizes only, keeps).

OUT may be a URL (pipeline.storage): then the index, manifest and shards are read from the store,
an entry being a relative path under OUT's URL (index_entry_url refuses one that leaves it).
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile

from pipeline import storage
from pipeline.hashing import sha256_bytes
from pipeline.index import index_entry_url
from pipeline.layout import DOMAINS, INDEX_NAME, MANIFEST_NAME, ShardsError, out_root


def verify(out: str) -> tuple[list[str], str]:
    """Re-read every shard; return (problems, summary). Each problem names its shard."""
    out = out_root(out)
    index_file = storage.join(out, INDEX_NAME)
    index, entries, by_shard, repeated = _read_outputs(out, index_file)
    problems = _unlisted(out, index, entries, by_shard) + repeated
    nsamples = nbytes = 0
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
    problems += _check_totals(index, entries)
    summary = (f"verify: {len(entries)} shards, {nsamples} samples, {nbytes / 1e6:.1f} MB re-read; "
               f"{len(problems)} bad" + ("." if not problems else f": see above. {_repair_hint(index)}"))
    return problems, summary


def _check_totals(index: dict, entries: list[dict]) -> list[str]:
    """Index totals that do not add up, and a domain with no sample in an OUT of `make shards`
    (such a run fails; a translation's OUT holds one domain only, a part's may hold none)."""
    problems = []
    whole_run = "translation" not in index and "part" not in index
    for d in DOMAINS:
        tot = index.get("totals", {}).get(d, {})
        mine = [e for e in entries if e.get("domain") == d]
        n = sum(e.get("nsamples", 0) for e in mine)
        # bytes and shards are checked where the index has them (every index make shards writes)
        for what, value in (("bytes", sum(e.get("bytes", 0) for e in mine)), ("shards", len(mine))):
            if what in tot and tot[what] != value:
                problems.append(f"index.json totals for {d}: {tot[what]} {what}, shards add up to {value}")
        if tot.get("samples") != n:
            problems.append(f"index.json totals for {d}: {tot.get('samples')} samples, shards add up to {n}")
        elif whole_run and n == 0:
            problems.append(f"index.json: domain {d} has no sample (make shards fails on such a domain; "
                            f"quarantine.parquet says why its inputs were rejected)")
    return problems


def _repair_hint(index: dict) -> str:
    """How to repair what verify found: the writer rewrites a shard that is missing, or whose
    bytes differ from its record once asked to hash them, and always rewrites the index."""
    if "translation" in index:
        return ("To repair: delete the bad shards and re-run the translate command that wrote OUT "
                "(it writes missing shards again, then the index and manifest).")
    return ("To repair: delete each bad shard and re-run make shards with the same arguments (it writes "
            "missing shards again, then the index and manifest); add --recheck to also find and rewrite "
            "every shard whose bytes differ from its record.")


def _read_outputs(out: str, index_file: str) -> tuple[dict, list[dict], dict[str, dict[str, dict]], list[str]]:
    """(index, its object entries, manifest rows by shard url and key, the manifest's repeated rows)."""
    import pyarrow.parquet as pq

    manifest_file = storage.join(out, MANIFEST_NAME)
    try:
        index = json.loads(storage.read_bytes(index_file))
        entries = [e for e in index["shards"] if isinstance(e, dict)]
        manifest = pq.read_table(io.BytesIO(storage.read_bytes(manifest_file)) if storage.is_url(manifest_file)
                                 else manifest_file).to_pylist()
    except storage.StorageError as e:  # a missing backend: its own one line names the extra
        raise ShardsError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardsError(f"{storage.redact(out)}: cannot read index.json / manifest.parquet: "
                          f"{storage.redact_text(str(e))}") from None
    except Exception as e:  # noqa: BLE001 - a store's client raises its own types (no endpoint, bad bucket name)
        raise ShardsError(f"{storage.redact(out)}: cannot read index.json / manifest.parquet: "
                          f"{type(e).__name__}: {storage.redact_text(str(e))}") from None
    by_shard: dict[str, dict[str, dict]] = {}
    repeated = []
    for row in manifest:
        rows = by_shard.setdefault(row["shard"], {})
        if row["key"] in rows:  # kept as one row below: a reader counting rows would count it twice
            repeated.append(f"{row['shard']}: sample {row['key']} is in manifest.parquet more than once")
        rows[row["key"]] = row
    return index, entries, by_shard, repeated


def _unlisted(out: str, index: dict, entries: list[dict], by_shard: dict) -> list[str]:
    """Index entries that are not objects, and manifest rows and shard files the index does not list."""
    problems = []
    if len(entries) != len(index["shards"]):
        problems.append("index.json: a shard entry is not an object")
    listed = {str(e.get("url")) for e in entries}
    for url in sorted(set(by_shard) - listed):
        problems.append(f"{url}: in manifest.parquet but not in index.json")
    for d in DOMAINS:
        for path in storage.glob(out, d, "*.tar"):
            rel = f"{d}/{os.path.basename(path)}"
            if rel not in listed:
                problems.append(f"{rel}: shard file not in index.json")
    return problems


def _read_entry(index_file: str, entry: dict) -> bytes:
    """The bytes of one index entry's shard (a regular file, or an object under OUT's URL, inside
    OUT), else ValueError."""
    target = index_entry_url(index_file, entry)  # IndexEntryError is a ValueError
    url = entry["url"]
    if storage.scheme(url) not in (None, "file"):
        raise ValueError(f"{storage.redact(url)}: a remote shard; verify re-reads the shards inside OUT only")
    if storage.is_url(target):  # a relative entry of an index at a URL
        try:
            return storage.read_bytes(target)
        except FileNotFoundError:
            raise ValueError(f"{url}: missing (no such object)") from None
        except OSError as e:
            raise ValueError(f"{url}: unreadable: {storage.redact_text(str(e))}") from None
    try:
        st = os.stat(target)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{url}: not a regular file")
        with open(target, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{url}: unreadable: {e.strerror}") from None


def _check_shard(entry: dict, data: bytes, rows: dict) -> tuple[list[str], int]:
    """What is wrong with one shard's bytes against index.json and the manifest, and its sample count."""
    bad = []
    if len(data) != entry.get("bytes"):
        bad.append(f"{len(data)} bytes, index.json says {entry.get('bytes')}")
    if sha256_bytes(data) != entry.get("sha256"):
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
        sha = sha256_bytes(img)
        if sha != meta.get("sha256") or (key in rows and sha != rows[key]["sha256"]):
            bad.append(f"sample {key}: image sha256 differs from its json/manifest")
            break
    for key, (img, meta) in samples.items():
        wrong = _row_differs(img, meta, rows.get(key))
        if wrong:
            bad.append(f"sample {key}: manifest.parquet {wrong}")
            break
    return bad, len(samples)


def _row_differs(img: bytes, meta: dict, row: dict | None) -> str | None:
    """What a manifest row says about its sample that the shard contradicts: its bytes against the
    image's length, its width and height against the sample's json (where the json has them)."""
    if row is None:  # the keys check above reports it
        return None
    if row.get("bytes") != len(img):
        return f"says {row.get('bytes')} bytes, the image has {len(img)}"
    for side in ("width", "height"):
        if side in meta and row.get(side) != meta[side]:
            return f"says {side} {row.get(side)}, the sample's json says {meta[side]}"
    return None


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
            if not m.isfile():  # a folder or link entry (`tar cf x.tar dir/`) has no bytes to check
                raise ValueError(f"member {m.name!r} is not a regular file")
            key, _, ext = m.name.partition(".")
            if key != cur:
                close()
                if key in out:
                    raise ValueError(f"sample {key} members are not adjacent")
                cur, parts = key, {}
            parts[ext] = tar.extractfile(m).read()
        close()
    return out
