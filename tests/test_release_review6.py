"""Release-side review 6: one model per corpus job however the alias moves, the consumers read
images as make shards does (16-bit, alpha), --tile/--tile-overlap and --batch-size reach a
registered model, the pyfunc's documented input rules, evaluation names unpaired files and takes
the model's own minimum side.

Fast: tiny models, pyfunc models saved to a folder (no tracking server)."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from PIL import Image

from launch.release import corpus, evaluate, pyfunc_model, translate
from launch.release import export as release_export
from launch.release.export import min_input_side, translate_tiled, translate_uint8
from launch.release.registry import PYFUNC_FILE, shipped_code, signature, stage_code
from launch.release.translate import Limits, translate_folder
from pipeline.images import check_image
from pipeline.imageio import read_rgb
from pipeline.shardwriter import write_tar
from test_release_review import make_export, noise


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def registered(export, tmp_path_factory):
    """The pyfunc model as log_translator writes it (with the registry's signature), loaded through MLflow."""
    root = tmp_path_factory.mktemp("pyfunc")
    files, _ = shipped_code()
    mlflow.pyfunc.save_model(root / "model", python_model=str(PYFUNC_FILE),
                             artifacts={pyfunc_model.ARTIFACT_KEY: str(export[0])},
                             code_paths=stage_code(files, root / "code"), signature=signature())
    return mlflow.pyfunc.load_model(str(root / "model"))


# ---------------------------------------------------------------- 2: one RGB conversion for every reader

def sixteen_bit_and_rgba(tmp_path: Path) -> dict[str, bytes]:
    g16 = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16, :, 3], rgba[:16, :, 0] = 255, 200  # top half opaque red, bottom half transparent black
    out = {}
    for name, im in (("g16.png", Image.fromarray(g16)), ("rgba.png", Image.fromarray(rgba, "RGBA"))):
        im.save(tmp_path / name)
        out[name] = (tmp_path / name).read_bytes()
    return out


def test_translate_evaluate_and_corpus_read_16_bit_and_alpha_as_make_shards_stores_them(tmp_path):
    for name, data in sixteen_bit_and_rgba(tmp_path).items():
        stored = np.asarray(Image.open(io.BytesIO(check_image(data, min_side=8).data)).convert("RGB"))
        assert np.array_equal(read_rgb(tmp_path / name), stored), name  # translate folder mode, evaluate
        assert np.array_equal(corpus.decode_rgb(data, name, Limits()), stored), name  # corpus mode
    white = read_rgb(tmp_path / "rgba.png")[16:]
    assert (white == 255).all()  # before: transparent black read as black


# ---------------------------------------------------------------- 3, 4: --tile and --batch-size with registered models

def wide_folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    src = tmp_path / "in"
    src.mkdir()
    img = noise(40, 100, 3)
    Image.fromarray(img).save(src / "wide.png")
    return src, img


@pytest.mark.parametrize("tile", [0, 48])
def test_a_registered_model_tiles_as_asked_like_its_export(export, registered, tmp_path, monkeypatch, tile):
    monkeypatch.setattr(release_export, "TILE", 32)  # the pyfunc's own tiling would cut this image
    src, img = wide_folder(tmp_path)
    limits = Limits(tile=tile, overlap=8)
    outs = {}
    for label, model in (("export", export[1]), ("registered", registered)):
        translate_folder(model, "a2b", src, tmp_path / label, progress=False, limits=limits)
        outs[label] = np.asarray(Image.open(tmp_path / label / "wide.png"))
    fn = lambda x, d: translate_uint8(export[1], x, d)  # noqa: E731
    want = fn(img[None], "a2b")[0] if tile == 0 else translate_tiled(fn, img, "a2b", tile, 8)
    assert np.array_equal(outs["export"], want) and np.array_equal(outs["registered"], want)


def test_the_pyfunc_takes_tile_params_and_refuses_bad_ones(export):
    from mlflow.pyfunc import PythonModelContext

    m = pyfunc_model.TranslatorModel()
    m.load_context(PythonModelContext(artifacts={pyfunc_model.ARTIFACT_KEY: str(export[0])}, model_config=None))
    img = noise(40, 100, 4)
    whole = translate_uint8(m.gen, img[None], "a2b")[0]
    assert np.array_equal(m.predict(None, img[None], params={"tile": 0})[0], whole)
    tiled = translate_tiled(lambda x, d: translate_uint8(m.gen, x, d), img, "a2b", 48, 8)
    assert np.array_equal(m.predict(None, img[None], params={"tile": 48, "tile_overlap": 8})[0], tiled)
    for params, says in (({"tile": 16}, r"params.tile: .*at least 32"), ({"tile": -1}, r"params.tile: "),
                         ({"tile": 48, "tile_overlap": 25}, r"params.tile_overlap: expected 0..24"),
                         ({"tile_overlap": 1.5}, r"params.tile_overlap")):
        with pytest.raises(ValueError, match=says):
            m.predict(None, img[None], params=params)


def network_batches(gen) -> list[int]:
    seen, real = [], gen.translate

    def counting(x, d, *a, **kw):
        seen.append(x.shape[0])
        return real(x, d, *a, **kw)
    gen.translate = counting
    return seen


def test_the_signature_declares_the_tile_params_so_mlflow_passes_them(registered):
    declared = {p.name for p in registered.metadata.get_params_schema().params}
    assert {"direction", "batch_size", "tile", "tile_overlap"} <= declared
    x = noise(40, 72, 3)[None]  # wider than a 32 px tile
    gen = registered.unwrap_python_model().gen
    whole = registered.predict(x, params={"direction": "a2b", "tile": 0})
    tiled = registered.predict(x, params={"direction": "a2b", "tile": 32, "tile_overlap": 8})
    fn = lambda imgs, d: translate_uint8(gen, imgs, d)  # noqa: E731
    assert np.array_equal(whole, fn(x, "a2b"))  # undeclared, MLflow would drop tile=0 and tile at 1024
    assert np.array_equal(tiled[0], translate_tiled(fn, x[0], "a2b", 32, 8))


def test_the_end_of_run_warning_names_the_files_left_out(capsys):
    evaluate.warn_skipped([f"/t/testA/{i}.png: no partner: x" for i in range(7)], shown=5)
    out = capsys.readouterr().out
    assert out.startswith("warning: 7 test file(s) left out of the evaluation: /t/testA/0.png")
    assert "/t/testA/4.png" in out and "/t/testA/5.png" not in out and out.rstrip().endswith("and 2 more")
    evaluate.warn_skipped([])
    assert capsys.readouterr().out == ""


def test_batch_size_reaches_a_registered_model(export, registered, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda spec, uri=None, device=None: (
        registered, {"kind": "mlflow", "name": "unit-rev", "version": "1", "run_id": "r"}))
    a = translate.parse_args(["--model", "models:/unit-rev/1", "--direction", "a2b", "--in", str(tmp_path),
                              "--out", str(tmp_path / "o"), "--batch-size", "40", "--device", "cpu"])
    fn, _, _, limits = translate.load(a)
    seen = network_batches(registered.unwrap_python_model().gen)
    try:
        imgs = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
        translate.translate_window(fn, "a2b", list(imgs), a.batch_size, limits)
    finally:
        del registered.unwrap_python_model().gen.translate
    assert seen == [40]  # before: [16, 16, 8], the pyfunc's default


def test_a_foreign_pyfunc_gets_the_declared_params(registered):
    asked = []
    schema = registered.metadata.get_params_schema()
    declared = {p.name for p in schema.params}
    model = SimpleNamespace(metadata=registered.metadata,
                            predict=lambda x, params=None: (asked.append(params), x)[1])
    evaluate.as_translate_fn(model, batch_size=7)(np.zeros((1, 8, 8, 3), np.uint8), "b2a")
    want = {"direction": "b2a", "batch_size": 7, "tile": 0}
    assert asked == [{k: v for k, v in want.items() if k == "direction" or k in declared}]
    assert asked[0]["batch_size"] == 7


# ---------------------------------------------------------------- 5: what MLflow checks before the model does

def test_in_process_mlflow_refuses_non_uint8_input_before_the_model_sees_it(registered):
    from mlflow.exceptions import MlflowException

    x = noise(8, 8, 5)[None]
    with pytest.raises(MlflowException):
        registered.predict(x.astype(np.int64), params={"direction": "a2b"})
    # the model's own checks run for callers of the unwrapped model, as its docstring says
    fractional = x.astype(np.float64)
    fractional[0, 1, 2, 0] = 12.5
    with pytest.raises(ValueError, match="not whole"):
        registered.unwrap_python_model().predict(None, fractional)
    assert "run only for callers of the model itself" in " ".join(pyfunc_model.__doc__.split())


# ---------------------------------------------------------------- 6: the corpus docstring

def test_the_corpus_docstring_says_outputs_are_never_deduplicated():
    doc = " ".join(corpus.__doc__.split())
    assert "never deduplicated" in doc and 'quarantined as "duplicate of' not in doc


# ---------------------------------------------------------------- 7, 8: evaluation's pairing and minimum side

def image_dir(root: Path, names: dict[str, int], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, side in names.items():
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name)
    return root


def test_unpaired_files_are_named_a_few_then_counted_and_exit_3(export, tmp_path, capsys):
    test_a = image_dir(tmp_path / "testA", {**{f"{i}_A.png": 16 for i in range(9)}, "7.png": 16})
    truth_b = image_dir(tmp_path / "testB", {**{f"{i}_B.png": 16 for i in range(9)}, "7.png": 16}, seed=1)
    rc = evaluate.main(["--model", str(export[0]), "--test-a", str(test_a), "--truth-b", str(truth_b),
                        "--c2st-steps", "0"])
    err = capsys.readouterr().err
    assert rc == 3  # before: 0, the 18 files silently dropped
    assert f"{test_a / '0_A.png'}: no partner" in err and f"{truth_b / '0_B.png'}: no partner" in err
    assert "4 more image(s) of" in err and "18 test or truth image(s) left out" in err
    assert f"{test_a / '8_A.png'}" not in err  # named a few, then counted


def test_unpaired_files_without_a_list_are_an_error_and_unusable_ones_are_named_once(tmp_path):
    test_a = image_dir(tmp_path / "a", {"s0.png": 8, "s1.png": 8, "only.png": 8, "tiny.png": 1})
    truth_b = image_dir(tmp_path / "b", {"s0.png": 8, "s1.png": 8}, seed=1)
    with pytest.raises(ValueError, match="only.png: no partner|tiny.png"):
        evaluate.load_pairs(test_a, truth_b)
    rejected = []
    stems, _, _ = evaluate.load_pairs(test_a, truth_b, rejected=rejected)
    assert stems == ["s0", "s1"] and len(rejected) == 2  # tiny.png: too small, not also "no partner"
    assert any("only.png: no partner" in r for r in rejected) and any("tiny.png: 1x1" in r for r in rejected)


@pytest.fixture(scope="module")
def deep_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("n_down3"), n_down=3)


def test_evaluation_takes_the_models_minimum_side(deep_export, tmp_path, capsys):
    d, gen = deep_export
    need = min_input_side(json.loads((d / "translator.json").read_text()))
    assert need == 9 and evaluate.model_min_side(gen) == need
    names = {"0.png": 6, "1.png": 16, "2.png": 16}
    test_a, truth_b = image_dir(tmp_path / "testA", names), image_dir(tmp_path / "testB", names, seed=1)
    rc = evaluate.main(["--model", str(d), "--test-a", str(test_a), "--truth-b", str(truth_b), "--c2st-steps", "0"])
    err = capsys.readouterr().err
    assert rc == 3, err  # before: exit 2 with a torch error, the whole evaluation lost
    assert f"{test_a / '0.png'}: 6x6 is too small: the model needs at least 9x9" in err
    rc = evaluate.main(["--model", str(d), "--test-a", str(test_a), "--truth-b", str(truth_b), "--c2st-steps", "0",
                        "--size", "4"])
    assert rc == 2 and "--size 4: the model needs at least 9 pixels per side" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--size 8: the model needs at least 9"):
        evaluate.evaluate_translator(gen, test_a=test_a, truth_b=truth_b, size=8)


# ---------------------------------------------------------------- 1: one model per corpus job

def identity(version: str) -> dict:
    return {"uri": "models:/unit-rev@champion", "name": "unit-rev", "version": version, "run_id": f"r{version}",
            "weights_sha256": "ab" * 32}


def job(out: Path, version: str, spec: str = "models:/unit-rev@champion") -> corpus.CorpusJob:
    j = corpus.CorpusJob(None, "a2b", [], str(out), "in", model=identity(version), model_spec=spec)
    return j


def test_the_first_rank_pins_the_alias_and_a_finished_job_releases_it(tmp_path):
    out = tmp_path / "out"
    assert corpus.mark_out(job(out, "1")) == identity("1")
    assert corpus.mark_out(job(out, "2")) == identity("1")  # the alias moved: the job keeps version 1
    (out / "index.json").write_text(json.dumps({"translation": {"model": identity("1")}}))
    assert corpus.mark_out(job(out, "2")) == identity("2")  # that job is complete: a new one starts
    assert corpus.mark_out(job(out, "3")) == identity("2")
    other = job(out, "5", spec="models:/unit-rev/5")
    assert corpus.mark_out(other) == other.model  # versions do not move
    assert json.loads((out / corpus.MARKER).read_text())["model"] == other.model


def shard_of(tmp_path: Path, n: int = 2) -> Path:
    buf = []
    for i in range(n):
        b = io.BytesIO()
        Image.fromarray(noise(16, 16, i)).save(b, format="PNG")
        buf += [(f"k{i}.png", b.getvalue())]
    path = tmp_path / "in" / "a-000000.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(str(path), iter(buf))
    return path


def test_an_alias_moving_between_rank_starts_neither_mixes_models_nor_hangs(export, tmp_path, monkeypatch, capsys):
    """Rank 1 resolves models:/unit-rev@champion to version 1; the alias moves to 2 before rank 0
    starts. Before: rank 0 translated with 2 and waited forever for rank 1's shard."""
    shards = [shard_of(tmp_path / f"s{i}") for i in range(2)]
    loads = []

    def fake_load(a):  # the alias resolves to 1 for the first rank, to 2 afterwards
        version = a.model.rsplit("/", 1)[1] if "@" not in a.model else ("1" if not loads else "2")
        loads.append((a.model, version))
        gen = export[1]
        info = {"kind": "mlflow", "name": "unit-rev", "version": version, "run_id": f"r{version}"}
        return (lambda x, d: translate_uint8(gen, x, d), {"weights_sha256": "ab" * 32}, info, Limits())
    monkeypatch.setattr(translate, "load", fake_load)
    sleeps = []
    monkeypatch.setattr(corpus.time, "sleep", lambda s: sleeps.append(s) if len(sleeps) < 50 else pytest.fail("hangs"))
    out = tmp_path / "out"
    argv = ["--model", "models:/unit-rev@champion", "--direction", "a2b", "--in", *map(str, shards),
            "--out", str(out), "--no-progress"]
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert corpus.main(translate.parse_args(argv)) == 0
    assert loads == [("models:/unit-rev@champion", "1"), ("models:/unit-rev@champion", "2"),
                     ("models:/unit-rev/1", "1")]
    assert "names version 2 now" in capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["translation"]["model"]["version"] == "1"


def test_rank_0_stops_on_a_record_written_with_another_model(tmp_path):
    out = tmp_path / "out"
    j = job(out, "2")
    j.shards = [SimpleNamespace(url=str(shard_of(tmp_path)), sha256=None, nsamples=2)]
    work = corpus.RankWork()  # this job started before the record below was written
    time.sleep(0.01)
    record = {"version": 1, "domain": "b", "number": 0, "url": "b/b-000000.tar", "fingerprint": "x",
              "bytes": 0, "inputs": [], "model": identity("1")}
    from pipeline.records import save_record
    save_record(str(out), record)
    bar = SimpleNamespace(update=lambda n: None, set_postfix_str=lambda *a, **k: None)
    old = corpus.RankWork(started_ns=time.time_ns() + 10**12)  # the record predates this job: wait for it
    corpus.poll_others(j, corpus.fingerprints(j), bar, old)
    with pytest.raises(corpus.ModelMismatch, match=r"shard 0 was written by another rank with models:/unit-rev/1 .*"
                                                   r"rank 0 translates with models:/unit-rev/2"):
        corpus.poll_others(j, corpus.fingerprints(j), bar, work)
    assert corpus.ModelMismatch.exit_status == 2 and os.path.exists(out / ".records")
