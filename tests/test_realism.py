"""Realism classifier on separable synthetic domains: reddish noise (A) vs bluish noise (B),
written as real tar shards (stock webdataset TarWriter) and read back by the project's loader."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import realism
from launch.realism import (load_classifier, prob_b, realism_metrics, realism_score, score_translator,
                            train_classifier)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16


def noise(rng, n, domain):
    """uint8 [n,SIZE,SIZE,3]: noise whose red (A) or blue (B) channel is high."""
    x = rng.integers(0, 120, size=(n, SIZE, SIZE, 3))
    ch = 0 if domain == "a" else 2
    x[..., ch] = rng.integers(140, 256, size=(n, SIZE, SIZE))
    return x.astype(np.uint8)


def swap_rb(imgs, direction=None):
    """A 'translator' whose output looks like the other domain: red and blue swapped."""
    return np.ascontiguousarray(np.asarray(imgs)[..., ::-1])


def png(img) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import webdataset as wds
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    entries = []
    for d in ("a", "b"):
        (out / d).mkdir()
        for s in range(2):
            url = f"{d}/{d}-{s:06d}.tar"
            with wds.TarWriter(str(out / url)) as w:
                for i, img in enumerate(noise(rng, 24, d)):
                    key = f"{d}{s}x{i:04d}"
                    w.write({"__key__": key, "png": png(img),
                             "json": {"domain": d, "width": SIZE, "height": SIZE, "format": "png"}})
            entries.append({"url": url, "domain": d, "nsamples": 24})
    (out / "index.json").write_text(json.dumps({"version": 1, "shards": entries}))
    return out


@pytest.fixture(scope="module")
def classifier(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    train_classifier(shards, out, image_size=SIZE, steps=40, batch_size=8, progress=False)
    return load_classifier(out)


@pytest.fixture(scope="module")
def test_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("test")
    rng = np.random.default_rng(123)  # images the classifier never saw
    for dom in ("a", "b"):
        (d / dom).mkdir()
        for i, img in enumerate(noise(rng, 20, dom)):
            Image.fromarray(img).save(d / dom / f"{i:04d}.png")
    return d / "a", d / "b"


def test_classifier_separates_held_out_domains(classifier):
    rng = np.random.default_rng(7)
    a, b = noise(rng, 50, "a"), noise(rng, 50, "b")
    assert realism_score(classifier, b, "b") >= 0.95
    assert realism_score(classifier, a, "a") >= 0.95
    p = prob_b(classifier, np.concatenate([a, b]))
    assert p.shape == (100,) and p[:50].max() < p[50:].min()
    assert classifier.meta["train_accuracy"] >= 0.9


def test_target_looking_translations_score_high_identity_low(classifier, test_dirs):
    rng = np.random.default_rng(9)
    a = noise(rng, 30, "a")
    assert realism_score(classifier, swap_rb(a), "b") >= 0.9   # a2b output that looks like B
    assert realism_score(classifier, a, "b") <= 0.1            # untranslated input
    good = score_translator(classifier, swap_rb, *test_dirs)
    ident = score_translator(classifier, lambda x, d: x, *test_dirs)
    assert good["realism_a2b"] >= 0.9 and good["realism_b2a"] >= 0.9
    assert ident["realism_a2b"] <= 0.1 and ident["realism_b2a"] <= 0.1
    assert set(score_translator(classifier, swap_rb, test_a=test_dirs[0])) == {"realism_a2b"}


def test_safetensors_round_trip(classifier, tmp_path):
    from safetensors.torch import load_file
    realism.save_classifier(tmp_path, classifier, dict(classifier.meta))
    again = load_classifier(tmp_path)
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x = noise(np.random.default_rng(1), 8, "a")
    assert np.array_equal(prob_b(classifier, x), prob_b(again, x))
    assert set(load_file(str(tmp_path / realism.WEIGHTS_NAME))) == set(classifier.state_dict())
    assert not list(tmp_path.glob(".*.tmp"))
    # corrupted weights are refused with the file's name
    w = tmp_path / realism.WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="no realism classifier"):
        load_classifier(tmp_path / "nowhere")


def test_bad_inputs(classifier):
    with pytest.raises(ValueError, match="target_domain"):
        realism_score(classifier, noise(np.random.default_rng(0), 2, "a"), "c")
    with pytest.raises(ValueError, match="uint8"):
        realism_score(classifier, np.zeros((2, SIZE, SIZE, 3), np.float32), "b")


def tiny_export(path: Path) -> Path:
    from launch.export import save_translator
    from model.unit import UNIT
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny", "image_size": SIZE})
    return save_translator(path, unit.gen, unit.config(), image_size=SIZE, step=0, ema=False)


def test_trainer_hook_trains_once_and_scores_an_export(shards, test_dirs, tmp_path):
    export = tiny_export(tmp_path / "export")
    clf = tmp_path / "realism"
    m = realism_metrics(export, shards, test_a=test_dirs[0], test_b=test_dirs[1], classifier_dir=clf,
                        image_size=SIZE, steps=30)
    assert set(m) == {"realism_a2b", "realism_b2a"} and all(0.0 <= v <= 1.0 for v in m.values())
    stamp = (clf / realism.WEIGHTS_NAME).stat().st_mtime_ns
    assert realism_metrics(export, shards, test_a=test_dirs[0], test_b=test_dirs[1], classifier_dir=clf,
                           image_size=SIZE, steps=30) == m
    assert (clf / realism.WEIGHTS_NAME).stat().st_mtime_ns == stamp  # reused, not retrained
    realism_metrics(export, shards, test_a=test_dirs[0], classifier_dir=clf, image_size=SIZE, steps=31)
    assert json.loads((clf / realism.META_NAME).read_text())["steps"] == 31  # other settings: retrained


def test_cli_train_and_score(shards, test_dirs, tmp_path, capsys):
    clf, export = tmp_path / "clf", tiny_export(tmp_path / "export")
    assert realism.main(["train", "--shards", str(shards), "--out", str(clf), "--steps", "40", "--size",
                         str(SIZE), "--batch", "8"]) == 0
    assert "saved to" in capsys.readouterr().out
    assert realism.main(["score", "--classifier", str(clf), "--model", str(export),
                         "--test-a", str(test_dirs[0]), "--test-b", str(test_dirs[1])]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:3] in ("a2b", "b2a")}
    assert set(lines) == {"a2b", "b2a"} and lines["a2b"][1] == "20"
    assert float(lines["a2b"][3]) <= 0.1 and float(lines["b2a"][3]) <= 0.1  # identity column
    assert realism.main(["score", "--classifier", str(tmp_path / "none"), "--model", str(export),
                         "--test-a", str(test_dirs[0])]) == 2
    assert "no realism classifier" in capsys.readouterr().err
