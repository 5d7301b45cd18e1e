"""Translating whole corpora (launch.release.translate on shards) and the CLI's manners.

Integration tests (slow) run the real `torchrun` launcher on CPU ranks, kill a run with SIGKILL
and resume it, and load a translator registered in a real MLflow store (SQLite under tmp_path).
Outputs are read back with stock webdataset."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from launch.release import evaluate as ev
from launch.release.export import translate_uint8
from launch.release.translate import main as translate_main
from launch.runstore.artifacts import read_meta, save_translator
from model.unit import UNIT
from pipeline.index import MANIFEST_COLUMNS, QUARANTINE_COLUMNS
from pipeline.imageio import read_rgb
from pipeline.shardwriter import write_tar
from test_hostile_launch import export  # noqa: F401  (the tiny-preset export fixture)
from trainutil import free_port, make_corpus, wait_for

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
N_TRAIN, PER_SHARD = 16, 2  # 8 shards of 2 images per domain


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Demo corpus at 32 px and its `make shards` OUT (corpus / "shards")."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=N_TRAIN, per_shard=PER_SHARD)


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def torchrun_cmd(*args, ranks: int = 2) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "launch.release.translate",
            *map(str, args)]


def samples(tar: Path) -> list[dict]:
    """Every sample of a tar as stock webdataset reads it, in order."""
    return list(wds.WebDataset(str(tar), shardshuffle=False, nodesplitter=wds.split_by_node))


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def input_shards(corpus: Path, domain: str) -> list[Path]:
    index = json.loads((corpus / "shards" / "index.json").read_text())
    return [corpus / "shards" / e["url"] for e in index["shards"] if e["domain"] == domain]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it at once (torchrun starts each rank in a
    session of its own, so killing the launcher's process group would leave the ranks running)."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    proc.communicate(timeout=30)


def one_thread(fn, *args):
    """fn(*args) on one thread, as the ranks (OMP_NUM_THREADS=1) compute it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def same_image(a, b) -> bool:
    """Equal, up to a rare 1-level rounding difference: CPU kernels may pick another algorithm in
    another process (tests/test_registry.py allows the same)."""
    d = np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
    return a.shape == b.shape and int(d.max()) <= 1 and float((d > 0).mean()) < 0.01


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --model "), err
    return lines[0]


# ---------------------------------------------------------------- corpus mode on two ranks

@pytest.mark.slow
def test_two_ranks_write_shards_webdataset_reads_back_with_the_same_keys_and_translations(corpus, export, tmp_path):
    out = tmp_path / "maps"
    r = subprocess.run(torchrun_cmd("--model", export[0], "--direction", "a2b", "--in", corpus / "shards",
                                    "--out", out, "--batch-size", PER_SHARD, "--no-progress"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 1 of 2 wrote 4 shard(s)" in r.stdout and "rank 0 of 2 wrote 4 shard(s)" in r.stdout
    assert f"Translated {N_TRAIN} of {N_TRAIN} image(s) a2b" in r.stdout and "quarantined 0" in r.stdout

    index = json.loads((out / "index.json").read_text())
    sources = input_shards(corpus, "a")
    assert [e["url"] for e in index["shards"]] == [f"b/b-{i:06d}.tar" for i in range(len(sources))]
    assert index["totals"]["b"]["samples"] == N_TRAIN and index["translation"]["direction"] == "a2b"
    weights = read_meta(export[0])["weights_sha256"]
    for i, src in enumerate(sources):
        before, after = samples(src), samples(out / "b" / f"b-{i:06d}.tar")
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        expected = one_thread(translate_uint8, export[1], np.stack([decode(s["jpg"]) for s in before]), "a2b")
        for s, y, k in zip(after, expected, [s["__key__"] for s in before]):
            assert same_image(decode(s["png"]), y)  # maps' format (the manifest's), lossless
            meta = json.loads(s["json"])
            assert meta["source_key"] == k and meta["source"] == f"{src.resolve()}#{k}"
            assert meta["model"] == {"export": str(export[0].resolve()), "weights_sha256": weights}
            assert (meta["domain"], meta["format"], meta["width"], meta["height"]) == ("b", "png", 32, 32)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.column_names == MANIFEST_COLUMNS and manifest.num_rows == N_TRAIN
    assert pq.read_table(out / "quarantine.parquet").column_names == QUARANTINE_COLUMNS


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_rewrites_no_finished_shard_and_loses_none(corpus, export, tmp_path):
    out = tmp_path / "maps"
    records = out / ".records" / "b"
    # --size 128 and batches of 1 make each shard take a while, and the ranks run at the lowest
    # priority, so this process sees the first record (and kills) while most shards are unwritten.
    args = ("--model", export[0], "--direction", "a2b", "--in", corpus / "shards", "--out", out,
            "--batch-size", "1", "--size", "128", "--no-progress")
    proc = subprocess.Popen(torchrun_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=lambda: os.nice(19))
    try:
        wait_for(lambda: records.is_dir() and any(records.glob("b-*.json")), 120, [proc], "a first shard", 0.01)
    finally:
        kill_tree(proc)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (out / "b").glob("b-*.tar") if (records / p.name.replace(".tar", ".json")).is_file()}
    assert 0 < len(done) < len(input_shards(corpus, "a")) and not (out / "index.json").exists()

    # Resumed by a single process: any number of ranks finishes the job.
    rc = translate_main([str(a) for a in args])
    assert rc == 0
    for name, ident in done.items():
        st = (out / "b" / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == ident, f"{name} was written again"
    keys = Counter(s["__key__"] for i in range(len(input_shards(corpus, "a")))
                   for s in samples(out / "b" / f"b-{i:06d}.tar"))
    want = Counter(s["__key__"] for src in input_shards(corpus, "a") for s in samples(src))
    assert keys == want and set(keys.values()) == {1}
    assert not [p for p in (out / "b").iterdir() if p.name.startswith(".")]  # no temporary files left
    assert json.loads((out / "index.json").read_text())["totals"]["b"]["samples"] == N_TRAIN


# ---------------------------------------------------------------- bad samples, damaged shards

def test_unusable_samples_and_a_truncated_shard_are_quarantined_and_exit_3(export, tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "in").mkdir()
    t0, t1 = tmp_path / "in" / "x-0.tar", tmp_path / "in" / "x-1.tar"
    write_tar(str(t0), [("k0.png", png(good[0])), ("k0.json", b"{}"), ("bad.png", b"not an image"),
                        ("tiny.png", png(good[0][:2, :2])), ("meta.json", b"{}"), ("k1.png", png(good[1]))])
    write_tar(str(tmp_path / "full.tar"), [("k2.png", png(good[2])), ("k3.png", png(good[2][::-1]))])
    data = (tmp_path / "full.tar").read_bytes()
    t1.write_bytes(data[:512 + len(png(good[2])) + 600])  # k2 whole, k3 cut in its data
    out = tmp_path / "out"
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(t0), str(t1),
                         "--out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 3, cap.out + cap.err
    reasons = {Path(r["source"]).name: r["reason"]
               for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert reasons.keys() == {"x-0.tar#bad", "x-0.tar#tiny", "x-0.tar#meta", "x-1.tar"}
    assert reasons["x-0.tar#bad"].startswith("unusable image: not a readable image")
    assert "2x2 is too small" in reasons["x-0.tar#tiny"] and reasons["x-0.tar#meta"].startswith("no image")
    assert reasons["x-1.tar"].startswith("unreadable shard")
    assert [s["__key__"] for s in samples(out / "b" / "b-000000.tar")] == ["k0", "k1"]
    assert [s["__key__"] for s in samples(out / "b" / "b-000001.tar")] == ["k2"]
    y = decode(samples(out / "b" / "b-000001.tar")[0]["png"])  # a list of tars: each sample's own format
    assert np.array_equal(y, translate_uint8(export[1], good[2][None], "a2b")[0])
    assert "quarantined 4" in cap.out


def test_an_out_holding_other_things_is_refused_and_left_alone(corpus, export, tmp_path, capsys):
    before = sorted(p.name for p in (corpus / "shards").rglob("*"))
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(corpus / "shards"),
                         "--out", str(corpus / "shards")])
    assert rc == 2 and "not written by launch.release.translate" in capsys.readouterr().err
    assert sorted(p.name for p in (corpus / "shards").rglob("*")) == before


# ---------------------------------------------------------------- folder mode: streaming, --ext, --size

def test_a_mixed_size_folder_streams_in_bounded_windows(export, tmp_path, monkeypatch):
    import launch.release.translate as tr

    src = tmp_path / "in"
    src.mkdir()
    shapes = [(24, 24), (40, 32), (32, 32)]
    for i in range(12):
        Image.fromarray(np.full(shapes[i % 3] + (3,), 10 * i, np.uint8)).save(src / f"{i:02d}.png")
    reads, calls = [], []
    real_read = tr.read_rgb
    monkeypatch.setattr(tr, "read_rgb", lambda p, **kw: reads.append(p) or real_read(p, **kw))

    def fn(x, direction):
        calls.append((len(reads), x.shape))
        return 255 - x

    res = tr.translate_folder(fn, "a2b", src, tmp_path / "out", batch_size=2, progress=False)
    assert res["translated"] == 12 and not res["rejected"]
    window = tr.WINDOW * 2
    assert calls[0][0] == window < 12  # translating began after one window, not after the whole folder
    assert all(shape[0] <= 2 for _, shape in calls)  # batches of one shape, at most --batch-size
    out = np.asarray(Image.open(tmp_path / "out" / "07.png"))
    assert out.shape == (40, 32, 3) and (out == 255 - 70).all()


def test_ext_and_size(export, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name, shape in (("a.jpg", (40, 56)), ("b.jpg", (48, 48)), ("b.png", (20, 20))):
        Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(src / name)
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(src), "--out",
                         str(tmp_path / "out"), "--ext", "png", "--size", "16", "--batch-size", "1", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 3, cap.err  # b.jpg and b.png both want b.png: the second is skipped by name
    assert "b.png: its output" in cap.err and "already written from" in cap.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    out = Image.open(tmp_path / "out" / "a.png")
    assert out.format == "PNG" and out.size == (16, 16)
    expected = translate_uint8(export[1], read_rgb(src / "a.jpg", size=16)[None], "a2b")[0]
    assert np.array_equal(np.asarray(out), expected)


def test_corpus_ext_and_size(corpus, export, tmp_path):
    out = tmp_path / "photos"
    rc = translate_main(["--model", str(export[0]), "--direction", "b2a", "--in", str(corpus / "shards" / "index.json"),
                         "--out", str(out), "--ext", "webp", "--size", "16", "--no-progress"])
    assert rc == 0
    got = samples(out / "a" / "a-000000.tar")
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples(input_shards(corpus, "b")[0])]
    im = Image.open(io.BytesIO(got[0]["webp"]))
    assert im.format == "WEBP" and im.size == (16, 16) and json.loads(got[0]["json"])["format"] == "webp"


def test_corpus_windows_are_bounded_by_bytes_too(corpus, export, tmp_path, monkeypatch):
    from launch.release import corpus as corpus_mod

    windows = []
    real = corpus_mod.translate_window

    def window(fn, direction, images, batch_size, limits=None):
        windows.append(len(images))
        return real(fn, direction, images, batch_size, limits)

    monkeypatch.setattr(corpus_mod, "translate_window", window)
    monkeypatch.setattr(corpus_mod, "WINDOW_BYTES", 32 * 32 * 3)  # one decoded 32 px image
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(corpus / "shards"),
                         "--out", str(tmp_path / "out"), "--batch-size", "8", "--no-progress"])
    assert rc == 0
    assert windows and set(windows) == {1}  # by count alone each shard's 2 images go together
    keys = [s["__key__"] for t in sorted((tmp_path / "out" / "b").glob("*.tar")) for s in samples(t)]
    assert len(keys) == N_TRAIN


def test_identical_translations_keep_every_key(corpus, tmp_path):
    """make shards drops duplicate inputs; a translation must never drop an output because it
    equals another one (a constant translator makes them all equal)."""
    unit = UNIT.from_config({"preset": "tiny"})
    with torch.no_grad():
        for p in unit.gen.parameters():
            p.zero_()
    save_translator(tmp_path / "const", unit.gen, unit.config(), image_size=32, step=1, ema=False)
    out = tmp_path / "out"
    rc = translate_main(["--model", str(tmp_path / "const"), "--direction", "a2b", "--in",
                         str(corpus / "shards"), "--out", str(out), "--no-progress"])
    assert rc == 0
    keys = [s["__key__"] for t in sorted((out / "b").glob("*.tar")) for s in samples(t)]
    want = [s["__key__"] for t in input_shards(corpus, "a") for s in samples(t)]
    assert keys == want and len(want) == N_TRAIN
    assert len({bytes(s["png"] if "png" in s else s["jpg"]) for t in sorted((out / "b").glob("*.tar"))
                for s in samples(t)}) == 1  # all outputs identical, all kept
    assert pq.read_table(out / "manifest.parquet").num_rows == N_TRAIN
    assert pq.read_table(out / "quarantine.parquet").num_rows == 0


# ---------------------------------------------------------------- the model: registry and manners

@pytest.fixture(scope="module")
def registry(corpus, tmp_path_factory):
    """A real SQLite MLflow store with unit-demo version 1 registered (register_run), aliased champion."""
    from mlflow import MlflowClient

    from launch.release.registry import register_run
    from test_registry import trained_run
    from test_tracking import make_shards_meta

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default experiment puts ./mlruns in the working directory
        run_dir = trained_run(root / "run", 0, uri, make_shards_meta(root / "meta"))
        res = register_run(run_dir, name="unit-demo", test_a=corpus / "demo" / "testA",
                           truth_b=corpus / "demo" / "testB", min_accuracy=0.0, image_size=32)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("unit-demo", "champion", res["version"])
    return {"uri": uri, "version": res["version"], "run_id": res["run_id"]}


@pytest.mark.slow
def test_a_registered_model_translates_a_corpus_and_is_named_in_every_sample(corpus, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    out = tmp_path / "maps"
    rc = translate_main(["--model", "models:/unit-demo@champion", "--direction", "a2b", "--in",
                         str(corpus / "shards"), "--out", str(out), "--no-progress"])
    assert rc == 0
    meta = json.loads(samples(out / "b" / "b-000000.tar")[0]["json"])
    assert {k: meta["model"][k] for k in ("uri", "name", "version", "run_id")} == {
        "uri": "models:/unit-demo@champion", "name": "unit-demo", "version": registry["version"],
        "run_id": registry["run_id"]}
    assert len(meta["model"]["weights_sha256"]) == 64


@pytest.mark.slow
@pytest.mark.parametrize("spec,says", [
    ("models:/unit-demo@prod", "registered model 'unit-demo' has no alias 'prod'; its aliases: candidate (version 1), "
                               "champion (version 1); its versions: 1"),
    ("models:/unit-demo/7", "registered model 'unit-demo' has no version 7; its aliases: candidate"),
    ("models:/unit-dmeo@champion", "no registered model 'unit-dmeo' at sqlite:///"),
])
def test_a_missing_alias_version_or_model_is_one_line_naming_what_exists(corpus, registry, tmp_path, monkeypatch,
                                                                        capsys, spec, says):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.chdir(tmp_path)
    rc = translate_main(["--model", spec, "--direction", "a2b", "--in", str(corpus / "shards"), "--out", "maps"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and says in line, line
    rc = ev.main(["--model", spec, "--test-a", str(corpus / "demo" / "testA"),
                  "--truth-b", str(corpus / "demo" / "testB")])
    assert rc == 2 and one_line_error(capsys.readouterr().err) == line  # evaluate has the same manners
    assert list(tmp_path.iterdir()) == []  # no ./mlflow.db, no mlruns/, no maps/


def test_no_tracking_uri_is_refused_and_nothing_is_created(corpus, tmp_path, monkeypatch, capsys):
    # Before: a traceback, and ./mlflow.db created in the working directory.
    clean = {k: v for k, v in env().items() if not k.startswith("MLFLOW_")}
    r = subprocess.run([sys.executable, "-m", "launch.release.translate", "--model", "models:/unit-demo@champion",
                        "--direction", "a2b", "--in", str(corpus / "shards"), "--out", "maps"],
                       cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=120)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and "MLFLOW_TRACKING_URI is not set" in line and "--tracking-uri" in line
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    rc = translate_main(["--model", "models:/unit-demo@champion", "--direction", "a2b",  # folder mode
                         "--in", str(corpus / "demo" / "testA"), "--out", "maps"])
    assert rc == 2 and one_line_error(capsys.readouterr().err) == line
    rc = ev.main(["--model", "models:/unit-demo@champion", "--test-a", str(corpus / "demo" / "testA"),
                  "--truth-b", str(corpus / "demo" / "testB")])
    assert rc == 2 and one_line_error(capsys.readouterr().err) == line
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no maps/


@pytest.mark.parametrize("uri,says", [
    ("sqlite:///{tmp}/nowhere/mlflow.db", "no MLflow store there"),
    ("http://me:hunter2@127.0.0.1:{port}", "cannot ask the tracking server http://127.0.0.1:"),  # no password shown
])
def test_a_missing_store_or_unreachable_server_is_one_line(corpus, tmp_path, monkeypatch, capsys, uri, says):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)
    uri = uri.format(tmp=tmp_path, port=free_port())
    rc = translate_main(["--model", "models:/unit-demo@champion", "--tracking-uri", uri, "--direction", "a2b",
                         "--in", str(corpus / "shards"), "--out", "maps"])
    err = capsys.readouterr().err
    assert rc == 2 and says in one_line_error(err) and "hunter2" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_export_dir_is_one_line(corpus, tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "translator.json").write_text("{}")
    for spec, says in ((tmp_path / "nope", "no such directory"), (tmp_path / "half", "no translator.safetensors")):
        rc = translate_main(["--model", str(spec), "--direction", "a2b", "--in", str(corpus / "shards"),
                             "--out", str(tmp_path / "out")])
        assert rc == 2 and says in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
