"""Defects a review of pipeline/ found: a stale duplicate record after its earlier copy changed,
glob characters in OUT's path, non-file tar members, and credentials in source URLs."""

from __future__ import annotations

import io
import json
import os
import tarfile

import fsspec
import pyarrow.parquet as pq
import pytest

from pipeline import sources, storage
from pipeline.images import Rejected, reason_category
from pipeline.layout import ShardsError
from pipeline.shardwriter import rewrite_shard, write_tar
from pipeline.verify import verify
from test_hostile_pipeline import folder, make, outputs
from test_shards import encode, noise_rgb


def flat_png(seed: int) -> bytes:
    """An uncompressed PNG: same byte count for every seed, different content."""
    return encode(noise_rgb(seed), "PNG", compress_level=0)


def two_domains(tmp_path, a_images: dict[str, bytes]):
    a = folder(tmp_path / "A", a_images)
    b = folder(tmp_path / "B", {f"q{i}.png": flat_png(50 + i) for i in range(2)})
    return a, b


def by_name(rows) -> dict[str, dict]:
    return {os.path.basename(r["source"]): r for r in rows}


# ----------------------------------------------------------------------------- 1. stale duplicates


@pytest.mark.parametrize("change", ["edited", "invalid"])
def test_duplicate_comes_back_when_its_earlier_copy_changes(tmp_path, change):
    p0 = flat_png(0)
    a, b = two_domains(tmp_path, {"p0.png": p0, "p1.png": flat_png(1), "p2.png": flat_png(2), "p3.png": p0})
    out = tmp_path / "out"
    assert make(a, b, out, "--max-per-shard", "2") == 3
    _, quarantine = outputs(out)
    assert [os.path.basename(q["source"]) for q in quarantine] == ["p3.png"]
    assert quarantine[0]["reason"].startswith("duplicate of ")

    # p3's shard (a-000001) is unchanged and would be skipped; its earlier copy p0 is gone.
    (a / "p0.png").write_bytes(flat_png(9) if change == "edited" else b"x" * len(p0))
    assert make(a, b, out, "--max-per-shard", "2") == (0 if change == "edited" else 3)
    manifest, quarantine = outputs(out)
    stored = by_name(r for r in manifest if r["domain"] == "a")
    assert set(stored) == ({"p0.png"} if change == "edited" else set()) | {"p1.png", "p2.png", "p3.png"}
    assert stored["p3.png"]["shard"] == "a/a-000001.tar"
    assert [(os.path.basename(q["source"]), reason_category(q["reason"])) for q in quarantine] == (
        [] if change == "edited" else [("p0.png", "not an image")])
    assert (out / "index.json").exists() and verify(str(out))[0] == []
    # Settled: a third run skips every shard and writes the same outputs.
    assert make(a, b, out, "--max-per-shard", "2") == (0 if change == "edited" else 3)
    assert outputs(out)[0] == manifest and verify(str(out))[0] == []


def test_part_rerun_after_merge_keeps_working_and_merge_drops_the_duplicate_again(tmp_path):
    p0 = flat_png(0)
    a, b = two_domains(tmp_path, {"p0.png": p0, "p1.png": flat_png(1), "p2.png": flat_png(2), "p3.png": p0})
    out = tmp_path / "out"
    for i in range(2):
        assert make(a, b, out, "--max-per-shard", "2", "--part", f"{i}/2") == 0
    assert make_merge(out) == 3  # p3 (part 1) duplicates p0 (part 0): dropped by the merge
    # Part 1's dedupe cannot see part 0's shard: it rebuilds its shard, and the stale merged
    # index (which no longer describes that shard) is gone until the next merge.
    assert make(a, b, out, "--max-per-shard", "2", "--part", "1/2") == 0
    assert not (out / "index.json").exists()
    assert make_merge(out) == 3
    _, quarantine = outputs(out)
    assert [os.path.basename(q["source"]) for q in quarantine] == ["p3.png"]
    assert verify(str(out))[0] == []


def make_merge(out) -> int:
    from pipeline import shards

    return shards.main(["merge", str(out)])


# ----------------------------------------------------------------------------- 2. glob characters in OUT


def test_out_path_with_glob_characters_merges_cleans_and_verifies(tmp_path):
    a, b = two_domains(tmp_path, {f"p{i}.png": flat_png(i) for i in range(4)})
    out = tmp_path / "o[1]"
    for i in range(2):
        assert make(a, b, out, "--max-per-shard", "2", "--part", f"{i}/2") == 0
    assert make_merge(out) == 0
    assert verify(str(out))[0] == []

    # A shard beyond the plan (an older, longer run) is removed by the next run ...
    stale = out / "a" / "a-000009.tar"
    stale.write_bytes((out / "a" / "a-000000.tar").read_bytes())
    (out / "a" / "unlisted.tar").write_bytes(b"")
    problems, _ = verify(str(out))
    # ... and until then verify names both files the index does not list.
    assert {"a/a-000009.tar: shard file not in index.json", "a/unlisted.tar: shard file not in index.json"} <= set(
        problems), problems
    (out / "a" / "unlisted.tar").unlink()
    assert make(a, b, out, "--max-per-shard", "2") == 0
    assert not stale.exists()
    assert verify(str(out))[0] == []


def test_storage_glob_takes_the_root_literally_for_paths_and_urls(tmp_path):
    for root in (tmp_path / "o[1]", tmp_path / "o1", tmp_path / "o*"):
        (root / "parts" / "0-of-2").mkdir(parents=True)
        (root / "parts" / "0-of-2" / "index.json").write_text("{}")
    assert storage.glob(str(tmp_path / "o[1]"), "parts", "*-of-*", "index.json") == [
        str(tmp_path / "o[1]" / "parts" / "0-of-2" / "index.json")]
    assert storage.glob(str(tmp_path / "o*"), "parts", "*-of-*", "index.json") == [
        str(tmp_path / "o*" / "parts" / "0-of-2" / "index.json")]

    fs = fsspec.filesystem("memory")
    try:
        for root in ("/review-glob/o[1]", "/review-glob/o1", "/review-glob/o?"):
            fs.pipe(f"{root}/a/a-000000.tar", b"x")
        assert storage.glob("memory://review-glob/o[1]", "a", "*.tar") == ["memory:///review-glob/o[1]/a/a-000000.tar"]
        assert storage.glob("memory://review-glob/o?", "a", "*.tar") == ["memory:///review-glob/o?/a/a-000000.tar"]
    finally:
        fs.rm("/review-glob", recursive=True)


# ----------------------------------------------------------------------------- 3. non-file tar members


def add_directory_member(shard) -> None:
    """Append a directory entry, as `tar rf shard dir/` would."""
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("zz/")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)


def test_verify_reports_a_shard_with_a_directory_member_as_bad(tmp_path):
    a, b = two_domains(tmp_path, {f"p{i}.png": flat_png(i) for i in range(2)})
    out = tmp_path / "out"
    assert make(a, b, out) == 0
    add_directory_member(out / "a" / "a-000000.tar")
    problems, summary = verify(str(out))
    assert any(p.startswith("a/a-000000.tar: ") and "member 'zz' is not a regular file" in p
               for p in problems), problems
    assert "1 bad" in summary


def test_rewrite_shard_refuses_a_directory_member_naming_it(tmp_path):
    (tmp_path / "a").mkdir()
    shard = tmp_path / "a" / "a-000000.tar"
    write_tar(str(shard), [("k1.png", flat_png(0)), ("k1.json", b"{}"), ("k2.png", flat_png(1)), ("k2.json", b"{}")])
    add_directory_member(shard)
    record = {"url": "a/a-000000.tar", "samples": [{"key": "k1", "source": "x", "sha256": "0" * 64},
                                                   {"key": "k2", "source": "y", "sha256": "1" * 64}],
              "duplicates": []}
    with pytest.raises(ShardsError, match=r"a-000000\.tar: member 'zz' is not a regular file"):
        rewrite_shard(record, str(tmp_path), {"k2"})


# ----------------------------------------------------------------------------- 4. credentials in sources


SECRETS = ("secret", "SIGXYZ", "AKIAXYZ", "X-Amz")


def test_presigned_and_password_urls_are_written_redacted(tmp_path, http_server):
    served = folder(http_server.root / "review-creds", {"0.png": flat_png(70), "1.png": flat_png(71),
                                                        "bad.png": b"not an image"})
    base = f"http://user:secret@{http_server.url.split('//')[1]}/review-creds"
    sig = "?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=SIGXYZ"
    lines = [f"{base}/0.png{sig}", f"{base}/1.png{sig}1", f"{base}/0.png{sig}2", f"{base}/bad.png{sig}",
             f"{base}/missing.png{sig}"]
    listing = tmp_path / "a.txt"
    listing.write_text("\n".join(lines) + "\n")
    b = folder(tmp_path / "B", {"q.png": flat_png(80)})
    out = tmp_path / "out"
    assert make(listing, b, out) == 3
    manifest, quarantine = outputs(out)
    plain = f"{http_server.url}/review-creds"
    assert sorted(r["source"] for r in manifest if r["domain"] == "a") == [f"{plain}/0.png", f"{plain}/1.png"]
    assert sorted((q["source"], reason_category(q["reason"])) for q in quarantine) == [
        (f"{plain}/0.png", "duplicate"), (f"{plain}/bad.png", "not an image"), (f"{plain}/missing.png", "unreadable")]
    shard_text = b"".join(tarfile.open(out / "a" / "a-000000.tar").extractfile(m).read()
                          for m in tarfile.open(out / "a" / "a-000000.tar") if m.name.endswith(".json"))
    texts = [json.dumps(manifest), json.dumps(quarantine), shard_text.decode(),
             json.dumps(pq.read_table(out / "quarantine.parquet").to_pylist())]
    for text in texts:
        assert not any(s in text for s in SECRETS), text
    assert json.loads(shard_text.split(b"}")[0] + b"}")["source"].startswith(plain)
    assert served.exists()


def test_a_failed_url_read_names_no_credential(monkeypatch):
    url = "s3://user:secret@bucket/x.png?X-Amz-Signature=SIGXYZ"

    def fail(u, **kw):
        raise OSError(f"HTTP 500 for {u} (bucket user:secret@bucket)")

    monkeypatch.setattr(fsspec.core, "url_to_fs", fail)
    with pytest.raises(Rejected) as e:
        sources.read_source(url, 1000)
    assert e.value.reason.startswith("unreadable: OSError: HTTP 500 for s3://bucket/x.png")
    assert not any(s in e.value.reason for s in SECRETS), e.value.reason
