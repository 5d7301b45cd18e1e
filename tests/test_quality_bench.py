"""bench/quality.py --curve: the reference's copies at ours' seconds, the checkpoint plan, the table."""
from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from quality import curve_overrides, curve_table, run_reference  # noqa: E402


def test_reference_copies_are_taken_at_the_marks_and_keep_their_weights(tmp_path):
    rng = np.random.default_rng(0)
    for d in ("trainA", "trainB"):
        (tmp_path / "data" / d).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / d / f"{i}.png")
    corpus = {"shards": tmp_path / "shards"}
    # The first iteration alone can take over a second (oneDNN's first calls), so the marks lie
    # seconds apart: the later one always has several steps between it and the first.
    gen, steps, snaps = run_reference(corpus, seconds=5.0, size=32, threads=1, seed=0, marks=[3.0, 1.0])
    assert len(snaps) == 2
    (n1, g1), (n2, g2) = snaps
    assert 0 < n1 < n2 <= steps  # the earlier mark first, whatever order they were given in
    assert not g1.training and not g2.training
    w = [next(m.parameters()) for m in (g1, g2, gen)]  # E_a's first convolution
    # copies, not the live model: each holds the weights of its own moment
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_curve_checkpoints_every_kth_of_the_steps_and_keeps_them(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 600\n")
    args = Namespace(curve=4, steps=None)
    assert curve_overrides(args, str(config)) == ["train.ckpt_every=150", "train.keep_ckpts=4"]
    assert curve_overrides(Namespace(curve=3, steps=90), str(config)) == ["train.ckpt_every=30", "train.keep_ckpts=3"]
    assert curve_overrides(Namespace(curve=0, steps=90), str(config)) == []
    with pytest.raises(SystemExit, match="more points"):
        curve_overrides(Namespace(curve=8, steps=5), str(config))


def test_curve_table_divides_ours_by_the_mean_of_the_seeds_it_has():
    def scores(a2b, b2a):
        return {"a2b": {"pixel_acc": a2b}, "b2a": {"pixel_acc": b2a}}

    curve = [{"seconds": 10.0, "steps": {"ours": 5, 0: 3, 1: 4}, "ours": scores(0.6, 0.3),
              "reference": {0: scores(0.2, 0.1), 1: scores(0.4, 0.3)}},
             {"seconds": 20.0, "steps": {"ours": 10, 0: 7}, "ours": scores(0.9, 0.5),   # seed 1 never got there
              "reference": {0: scores(0.3, 0.2)}}]
    rows = curve_table("demo", curve, [0, 1]).splitlines()[-2:]
    assert rows[0] == "| 10 | 5 | 0.600 | 0.300 | 3 / 4 | 0.200 / 0.400 (mean 0.300) | 0.200 | 2.00x |"
    assert rows[1] == "| 20 | 10 | 0.900 | 0.500 | 7 | 0.300 (mean 0.300) | 0.200 | 3.00x |"
