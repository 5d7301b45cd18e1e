"""make shards, seventh review round: a kill inside a dedup rewrite, part runs with different N,
stale parts folders of an earlier job, and verify's checks of totals and manifest rows."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline.index as ix
import pipeline.shardwriter as sw
from pipeline.layout import LockedError
from pipeline.lock import out_locks
from pipeline.shards import main, verify
from test_shards_review6 import make_domain, png


def args(root, *extra) -> list[str]:
    return ["--src-a", f"{root}/A", "--src-b", f"{root}/B", "--out", f"{root}/out", "--no-progress", *extra]


# ----------------------------------------------------------------------------- 1. kill in rewrite_shard


def test_a_kill_between_the_rewritten_tar_and_its_record_leaves_no_current_record(tmp_path, monkeypatch):
    make_domain(tmp_path / "A", 2, 1)
    make_domain(tmp_path / "B", 2, 20)
    shutil.copy(tmp_path / "A" / "00.png", tmp_path / "A" / "01.png")  # a duplicate, in shard 1
    real = sw.rewrite_shard

    def killed(record, out, remove):
        def crash(*_):
            raise KeyboardInterrupt("killed before the record was saved")
        monkeypatch.setattr(sw, "save_record", crash)
        return real(record, out, remove)

    monkeypatch.setattr(ix, "rewrite_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args(tmp_path, "--max-per-shard", "1"))
    monkeypatch.undo()
    (tmp_path / "A" / "00.png").write_bytes(png(77))  # the original changes: 01 is no duplicate now
    assert main(args(tmp_path, "--max-per-shard", "1")) == 0
    problems, _ = verify(str(tmp_path / "out"))
    assert problems == []
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["totals"]["a"]["samples"] == 2


# ----------------------------------------------------------------------------- 2. parts with another N


def test_a_part_run_with_another_count_is_refused_while_one_holds_out(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    held = tmp_path / "held"
    code = (f"from pipeline.lock import out_locks; import time\n"
            f"with out_locks({out!r}, (0, 2)):\n    open({str(held)!r}, 'w').close(); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        deadline = time.time() + 30
        while not held.exists():
            assert time.time() < deadline and holder.poll() is None
            time.sleep(0.1)
        with pytest.raises(LockedError, match="--part runs of 2 parts"):
            with out_locks(out, (0, 3)):
                pass
        with out_locks(out, (1, 2)):  # the same job's other part still runs beside it
            pass
    finally:
        holder.kill()
        holder.wait()
    with out_locks(out, (0, 3)):  # once the holder is gone, the other count may run
        pass


# ----------------------------------------------------------------------------- 3. stale parts folders


def test_a_job_with_another_part_count_can_merge_after_an_earlier_job(tmp_path, capsys):
    make_domain(tmp_path / "A", 3, 1)
    make_domain(tmp_path / "B", 3, 20)
    for i in range(2):
        assert main(args(tmp_path, "--max-per-shard", "1", "--part", f"{i}/2")) == 0
    assert main(["merge", str(tmp_path / "out")]) == 0
    for i in range(3):
        assert main(args(tmp_path, "--max-per-shard", "1", "--part", f"{i}/3")) == 0
    assert "removed 2 parts folder(s)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "parts").iterdir() if not p.name.startswith(".")) == \
        ["0-of-3", "1-of-3", "2-of-3"]
    assert main(["merge", str(tmp_path / "out")]) == 0


# ----------------------------------------------------------------------------- 4. verify


@pytest.fixture
def shards(tmp_path):
    make_domain(tmp_path / "A", 3, 1)
    make_domain(tmp_path / "B", 3, 20)
    assert main(args(tmp_path)) == 0
    return tmp_path / "out"


def test_verify_reports_index_totals_whose_bytes_or_shards_do_not_add_up(shards):
    path = shards / "index.json"
    index = json.loads(path.read_text())
    index["totals"]["a"]["bytes"] += 512
    index["totals"]["b"]["shards"] += 1
    path.write_text(json.dumps(index))
    problems, _ = verify(str(shards))
    assert any("totals for a" in p and "bytes" in p for p in problems)
    assert any("totals for b" in p and "shards" in p for p in problems)
    assert len(problems) == 2


def rewrite_manifest(shards, edit) -> None:
    table = pq.read_table(shards / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(edit(table.to_pylist()), schema=table.schema), shards / "manifest.parquet")


def test_verify_reports_a_repeated_manifest_row(shards):
    rewrite_manifest(shards, lambda rows: rows + [rows[0]])
    problems, _ = verify(str(shards))
    assert problems and all("more than once" in p for p in problems)


@pytest.mark.parametrize("field,value,said", [("bytes", 1, "1 bytes"), ("width", 9999, "width 9999"),
                                              ("height", 7, "height 7")])
def test_verify_reports_a_manifest_row_the_shard_contradicts(shards, field, value, said):
    rewrite_manifest(shards, lambda rows: [dict(rows[0], **{field: value})] + rows[1:])
    problems, _ = verify(str(shards))
    assert len(problems) == 1 and said in problems[0]


def test_a_png_cut_before_its_iend_chunk_is_stored_re_encoded_whole():
    from pipeline.images import PNG_END, check_image

    arr = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    whole = buf.getvalue()
    assert whole.endswith(PNG_END)
    kept = check_image(whole)
    assert not kept.converted and kept.data == whole          # a complete 8-bit PNG is kept as it is
    cut = check_image(whole[:-len(PNG_END)])
    assert cut.converted and cut.data.endswith(PNG_END)       # re-encoded: a valid file
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(cut.data)).convert("RGB")), arr)
