"""Object storage review 7: a 4xx answer is not retried; '?' and '#' cannot lift an index entry
of a web index out of its folder; a password that holds '/' after digits is still a password (in
redact and in scrub, and a backend's multi-line error stays one line); s3a:// and s3:// (gcs://
and gs://) are one location for the source/OUT overlap check."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import shardrun, shards, storage
from pipeline.index import IndexEntryError, index_entry_url
from pipeline.layout import ShardsError
from pipeline.shardrun import RunArgs, _url_inside

# ----------------------------------------------------------------------------- 1: 4xx is permanent


def http_error(status: int) -> BaseException:
    """The exception fsspec's HTTPFileSystem raises for a response with `status` (as it builds it)."""
    aiohttp = pytest.importorskip("aiohttp")
    yarl = pytest.importorskip("yarl")
    multidict = pytest.importorskip("multidict")
    from fsspec.implementations.http import HTTPFileSystem

    class Response:  # the little of aiohttp's response that fsspec reads
        pass

    r = Response()
    r.status, r.ok, r.reason, r.history, r.headers = status, status < 400, "x", (), {}
    url, headers = yarl.URL("https://h/s.tar"), multidict.CIMultiDictProxy(multidict.CIMultiDict())
    r.request_info = aiohttp.RequestInfo(url, "GET", headers, url)

    def raise_for_status():
        raise aiohttp.ClientResponseError(r.request_info, (), status=status, message="x")

    r.raise_for_status = raise_for_status
    try:
        HTTPFileSystem._raise_not_found_for_status(None, r, "https://h/s.tar")
    except Exception as e:  # noqa: BLE001 - whatever fsspec raises is what storage sees
        return e
    raise AssertionError(f"fsspec raised nothing for {status}")


def attempts(e: BaseException) -> tuple[int, int]:
    """(calls of fn, on_retry calls) when fn always raises `e`."""
    calls, retried = [], []

    def fn():
        calls.append(1)
        raise e

    with pytest.raises(type(e)):
        storage.retrying(fn, "read", backoff=0, on_retry=retried.append)
    return len(calls), len(retried)


@pytest.mark.parametrize("status", [400, 401, 403, 410])
def test_an_http_4xx_from_fsspec_is_not_retried(status):
    e = http_error(status)
    assert not storage.transient(e)
    assert attempts(e) == (1, 0)  # before: 5 attempts and 4 counted retries on every draw


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_a_timeout_throttle_or_5xx_answer_is_still_retried(status):
    e = http_error(status)
    assert storage.transient(e)
    assert attempts(e) == (storage.RETRIES + 1, storage.RETRIES)


def test_a_status_is_read_without_aiohttp():
    class ClientError(Exception):  # any client's error that carries an HTTP status
        def __init__(self, status):
            super().__init__(f"status {status}")
            self.status = status

    assert not storage.transient(ClientError(403)) and not storage.transient(ClientError(499))
    assert storage.transient(ClientError(429)) and storage.transient(ClientError(502))
    assert storage.transient(ClientError("403"))  # not an HTTP status: left to the other rules
    code = "import sys, pipeline.storage; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # an optional backend is not imported by storage


# ----------------------------------------------------------------------------- 2: ? and # in a web index


WEB_INDEX = "https://h.example/data/shards/index.json"


@pytest.mark.parametrize("rel", ["..?x=1", "..#frag", "a/../..?", "a/..#/x.tar", "a/x.tar?sig=1"])
def test_a_query_or_fragment_in_an_entry_of_a_web_index_is_refused(rel):
    with pytest.raises(IndexEntryError, match=r"'\?' or '#'") as info:
        index_entry_url(WEB_INDEX, {"url": rel})
    assert rel in str(info.value) and "https://h.example/data/shards/index.json" in str(info.value)


def test_entries_of_a_web_index_stay_under_its_folder():
    assert index_entry_url(WEB_INDEX, {"url": "a/a-000000.tar"}) == "https://h.example/data/shards/a/a-000000.tar"
    # written percent-encoded they stay characters of the path (a server decodes them there)
    assert index_entry_url(WEB_INDEX, {"url": "a/x%3F1.tar"}) == "https://h.example/data/shards/a/x%3F1.tar"
    with pytest.raises(IndexEntryError, match="outside"):
        index_entry_url(WEB_INDEX, {"url": "%2e%2e/x.tar"})
    # the index's own query (a signed URL) is still carried over
    signed = index_entry_url(WEB_INDEX + "?sig=abc", {"url": "a/a-000000.tar"})
    assert signed == "https://h.example/data/shards/a/a-000000.tar?sig=abc"


def test_an_object_stores_index_keeps_question_mark_and_hash_in_entries():
    assert index_entry_url("s3://b/data/index.json", {"url": "a/q?1.tar"}) == "s3://b/data/a/q?1.tar"
    assert index_entry_url("memory://b/data/index.json", {"url": "a/h#1.tar"}) == "memory://b/data/a/h#1.tar"


# ----------------------------------------------------------------------------- 3: digits before the '/'


@pytest.mark.parametrize("url, want", [
    ("s3://AKIAEXAMPLE:7/XUtnFEMIK7MDENG@bucket/key", "s3://bucket/key"),
    ("gs://user:2024/s3cr3tpass@bucket/key.tar", "gs://bucket/key.tar"),
    ("https://user:2024/s3cr3tpass@host.example/shards/index.json", "https://host.example/shards/index.json"),
    ("https://user:2024?s3cr3tpass@host.example/x.tar", "https://host.example/x.tar"),
    ("https://user:2024/s3cr3tpass@host.example", "https://host.example"),
])
def test_a_password_of_digits_then_a_slash_is_not_a_port(url, want):
    assert storage.redact(url) == want and storage.canonical(url) == want
    text = storage.redact_text(f"cannot read {url}: 403")
    assert text == f"cannot read {want}: 403"


@pytest.mark.parametrize("url, want", [
    ("https://host:8080/path/a@b.jpg", "https://host:8080/path/a@b.jpg"),
    ("s3://bucket/a@b:c/x.tar", "s3://bucket/a@b:c/x.tar"),
    ("https://host:8080/a/b@c/d.jpg", "https://host:8080/a/b@c/d.jpg"),
    ("https://[::1]:8080/x@y.jpg", "https://[::1]:8080/x@y.jpg"),
    # credentials before the host, then an '@' in the key: only the credentials go
    ("https://u:pass@h:8080/x@y.jpg", "https://h:8080/x@y.jpg"),
    ("s3://KEY:SECRET@bkt/a@b.jpg", "s3://bkt/a@b.jpg"),
])
def test_a_port_or_an_at_sign_in_a_key_is_kept(url, want):
    assert storage.redact(url) == want


def test_the_cli_does_not_print_a_password_of_digits_then_a_slash(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    rc = shards.main(["--src-a", "memory://user:2024/s3cr3tpass@bkt/nowhere", "--src-b", str(tmp_path / "b"),
                      "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "memory://bkt/nowhere" in err
    assert "s3cr3tpass" not in err and "2024" not in err


# ----------------------------------------------------------------------------- 4: scrub and one line


SLASHED = "s3://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY/EXAMPLEKEY@bucket/out"


def test_scrub_removes_a_password_that_urllib_split_at_its_slash():
    msg = 'Invalid bucket name "AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY": must match a regex'
    assert storage.scrub(msg, SLASHED) == 'Invalid bucket name "***": must match a regex'
    # each piece on its own too, as a backend may quote the key it read ("EXAMPLEKEY@bucket/out")
    assert storage.scrub("no such key EXAMPLEKEY@bucket/out", SLASHED) == "no such key ***@bucket/out"
    whole = storage.scrub("AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY/EXAMPLEKEY@bucket", SLASHED)
    assert whole == "***@bucket"


def test_error_text_is_one_line_without_the_secret():
    e = ValueError('Parameter validation failed:\nInvalid bucket name "AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY"\n')
    text = storage.error_text(e, SLASHED)
    assert text == 'Parameter validation failed: Invalid bucket name "***"'


def test_a_cli_error_about_such_an_out_is_one_line_without_the_secret(tmp_path, monkeypatch, capsys):
    def refuse(url, data, durable=True):  # what botocore says about the bucket it parsed
        raise Exception('Parameter validation failed:\nInvalid bucket name "AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY"')

    monkeypatch.setattr(shardrun, "write_bytes", refuse)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = "memory://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCY/EXAMPLEKEY@bucket/out"
    rc = shards.main(["--src-a", str(tmp_path / "a"), "--src-b", str(tmp_path / "b"), "--out", out, "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "cannot write to OUT memory://bucket/out" in err and "Invalid bucket name" in err
    assert "wJalrX" not in err and "EXAMPLEKEY" not in err
    assert err.strip().count("\n") == 0


# ----------------------------------------------------------------------------- 5: aliases overlap


@pytest.mark.parametrize("source, out", [("s3a://b/data", "s3://b/data/out"), ("gcs://b/data", "gs://b/data"),
                                         ("s3://b/data/in", "S3A://KEY:SECRET@b/data/"), ("s3n://b/x/", "s3://b/x")])
def test_aliases_of_one_location_overlap(source, out):
    assert _url_inside(source, out) and _url_inside(out, source)


def test_neighbours_do_not_overlap():
    assert not _url_inside("s3a://b/data", "s3://b/database")
    assert not _url_inside("gcs://b/data", "s3://b/data")


def test_a_run_refuses_an_out_inside_a_source_spelled_with_an_alias(tmp_path, monkeypatch):
    # no store is reached: the checks before the overlap one are stubbed out
    monkeypatch.setattr(shardrun, "source_exists", lambda src: True)
    monkeypatch.setattr(shardrun, "_check_store", lambda out: None)
    monkeypatch.setattr(shardrun, "write_bytes", lambda url, data, durable=True: None)
    monkeypatch.setattr(storage, "remove", lambda url: None)
    args = RunArgs(src={"a": "s3a://b/data", "b": str(tmp_path)}, out="s3://b/data/out")
    with pytest.raises(ShardsError, match="source A s3a://b/data is OUT s3://b/data/out or inside it"):
        shardrun._check_paths(args)


def test_a_short_piece_of_such_a_password_leaves_the_message_readable():
    url = "s3://AKIAEXAMPLE:7/XUtnFEMIK7MDENG@bucket/out"
    msg = storage.scrub("shard 7 of 17: no key XUtnFEMIK7MDENG@bucket/out", url)
    assert msg == "shard 7 of 17: no key ***@bucket/out"
