"""What a run trained on, as plain dicts: one record per domain, read from the shards' own
index.json and manifest.parquet (nothing here knows about MLflow; the run store logs them).

    datasets(shards=None, shards_a=None, shards_b=None) -> [record, ...]   as the config names shards
    shard_datasets(out_dir) -> [record_a, record_b]                        an OUT folder of `make shards`
    domain_dataset(spec, domain) -> record                                 one domain's shards

A record:

    {"name": "shards-a", "domain": "a",
     "digest": "0f3c...",          16 hex digits that identify the domain's content (see digest_of)
     "digest_of": "manifest",      "manifest": its (key, sha256) rows, so the same samples give the
                                   same digest however they are sharded; "index": the index's shard
                                   checksums (no manifest); "urls": the shard URLs (a pattern or list)
     "source": "/data/out/a",      where the shards are (URLs without credentials or query strings)
     "profile": {"samples": 2000, "shards": 3, "bytes": 3456789},   None where unknown
     "manifest_sha256": "...", "index_sha256": "..."}               None where there is no such file

Only local index files are read (as pipeline.loader does); any other spec is described by its URLs.
"""
from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

from pipeline.hashing import sha256_bytes, sha256_file, sha256_json
from pipeline.layout import DOMAINS, INDEX_NAME, MANIFEST_NAME

DIGEST_LEN = 16


def datasets(shards=None, shards_a=None, shards_b=None) -> list[dict]:
    """A record per domain that has shards: `shards_a`/`shards_b` where given, else `shards` (an OUT
    folder, whose index names both domains)."""
    specs = {"a": shards_a if shards_a is not None else shards,
             "b": shards_b if shards_b is not None else shards}
    return [domain_dataset(spec, d) for d, spec in specs.items() if spec is not None]


def shard_datasets(out_dir) -> list[dict]:
    """Both domains of an OUT folder of `make shards`."""
    index = Path(out_dir) / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no {INDEX_NAME} (is {out_dir} an OUT folder of make shards?)")
    return [domain_dataset(out_dir, d) for d in DOMAINS]


def domain_dataset(spec, domain: str) -> dict:
    """One domain's record from an OUT folder, an index.json, a brace pattern, one URL or a list of URLs."""
    if domain not in DOMAINS:
        raise ValueError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    if isinstance(spec, (str, os.PathLike)) and not _has_scheme(os.fspath(spec)):
        path = Path(spec)
        if path.is_dir():
            return _from_index(path / INDEX_NAME, domain, source=path / domain)
        if path.suffix == ".json":
            return _from_index(path, domain, source=path)
    return _from_urls(spec, domain)


def _has_scheme(spec: str) -> bool:
    return len(urllib.parse.urlsplit(spec).scheme) > 1  # one letter is a Windows drive


def _read_index(index_path: Path) -> dict:
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no {INDEX_NAME} (is {index_path.parent} an OUT folder of make shards?)")
    try:
        index = json.loads(index_path.read_text())
    except ValueError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{index_path}: expected an object with a 'shards' list")
    return index


def _from_index(index_path: Path, domain: str, source: Path) -> dict:
    index = _read_index(index_path)
    manifest = index_path.with_name(MANIFEST_NAME)
    shards = [s for s in index["shards"] if isinstance(s, dict) and s.get("domain") == domain]
    if manifest.is_file():
        digest, samples, digest_of = *_manifest_digest(manifest, domain), "manifest"
    else:
        lines = sorted(f"{s.get('url')}\t{s.get('sha256', '')}\n" for s in shards)
        digest, digest_of = sha256_bytes("".join(lines).encode()), "index"
        samples = sum(int(s.get("nsamples", 0)) for s in shards)
    nbytes = index.get("totals", {}).get(domain, {}).get("bytes")
    return {"name": f"shards-{domain}", "domain": domain, "digest": digest[:DIGEST_LEN], "digest_of": digest_of,
            "source": str(source.resolve()),
            "profile": {"samples": samples, "shards": len(shards),
                        "bytes": int(nbytes if nbytes is not None else sum(int(s.get("bytes", 0)) for s in shards))},
            "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "index_sha256": sha256_file(index_path)}


def _manifest_digest(manifest: Path, domain: str) -> tuple[str, int]:
    """sha256 over the domain's "key<TAB>sha256" lines sorted by key, and their number."""
    import pyarrow.parquet as pq

    rows = pq.read_table(manifest, columns=["key", "domain", "sha256"]).to_pydict()
    pairs = sorted((k, s) for k, d, s in zip(rows["key"], rows["domain"], rows["sha256"]) if d == domain)
    return sha256_bytes("".join(f"{k}\t{s}\n" for k, s in pairs).encode()), len(pairs)


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


def redact(url: str) -> str:
    """`url` without what may hold a credential: user:password@, the query string (signed URLs),
    the fragment, and a pipe: command's words after the program name."""
    if url.startswith("pipe:"):
        words = url[len("pipe:"):].split()
        return f"pipe:{words[0] if words else ''} ..."
    parts = urllib.parse.urlsplit(url)
    if len(parts.scheme) <= 1:
        return url  # a local path
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _common_prefix(urls: list[str]) -> str:
    """The folder the URLs share ("s3://bucket/shards/"), or "" when they share none."""
    prefix = os.path.commonprefix(urls)
    return prefix[:prefix.rfind("/") + 1] if "/" in prefix else ""
