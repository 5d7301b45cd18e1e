"""What a run trained on, as plain dicts: one record per domain, read from the shards' own
index.json and manifest.parquet (nothing here knows about MLflow; the run store logs them).

    datasets(shards=None, shards_a=None, shards_b=None) -> [record, ...]   as the config names shards
    shard_datasets(out_dir) -> [record_a, record_b]                        an OUT folder of `make shards`
    domain_dataset(spec, domain) -> record                                 one domain's shards

A record:

    {"name": "shards-a", "domain": "a",
     "digest": "0f3c...",          16 hex digits that identify the domain's content (see digest_of)
     "digest_of": "manifest",      "manifest": its (key, sha256) rows, so the same samples give the
                                   same digest however they are sharded and wherever they are stored;
                                   "index": the index's shard checksums (no manifest); "urls": the
                                   shard URLs (a pattern or list)
     "source": "/data/out/a",      where the shards are: OUT/<domain> for an OUT folder, the index
                                   file for an index, the pattern or the URLs' common folder
                                   otherwise; URLs without credentials or query strings
     "profile": {"samples": 2000, "shards": 3, "bytes": 3456789},   None where unknown
     "manifest_sha256": "...", "index_sha256": "..."}               None where there is no such file

An OUT folder or index.json may be local or a URL (s3://, gs://, http(s)://, ...): index.json and
manifest.parquet are read through pipeline.storage, as the loader reads them
(pipeline.index.index_of decides whether a spec names an index).
"""
from __future__ import annotations

import io
import os

from pipeline import storage
from pipeline.hashing import sha256_bytes, sha256_file, sha256_json
from pipeline.index import index_of, read_index
from pipeline.layout import DOMAINS, INDEX_NAME, MANIFEST_NAME
from pipeline.storage import redact

DIGEST_LEN = 16


def datasets(shards=None, shards_a=None, shards_b=None) -> list[dict]:
    """A record per domain that has shards: `shards_a`/`shards_b` where given, else `shards` (an OUT
    folder, whose index names both domains)."""
    specs = {"a": shards_a if shards_a is not None else shards,
             "b": shards_b if shards_b is not None else shards}
    return [domain_dataset(spec, d) for d, spec in specs.items() if spec is not None]


def shard_datasets(out_dir) -> list[dict]:
    """Both domains of an OUT folder of `make shards` (a path or URL)."""
    out = os.fspath(out_dir)
    index = storage.join(out, INDEX_NAME)
    if not storage.exists(index):
        raise FileNotFoundError(f"{redact(index)}: no {INDEX_NAME} (is {redact(out)} an OUT folder of make shards?)")
    return [domain_dataset(out, d) for d in DOMAINS]


def domain_dataset(spec, domain: str) -> dict:
    """One domain's record from an OUT folder or index.json (local or URL), a brace pattern, one
    URL or a list of URLs."""
    if domain not in DOMAINS:
        raise ValueError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        index_file = index_of(spec)
        if index_file is not None:
            folder = index_file not in (spec, storage.local_path(spec))  # an OUT folder, not an index file
            return _from_index(index_file, domain, _shown(storage.join(spec, domain) if folder else spec))
    return _from_urls(spec, domain)


def _shown(location: str) -> str:
    """How a source is recorded: a local path made absolute, a URL redacted."""
    if storage.is_url(location):
        return redact(location)
    return os.path.realpath(storage.local_path(location))


def _from_index(index_file: str, domain: str, source: str) -> dict:
    index, index_bytes = read_index(index_file)
    shards = [s for s in index["shards"] if isinstance(s, dict) and s.get("domain") == domain]
    manifest = _read_manifest(storage.join(storage.parent(index_file), MANIFEST_NAME), domain)
    if manifest is not None:
        digest, samples, manifest_sha = manifest
        digest_of = "manifest"
    else:
        lines = sorted(f"{s.get('url')}\t{s.get('sha256', '')}\n" for s in shards)
        digest, digest_of, manifest_sha = sha256_bytes("".join(lines).encode()), "index", None
        samples = sum(int(s.get("nsamples", 0)) for s in shards)
    nbytes = (index.get("totals") or {}).get(domain, {}).get("bytes")
    return {"name": f"shards-{domain}", "domain": domain, "digest": digest[:DIGEST_LEN], "digest_of": digest_of,
            "source": source,
            "profile": {"samples": samples, "shards": len(shards),
                        "bytes": int(nbytes if nbytes is not None else sum(int(s.get("bytes", 0)) for s in shards))},
            "manifest_sha256": manifest_sha, "index_sha256": sha256_bytes(index_bytes)}


def _read_manifest(url: str, domain: str) -> tuple[str, int, str] | None:
    """(digest, samples, file sha256) of the domain's manifest rows; None when there is no
    manifest. The digest is sha256 over the "key<TAB>sha256" lines sorted by key."""
    import pyarrow.parquet as pq

    if storage.is_url(url):
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            return None
        source, file_sha = io.BytesIO(data), sha256_bytes(data)
    else:
        source = storage.local_path(url)
        if not os.path.isfile(source):
            return None
        file_sha = sha256_file(source)
    rows = pq.read_table(source, columns=["key", "domain", "sha256"]).to_pydict()
    pairs = sorted((k, s) for k, d, s in zip(rows["key"], rows["domain"], rows["sha256"]) if d == domain)
    return sha256_bytes("".join(f"{k}\t{s}\n" for k, s in pairs).encode()), len(pairs), file_sha


def _from_urls(spec, domain: str) -> dict:
    """A pattern or list names shards but no manifest: the digest is of the (redacted) URLs."""
    if isinstance(spec, (list, tuple)):
        urls = [os.fspath(u) for u in spec]
        shown = _common_prefix([redact(u) for u in urls]) or (redact(urls[0]) if urls else "")
    elif isinstance(spec, (str, os.PathLike)):
        import braceexpand

        urls = list(braceexpand.braceexpand(os.fspath(spec)))
        shown = redact(os.fspath(spec))
    else:
        raise TypeError(f"shards for domain {domain!r}: expected a path, pattern or list, got {type(spec).__name__}")
    if not urls:
        raise ValueError(f"shards for domain {domain!r}: empty list")
    redacted = [redact(u) for u in urls]
    return {"name": f"shards-{domain}", "domain": domain, "digest": sha256_json(redacted)[:DIGEST_LEN],
            "digest_of": "urls", "source": shown,
            "profile": {"samples": None, "shards": len(urls), "bytes": None},
            "manifest_sha256": None, "index_sha256": None}


def _common_prefix(urls: list[str]) -> str:
    """The folder the URLs share ("s3://bucket/shards/"), or "" when they share none."""
    prefix = os.path.commonprefix(urls)
    return prefix[:prefix.rfind("/") + 1] if "/" in prefix else ""
