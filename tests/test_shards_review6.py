"""make shards, sixth review round: http(s) folder sources, signatures refreshed after a
metadata-only change, --recheck and verify's repair hint, no index.json after a failed run, a
shard path that is a folder, broken links, and size flags that must be above zero."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.images import Rejected
from pipeline.index import finalize
from pipeline.shards import main, verify
from pipeline.sources import UNKNOWN_SIZE, list_inputs, read_source, stat_signature


def png(seed: int, side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_domain(folder, n: int, seed: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"{i:02d}.png"), "wb") as f:
            f.write(png(seed + i))


def args(root, out="out", *extra, src_a=None) -> list[str]:
    return ["--src-a", src_a or f"{root}/A", "--src-b", f"{root}/B", "--out", f"{root}/{out}", "--no-progress", *extra]


def stored_sha(out, source_suffix: str) -> str:
    rows = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    return next(r["sha256"] for r in rows if r["source"].endswith(source_suffix))


# ----------------------------------------------------------------------------- 1. an http(s) folder


def test_an_http_folder_is_cut_by_shard_size_and_a_replaced_file_is_seen(http_server, tmp_path, capsys):
    served = http_server.root / "review6-A"
    make_domain(served, 3, 10)
    make_domain(tmp_path / "B", 2, 50)
    url = f"{http_server.url}/review6-A/"
    listed = list(list_inputs(url))
    # the listing has no size, ETag or date: no signature (always hashed), a constant size for grouping
    assert [(i.size, i.sig) for i in listed] == [(UNKNOWN_SIZE, None)] * 3
    run = args(tmp_path, "out", "--shard-size-mb", str(2.5 * UNKNOWN_SIZE / 2**20), src_a=url)
    assert main(run) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["totals"]["a"]["shards"] == 2  # two inputs per shard, not the whole domain in one

    new = png(999, 48)
    (served / "00.png").write_bytes(new)  # replaced on the server under the same name
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    # shard 0 is written again (its first input hashed differs); shard 1's input hashed the same
    assert "validated 2 inputs" in out and "2 inputs of existing shards hashed" in out
    assert stored_sha(tmp_path / "out", "/review6-A/00.png") == hashlib.sha256(new).hexdigest()
    assert verify(str(tmp_path / "out"))[0] == []


def test_a_listing_with_metadata_still_has_a_signature():
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        fs.pipe("/review6-src/x.png", b"data")
        (item,) = list_inputs("memory://review6-src")
        assert item.size == 4 and item.sig is not None and item.sig.startswith("remote:")
    finally:
        fs.rm("/review6-src", recursive=True)


# ----------------------------------------------------------------------------- 2. metadata-only change


def test_a_metadata_only_change_is_hashed_once_then_recorded(tmp_path, capsys):
    make_domain(tmp_path / "A", 6, 0)
    make_domain(tmp_path / "B", 6, 100)
    run = args(tmp_path, "out", "--max-per-shard", "2")
    assert main(run) == 0
    for d in "AB":  # `touch`: a new mtime and ctime, the same bytes
        for name in os.listdir(tmp_path / d):
            st = os.stat(tmp_path / d / name)
            os.utime(tmp_path / d / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "6 shards already complete" in out and "12 inputs of existing shards hashed" in out
    record = json.loads((tmp_path / "out" / ".records" / "a" / "a-000000.json").read_text())
    assert [i[2] for i in record["inputs"]] == [stat_signature(os.stat(p)) for p, *_ in record["inputs"]]
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "6 shards already complete" in out and "hashed" not in out  # nothing read again


# ----------------------------------------------------------------------------- 3. same-size damage


def test_verify_says_how_to_repair_and_recheck_rewrites_a_damaged_shard(tmp_path, capsys):
    make_domain(tmp_path / "A", 3, 0)
    make_domain(tmp_path / "B", 3, 100)
    assert main(args(tmp_path)) == 0
    shard = tmp_path / "out" / "a" / "a-000000.tar"
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[700] ^= 0xFF  # bit rot: same size
    shard.write_bytes(bytes(damaged))
    problems, summary = verify(str(tmp_path / "out"))
    assert problems and "To repair: delete each bad shard and re-run make shards" in summary
    assert "--recheck" in summary
    capsys.readouterr()
    assert main(args(tmp_path)) == 0  # the size check alone keeps it (documented)
    assert shard.read_bytes() != good
    assert main(args(tmp_path, "out", "--recheck")) == 0
    assert "--recheck hashed 2 existing shards, 1 differed" in capsys.readouterr().out
    assert shard.read_bytes() == good and verify(str(tmp_path / "out"))[0] == []


# ----------------------------------------------------------------------------- 4. a failed run


def test_a_failed_run_writes_no_index_and_verify_flags_an_empty_domain(tmp_path, capsys):
    make_domain(tmp_path / "A", 2, 0)
    os.makedirs(tmp_path / "B")
    (tmp_path / "B" / "tiny.png").write_bytes(png(5, 8))  # below --min-side
    (tmp_path / "B" / "notes.txt").write_text("x")
    assert main(args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "domain B: no valid image among 2 inputs" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "index.json").exists()
    assert (tmp_path / "out" / "quarantine.parquet").exists()  # what the message points to
    # An index written all the same (as before the fix) is flagged by verify.
    finalize(str(tmp_path / "out"), {"a": [0], "b": [0]}, str(tmp_path / "out"))
    problems, _ = verify(str(tmp_path / "out"))
    assert problems == ["index.json: domain b has no sample (make shards fails on such a domain; "
                        "quarantine.parquet says why its inputs were rejected)"]


# ----------------------------------------------------------------------------- 5. a folder in a file's place


@pytest.mark.parametrize("where", ["a/a-000000.tar", ".records/a/a-000000.json", "index.json"])
def test_a_folder_where_a_shard_record_or_index_goes_is_refused_before_anything_is_removed(tmp_path, capsys, where):
    make_domain(tmp_path / "A", 2, 0)
    make_domain(tmp_path / "B", 2, 100)
    assert main(args(tmp_path)) == 0
    (tmp_path / "B" / "00.png").write_bytes(png(77))  # B's shard must be written again
    target = tmp_path / "out" / where
    target.unlink()
    target.mkdir()
    capsys.readouterr()
    assert main(args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err == f"error: {target} is not a regular file (a folder); remove it and re-run\n"
    if where != "index.json":
        assert (tmp_path / "out" / "index.json").exists()  # nothing removed
    target.rmdir()
    assert main(args(tmp_path)) == 0 and verify(str(tmp_path / "out"))[0] == []


# ----------------------------------------------------------------------------- 6. a broken link


def test_a_broken_link_is_not_a_regular_file(tmp_path):
    make_domain(tmp_path / "A", 2, 0)
    make_domain(tmp_path / "B", 2, 100)
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "A" / "broken.jpg")
    os.symlink("loop.jpg", tmp_path / "A" / "loop.jpg")
    with pytest.raises(Rejected, match="^not a regular file: a broken link$"):
        read_source(str(tmp_path / "A" / "broken.jpg"), 2**20)
    with pytest.raises(Rejected, match="^unreadable: no such file$"):  # not there at all: as before
        read_source(str(tmp_path / "A" / "missing.jpg"), 2**20)
    assert main(args(tmp_path)) == 3
    rows = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert sorted((os.path.basename(r["source"]), r["reason"]) for r in rows) == [
        ("broken.jpg", "not a regular file: a broken link"), ("loop.jpg", "not a regular file: a symbolic link loop")]


# ----------------------------------------------------------------------------- 7. size flags


@pytest.mark.parametrize("flag,value", [("--shard-size-mb", "0"), ("--shard-size-mb", "-5"), ("--max-file-mb", "0"),
                                        ("--max-file-mb", "inf"), ("--max-file-mb", "nan"), ("--min-side", "0"),
                                        ("--min-side", "-3")])
def test_size_flags_below_their_minimum_are_refused(tmp_path, capsys, flag, value):
    make_domain(tmp_path / "A", 1, 0)
    make_domain(tmp_path / "B", 1, 100)
    with pytest.raises(SystemExit) as e:
        main(args(tmp_path, "out", flag, value))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and f"got {value}" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
