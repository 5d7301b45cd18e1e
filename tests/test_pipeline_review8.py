"""Review 8 of the pipeline: the shard cache touches only its own copies (a foreign file, a folder,
a refused utime), list files (a BOM, "./" and "../" in a bucket), private shard records, the
merge job's upload, and a demo corpus regenerated with smaller counts."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tarfile
import uuid
from pathlib import Path

import fsspec
import pytest
import yaml

from pipeline import demo
from pipeline.loader import CACHE_SUBDIR, Shard, ShardCache, ShardReader
from pipeline.shards import main as shards_main
from pipeline.sources import SourceError, list_inputs, read_source
from test_shards_review6 import make_domain, png

ROOT = Path(__file__).resolve().parent.parent


def tar_bytes(names=("k.jpg",)) -> bytes:
    """A real tar shard holding one small member per name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


# ---------------------------------------------------------------- 1, 2, 7: the shard cache


def test_the_cache_never_removes_a_file_it_did_not_write(tmp_path):
    # data.cache_dir=/local/nvme: a disk's root, holding the user's own files too
    precious = tmp_path / "experiment-results.csv"
    precious.write_text("precious\n" * 100)
    os.utime(precious, (1, 1))  # the least recently used file there
    cache = ShardCache(str(tmp_path), max_bytes=3000)
    for i in range(6):
        cache.open(f"s3://bucket/a/a-{i:06d}.tar", lambda: b"x" * 1000).close()
    assert precious.read_text() == "precious\n" * 100
    copies = list((tmp_path / CACHE_SUBDIR).iterdir())
    assert copies and sum(p.stat().st_size for p in copies) <= 3000


def test_a_folder_or_foreign_file_in_the_cache_folder_does_not_stop_trimming(tmp_path, caplog):
    cache = ShardCache(str(tmp_path), max_bytes=3000)
    own = tmp_path / CACHE_SUBDIR
    # a folder named like a copy (sorted first: oldest), and another program's file, both kept
    (own / "0123456789abcdef-lost+found").mkdir()
    (own / "notes.txt").write_text("n" * 5000)
    for p in (own / "0123456789abcdef-lost+found", own / "notes.txt"):
        os.utime(p, (1, 1))
    for i in range(10):
        with cache.open(f"s3://bucket/a/a-{i:06d}.tar", lambda: b"x" * 1000) as f:
            assert f.read() == b"x" * 1000
    assert "cannot keep a copy" not in caplog.text
    assert (own / "0123456789abcdef-lost+found").is_dir() and (own / "notes.txt").exists()
    copies = [p for p in own.iterdir() if p.is_file() and p.name != "notes.txt"]
    assert 1 <= len(copies) <= 3 and sum(p.stat().st_size for p in copies) <= 3000


def test_a_copy_whose_access_time_cannot_be_set_is_still_read(tmp_path, monkeypatch):
    cache = ShardCache(str(tmp_path), max_bytes=10**9)
    url = "s3://bucket/a/a-000000.tar"
    cache.open(url, lambda: tar_bytes()).close()  # another user's copy, in a shared folder

    def refused(path, *a, **k):
        raise PermissionError(errno.EPERM, "Operation not permitted", path)

    monkeypatch.setattr(os, "utime", refused)
    f, index = ShardReader(verify=False, cache=cache).open(Shard(url))  # not fetched again
    try:
        assert [s[0] for s in index.samples] == ["k"]
    finally:
        f.close()


# ---------------------------------------------------------------- 3, 4: list files


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    root = f"/review8-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"{root}/images/0.png", png(0))
    yield fs, root
    fs.rm(root, recursive=True)


@pytest.mark.parametrize("where, entry", [("lists/a.txt", "../images/0.png"), ("images/list.txt", "./0.png"),
                                          ("images/l.txt", "sub/../0.png")])
def test_a_bucket_list_entry_is_normalised_like_a_local_one(bucket, where, entry):
    fs, root = bucket
    fs.pipe(f"{root}/{where}", f"{entry}\n".encode())
    (inp,) = list_inputs(f"memory:/{root}/{where}")
    assert inp.path == f"memory:/{root}/images/0.png"
    assert read_source(inp.path, 10**6) == png(0)


def test_a_bucket_list_entry_above_the_bucket_root_is_refused(bucket):
    fs, root = bucket
    fs.pipe(f"{root}/a.txt", b"../../etc/passwd\n")
    with pytest.raises(SourceError, match=r"a\.txt: entry '\.\./\.\./etc/passwd' climbs above the root"):
        list(list_inputs(f"memory:/{root}/a.txt"))


def test_a_list_file_with_a_byte_order_mark_keeps_its_first_input(tmp_path):
    make_domain(tmp_path / "A", 3, 0)
    make_domain(tmp_path / "B", 3, 100)
    names = sorted(os.listdir(tmp_path / "A"))
    (tmp_path / "a.txt").write_text("".join(f"{tmp_path}/A/{n}\n" for n in names), encoding="utf-8-sig")
    assert [Path(i.path).name for i in list_inputs(str(tmp_path / "a.txt"))] == names
    run = ["--src-a", f"{tmp_path}/a.txt", "--src-b", f"{tmp_path}/B", "--out", f"{tmp_path}/out", "--no-progress"]
    assert shards_main(run) == 0  # nothing quarantined
    assert json.loads((tmp_path / "out" / "index.json").read_text())["totals"]["a"]["samples"] == 3


# ---------------------------------------------------------------- 5, 6: records private, uploads


def test_records_are_readable_by_their_owner_only(tmp_path):
    make_domain(tmp_path / "A", 2, 0)
    make_domain(tmp_path / "B", 2, 100)
    out = tmp_path / "out"
    (out / ".records").mkdir(parents=True)
    os.chmod(out / ".records", 0o755)  # an older run's folder: made private too
    run = ["--src-a", f"{tmp_path}/A", "--src-b", f"{tmp_path}/B", "--out", str(out), "--no-progress"]
    assert shards_main(run) == 0
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    records = list((out / ".records").glob("*/*.json"))
    assert records and all(mode(p) == 0o600 for p in records)
    assert mode(out / ".records") == 0o700 and mode(out / ".records" / "a") == 0o700
    # what training reads stays readable by other users
    assert mode(out / "index.json") == 0o644 and mode(out / "a" / "a-000000.tar") == 0o644


def merge_script() -> str:
    (job,) = yaml.safe_load_all((ROOT / "infra/k8s/shards/merge-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


def test_the_merge_job_mirrors_out_without_the_writers_files_and_the_index_last():
    script = merge_script()
    (sync,) = re.findall(r"aws s3 sync [^;]*", script)
    assert "--delete" in sync
    for pattern in (".records/*", ".lock", "parts/*", "index.json"):
        assert f"--exclude '{pattern}'" in sync, pattern
    cp = script.index('aws s3 cp /data/shards/index.json "$SHARDS_S3_URI/index.json"')
    assert cp > script.index("aws s3 sync")


def test_every_documented_upload_leaves_out_the_records():
    for path in ("infra/README.md", "infra/slurm/shards_array.sbatch"):
        text = (ROOT / path).read_text()
        assert "aws s3 sync" in text
        for sync in re.findall(r"aws s3 sync (?:\\\n|[^\n`]|\n# )*", text):
            assert "--delete" in sync and "--exclude '.records/*'" in sync, (path, sync)


# ---------------------------------------------------------------- 8: the demo corpus


def test_a_smaller_demo_corpus_leaves_no_files_of_the_larger_one(tmp_path):
    demo.write_corpus(str(tmp_path / "d"), 4, 3, size=32, seed=0, progress=False)
    (tmp_path / "d" / "trainA" / "mine.jpg").write_bytes(b"not the generator's")
    demo.write_corpus(str(tmp_path / "d"), 2, 1, size=32, seed=1, progress=False)
    demo.write_corpus(str(tmp_path / "fresh"), 2, 1, size=32, seed=1, progress=False)
    for sub in ("trainA", "trainB", "testA", "testB"):
        got = {p.name: p.read_bytes() for p in (tmp_path / "d" / sub).iterdir() if p.name != "mine.jpg"}
        want = {p.name: p.read_bytes() for p in (tmp_path / "fresh" / sub).iterdir()}
        assert got == want, sub
    assert (tmp_path / "d" / "trainA" / "mine.jpg").exists()  # not a name the generator gives
