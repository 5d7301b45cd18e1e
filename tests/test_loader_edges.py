"""The loader at its edges (the fifth review round's findings): credentials quoted without a scheme
in a backend's error, cache files abandoned by a killed writer, a reshaped resume past every old
rank's chunks, a thin strip that a resize would blow up."""
from __future__ import annotations

import os
import time

import cv2
import numpy as np
import pytest

from pipeline.augment import AugmentConfig, Augmenter, TooManyPixels
from pipeline.loader import CACHE_SUBDIR, STALE_TEMP_S, Counters, Shard, ShardCache, ShardError, ShardReader, \
    UnpairedLoader, reshaped_state
from test_loader import SIZE, out, take  # noqa: F401  (the module's shards fixture)


@pytest.mark.parametrize("url", ["pipe:sh -c 'exit 3' AWS_SECRET_ACCESS_KEY=SECRETPW",
                                 "memory://alice:SECRETPW@bucket/x.tar",
                                 "s3://AKIAEXAMPLE:SECRETPW@bucket/x.tar"])
def test_an_unreadable_shard_is_named_without_its_credentials(url, caplog):
    import fsspec

    try:
        with pytest.raises(ShardError) as e:
            ShardReader(False, None).open(Shard(url), Counters())
    finally:  # fsspec caches the filesystem it made here, without the S3 tests' credentials
        if url.startswith("s3://"):
            type(fsspec.filesystem("s3")).clear_instance_cache()
    assert e.value.reason == "unreadable_shard"
    assert "SECRETPW" not in str(e.value), str(e.value)
    assert "cannot read" in str(e.value)
    assert "SECRETPW" not in caplog.text


def test_a_cache_file_abandoned_mid_write_is_removed_once_stale(tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), 1_000_000)
    folder = tmp_path / "cache" / CACHE_SUBDIR  # temporaries named as the cache names its own
    stale = folder / ".0123456789abcdef-killed.tar.abc123.tmp"
    fresh = folder / ".0123456789abcdef-writing.tar.def456.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"x" * 450_000)
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    for i in range(3):
        cache.open(f"s3://b/ok{i}.tar", lambda: b"y" * 400_000)
    names = sorted(p.name for p in folder.iterdir())
    assert stale.name not in names          # a killed writer's leftover no longer holds its space
    assert fresh.name in names              # another worker's copy in flight is left alone
    kept = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))
    assert kept <= 1_000_000


def test_a_reshaped_resume_starts_past_every_old_ranks_chunks(out):  # noqa: F811
    kw = dict(batch_size=4, image_size=SIZE, seed=1, num_workers=0)
    old = [UnpairedLoader(out, out, rank=r, world_size=2, **kw) for r in (0, 1)]
    take(old[0], 2)
    take(old[1], 9)  # rank 1 ran further through its chunks than rank 0
    states = [loader.state_dict() for loader in old]
    tops = [max(p[0] for v in s["positions"].values() for p in v.values()) for s in states]
    assert tops[1] > tops[0]
    new = UnpairedLoader(out, out, rank=1, world_size=3, **kw)
    new.load_state_dict(reshaped_state(states))
    assert all(p == (max(tops) + 1, 0) for p in new._positions[0].values())
    assert reshaped_state(states)["rank"] == 0 and reshaped_state(states)["stats"] == states[0]["stats"]
    with pytest.raises(ValueError, match="no loader state"):
        reshaped_state([])


def test_a_thin_strip_that_the_resize_would_blow_up_is_too_many_pixels():
    ok, png = cv2.imencode(".png", np.zeros((2, 200_000, 3), np.uint8))  # 400,000 pixels, 1 kB
    augment = Augmenter(AugmentConfig(resize=128), 128)
    with pytest.raises(TooManyPixels, match="200000x2 resized to a shortest side of 128 is 12800000x128"):
        augment(png.tobytes(), np.array([0.5, 0.5, 0.9]), 0)
    ok, png = cv2.imencode(".png", np.zeros((40, 400, 3), np.uint8))  # an ordinary wide image still works
    assert augment(png.tobytes(), np.array([0.5, 0.5, 0.9]), 0).shape == (128, 128, 3)
