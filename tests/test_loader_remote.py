"""Training data streamed from object storage and HTTP: the loader reads an OUT folder by its URL
(S3 served by moto on 127.0.0.1, HTTP by Python's http.server), yields exactly the batches of the
local OUT, resumes exactly, caches within its bound, skips what it cannot read, retries what fails
transiently, and verifies checksums; config checks read remote indexes before ranks start; and a
real 1-rank launch from S3 logs lineage to the real MLflow server without leaking the secret key.

The OUT folders are made locally (the session's corpus) and uploaded here, independent of
`make shards` writing to a bucket."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import S3_SECRET

from pipeline import storage
from pipeline.index import IndexEntryError, index_entry_url
from pipeline.lineage import shard_datasets
from pipeline.loader import CACHE_SUBDIR, UnpairedLoader, resolve_shards

ROOT = Path(__file__).resolve().parent.parent
KW = dict(batch_size=4, image_size=32, seed=3)
_UPLOADED: dict[str, str] = {}


def upload_out(local: Path, url: str) -> str:
    """Copy an OUT folder to `url` file by file (storage.put_file: one complete object each)."""
    if url not in _UPLOADED:
        for p in sorted(local.rglob("*")):
            if p.is_file():
                storage.put_file(str(p), storage.join(url, *p.relative_to(local).parts))
        _UPLOADED[url] = url
    return url


def s3_out(s3_server, corpus: Path) -> str:
    """The session corpus's OUT folder in the session's bucket (uploaded once)."""
    return upload_out(corpus / "shards", s3_server.url("corpus-out"))


def http_out(http_server, corpus: Path, name: str) -> tuple[str, Path]:
    """A fresh copy of the corpus's OUT folder served over HTTP: (URL, local folder behind it)."""
    dest = Path(http_server.root) / name
    if not dest.exists():
        shutil.copytree(corpus / "shards", dest)
    return f"{http_server.url}/{name}", dest


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(b1, b2) -> bool:
    return all(x["a"].equal(y["a"]) and x["b"].equal(y["b"]) for x, y in zip(b1, b2, strict=True))


def test_one_rule_tells_urls_commands_and_paths_apart():
    # pipeline.storage.scheme is the only parser of "is this a URL": index entries, shard specs,
    # sources and OUT all ask it.
    cases = {"s3://b/k.tar": ("s3", True), "HTTPS://h/x": ("https", True), "gs://b/{0..3}.tar": ("gs", True),
             "file:///data/x.tar": ("file", False), "pipe:curl -s x": ("pipe", False), "PIPE:ls": ("pipe", False),
             "ftp:x": ("ftp", False), "c:/data/x.tar": (None, False), "data/shards": (None, False),
             "data/x://y": (None, False), "/abs/path.tar": (None, False)}
    for s, (scheme, url) in cases.items():
        assert (storage.scheme(s), storage.is_url(s)) == (scheme, url), s
    assert storage.local_path("file:///data/x") == "/data/x" and storage.local_path("data/x") == "data/x"


# ----------------------------------------------------------------------------- same batches, resume, cache


def test_next_shard_is_fetched_while_the_current_one_is_read(http_server, corpus):
    """A stream knows its next shard in advance: ShardReader.prefetch fetches it in the background,
    so open() serves those bytes, even once the object is gone from the server."""
    from pipeline.loader import ShardReader

    url, folder = http_out(http_server, corpus, "prefetch")
    shard = resolve_shards(url, "a")[1]
    reader = ShardReader(verify=True, cache=None)
    reader.prefetch(shard).result(timeout=30)
    (folder / "a" / "a-000001.tar").unlink()
    f, index = reader.open(shard)
    assert len(index.samples) == shard.nsamples > 0
    f.close()
    with pytest.raises(Exception, match="unreadable|cannot read"):  # no prefetch now: the server says 404
        reader.open(shard)




def test_s3_and_http_out_yield_the_local_batches(s3_server, http_server, corpus, tmp_path):
    local = corpus / "shards"
    ref = take(UnpairedLoader(local, local, num_workers=0, **KW), 8)
    s3 = s3_out(s3_server, corpus)
    assert resolve_shards(s3, "a")[0].url == f"{s3}/a/a-000000.tar"
    got = UnpairedLoader(s3, s3, num_workers=0, **KW)
    assert same(take(got, 8), ref)
    assert got.stats["skipped"]["unreadable_shard"] == 0 and got.stats["retries"] == 0
    url, _ = http_out(http_server, corpus, "same")
    assert same(take(UnpairedLoader(url, f"{url}/index.json", num_workers=0, **KW), 8), ref)
    # A cache smaller than three shards: the same batches, and the folder never holds more than its bound.
    shard_bytes = (local / "a" / "a-000000.tar").stat().st_size
    bound = int(2.5 * shard_bytes)
    cached = UnpairedLoader(s3, s3, num_workers=0, cache_dir=str(tmp_path / "cache"), cache_bytes=bound, **KW)
    assert same(take(cached, 8), ref)
    files = list((tmp_path / "cache" / CACHE_SUBDIR).iterdir())
    assert files and sum(f.stat().st_size for f in files) <= bound


def test_resume_from_s3_is_exact(s3_server, corpus):
    s3 = s3_out(s3_server, corpus)
    kw = dict(num_workers=1, **KW)
    straight = take(UnpairedLoader(s3, s3, **kw), 12)
    first = UnpairedLoader(s3, s3, **kw)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = UnpairedLoader(s3, s3, **kw)
    resumed.load_state_dict(state)
    assert same(take(resumed, 7), straight[5:])
    assert resumed.stats["batches"] == 12 and resumed.stats["retries"] == 0


# ----------------------------------------------------------------------------- failures over HTTP


def test_http_shard_deleted_mid_run_is_counted_and_data_flows(http_server, corpus):
    url, folder = http_out(http_server, corpus, "deleted")
    loader = UnpairedLoader(url, url, num_workers=0, **KW)
    it = iter(loader)
    for _ in range(2):
        next(it)
    assert loader.stats["skipped"]["unreadable_shard"] == 0
    for i in range(3):  # half of domain a's shards vanish while the loader runs
        (folder / "a" / f"a-{i:06d}.tar").unlink()
    batches = [next(it) for _ in range(24)]
    assert all(b["a"].shape == (4, 3, 32, 32) for b in batches)
    st = loader.stats
    assert st["skipped"]["unreadable_shard"] >= 1 and st["samples"] == 26 * 8


def test_http_changed_shard_is_refused_with_verify_shards(http_server, corpus, tmp_path):
    url, folder = http_out(http_server, corpus, "changed")
    index = json.loads((folder / "index.json").read_text())
    for i in range(3):  # bytes changed after indexing (same size): only the checksum tells
        with open(folder / "a" / f"a-{i:06d}.tar", "r+b") as f:
            f.seek(2000)
            f.write(b"\0" * 64)
    plain = UnpairedLoader(url, url, num_workers=0, **KW)
    take(plain, 12)
    assert plain.stats["skipped"]["checksum_mismatch"] == 0
    cache = tmp_path / "cache"
    checked = UnpairedLoader(url, url, num_workers=0, verify_shards=True, cache_dir=str(cache), **KW)
    take(checked, 12)
    assert checked.stats["skipped"]["checksum_mismatch"] >= 1
    # A copy that failed the check is not kept: the cache holds only bytes the index vouches for.
    good = {e["sha256"] for e in index["shards"]}
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() in good for p in (cache / CACHE_SUBDIR).iterdir())


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the first GET of each of the first `fail` paths asked for answers 503
    (an overloaded store), the next GET of that path succeeds."""

    def do_GET(self):
        with self.server.lock:
            failing = self.path not in self.server.paths and len(self.server.paths) < self.server.fail
            if failing:
                self.server.paths.add(self.path)
        if failing:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(tmp_path, corpus):
    shutil.copytree(corpus / "shards", tmp_path / "out")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Flaky, directory=str(tmp_path)))
    srv.lock, srv.paths, srv.fail = threading.Lock(), set(), 3
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_port}/out"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_transient_http_errors_are_retried(flaky_server, corpus):
    srv, url = flaky_server
    local = corpus / "shards"
    ref = take(UnpairedLoader(local, local, num_workers=0, **KW), 6)
    loader = UnpairedLoader(url, url, num_workers=0, **KW)  # the index read is the first 503, retried
    assert srv.paths == {"/out/index.json"}
    assert same(take(loader, 6), ref)  # the next two 503s hit shard fetches, retried: nothing lost
    assert len(srv.paths) == 3 and loader.stats["retries"] == 2
    assert loader.stats["skipped"]["unreadable_shard"] == 0


# ----------------------------------------------------------------------------- index entries of a remote index


def test_index_entry_url_with_remote_index():
    idx = "s3://bucket/runs/out/index.json"
    assert index_entry_url(idx, {"url": "a/a-000000.tar"}) == "s3://bucket/runs/out/a/a-000000.tar"
    assert index_entry_url(idx, {"url": "a/./x/../a-1.tar"}) == "s3://bucket/runs/out/a/a-1.tar"
    assert index_entry_url(idx, {"url": "gs://other/b.tar"}) == "gs://other/b.tar"  # an absolute URL: as given
    signed = "https://h.example/out/index.json?token=abc"
    assert index_entry_url(signed, {"url": "b/b-1.tar"}) == "https://h.example/out/b/b-1.tar?token=abc"
    for url, why in [("../other/x.tar", "outside"), ("a/../../x.tar", "outside"), ("%2e%2e/x.tar", "outside"),
                     (".", "outside"), ("/etc/passwd", "absolute"), ("file:///etc/passwd", "file:"),
                     ("file:a/x.tar", "file:"), ("pipe:curl -s https://x/a.tar", "'pipe'"),
                     ("ftp://h/x.tar", "'ftp'")]:
        with pytest.raises(IndexEntryError, match=why) as e:
            index_entry_url(idx, {"url": url})
        assert str(e.value).startswith(idx), str(e.value)
    # The index is named without its credentials.
    with pytest.raises(IndexEntryError) as e:
        index_entry_url("https://user:pw@h.example/out/index.json?sig=s3cr3t", {"url": "../x.tar"})
    assert "https://h.example/out/index.json" in str(e.value)
    assert "pw" not in str(e.value) and "s3cr3t" not in str(e.value)


def test_folder_url_without_index_is_an_error_not_a_shard(http_server, s3_server):
    with pytest.raises(ValueError, match="no index.json"):
        resolve_shards(f"{http_server.url}/no-such-out", "a")
    with pytest.raises(ValueError, match="no index.json"):
        resolve_shards(s3_server.url("no-such-out"), "a")
    # A URL ending .tar is one shard, taken as given (read when drawn).
    assert [s.url for s in resolve_shards(f"{http_server.url}/x/a-000000.tar", "a")] == [
        f"{http_server.url}/x/a-000000.tar"]


# ----------------------------------------------------------------------------- config check


def check_config(cfg: Path, *overrides) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "launch.config", str(cfg), *overrides], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert S3_SECRET not in r.stdout + r.stderr
    return r


def test_config_check_reads_remote_indexes(s3_server, http_server, corpus, tmp_path, capsys):
    from launch.config import main
    from trainutil import write_config

    cfg = write_config(tmp_path / "cfg.yaml", corpus, tmp_path / "run")
    missing = s3_server.url("nope")
    r = check_config(cfg, f"data.shards={missing}")  # the command itself: its exit status
    assert r.returncode == 2 and "data.shards" in r.stderr and missing in r.stderr, r.stderr
    # A bucket that is not there, and per-domain specs (in this process: faster than a subprocess).
    assert main([str(cfg), "data.shards=s3://no-such-bucket-for-unit/out"]) == 2
    assert "data.shards = 's3://no-such-bucket-for-unit/out'" in capsys.readouterr().err
    s3 = s3_out(s3_server, corpus)
    http_url, _ = http_out(http_server, corpus, "config")
    assert main([str(cfg), f"data.shards_a={s3}/index.json", f"data.shards_b={http_url}/nope/index.json"]) == 2
    err = capsys.readouterr().err
    assert "data.shards_b" in err and "data.shards_a" not in err and S3_SECRET not in err, err
    assert main([str(cfg), f"data.shards={s3}", f"data.shards_b={http_url}"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["data"]["shards"] == s3 and S3_SECRET not in out + err


# ----------------------------------------------------------------------------- a real launch


def _strings(obj) -> str:
    return json.dumps(obj, default=str)


@pytest.mark.slow
def test_training_launch_from_s3_logs_lineage_and_no_secret(server_up, s3_server, corpus, tmp_path):
    from mlflow import MlflowClient
    from trainutil import launch, write_config

    s3 = s3_out(s3_server, corpus)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", corpus, run_dir, tracking={"experiment": "s3-train"}, max_steps=3)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(shards=s3, cache_dir=str(tmp_path / "cache"), cache_bytes=200_000, verify_shards=True)
    cfg.write_text(yaml.safe_dump(raw))
    r = launch(cfg, env={"MLFLOW_TRACKING_URI": server_up.uri})
    assert S3_SECRET not in r.stdout
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    run = MlflowClient(server_up.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    want = {rec["name"]: rec["digest"] for rec in shard_datasets(corpus / "shards")}
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {n: d.digest for n, d in inputs.items()} == want
    for domain in ("a", "b"):
        assert json.loads(inputs[f"shards-{domain}"].source)["uri"] == f"{s3}/{domain}"
        assert run.data.tags[f"dataset.{domain}.source"] == f"{s3}/{domain}"
    assert run.data.params["config.data.shards"] == s3
    assert run.data.metrics["loader/skipped/unreadable_shard"] == 0
    cache = list((tmp_path / "cache" / CACHE_SUBDIR).iterdir())
    assert cache and sum(p.stat().st_size for p in cache) <= 200_000
    # The secret key is nowhere: output, run directory, params, tags, dataset inputs.
    assert S3_SECRET not in _strings([run.data.params, run.data.tags, [d.to_dictionary() for d in inputs.values()]])
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and S3_SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_signed_urls_never_reach_messages(http_server, corpus, caplog):
    """A shard named by a signed URL (the signature is a credential) that cannot be read: the
    warning and the counters name it without its query string."""
    url, _ = http_out(http_server, corpus, "signed")
    shards_a = [f"{url}/a/a-000000.tar?X-Amz-Signature=s3cr3t", f"{url}/a/gone.tar?X-Amz-Signature=s3cr3t"]
    loader = UnpairedLoader(shards_a, url, num_workers=0, **KW)
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        take(loader, 10)
    assert loader.stats["skipped"]["unreadable_shard"] >= 1 and loader.stats["samples"] == 80
    warned = [r.getMessage() for r in caplog.records if "unreadable_shard" in r.getMessage()]
    assert warned and all(f"{url}/a/gone.tar" in m and "s3cr3t" not in m for m in warned), warned
