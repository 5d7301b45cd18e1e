"""Defects a review found: shared temporary folders another user could plant, credentials in a
loader error, in tracking.json and in the quarantine report, and tar member names that climb out
of their folder."""
from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import launch.release.corpus as corpus
from launch.runstore.store import open_run, run_tracking, without_password
from pipeline import atomic, layout
from pipeline.layout import ShardsError
from pipeline.loader import Shard, ShardError, sample_stream
from pipeline.lock import lock_file, writer_lock

SECRET_URI = "https://alice:S3CRET@mlflow.example.org"
OUT_URL = "s3://bucket/out"


@pytest.fixture
def tmp(tmp_path, monkeypatch) -> Path:
    """A temporary directory of this test's own, standing for the shared /tmp."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("precious")
    return v


# ---------------------------------------------------------------- 1. planted temporary folders

def test_lock_and_staging_folders_are_made_private(tmp):
    with writer_lock(f"{OUT_URL}/.lock", "test"):
        pass
    lock_dir = Path(lock_file(f"{OUT_URL}/.lock")).parent
    assert stat.S_IMODE(os.lstat(lock_dir).st_mode) == 0o700
    atomic.write_bytes("memory://review-safety/out/x.bin", b"data")
    staged = atomic.staging_dir("memory://review-safety/out")
    for folder in (staged.parent, staged):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700


def test_a_symlinked_lock_folder_is_refused_and_its_target_untouched(tmp, tmp_path):
    v = victim(tmp_path)
    path = Path(lock_file(f"{OUT_URL}/.lock"))
    planted = tmp_path / "attacker"
    planted.mkdir()
    (planted / path.name).symlink_to(v)
    path.parent.symlink_to(planted)
    with pytest.raises(ShardsError, match="symbolic link") as e:
        with writer_lock(f"{OUT_URL}/.lock", "test"):
            pass
    assert str(path.parent) in str(e.value)
    assert v.read_text() == "precious"


def test_a_lock_folder_others_can_write_is_refused(tmp):
    path = Path(lock_file(f"{OUT_URL}/.lock"))
    path.parent.mkdir()
    path.parent.chmod(0o777)
    with pytest.raises(ShardsError, match="writable by group or others") as e:
        with writer_lock(f"{OUT_URL}/.lock", "test"):
            pass
    assert str(path.parent) in str(e.value)
    assert not path.exists()


@pytest.mark.parametrize("url", [False, True])
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp, tmp_path, url):
    v = victim(tmp_path)
    lock = f"{OUT_URL}/.lock" if url else str(tmp_path / "out" / ".lock")
    path = Path(lock_file(lock))
    path.parent.mkdir(mode=0o700)
    path.symlink_to(v)
    with pytest.raises(ShardsError, match="symbolic link") as e:
        with writer_lock(lock, "test"):
            pass
    assert str(path) in str(e.value)
    assert v.read_text() == "precious"


@pytest.mark.parametrize("plant", ["symlinked top", "0777 top", "symlinked folder", "0777 folder"])
def test_a_planted_staging_folder_is_refused_and_nothing_is_uploaded(tmp, tmp_path, plant):
    import fsspec

    url = f"memory://review-safety/{plant.replace(' ', '-')}/x.bin"
    staged = atomic.staging_dir(url.rsplit("/", 1)[0])
    target = staged.parent if "top" in plant else staged
    os.makedirs(target.parent, mode=0o700, exist_ok=True)
    if "symlinked" in plant:
        elsewhere = tmp_path / "attacker"
        elsewhere.mkdir(mode=0o700)
        target.symlink_to(elsewhere)
    else:
        target.mkdir()
        target.chmod(0o777)
    with pytest.raises(PermissionError, match="symbolic link" if "symlinked" in plant else "writable") as e:
        atomic.write_bytes(url, b"data")
    assert str(target) in str(e.value)
    assert not fsspec.filesystem("memory").exists(url[len("memory://"):])


def test_cleaning_a_planted_staging_folder_is_refused_and_deletes_nothing(tmp, tmp_path):
    folder = "memory://review-safety/cleaning"
    staged = atomic.staging_dir(folder)
    staged.parent.mkdir(mode=0o700)
    elsewhere = tmp_path / "attacker"  # where the planted link points: someone's files
    elsewhere.mkdir()
    kept = elsewhere / ".a-000000.tar.abcdef.tmp"  # a name the cleaning would otherwise remove
    kept.write_bytes(b"theirs")
    staged.symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="symbolic link"):
        layout.remove_temps(folder, "a-*.tar")
    assert kept.read_bytes() == b"theirs"
    staged.unlink()
    layout.remove_temps(folder, "a-*.tar")  # no staging folder: nothing to clean, nothing made
    assert not staged.exists()
    atomic.private_dir(staged)  # our own folder: what a killed write left is removed
    (staged / kept.name).write_bytes(b"ours")
    layout.remove_temps(folder, "a-*.tar")
    assert not (staged / kept.name).exists()


# ---------------------------------------------------------------- 2. the loader's last error

def test_no_readable_sample_error_names_the_shard_without_credentials():
    class Unreadable:
        def open(self, shard, counters):
            raise ShardError("unreadable_shard", "redacted elsewhere")

        def prefetch(self, shard, counters):
            return None

    shards = [Shard(url="https://alice:S3CRET@h.example/a-0.tar?sig=abc")]
    stream = sample_stream(shards, "a", 0, 0, 0, (0, 0), Unreadable(), None, SimpleNamespace(skip=lambda *a: None))
    with pytest.raises(RuntimeError, match="no readable sample") as e:
        next(stream)
    assert "https://h.example/a-0.tar" in str(e.value)
    assert "S3CRET" not in str(e.value) and "sig=abc" not in str(e.value)


# ---------------------------------------------------------------- 3. tracking.json

class FakeClient:
    tracking_uri = SECRET_URI

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1")

    def create_run(self, exp_id, run_name=None, tags=None):
        return SimpleNamespace(info=SimpleNamespace(run_id="r1"))


def test_tracking_json_keeps_no_password_and_readers_find_it_again(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert open_run(FakeClient(), run_dir, "unit") == "r1"
    text = (run_dir / "tracking.json").read_text()
    assert "S3CRET" not in text
    assert json.loads(text)["tracking_uri"] == "https://alice@mlflow.example.org"
    # no URI of the caller's: the recorded one (MLflow takes MLFLOW_TRACKING_USERNAME/PASSWORD itself)
    assert run_tracking(run_dir)[0] == "https://alice@mlflow.example.org"
    # the environment names the same server with its password: that one, to reconnect
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    assert run_tracking(run_dir)[0] == SECRET_URI
    # another server in the environment does not replace the run's own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:x@other.example.org")
    assert run_tracking(run_dir)[0] == "https://alice@mlflow.example.org"
    assert run_tracking(run_dir, "http://given:5000")[0] == "http://given:5000"


@pytest.mark.parametrize("uri, kept", [
    ("https://alice:S3CRET@mlflow.example.org/x", "https://alice@mlflow.example.org/x"),
    # a database store's user and options are what reconnecting needs; only the password goes
    ("postgresql://mlflow:pw@db:5432/runs?sslmode=require", "postgresql://mlflow@db:5432/runs?sslmode=require"),
    ("postgresql://postgres@127.0.0.1:5432/runs", "postgresql://postgres@127.0.0.1:5432/runs"),
    ("sqlite:////tmp/run/mlflow.db", "sqlite:////tmp/run/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_without_password_leaves_out_only_the_password(uri, kept):
    assert without_password(uri) == kept


# ---------------------------------------------------------------- 4, 5. corpus translation

def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def raw_tar(path: Path, names: list[str]) -> None:
    """A tar with these member names as given (tarfile keeps `/` and `..`; our writer is not used)."""
    with tarfile.open(path, "w") as t:
        for i, name in enumerate(names):
            data = png(10 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def job(tmp_path: Path, url: str) -> corpus.CorpusJob:
    return corpus.CorpusJob(fn=lambda x, direction: 255 - x, direction="a2b", shards=[Shard(url=url)],
                            out=str(tmp_path / "out"), source=url, progress=False)


def test_an_unreadable_shards_reason_keeps_no_credentials(tmp_path, monkeypatch):
    def failing(url):
        raise OSError("GET https://alice:S3CRET@h.example/a-0.tar?X-Amz-Signature=abc failed")
        yield

    monkeypatch.setattr(corpus, "read_samples", failing)
    rec = corpus.write_translated_shard(job(tmp_path, "https://alice:S3CRET@h.example/a-0.tar"), 0, "fp",
                                        lambda n: None)
    [rejected] = rec["rejected"]
    assert rejected["reason"].startswith("unreadable shard: OSError: GET https://h.example/a-0.tar")
    assert "S3CRET" not in json.dumps(rec) and "abc" not in rejected["reason"]


def test_member_names_that_climb_out_are_quarantined_not_written(tmp_path):
    shard = tmp_path / "a-0.tar"
    bad = ["../../evil.png", "/abs/x.png", "sub/../../y.png", "back\\slash.png", "new\nline.png", "del\x7f.png"]
    raw_tar(shard, ["ok.png", "sub/fine.png", *bad])
    rec = corpus.write_translated_shard(job(tmp_path, str(shard)), 0, "fp", lambda n: None)
    with tarfile.open(tmp_path / "out" / rec["url"]) as t:
        names = t.getnames()
    assert names == ["ok.png", "ok.json", "sub/fine.png", "sub/fine.json"]
    reasons = {r["source"].split("#", 1)[1]: r["reason"] for r in rec["rejected"]}
    assert sorted(reasons) == sorted(n[:-len(".png")] for n in bad)
    for name in bad:
        assert reasons[name[:-len(".png")]].startswith(f"unsafe member name {name!r}")
