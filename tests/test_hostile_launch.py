"""Hostile and careless inputs on the launch side (issue 15): image files that are huge, tiny,
damaged or sideways, output folders inside input folders, run directories that are not run
directories, resume paths that are not checkpoints or not trusted, booleans given for integers.

Fast: no DeepSpeed launch here (tests/test_train.py launches real ranks)."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.runstore import rundir
from launch.training import checkpoint as ckpt
from launch.config import ConfigError, load_config
from launch.release.export import min_input_side, tile_starts, translate_tiled, translate_uint8
from launch.runstore.artifacts import save_translator
from pipeline.imageio import ImageRejected, NotAnImage, read_rgb
from launch.release.translate import Limits, main as translate_main, translate_folder
from model.unit import UNIT


# ---------------------------------------------------------------- helpers

def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds almost no data (a decompression bomb
    stand-in: decoding it would allocate width*height*3 bytes before failing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 128)], -1)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    d = tmp_path_factory.mktemp("export")
    save_translator(d, unit.gen, unit.config(), image_size=32, step=1, ema=False)
    return d, unit.gen.eval()


# ---------------------------------------------------------------- 12: images too small for the network

@pytest.mark.parametrize("cfg", [
    {"n_down": 0}, {"n_down": 1}, {"n_down": 2}, {"n_down": 3},
    {"n_down": 1, "pad_type": "zero"}, {"n_down": 2, "pad_type": "zero", "norm": "ln"},
    {"n_down": 2, "pad_type": "replicate", "norm": "none", "up_norm": "none"},
])
def test_min_input_side_is_the_networks_true_minimum(cfg):
    gen = UNIT.from_config({"preset": "tiny", **cfg}).gen.eval()
    cfg = {"preset": "tiny", **cfg}
    works = []
    for side in range(1, 12):
        try:
            translate_uint8(gen, np.zeros((1, side, side, 3), np.uint8), "a2b", multiple=2 ** cfg["n_down"])
            works.append(side)
        except (RuntimeError, ValueError, IndexError):
            pass
    assert works == list(range(min_input_side(cfg), 12))


def test_a_1x1_image_is_skipped_by_name_and_the_batch_goes_on(export, tmp_path, capsys):
    # Before: 6/9 done, then "Expected more than 1 spatial element ..." (no file named), exit 2.
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(9):
        size = (1, 1) if i == 6 else (32, 32)
        Image.fromarray(gradient(*size, seed=i)).save(src / f"img{i}.png")
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(src), "--out", str(out),
                         "--batch-size", "4"])
    cap = capsys.readouterr()
    assert rc == 3, cap.err
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(9) if i != 6]
    assert f"{src / 'img6.png'}: 1x1 is too small" in cap.err.replace("skipped ", "")
    assert "at least 5x5" in cap.err
    assert "Translated 8 image(s)" in cap.out and "1 image(s) skipped as unusable" in cap.out


def test_a_failing_image_in_a_batch_costs_only_itself(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(gradient(8, 8, seed=i)).save(src / f"{i}.png")

    def fn(x, direction):  # the model chokes on one image (image 2 has this pixel)
        if any((im[0, 0] == np.asarray(Image.open(src / "2.png"))[0, 0]).all() for im in x):
            raise RuntimeError("boom")
        return 255 - x

    res = translate_folder(fn, "a2b", src, tmp_path / "out", batch_size=4, progress=False)
    assert res["translated"] == 3
    assert [(Path(r["path"]).name, r["reason"]) for r in res["rejected"]] == \
        [("2.png", "translation failed (RuntimeError: boom)")]


# ---------------------------------------------------------------- 10: huge images

def test_pixel_cap_is_checked_on_the_header_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 5000, 5000)  # 75 MB if decoded; the file is ~100 bytes
    with pytest.raises(ImageRejected) as e:
        read_rgb(bomb, max_pixels=1_000_000)
    assert str(e.value).startswith(str(bomb)) and "5000x5000 = 25000000 pixels is above the limit" in str(e.value)
    with pytest.raises(ImageRejected, match="damaged or truncated"):  # under the cap it is decoded, and fails
        read_rgb(bomb, max_pixels=None)


def test_huge_and_damaged_images_are_counted_and_skipped(export, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(gradient(32, 32)).save(src / "ok.png")
    png_header_only(src / "huge.png", 3000, 3000)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (src / "notes.txt").write_text("not an image")
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(src), "--out", str(out),
                         "--max-pixels", "1000000", "--report", str(tmp_path / "report.json")])
    cap = capsys.readouterr()
    assert rc == 3
    assert sorted(p.name for p in out.iterdir()) == ["ok.png"]
    report = json.loads((tmp_path / "report.json").read_text())
    reasons = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"huge.png", "broken.jpg"}
    assert "above the limit of 1000000" in reasons["huge.png"] and "damaged or truncated" in reasons["broken.jpg"]
    assert [Path(p).name for p in report["skipped"]] == ["notes.txt"]
    assert "2 image(s) skipped as unusable" in cap.out and "1 file(s) skipped as not images" in cap.out


def test_only_non_images_skipped_exits_zero(export, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(gradient(32, 32)).save(src / "ok.png")
    (src / "README").write_text("hello")
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(src),
                         "--out", str(tmp_path / "out")])
    assert rc == 0 and "0 image(s) skipped as unusable" in capsys.readouterr().out


def test_tiles_cover_every_pixel_once_and_bound_the_network_input():
    img = gradient(70, 45)
    seen = []

    def negate(x, direction):  # a pointwise "model": tiling must give exactly its output
        seen.append(x.shape)
        return 255 - x

    out = translate_tiled(negate, img, "a2b", tile=16, overlap=4)
    assert np.array_equal(out, 255 - img)
    assert max(max(s[1], s[2]) for s in seen) <= 16 and len(seen) == 6 * 4

    def shift(x, direction):  # a model that depends on the tile's content: blends stay within range
        return np.clip(x.astype(int) + 10, 0, 255).astype(np.uint8)
    assert np.array_equal(translate_tiled(shift, img, "a2b", tile=32, overlap=8), shift(img[None], "a2b")[0])


def test_tile_starts_overlap_and_reach_the_border():
    for length in (17, 33, 100, 1000, 1025):
        starts = tile_starts(length, 32, 8)
        assert starts[0] == 0 and starts[-1] + min(32, length) == max(length, min(32, length))
        assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))


def test_large_image_is_translated_in_tiles_with_the_real_model(export, tmp_path):
    d, gen = export
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(gradient(72, 40)).save(src / "big.png")
    Image.fromarray(gradient(24, 24)).save(src / "small.png")
    res = translate_folder(gen, "a2b", src, tmp_path / "out", progress=False, limits=Limits(tile=32, overlap=8))
    assert res["translated"] == 2 and res["tiled"] == 1 and not res["rejected"]
    big = np.asarray(Image.open(tmp_path / "out" / "big.png"))
    assert big.shape == (72, 40, 3)
    # Where only the first tile covers the pixels, they are that tile's translation unchanged.
    (y1, x1) = (tile_starts(72, 32, 8)[1], tile_starts(40, 32, 8)[1])
    assert (y1, x1) == (20, 8)
    first = translate_uint8(gen, gradient(72, 40)[None, :32, :32], "a2b")[0]
    assert np.abs(big[:y1, :x1].astype(int) - first[:y1, :x1]).max() <= 1
    small = np.asarray(Image.open(tmp_path / "out" / "small.png"))
    assert np.abs(small.astype(int) - translate_uint8(gen, gradient(24, 24)[None], "a2b")[0]).max() <= 1


# ---------------------------------------------------------------- 13: EXIF orientation

def test_exif_orientation_is_applied_when_reading(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)  # landscape as stored: left half red, right half blue
    stored[:, :16, 0] = 255
    stored[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, quality=100, exif=exif.tobytes())
    arr = read_rgb(path)
    assert arr.shape == (32, 16, 3)  # portrait, as a viewer shows it
    upright, wrong_way = np.rot90(stored, k=-1), np.rot90(stored, k=1)
    assert np.abs(arr.astype(int) - upright).mean() < 10 < 50 < np.abs(arr.astype(int) - wrong_way).mean()
    # The cap and the minimum side are checked on the upright size.
    with pytest.raises(ImageRejected, match="16x32"):  # W x H after rotation
        read_rgb(path, min_side=20)


def test_translate_writes_sideways_jpegs_upright(export, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(gradient(16, 40)).save(src / "p.jpg", quality=95, exif=exif.tobytes())
    res = translate_folder(export[1], "a2b", src, tmp_path / "out", progress=False)
    assert res["translated"] == 1
    assert Image.open(tmp_path / "out" / "p.jpg").size == (16, 40)  # (W, H): upright portrait


def test_read_rgb_names_the_file_and_the_reason(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(NotAnImage):
        read_rgb(tmp_path / "a.txt")
    trunc = tmp_path / "t.png"
    buf = io.BytesIO()
    Image.fromarray(gradient(64, 64)).save(buf, format="PNG")
    trunc.write_bytes(buf.getvalue()[:300])
    with pytest.raises(ImageRejected) as e:
        read_rgb(trunc)
    assert str(e.value).startswith(f"{trunc}: damaged or truncated")


# ---------------------------------------------------------------- 8: --out inside --in

@pytest.mark.parametrize("where", ["inside", "same", "contains"])
def test_out_inside_in_is_refused(export, tmp_path, capsys, where):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(gradient(32, 32)).save(src / "a.png")
    out = {"inside": src / "translated", "same": src / ".", "contains": tmp_path}[where]
    rc = translate_main(["--model", str(export[0]), "--direction", "a2b", "--in", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --" in err, err
    assert sorted(p.name for p in src.rglob("*")) == ["a.png"]  # nothing written, nothing translated twice


# ---------------------------------------------------------------- run directories and resume (2, 4, 15)

BASE = {"data": {"shards": "data/shards"}, "model": {"preset": "tiny"}}


def cfg_for(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *overrides], base=BASE)


def fake_checkpoint(run_dir: Path, step: int, run_uid: str | None = None, **cfg_overrides) -> Path:
    """What save() leaves: G/ and D/ (empty here: nothing is unpickled in these tests), meta.json
    with the config and run_uid, rank files, COMPLETE. Claims run_dir when run_uid is None."""
    if run_uid is None:
        run_uid = rundir.claim_run_dir(run_dir)["run_uid"]
    d = ckpt.step_dir(run_dir, step)
    (d / "G").mkdir(parents=True)
    (d / "D").mkdir()
    cfg = cfg_for(run_dir, *[f"{k}={v}" for k, v in cfg_overrides.items()])
    (d / "meta.json").write_text(json.dumps({"step": step, "config": cfg.model_dump(mode="json"), "run_uid": run_uid}))
    (d / "rank-00000.json").write_text("{}")
    (d / ckpt.MARKER).write_text(json.dumps({"step": step, "run_uid": run_uid}))
    return d


def test_resume_path_outside_the_run_dir_needs_the_trust_flag(tmp_path):
    # Case 2: DeepSpeed unpickles whatever resume= names.
    other = fake_checkpoint(tmp_path / "downloaded", 5)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        check_resume(cfg_for(run_dir, f"resume={other}"))
    msg = str(e.value)
    assert f"config key resume = '{other}'" in msg and "outside run_dir" in msg and "trust_resume_path=true" in msg
    assert check_resume(cfg_for(run_dir, f"resume={other}", "trust_resume_path=true")) == other
    # A link inside the run directory to a checkpoint elsewhere is still elsewhere.
    rundir.claim_run_dir(run_dir)
    (run_dir / "ckpt").mkdir()
    (run_dir / "ckpt" / "step-00000005").symlink_to(other)
    with pytest.raises(ConfigError, match="outside run_dir"):
        check_resume(cfg_for(run_dir, f"resume={run_dir / 'ckpt' / 'step-00000005'}"))
    assert ckpt.latest_complete(run_dir) is None  # and resume=auto does not follow it either


def test_resume_path_inside_the_run_dir_is_trusted(tmp_path):
    run_dir = tmp_path / "run"
    old = fake_checkpoint(run_dir, 4)
    assert check_resume(cfg_for(run_dir, f"resume={old}")) == old


def check_resume(cfg):
    from launch.config import resume_point
    return resume_point(cfg)


def test_resume_that_is_not_a_checkpoint_fails_before_launch(tmp_path):
    # Case 15: passed validation, then FileNotFoundError .../meta.json on every rank.
    not_ckpt = tmp_path / "photos"
    not_ckpt.mkdir()
    with pytest.raises(ConfigError) as e:
        check_resume(cfg_for(tmp_path / "run", f"resume={not_ckpt}", "trust_resume_path=true"))
    assert "not a checkpoint (no COMPLETE, meta.json, G/, D/)" in str(e.value)
    assert "RUN_DIR/ckpt/step-NNNNNNNN" in str(e.value)
    with pytest.raises(ConfigError, match="no such folder"):
        check_resume(cfg_for(tmp_path / "run", f"resume={tmp_path / 'nope'}"))
    # A run directory given as resume= says what to do instead.
    run_dir = tmp_path / "old-run"
    newest = fake_checkpoint(run_dir, 7)
    with pytest.raises(ConfigError) as e:
        check_resume(cfg_for(tmp_path / "run", f"resume={run_dir}", "trust_resume_path=true"))
    assert f"set run_dir={run_dir} resume=auto" in str(e.value) and str(newest) in str(e.value)


def test_pre_launch_check_refuses_a_bad_resume(tmp_path):
    import subprocess
    import sys
    (tmp_path / "index.json").write_text(json.dumps({"shards": []}))
    c = tmp_path / "c.yaml"
    c.write_text(f"run_dir: {tmp_path / 'run'}\nresume: {tmp_path}\ndata: {{shards: {tmp_path}, image_size: 32}}\n")
    r = subprocess.run([sys.executable, "-m", "launch.config", str(c)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and "config key resume" in r.stderr and "not a checkpoint" in r.stderr, r.stderr


def test_moved_or_copied_run_dir_resumes(tmp_path):
    # Case 15: "run_dir: checkpoint has '.../run_base', config has '.../run_other'".
    import shutil
    base = tmp_path / "run_base"
    fake_checkpoint(base, 3)
    last = fake_checkpoint(base, 6, rundir.read_run_marker(base)["run_uid"])
    assert check_resume(cfg_for(base)) == last
    copied = tmp_path / "run_copy"
    shutil.copytree(base, copied)
    moved = tmp_path / "run_other"
    base.rename(moved)
    for d in (moved, copied):
        assert check_resume(cfg_for(d)) == d / "ckpt" / "step-00000006"
    # What does break resuming is still refused, naming it.
    with pytest.raises(ConfigError, match="model.dim"):
        check_resume(cfg_for(moved, "model.dim=8"))


def test_resume_never_into_an_existing_run_is_refused(tmp_path):
    # Case 4: the old run's higher steps counted as newest; pruning removed what was just written.
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 30)
    with pytest.raises(ConfigError) as e:
        check_resume(cfg_for(run_dir, "resume=never"))
    assert "config key resume = 'never'" in str(e.value) and "already holds a run" in str(e.value)
    assert "step-00000030" in str(e.value)
    assert check_resume(cfg_for(tmp_path / "fresh", "resume=never")) is None
    (tmp_path / "empty").mkdir()
    assert check_resume(cfg_for(tmp_path / "empty", "resume=never")) is None


def test_going_back_to_an_older_checkpoint_of_the_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    old = fake_checkpoint(run_dir, 10)
    fake_checkpoint(run_dir, 20, rundir.read_run_marker(run_dir)["run_uid"])
    with pytest.raises(ConfigError, match="newer complete checkpoints \\(step-00000020\\)"):
        check_resume(cfg_for(run_dir, f"resume={old}"))


def test_a_folder_that_is_not_a_run_dir_is_refused_and_left_alone(tmp_path):
    # Case 4: pruning deleted ckpt/step-00000001/thesis.tex; config.yaml and export/ were overwritten.
    folder = tmp_path / "thesis"
    (folder / "ckpt" / "step-00000001").mkdir(parents=True)
    (folder / "ckpt" / "step-00000001" / "thesis.tex").write_text("\\chapter{}")
    (folder / "config.yaml").write_text("mine: true\n")
    before = sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))
    with pytest.raises(ConfigError) as e:
        check_resume(cfg_for(folder))
    assert f"config key run_dir = '{folder}'" in str(e.value) and "not a run directory" in str(e.value)
    assert sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*")) == before


@pytest.mark.parametrize("where", ["/", "/etc", "/usr/share/unit", "~", "home-parent"])
def test_system_folders_and_home_are_refused_as_run_dir(where):
    home = Path.home()
    path = {"~": str(home), "home-parent": str(home.parent)}.get(where, where)
    with pytest.raises(ConfigError) as e:
        check_resume(cfg_for(path))
    assert "config key run_dir" in str(e.value) and ("system folder" in str(e.value) or "root" in str(e.value)
                                                      or "home folder" in str(e.value))


def test_run_dir_marker_written_once_keeps_its_identity(tmp_path):
    first = rundir.claim_run_dir(tmp_path / "r")
    assert rundir.claim_run_dir(tmp_path / "r") == first
    assert json.loads((tmp_path / "r" / rundir.RUN_MARKER).read_text())["run_uid"] == first["run_uid"]
    (tmp_path / "r" / rundir.RUN_MARKER).write_text("garbage")
    with pytest.raises(ConfigError, match="is damaged"):
        check_resume(cfg_for(tmp_path / "r"))


@pytest.mark.slow
def test_real_launch_moved_run_dir_resumes_and_never_is_refused(corpus, tmp_path):
    """With the real `deepspeed launch/train.py` (1 CPU rank): train, move the run directory,
    continue it there; resume=never into a copy of it is refused before any rank trains (the two
    launches at once: neither depends on the other or on timing)."""
    import shutil

    from trainutil import kill_group, launch, launch_cmd, resumed_step, start, write_config

    base, other, copy = tmp_path / "run_base", tmp_path / "run_other", tmp_path / "run_copy"
    launch(write_config(tmp_path / "a.yaml", corpus, base, max_steps=2, ckpt_every=2))
    uid = rundir.read_run_marker(base)["run_uid"]
    shutil.copytree(base, copy)
    base.rename(other)
    listing = sorted(p.name for p in (copy / "ckpt").iterdir())
    never = start(launch_cmd(write_config(tmp_path / "c.yaml", corpus, copy, max_steps=4, ckpt_every=2),
                             "resume=never"))
    try:
        r = launch(write_config(tmp_path / "b.yaml", corpus, other, max_steps=4, ckpt_every=2))
        assert resumed_step(r.stdout) == 2
        assert json.loads((other / "ckpt" / "step-00000004" / ckpt.MARKER).read_text())["run_uid"] == uid
        out, _ = never.communicate(timeout=120)
    finally:
        kill_group(never)
    assert never.returncode != 0 and "already holds a run" in out, out[-3000:]
    assert sorted(p.name for p in (copy / "ckpt").iterdir()) == listing
