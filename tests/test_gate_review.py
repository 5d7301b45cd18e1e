"""The champion gate against a review: scores compared only at the same size and threshold, a registry
that cannot be asked never read as "no champion", no gate without the trivial baselines, and the
evaluate CLI pinned to the version an alias named when it was resolved."""

import io
import json

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from launch.release import baselines
from launch.release import evaluate as ev
from launch.release.baselines import DomainStats
from launch.release.registry import decide, download_version, register_run
from test_registry import split, tiny, trained_run  # noqa: F401  (split: a module fixture)
from test_quality_metrics import one_thread  # noqa: F401  (autouse: tiny CNNs run on one torch thread)
from test_tracking import make_shards_meta


def black_stats() -> dict:
    """Training statistics of all-black domains: every trivial baseline paints black, which seed 0's
    translations beat at every size and threshold used below."""
    black = np.zeros((2, 8, 8, 3), np.uint8)
    return {"a": DomainStats.empty().add(black), "b": DomainStats.empty().add(black)}


def store(tmp_path, monkeypatch) -> tuple[str, MlflowClient]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default experiment would put ./mlruns here
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------------------------------------
# 1. The same test split means the same folders, size and threshold


def test_split_digest_names_the_size_and_the_threshold(split):
    pairs = {"a2b": [split["a"], split["b"]]}
    digests = {ev.split_digest(pairs, size, threshold) for size in (None, 16, 64) for threshold in (16, 64)}
    assert len(digests) == 6
    assert ev.split_digest(pairs, 16, 16) == ev.split_digest(pairs, 16, 16)


def test_the_champion_is_re_measured_at_the_candidates_size_and_threshold(tmp_path, split, monkeypatch):
    """Champion: seed 0 at native size (1.0, its own translations). The same weights registered at
    size 16 score far less: the champion must be scored there too, with the candidate's threshold."""
    uri, c = store(tmp_path, monkeypatch)
    run_dir = trained_run(tmp_path / "run", 0, uri, make_shards_meta(tmp_path / "shards"), stats=black_stats())
    kw = {"name": "sized", "test_a": split["a"], "truth_b": split["b"], "min_accuracy": 0.0}

    r1 = register_run(run_dir, image_size=None, **kw)
    assert r1["promoted"] and r1["metrics"]["test/pixel_acc_a2b"] == 1.0

    at16 = ev.evaluate_export(run_dir / "export", split["a"], split["b"], size=16,
                              opts=ev.EvalOptions(c2st_steps=0))["a2b"]["pixel_acc"]
    assert at16 < 0.5                                  # the native-size 1.0 does not hold at 16
    r2 = register_run(run_dir, image_size=16, **kw)
    assert r2["champion_before"]["metric"] == pytest.approx(at16, abs=1e-9)
    assert not r2["promoted"] and "champion rule" in r2["reason"]      # the same weights tie

    # the export's baselines.json holds the best constant at 16 only: at 64 it is refused, the
    # statistics given instead
    with pytest.raises(ValueError, match="at tolerance 16 only, not at 64"):
        ev.evaluate_export(run_dir / "export", split["a"], split["b"], size=16,
                           opts=ev.EvalOptions(c2st_steps=0, threshold=64))
    loose = ev.EvalOptions(c2st_steps=0, threshold=64, baselines=black_stats())
    at16_loose = ev.evaluate_export(run_dir / "export", split["a"], split["b"], size=16,
                                    opts=loose)["a2b"]["pixel_acc"]
    assert at16_loose > at16 + 0.1                     # the threshold changes the score
    r3 = register_run(run_dir, image_size=16, opts=ev.EvalOptions(c2st_steps=0, threshold=64, baselines=black_stats()),
                      **kw)
    assert r3["metrics"]["test/pixel_acc_a2b"] == pytest.approx(at16_loose, abs=1e-9)
    assert r3["champion_before"]["metric"] == pytest.approx(at16_loose, abs=1e-9)
    assert not r3["promoted"] and str(c.get_model_version_by_alias("sized", "champion").version) == r1["version"]
    tags = [c.get_model_version("sized", r["version"]).tags["test_split"] for r in (r1, r2, r3)]
    assert len(set(tags)) == 3


# ---------------------------------------------------------------------------------------------
# 2. Only a missing alias means "no champion yet"

BEATS_ALL = {"test/pixel_acc_a2b": 0.9, "test/best_baseline_pixel_acc_a2b": 0.3, "test/identity_pixel_acc_a2b": 0.1,
             "test/constant_pixel_acc_a2b": 0.3, "test/histmatch_pixel_acc_a2b": 0.2}


def test_no_champion_alias_is_no_champion_but_a_registry_error_fails(tmp_path, monkeypatch):
    uri, c = store(tmp_path, monkeypatch)
    c.create_registered_model("gate")  # as registering a candidate leaves it: no champion alias
    args = ("gate", "test/pixel_acc_a2b", BEATS_ALL, None, 0.0, "d", {}, None)
    promoted, reason, before = decide(c, *args)
    assert promoted and "no champion yet" in reason and before is None

    class Locked:
        """The store answers every registry read with SQLite's "database is locked"."""

        def __getattr__(self, attr):
            if attr.startswith("get_"):
                def fail(*a, **k):
                    raise MlflowException("(sqlite3.OperationalError) database is locked",
                                          error_code="TEMPORARILY_UNAVAILABLE")
                return fail
            return getattr(c, attr)

    with pytest.raises(RuntimeError, match="'gate'.*database is locked"):
        decide(Locked(), *args)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    gone = MlflowClient(tracking_uri="http://127.0.0.1:1", registry_uri="http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="'gate'.*127.0.0.1:1"):   # a server that cannot be reached
        decide(gone, *args)


# ---------------------------------------------------------------------------------------------
# 3. No gate without the trivial baselines


def test_decide_refuses_when_only_identity_was_measured(tmp_path, monkeypatch):
    uri, c = store(tmp_path, monkeypatch)
    c.create_registered_model("gate")
    identity_only = {k: v for k, v in BEATS_ALL.items() if "constant" not in k and "histmatch" not in k}
    identity_only["test/best_baseline_pixel_acc_a2b"] = identity_only["test/identity_pixel_acc_a2b"]
    promoted, reason, _ = decide(c, "gate", "test/pixel_acc_a2b", identity_only, None, 0.0, "d", {}, None)
    assert not promoted and reason.startswith("baseline rule") and "no trivial baselines" in reason


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def real_shards(root, images: dict) -> None:
    """One tar shard per domain (stock webdataset) and index.json, as `make shards` leaves them."""
    import webdataset as wds

    entries = []
    for d, imgs in images.items():
        (root / d).mkdir(parents=True)
        url = f"{d}/{d}-000000.tar"
        with wds.TarWriter(str(root / url)) as w:
            for i, img in enumerate(imgs):
                w.write({"__key__": f"{d}{i:04d}", "png": png(img),
                         "json": {"domain": d, "width": img.shape[1], "height": img.shape[0], "format": "png"}})
        entries.append({"url": url, "domain": d, "nsamples": len(imgs)})
    (root / "index.json").write_text(json.dumps({"version": 1, "shards": entries}))


def test_an_export_without_baselines_gets_them_from_the_runs_shards_or_is_not_promoted(tmp_path, split, monkeypatch):
    uri, c = store(tmp_path, monkeypatch)
    run_dir = trained_run(tmp_path / "run", 0, uri, make_shards_meta(tmp_path / "meta"), with_baselines=False)
    kw = {"name": "nobase", "test_a": split["a"], "truth_b": split["b"], "min_accuracy": 0.0, "image_size": 32}

    # A finish step that never ran, and no usable config: only identity could be measured.
    r1 = register_run(run_dir, **kw)
    assert r1["metrics"]["test/pixel_acc_a2b"] == 1.0 > r1["metrics"]["test/identity_pixel_acc_a2b"]
    assert not r1["promoted"] and r1["aliases"] == ["candidate"]
    gate = c.get_model_version("nobase", r1["version"]).tags["gate"]
    assert gate.startswith("failed: baseline rule") and "no trivial baselines" in gate

    # The run's config names its training shards: the baselines come from them, as the end of training
    # computes them, are saved beside the export and ship with the model.
    rng = np.random.default_rng(9)
    train = {"a": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             "b": rng.integers(100, 160, (6, 32, 32, 3), dtype=np.uint8)}
    real_shards(tmp_path / "shards", train)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"seed": 0, "model": {"preset": "tiny"}, "eval": {"baseline_images": 6},
         "data": {"shards": str(tmp_path / "shards"), "image_size": 32}}))
    r2 = register_run(run_dir, **kw)
    expected = baselines.stats_from_shards(tmp_path / "shards", image_size=32, max_images=6, seed=0)
    want = ev.evaluate_translator(lambda x, d: x, test_a=split["a"], truth_b=split["b"], size=32,
                                  opts=ev.EvalOptions(baselines=expected, c2st_steps=0))["a2b"]
    for name in baselines.NAMES:
        assert r2["metrics"][f"test/{name}_pixel_acc_a2b"] == pytest.approx(want[f"{name}_pixel_acc"], abs=1e-9)
    assert r2["promoted"] and "no champion yet" in r2["reason"]
    saved = baselines.load(run_dir / "export" / baselines.FILE_NAME)
    assert np.array_equal(saved["b"].hist, expected["b"].hist)
    local = download_version(c, "nobase", r2["version"], tmp_path / "dl")
    assert np.array_equal(baselines.load(next(local.rglob(baselines.FILE_NAME)))["b"].hist, expected["b"].hist)


# ---------------------------------------------------------------------------------------------
# 4. The evaluate CLI resolves an alias once


def test_evaluate_cli_pins_the_version_the_alias_named(tmp_path, split, monkeypatch):
    """The champion alias moves to another version right after the CLI resolved it: the model it
    evaluates is still the one whose run it logs to."""
    uri, c = store(tmp_path, monkeypatch)
    shards = make_shards_meta(tmp_path / "shards")
    kw = {"name": "moving", "test_a": split["a"], "truth_b": split["b"], "min_accuracy": 0.0, "image_size": 32}
    r1 = register_run(trained_run(tmp_path / "good", 0, uri, shards, stats=black_stats()), **kw)
    r2 = register_run(trained_run(tmp_path / "other", 1, uri, shards, stats=black_stats()), **kw)
    assert r1["promoted"] and not r2["promoted"]

    resolve = ev.resolve_model_version

    def resolve_then_move(spec, client):
        out = resolve(spec, client)
        c.set_registered_model_alias("moving", "champion", r2["version"])   # another registration, meanwhile
        return out

    monkeypatch.setattr(ev, "resolve_model_version", resolve_then_move)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert ev.main(["--model", "models:/moving@champion", "--test-a", str(split["a"]), "--truth-b", str(split["b"]),
                    "--c2st-steps", "0"]) == 0
    hist = c.get_metric_history(r1["run_id"], "eval/pixel_acc_a2b")  # evaluate's own names (review 8)
    assert len(hist) == 1 and hist[0].value == 1.0   # version 1 scored, logged to its run
    assert c.get_run(r1["run_id"]).data.tags["eval/model_uri"] == f"models:/moving/{r1['version']}"
