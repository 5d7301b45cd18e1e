"""Loader review 6: one readable shard among many unreadable ones keeps a domain going; a shard cut
at a member boundary or in a header counts as truncated; a negative seed and a resize below the
crop are refused when the loader is built, not in its first batch's worker."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from pipeline.loader import UnpairedLoader
from pipeline.tarindex import index_tar
from test_loader import SIZE, take, write_out


def test_one_readable_shard_among_many_unreadable_keeps_the_domain_going(tmp_path):
    out = write_out(tmp_path, shards_per_domain=1)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"] += [{"url": f"a/a-gone{i:02d}.tar", "domain": "a", "nsamples": 8} for i in range(19)]
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = UnpairedLoader(out, out, batch_size=8, image_size=SIZE, seed=2, num_workers=0, rank=0, world_size=1)
    take(loader, 60)  # before: "no readable sample in 113 shard draws" at the first batch with seed 2
    assert loader.stats["skipped"]["unreadable_shard"] > 100


def test_a_domain_whose_every_shard_is_gone_still_stops(tmp_path):
    out = write_out(tmp_path, shards_per_domain=2)
    for s in range(2):
        os.remove(tmp_path / "a" / f"a-{s:06d}.tar")
    loader = UnpairedLoader(out, out, batch_size=8, image_size=SIZE, seed=0, num_workers=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="every one of its 2 shards failed"):
        take(loader, 1)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return list(tar)


def test_a_shard_cut_between_members_or_in_a_header_is_truncated(tmp_path):
    write_out(tmp_path, shards_per_domain=1)
    data = (tmp_path / "a" / "a-000000.tar").read_bytes()
    whole = index_tar(io.BytesIO(data), len(data))
    assert not whole.truncated and len(whole.samples) == 8
    listed = members(data)
    for m in listed[2:]:  # at a member boundary, and inside the next header
        for cut in (m.offset, m.offset + 100):
            index = index_tar(io.BytesIO(data[:cut]), cut)
            assert index.truncated, cut  # before: 24 such cuts passed as whole shards
            assert len(index.samples) < 8 or m is listed[-1]  # only the last sample's json cut off


def test_fewer_samples_than_index_json_lists_count_as_truncated(tmp_path):
    out = write_out(tmp_path, shards_per_domain=1)
    index = json.loads((tmp_path / "index.json").read_text())
    for e in index["shards"]:
        if e["domain"] == "a":
            e["nsamples"] = 10  # the shard holds 8, a whole tar of them
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = UnpairedLoader(out, out, batch_size=4, image_size=SIZE, seed=0, num_workers=0, rank=0, world_size=1)
    take(loader, 3)
    assert loader.stats["skipped"]["truncated_shard"] >= 1


def test_a_negative_seed_and_a_resize_below_the_crop_are_refused_when_built(tmp_path):
    out = write_out(tmp_path, shards_per_domain=1)
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        UnpairedLoader(out, out, batch_size=4, image_size=SIZE, seed=-1, num_workers=0)
    with pytest.raises(ValueError, match="augment.resize=16 is smaller than image_size=32"):
        UnpairedLoader(out, out, batch_size=4, image_size=SIZE, augment={"resize": 16}, num_workers=0)
