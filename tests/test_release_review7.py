"""Release-side review 7: a malformed --baselines file is one line naming it (exit 2) before any
translating; a negative --threshold is refused with or without baselines; a tar written with a
large blocking factor is read whole; a folder read for both directions names each unusable file
once; rank 0 stops on another rank's model however early that rank finished; a tie is a tie.

Fast: fake translators, tiny shards, no model weights."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.release import baselines, corpus, evaluate, translate
from launch.release.translate import Limits
from pipeline.colour_stats import DomainStats
from pipeline.records import save_record
from test_release_review import noise
from test_release_review6 import image_dir, shard_of


def identity_model(monkeypatch) -> list:
    """evaluate.load_model -> an identity translator; the returned list counts the images it translated."""
    seen = []

    def fn(imgs, direction):
        seen.append(len(imgs))
        return np.asarray(imgs)
    monkeypatch.setattr(evaluate, "load_model", lambda spec, uri=None, device=None: (fn, {"kind": "fake"}))
    return seen


def split(tmp_path: Path) -> tuple[Path, Path]:
    names = {f"{i}.png": 16 for i in range(3)}
    return image_dir(tmp_path / "testA", names), image_dir(tmp_path / "testB", names, seed=1)


# ---------------------------------------------------------------- 1: malformed --baselines files

def good_json() -> dict:
    rng = np.random.default_rng(0)
    stats = {d: DomainStats.empty().add(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)) for d in "ab"}
    return baselines.to_json(stats)


def with_domain(change) -> dict:
    d = good_json()
    change(d["domains"])
    return d


BAD = {  # name: (file content, what the error says)
    "a JSON list": ([1, 2], "expected a JSON object, got list"),
    "only domain a": (with_domain(lambda ds: ds.pop("b")), r"missing b"),
    "a third domain": (with_domain(lambda ds: ds.update(c=ds["a"])), r"domains \['a', 'b', 'c'\], expected a and b"),
    "a hist of 3 values": (with_domain(lambda ds: ds["a"].update(hist=[1, 2, 3])),
                           "domain a: hist must be 3 x 256 integer counts, got 3 value"),
    "a hist of floats": (with_domain(lambda ds: ds["b"].update(hist=[[0.5] * 256] * 3)), "domain b: hist must be"),
    "a negative count": (with_domain(lambda ds: ds["a"]["hist"][0].__setitem__(0, -1)), "domain a: hist must hold"),
    "a mode colour of 300": (with_domain(lambda ds: ds["b"].update(mode_colour=[300, 0, 0])),
                             r"domain b: mode_colour must be 3 integers 0..255, got \[300, 0, 0\]"),
    "a two-channel constant": (with_domain(lambda ds: ds["a"].update(constant_colour=[1, 2])), "constant_colour must"),
    "images missing": (with_domain(lambda ds: ds["a"].pop("images")), "domain a: images must be an integer >= 0"),
    "a domain that is a string": (with_domain(lambda ds: ds.update(a="x")), "domain a: expected an object, got str"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_malformed_baselines_file_is_refused_with_its_path_and_what_is_wrong(tmp_path, name):
    content, why = BAD[name]
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"^{path}: not a baselines file .*{why}"):
        baselines.load(path)


def test_a_good_file_still_loads_and_a_folder_is_refused(tmp_path):
    path = baselines.save(tmp_path / "baselines.json", baselines.from_json(good_json()))
    again = baselines.load(path)
    assert sorted(again) == ["a", "b"] and again["a"].hist.sum() == 3 * 2 * 8 * 8
    with pytest.raises(ValueError, match=f"^{tmp_path}: not a baselines file \\(Is a directory\\)"):
        baselines.load(tmp_path)


@pytest.mark.parametrize("name", ["a folder", "a JSON list", "only domain a", "a hist of 3 values"])
def test_the_cli_prints_one_line_and_exits_2_before_translating(tmp_path, monkeypatch, capsys, name):
    seen = identity_model(monkeypatch)
    test_a, truth_b = split(tmp_path)
    path = tmp_path / "bl"
    if name != "a folder":
        path = tmp_path / "bl.json"
        path.write_text(json.dumps(BAD[name][0]))
    else:
        path.mkdir()
    rc = evaluate.main(["--model", "x", "--test-a", str(test_a), "--truth-b", str(truth_b), "--c2st-steps", "0",
                        "--no-log", "--baselines", str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err  # before: tracebacks (IsADirectoryError, AttributeError, KeyError 'b')
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: {path}: not a baselines file (")
    assert seen == []  # before: only domain a failed after the whole split was translated


# ---------------------------------------------------------------- 2: a negative threshold

def test_a_negative_threshold_is_refused_without_baselines_too(tmp_path, monkeypatch, capsys):
    identity_model(monkeypatch)
    test_a, _ = split(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "x", "--test-a", str(test_a), "--truth-b", str(test_a), "--c2st-steps", "0",
                       "--no-log", "--threshold", "-1"])
    assert e.value.code == 2 and "--threshold -1: must be >= 0" in capsys.readouterr().err  # before: scored 0.0
    x = noise(4, 4)[None]
    with pytest.raises(ValueError, match="threshold -1: expected >= 0"):
        evaluate.pixel_accuracy(x, x, -1)
    assert evaluate.pixel_accuracy(x, x, 0) == 1.0  # 0, exact matches only, is allowed
    assert evaluate.arguments(["--model", "x", "--test-a", "a", "--truth-b", "b", "--threshold", "0"]).threshold == 0


# ---------------------------------------------------------------- 3: tars with a large blocking factor

def tar_bytes(n: int = 2) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(noise(8, 8, i)).save(png, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    return buf.getvalue()


def keys_of(path: Path) -> list[str]:
    return [k for k, _ in corpus.read_samples(str(path))]


def test_a_tar_padded_to_128_kib_records_is_read_and_damage_is_still_found(tmp_path):
    data = tar_bytes()
    padded = tmp_path / "b256.tar"
    padded.write_bytes(data + b"\0" * (256 * 512 - len(data)))  # what GNU tar -b 256 writes
    assert keys_of(padded) == ["0000", "0001"]  # before: ReadError, no end-of-archive block
    cut = tmp_path / "cut.tar"
    second = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[1].offset
    cut.write_bytes(data[:second + 100])  # in the second header: tarfile itself stops quietly there
    with pytest.raises(tarfile.ReadError, match=f"truncated or damaged after byte {second}"):
        keys_of(cut)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(data + b"\0" * 100_000 + b"\1" + b"\0" * 40_000)  # not padding far past the tail
    with pytest.raises(tarfile.ReadError, match="data other than zero padding"):
        keys_of(garbage)


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
def test_a_tar_written_by_tar_b_256_is_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(noise(8, 8, i)).save(src / f"{i:04d}.png")
    out = tmp_path / "b256.tar"
    subprocess.run(["tar", "-b", "256", "-cf", str(out), "-C", str(src), "0000.png", "0001.png"], check=True)
    assert out.stat().st_size == 131072 and keys_of(out) == ["0000", "0001"]


# ---------------------------------------------------------------- 4: one folder for both directions

def test_a_folder_read_for_both_directions_names_each_unusable_file_once(tmp_path, monkeypatch, capsys):
    identity_model(monkeypatch)
    test_a, test_b = split(tmp_path)
    (test_a / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # damaged
    shutil.copy(test_a / "0.png", test_a / "9.png")  # no partner in testB
    rc = evaluate.main(["--model", "x", "--test-a", str(test_a), "--truth-b", str(test_b),
                        "--test-b", str(test_b), "--truth-a", str(test_a), "--c2st-steps", "0", "--no-log"])
    err = capsys.readouterr().err
    assert rc == 3
    assert err.count(f"skipped {test_a / '7.png'}: ") == 1 and err.count(f"skipped {test_a / '9.png'}: ") == 1
    assert "1 test image(s) skipped as unusable; 1 test or truth image(s) left out" in err  # before: 2 unusable
    rejected = []
    evaluate.load_pairs(test_a, test_a, rejected=rejected)  # the same folder as test and truth
    assert len(rejected) == 1 and rejected[0].startswith(f"{test_a / '7.png'}: ")


# ---------------------------------------------------------------- 5: another rank's model, early

def test_rank_0_stops_on_another_model_written_while_it_loaded_its_own(tmp_path, monkeypatch, capsys):
    """Rank 1 (version 1) finishes shard 1 while rank 0 is still loading version 2. Before: rank 0's
    job started after its load, the record counted as an older job's, and rank 0 waited forever."""
    shards = [shard_of(tmp_path / f"s{i}") for i in range(2)]
    out = tmp_path / "out"
    other = {"uri": "models:/unit-rev/1", "name": "unit-rev", "version": "1", "run_id": "r1",
             "weights_sha256": "cd" * 32}

    def fake_load(a):
        threading.Event().wait(0.05)  # loading takes a while (not time.sleep: patched below)
        save_record(str(out), {"version": corpus.FORMAT_VERSION, "domain": "b", "number": 1,
                               "url": "b/b-000001.tar", "fingerprint": "x", "bytes": 0, "inputs": [],
                               "model": other})
        info = {"kind": "mlflow", "name": "unit-rev", "version": "2", "run_id": "r2"}
        return (lambda x, d: np.asarray(x), {"weights_sha256": "ab" * 32}, info, Limits())
    monkeypatch.setattr(translate, "load", fake_load)
    sleeps = []
    monkeypatch.setattr(corpus.time, "sleep", lambda s: sleeps.append(s) if len(sleeps) < 20 else pytest.fail("hangs"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--model", "models:/unit-rev/2", "--direction", "a2b", "--in", *map(str, shards), "--out", str(out),
            "--no-progress"]
    assert corpus.main(translate.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert "shard 1 was written by another rank with models:/unit-rev/1" in err
    assert "rank 0 translates with models:/unit-rev/2" in err and not (out / "index.json").exists()


# ---------------------------------------------------------------- 6: a tie

def verdict_line(margin: float) -> str:
    res = {"a2b": {"n": 3, "pixel_acc": 0.5, "mae": 1.0, "identity_pixel_acc": 0.5 - margin, "identity_mae": 1.0,
                   "best_baseline": "identity", "best_baseline_pixel_acc": 0.5 - margin, "margin": margin}}
    return next(ln.strip() for ln in evaluate.format_table(res).splitlines() if ln.strip().startswith("model "))


def test_a_tie_is_reported_as_a_tie():
    assert verdict_line(0.0) == "model ties with the strongest baseline (identity) in pixel accuracy"  # before: LOSES TO
    assert verdict_line(0.25) == "model beats the strongest baseline (identity) by +0.2500 pixel accuracy"
    assert verdict_line(-0.25) == "model LOSES TO the strongest baseline (identity) by -0.2500 pixel accuracy"
