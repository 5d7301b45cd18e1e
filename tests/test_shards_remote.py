"""make shards with OUT in an object store (S3, served by moto on 127.0.0.1): the same bytes as on
disk, resume after kill -9, verify, parts + merge, a missing backend, and no credential in any
message. Real parts only: the CLI in subprocesses, s3fs against a real S3 endpoint, stock webdataset."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import S3_SECRET

from pipeline import shards
from pipeline.atomic import staging_dir
from pipeline.demo import write_corpus
from pipeline.lock import writer_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 60  # per domain: with 3 inputs per shard, 21 + 20 shards, enough to kill a run midway
SHARD_ARGS = ["--max-per-shard", "3", "--no-progress"]
MESSAGES: list[str] = []  # every stdout/stderr of every run here: none may hold the secret key


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def cli(*args, code: str | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline.shards ARGS` (or `python -c CODE ARGS`) with the S3 environment inherited."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "pipeline.shards", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    MESSAGES.extend((r.stdout, r.stderr))
    assert S3_SECRET not in r.stdout + r.stderr
    return r


def inproc(capsys, *argv) -> tuple[int, str]:
    """shards.main in this process (faster than a subprocess); (exit status, stdout + stderr)."""
    rc = shards.main(list(argv))
    out, err = capsys.readouterr()
    MESSAGES.extend((out, err))
    assert S3_SECRET not in out + err
    return rc, out + err


def store(url: str):
    """(s3 filesystem with fresh listings, path in it)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


def objects(url: str) -> dict[str, bytes]:
    """Every object under `url`, by its name relative to `url`."""
    fs, root = store(url)
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def local_files(out) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs}


def outputs(files: dict[str, bytes]) -> tuple[dict, list[dict], list[dict]]:
    """(index, manifest rows, quarantine rows) from the bytes of an OUT."""
    return (json.loads(files["index.json"]), pq.read_table(io.BytesIO(files["manifest.parquet"])).to_pylist(),
            pq.read_table(io.BytesIO(files["quarantine.parquet"])).to_pylist())


def published(files: dict[str, bytes]) -> dict[str, bytes]:
    """What readers of an OUT see: shards and the three outputs (not the bookkeeping)."""
    return {k: v for k, v in files.items() if not k.startswith((".records/", "parts/", ".lock"))}


def fresh(s3_server) -> str:
    return s3_server.url(f"shards-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Demo corpus (32 px) plus a cross-shard duplicate and one bad file in domain A."""
    root = tmp_path_factory.mktemp("remote-corpus")
    write_corpus(str(root), N_TRAIN, 0, size=32, seed=0, progress=False)
    extra = root / "trainA" / "zz extra"
    extra.mkdir()
    shutil.copy(root / "trainA" / "000005.jpg", extra / "copy of 000005.jpg")
    (extra / "notes.jpg").write_text("not an image")
    return root


def src(corpus) -> list[str]:
    return ["--src-a", str(corpus / "trainA"), "--src-b", str(corpus / "trainB")]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The same inputs written to a local OUT: the files every S3 result must equal."""
    out = tmp_path_factory.mktemp("remote-ref") / "out"
    r = cli(*src(corpus), "--out", str(out), *SHARD_ARGS)
    assert r.returncode == 3, r.stderr
    return local_files(out)


@pytest.fixture(scope="module")
def on_s3(corpus, reference, s3_server):
    """The CLI to s3://bucket/prefix with two (spawned) workers; (URL, the completed process)."""
    url = fresh(s3_server)
    r = cli(*src(corpus), "--out", url, "--workers", "2", *SHARD_ARGS)
    assert r.returncode == 3, r.stderr
    return url, r


# ----------------------------------------------------------------------------- 1. same bytes as on disk


def test_s3_out_is_byte_identical_to_local_and_read_by_stock_webdataset(on_s3, reference, tmp_path):
    url, r = on_s3
    assert f"outputs in {url}" in r.stdout and "no locks" in r.stderr and r.stderr.count("\n") == 1
    remote = objects(url)
    assert published(remote) == published(reference)  # shards, index.json, manifest, quarantine
    assert sorted(k for k in remote if k.startswith(".records/")) == sorted(
        k for k in reference if k.startswith(".records/"))
    assert not [k for k in remote if k.startswith(".") and "/" not in k]  # no probe, temporary or lock left

    index, manifest, quarantine = outputs(remote)
    assert index["totals"]["a"]["samples"] == index["totals"]["b"]["samples"] == N_TRAIN
    assert {q["reason"].split(" ")[0] for q in quarantine} == {"duplicate", "not"}
    entry = next(e for e in index["shards"] if e["domain"] == "b" and e["nsamples"] == 3)
    shard = tmp_path / os.path.basename(entry["url"])
    fs, path = store(f"{url}/{entry['url']}")
    fs.get_file(path, str(shard))  # downloaded as any consumer would, then read by webdataset itself
    keys = [s["__key__"] for s in wds.WebDataset([str(shard)], shardshuffle=False)]
    assert keys and keys == [m["key"] for m in manifest if m["shard"] == entry["url"]]


# ----------------------------------------------------------------------------- 2. kill -9, resume, shrink


def _records(url: str) -> int:
    fs, root = store(url)
    try:
        return len(fs.find(f"{root}/.records"))
    except FileNotFoundError:
        return 0


def test_kill_9_mid_run_then_rerun_equals_uninterrupted_and_shrink_removes_stale(corpus, reference, s3_server,
                                                                                capsys):
    url = fresh(s3_server)
    args = [*src(corpus), "--out", url, *SHARD_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.shards", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while _records(url) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    MESSAGES.extend(x.decode() for x in proc.communicate())
    partial = objects(url)
    assert "index.json" not in partial and 3 <= len([k for k in partial if k.startswith(".records/")]) < 41
    for rec in (k for k in partial if k.startswith(".records/")):  # a record is uploaded after its shard
        assert json.loads(partial[rec])["url"] in partial

    planted = staging_dir(f"{url}/a") / ".a-000001.tar.Xy12_9.tmp"  # as an upload cut short would leave
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"half a tar")
    r = cli(*args)
    assert r.returncode == 3 and "shards already complete and skipped" in r.stdout, r.stderr
    for folder in ("a", "b", ".records/a", ".records/b", ""):  # local upload temporaries of the kill: gone
        assert not list(staging_dir(f"{url}/{folder}".rstrip("/")).glob(".*.tmp"))
    remote = objects(url)
    assert published(remote) == published(reference)  # same samples, same shard bytes
    index, manifest, _ = outputs(remote)
    assert len({m["key"] for m in manifest}) == len(manifest) == 2 * N_TRAIN
    r = cli("verify", url)
    assert r.returncode == 0 and "0 bad" in r.stdout, r.stderr

    # A shorter plan over the same OUT: the shards and records past its end go from the bucket.
    rc, text = inproc(capsys, *src(corpus), "--out", url, "--max-per-shard", "40", "--no-progress")
    assert rc == 3, text
    remote = objects(url)
    index, manifest2, _ = outputs(remote)
    assert sorted(k for k in remote if k.endswith(".tar")) == sorted(s["url"] for s in index["shards"])
    assert len([k for k in remote if k.startswith(".records/")]) == len(index["shards"]) == 4
    assert {m["key"] for m in manifest2} == {m["key"] for m in manifest}
    assert shards.verify(url)[0] == []


# ----------------------------------------------------------------------------- 3. verify


def test_verify_on_the_url_reports_changed_and_deleted_objects(on_s3, s3_server, capsys):
    url = fresh(s3_server)
    fs, src_root = store(on_s3[0])
    _, root = store(url)
    for p in fs.find(src_root):  # what verify reads: shards and outputs, not the records
        if "/.records/" not in p:
            fs.copy(p, root + p[len(src_root):])
    rc, text = inproc(capsys, "verify", url)
    assert rc == 0 and "0 bad" in text, text
    fs.pipe_file(f"{root}/a/a-000002.tar", b"not a tar any more")
    fs.rm_file(f"{root}/b/b-000001.tar")
    fs.pipe_file(f"{root}/a/a-000999.tar", b"")
    rc, text = inproc(capsys, "verify", url)
    bad = sorted(line for line in text.splitlines() if line.startswith("BAD "))
    assert rc == 1 and len(bad) == 3, text
    assert bad[0].startswith("BAD a/a-000002.tar: ") and "sha256" in bad[0]
    assert bad[1] == "BAD a/a-000999.tar: shard file not in index.json"
    assert bad[2].startswith("BAD b/b-000001.tar: missing")


# ----------------------------------------------------------------------------- 4. parts + merge


def test_two_parts_then_merge_on_the_url_equal_a_single_run(corpus, reference, s3_server, capsys):
    url = fresh(s3_server)
    for i in range(2):
        rc, text = inproc(capsys, *src(corpus), "--out", url, "--part", f"{i}/2", *SHARD_ARGS)
        assert rc in (0, 3), text
        assert f"outputs in {url}/parts/{i}-of-2" in text
    remote = objects(url)
    assert "index.json" not in remote and {"parts/0-of-2/index.json", "parts/1-of-2/index.json"} <= set(remote)
    rc, text = inproc(capsys, "merge", url)
    assert rc == 3, text
    assert published(objects(url)) == published(reference)
    assert shards.verify(url)[0] == []

    with writer_lock(f"{url}/.lock", "another merge"):  # a second writer on this host is refused
        rc, text = inproc(capsys, "merge", url)
    assert rc == 2 and f"{url} is being written by another process (pid {os.getpid()}" in text


# ----------------------------------------------------------------------------- 5. no backend


NO_S3FS = """
import runpy, sys
sys.modules["s3fs"] = None  # as if the [s3] extra were not installed
sys.argv = ["pipeline.shards", *sys.argv[1:]]
runpy.run_module("pipeline.shards", run_name="__main__")
"""


def test_missing_extra_is_one_line_naming_it(corpus, s3_server, tmp_path):
    url = fresh(s3_server)
    for args in ([*src(corpus), "--out", url, "--no-progress"], ["verify", url], ["merge", url]):
        r = cli(*args, code=NO_S3FS)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("error: ") and "pip install 'unit-translate[s3]'" in r.stderr, r.stderr
    assert objects(url) == {}


# ----------------------------------------------------------------------------- 6. no credential anywhere


def test_no_message_or_object_holds_the_secret_key(corpus, on_s3, s3_server, capsys):
    # Error paths too: a bucket that does not exist, a URL that carries the secret itself.
    bad_bucket = f"s3://unit-missing-{uuid.uuid4().hex[:8]}/x"
    rc, text = inproc(capsys, *src(corpus), "--out", bad_bucket, "--no-progress")
    assert rc == 1 and "cannot write to OUT s3://unit-missing-" in text, text
    with_secret = f"s3://unit-test-key:{S3_SECRET}@{s3_server.bucket}/x?token={S3_SECRET}"
    for argv in ([*src(corpus), "--out", with_secret, "--no-progress"], ["verify", with_secret]):
        rc, text = inproc(capsys, *argv)
        assert rc != 0
    # A URL source inside a URL OUT (or around it) is refused: a store listing cannot skip OUT.
    rc, text = inproc(capsys, "--src-a", f"{on_s3[0]}/a", "--src-b", str(corpus / "trainB"), "--out", on_s3[0],
                      "--no-progress")
    assert rc == 1 and "or inside it" in text, text
    assert MESSAGES and not [m for m in MESSAGES if S3_SECRET in m]
    assert not [k for k, v in objects(on_s3[0]).items() if S3_SECRET.encode() in v]
