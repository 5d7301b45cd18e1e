"""make shards at its edges: names that are not UTF-8, merged duplicates' order, a rerun killed
before finalize, dot-folders in a URL source (the fifth review round's findings)."""
from __future__ import annotations

import filecmp
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import shardrun
from pipeline.shards import main
from pipeline.sources import list_inputs


def flat_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_domains(root, a_values, b_values=(200, 201), names=None):
    for d, values in (("A", a_values), ("B", b_values)):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        for i, v in enumerate(values):
            name = names[i] if names else f"{d.lower()}{i:02d}.png".encode()
            with open(os.path.join(os.fsencode(root), d.encode(), name), "wb") as f:
                f.write(flat_png(v + (d == "B") * 7))


def test_a_source_name_that_is_not_utf8_is_stored_and_shown_with_its_bytes_escaped(tmp_path):
    root = str(tmp_path)
    write_domains(root, (10, 60), (10, 60), names=[b"ok.png", b"caf\xe9.png"])  # Latin-1, as old archives hold
    out = tmp_path / "out"
    assert main(["--src-a", f"{root}/A", "--src-b", f"{root}/B", "--out", str(out), "--no-progress"]) == 0
    sources = pq.read_table(out / "manifest.parquet").column("source").to_pylist()
    assert sorted(os.path.basename(s) for s in sources) == ["caf\\xe9.png", "caf\\xe9.png", "ok.png", "ok.png"]
    # stock webdataset reads the shard back, the sample's JSON naming the same source
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / s["url"]) for s in index["shards"] if s["domain"] == "a"]
    metas = [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(os.path.basename(m["source"]) for m in metas) == ["caf\\xe9.png", "ok.png"]


def test_merged_parts_list_cross_part_duplicates_in_the_single_runs_order(tmp_path):
    """a10 copies a04 (shard 2, part 0) and a11 copies a06 (shard 3, part 1), both land in shard 5
    (part 1): part 1's finalize drops a11, the merge a10; a single run drops both at once."""
    root = str(tmp_path)
    write_domains(root, list(range(10, 20)) + [14, 16])
    common = ["--src-a", f"{root}/A", "--src-b", f"{root}/B", "--max-per-shard", "2", "--no-progress"]
    assert main([*common, "--out", f"{root}/single"]) == 3  # duplicates quarantined
    for i in range(2):
        assert main([*common, "--out", f"{root}/parts", "--part", f"{i}/2"]) in (0, 3)
    assert main(["merge", f"{root}/parts"]) == 3
    quarantine = pq.read_table(f"{root}/parts/quarantine.parquet").to_pylist()
    assert [os.path.basename(q["source"]) for q in quarantine] == ["a10.png", "a11.png"]
    for name in ("index.json", "manifest.parquet", "quarantine.parquet", "a/a-000005.tar"):
        assert filecmp.cmp(f"{root}/single/{name}", f"{root}/parts/{name}", shallow=False), name


def test_a_rerun_killed_after_removing_a_stale_shard_leaves_no_index_that_lists_it(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_domains(root, (10, 11, 12, 13), (100, 101, 102, 103))
    args = ["--src-a", f"{root}/A", "--src-b", f"{root}/B", "--out", f"{root}/out", "--max-per-shard", "2",
            "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "out" / "a" / "a-000001.tar").exists()
    for name in ("a02.png", "a03.png"):  # A's last group goes; no other shard changes
        os.remove(os.path.join(root, "A", name))

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before finalize")

    monkeypatch.setattr(shardrun, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (tmp_path / "out" / "a" / "a-000001.tar").exists()
    assert not (tmp_path / "out" / "index.json").exists()  # no index names the deleted shard
    monkeypatch.undo()
    assert main(args) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(s["url"] for s in index["shards"]) == ["a/a-000000.tar", "b/b-000000.tar", "b/b-000001.tar"]


def test_a_url_folder_skips_dot_folders_as_a_local_folder_does(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    tree = ["x.png", ".hidden.png", ".cache/y.png", "sub/z.png", "sub/.git/w.png"]
    try:
        for p in tree:
            fs.pipe(f"/edges-src/{p}", b"data")
            (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / p).write_bytes(b"data")
        remote = [i.path[len("memory:///edges-src/"):] for i in list_inputs("memory://edges-src")]
        local = [os.path.relpath(i.path, tmp_path) for i in list_inputs(str(tmp_path))]
        assert remote == local == ["sub/z.png", "x.png"]
    finally:
        fs.rm("/edges-src", recursive=True)
