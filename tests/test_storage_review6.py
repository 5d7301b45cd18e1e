"""Object storage review 6: in an object store's URL `?` and `#` are characters of the key (an OUT
or a source named so keeps its name, in the bucket and in the manifest); s3a:// and s3:// share a
lock; scrubbing a short fragment leaves the rest of a message alone; a shard name longer than a
file name may be is cached all the same."""
from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import shards, storage
from pipeline.lock import lock_file
from pipeline.loader import ShardCache, UnpairedLoader


def test_an_object_stores_key_keeps_its_question_mark_and_hash():
    assert storage.join("s3://bkt/hash#x", "a/a-000000.tar") == "s3://bkt/hash#x/a/a-000000.tar"
    assert storage.join("gs://bkt/q?x", "index.json") == "gs://bkt/q?x/index.json"
    assert storage.parent("s3://bkt/src/h#1.jpg") == "s3://bkt/src"
    assert storage.redact("s3://KEY:SECRET@bkt/src/h#1.jpg") == "s3://bkt/src/h#1.jpg"
    assert storage.redact("s3://bkt/src/q?1.jpg") == "s3://bkt/src/q?1.jpg"
    # but a query that looks like a credential pasted onto an object store's URL is still cut
    assert storage.redact("s3://bkt/x.png?X-Amz-Signature=SIG") == "s3://bkt/x.png"
    assert storage.redact("gs://bkt/x?a=1&token=SECRET") == "gs://bkt/x"
    # a web URL's query and fragment are still what they are there: a signed URL's signature
    assert storage.join("https://h/o?sig=abc", "index.json") == "https://h/o/index.json?sig=abc"
    assert storage.redact("https://u:p@h/o/x.tar?sig=abc#f") == "https://h/o/x.tar"


def test_aliases_of_one_location_share_a_lock_and_secrets_do_not_name_it():
    assert lock_file("s3a://bkt/x/") == lock_file("s3://bkt/x") == lock_file("S3://KEY:SECRET@bkt/x")
    assert lock_file("s3://bkt/x") != lock_file("s3://bkt/y")


def test_scrubbing_a_short_fragment_leaves_the_message_readable():
    msg = storage.error_text(FileNotFoundError("https://h/hash/a/a-000000.tar: no such object"), "https://h/hash#a")
    assert "a-000000.tar" in msg and "***" not in msg
    long = storage.error_text(ValueError("bad signature sigXYZ12345 for /o"), "https://h/o?sigXYZ12345")
    assert "sigXYZ12345" not in long


def test_a_shard_name_longer_than_a_file_name_is_cached(tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), 10_000)
    url = "s3://bkt/long/a/" + "x" * 244 + ".tar"
    with cache.open(url, lambda: b"tar bytes") as f:
        assert f.read() == b"tar bytes"
    with cache.open(url, lambda: pytest.fail("fetched twice")) as f:  # the copy was kept
        assert f.read() == b"tar bytes"


def put_images(fs, root: str, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
        fs.pipe_file(f"{root}/{name}", buf.getvalue())


def test_shards_of_keys_with_hash_and_question_mark_in_a_bucket(s3_server, capsys):
    bucket = s3_server.url(f"keys-{uuid.uuid4().hex[:8]}")
    fs, root = fsspec.core.url_to_fs(bucket)
    names = ["plain.png", "h#1.png", "h#2.png", "q?1.png"]
    put_images(fs, f"{root}/srcA", names, 0)
    put_images(fs, f"{root}/srcB", names, 1)
    out = f"{bucket}/out#x"
    rc = shards.main(["--src-a", f"{bucket}/srcA", "--src-b", f"{bucket}/srcB", "--out", out, "--no-progress"])
    assert rc == 0, capsys.readouterr()
    assert f"outputs in {out}" in capsys.readouterr().out  # before: "s3://.../out", where nothing was
    fs.invalidate_cache()
    assert fs.exists(f"{root}/out#x/index.json") and not fs.exists(f"{root}/out/index.json")
    with fs.open(f"{root}/out#x/manifest.parquet", "rb") as f:
        sources = sorted(r["source"] for r in pq.read_table(f).to_pylist() if r["domain"] == "a")
    assert sources == sorted(f"{bucket}/srcA/{n}" for n in names)  # before: ".../h" twice, ".../q"
    loader = UnpairedLoader(out, out, batch_size=2, image_size=16, num_workers=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["a"].shape == (2, 3, 16, 16) and loader.stats["skipped"]["unreadable_shard"] == 0
