"""pipeline.atomic and pipeline.hashing: the one atomic write and the one sha256 of the project."""
from __future__ import annotations

import hashlib
import json
import stat

import pytest

from pipeline import atomic, hashing


def test_write_json_replaces_whole_file_with_readable_mode(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic.write_json(path, {"b": 2, "a": 1})
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted: stable bytes
    assert stat.S_IMODE(path.stat().st_mode) == atomic.MODE
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.bin"
    atomic.write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(path) as tmp:
            tmp.write_bytes(b"half")
            assert atomic.TEMP_NAME.match(tmp.name) and tmp.parent == tmp_path
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_temp_name_pattern_matches_only_temporaries():
    assert atomic.TEMP_NAME.match(".index.json.k2j3h4x_.tmp")
    assert not atomic.TEMP_NAME.match("index.json")
    assert not atomic.TEMP_NAME.match(".unit-run.json")


def test_hashes_agree_with_hashlib(tmp_path):
    data = b"x" * (hashing.CHUNK * 2 + 5)  # more than one chunk
    (tmp_path / "f").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert hashing.sha256_file(tmp_path / "f") == want == hashing.sha256_bytes(data)
    assert hashing.sha256_json({"a": 1, "b": [1, 2]}) == hashing.sha256_json({"b": [1, 2], "a": 1})
    assert hashing.sha256_json({"a": 1}) != hashing.sha256_json({"a": 2})
