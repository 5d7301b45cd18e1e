"""Run store defects found in a second review: a dataset input that kept an earlier run's source,
and images uploaded twice when buffered records are sent again. The embedded SQLite store and
(marked slow) the session's real `mlflow server` with proxied artifacts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

import launch.runstore.tracking as tracking
from launch.runstore.datasets import SOURCE_TAG_MAX, dataset_input
from launch.runstore.records import BUFFER_NAME, image_prefix, read_buffer, send, write_buffer
from launch.runstore.store import embedded_uri, make_client, open_run
from launch.runstore.tracking import Tracker
from pipeline.lineage import domain_dataset
from test_tracking import make_shards_meta


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ----------------------------------------------------------------------------- 1. dataset sources


def input_tags(client, run_id: str) -> dict[str, dict[str, str]]:
    return {d.dataset.name: {t.key: t.value for t in d.tags} for d in client.get_run(run_id).inputs.dataset_inputs}


def test_a_run_reading_the_same_data_elsewhere_logs_its_own_source(tmp_path):
    """The same samples copied to another folder: the same name and digest, so MLflow links the
    second run to the first run's dataset (and its source); the input still says where each run read."""
    first = make_shards_meta(tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    run_ids = []
    for i, shards in enumerate((first, second)):
        t = Tracker(uri=store, experiment="same-data", system_metrics=False)
        run_ids.append(t.start(tmp_path / f"run{i}"))
        t.log_datasets(shards=shards)
        assert t.end()
    c = MlflowClient(store)
    recs = [domain_dataset(first, "a"), domain_dataset(second, "a")]
    assert recs[0]["digest"] == recs[1]["digest"] and recs[0]["source"] != recs[1]["source"]
    for run_id, shards in zip(run_ids, (first, second)):
        tags = input_tags(c, run_id)
        for d in "ab":
            assert tags[f"shards-{d}"]["source"] == str((shards / d).resolve())
        assert c.get_run(run_id).data.tags["dataset.a.source"] == str((shards / "a").resolve())
    # MLflow's own dataset entity is the experiment's one for (name, digest): the first run's.
    second_input = next(d for d in c.get_run(run_ids[1]).inputs.dataset_inputs if d.dataset.name == "shards-a")
    assert json.loads(second_input.dataset.source)["uri"] == str((first / "a").resolve())


def test_a_source_longer_than_an_input_tag_is_cut_not_refused(tmp_path):
    client = make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = open_run(client, tmp_path / "run", "long")
    long = "s3://bucket/" + "x" * 700 + "/a"
    rec = {"name": "shards-a", "domain": "a", "digest": "0123456789abcdef", "digest_of": "urls", "source": long,
           "profile": {"samples": None}}
    send(client, run_id, {"op": "datasets", "datasets": [rec]})
    tag = input_tags(client, run_id)["shards-a"]["source"]
    assert len(tag) == SOURCE_TAG_MAX and tag.endswith("...") and long.startswith(tag[:-3])
    assert dataset_input(rec).dataset.source == json.dumps({"uri": long})


# ----------------------------------------------------------------------------- 2. images sent again


def png(path: Path, size=(40, 24), value=90) -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def image_names(client, run_id: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, "images"))


def test_an_image_record_sent_twice_is_one_image(tmp_path):
    client = make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = open_run(client, tmp_path / "run", "images")
    rec = {"op": "image", "path": str(png(tmp_path / "s.png")), "key": "samples/a2b", "step": 7, "ts": 1234}
    send(client, run_id, rec)
    first = image_names(client, run_id)
    send(client, run_id, dict(rec))
    assert image_names(client, run_id) == first and len(first) == 2
    # Another step, or the same step logged again later (another timestamp), is another image.
    send(client, run_id, rec | {"step": 8})
    send(client, run_id, rec | {"ts": 1300})
    assert len(image_names(client, run_id)) == 6


def test_the_check_knows_the_names_log_image_gives(tmp_path):
    """send_image skips an image the run has by the start of the names MlflowClient.log_image
    gives its files; should an MLflow upgrade rename them, this fails (and images go twice)."""
    client = make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = open_run(client, tmp_path / "run", "names")
    rec = {"op": "image", "path": str(png(tmp_path / "s.png")), "key": "samples/b", "step": 3, "ts": 99}
    with Image.open(rec["path"]) as im:
        client.log_image(run_id, im.convert("RGB"), key="samples/b", step=3, timestamp=99, synchronous=True)
    names = [n.rsplit("/", 1)[-1] for n in image_names(client, run_id)]
    assert len(names) == 2 and all(n.startswith(image_prefix(rec)) for n in names)
    send(client, run_id, rec)
    assert len(image_names(client, run_id)) == 2
    assert not any(n.startswith(image_prefix(rec | {"step": 30})) for n in names)  # step 3 is not step 30


def test_a_record_sent_and_also_buffered_is_uploaded_once(tmp_path):
    """end() writes what is in flight to the buffer file: an image whose upload finished just then
    (its answer lost) is there too; upload sends it again."""
    run_dir = tmp_path / "run"
    t = Tracker(system_metrics=False)
    run_id = t.start(run_dir)
    t.log_image(png(tmp_path / "s.png"), 5)
    assert t.end()
    client = MlflowClient(embedded_uri(run_dir))
    sent = image_names(client, run_id)
    assert len(sent) == 2
    rec = {"op": "image", "path": str((tmp_path / "s.png").resolve()), "key": "samples", "step": 5,
           "run": run_id}
    # The record as the tracker kept it (same timestamp): recover it from the file name MLflow shows.
    rec["ts"] = int(sent[0].split("+timestamp+")[1].split("+")[0])
    write_buffer(run_dir / BUFFER_NAME, [rec])
    assert tracking.upload(run_dir)["sent"] == 1
    assert image_names(client, run_id) == sent


def test_an_interrupted_upload_run_again_sends_no_image_twice(tmp_path, monkeypatch):
    """The server goes away after the first image's files were stored but before its answer: the
    buffer keeps that record, and the next upload sends it again."""
    run_dir = tmp_path / "run"
    client = make_client(embedded_uri(run_dir))
    run_id = open_run(client, run_dir, "unit")
    recs = [{"op": "image", "path": str(png(tmp_path / f"s{i}.png", value=10 * i)), "key": "samples", "step": i,
             "ts": 1000 + i, "run": run_id} for i in range(3)]
    write_buffer(run_dir / BUFFER_NAME, recs)
    calls = []

    def make_flaky(uri):
        c = make_client(uri)
        real = c.log_image

        def log_image(*args, **kwargs):   # the files are stored, the answer to the first image is lost
            result = real(*args, **kwargs)
            calls.append(args)
            if len(calls) == 1:
                raise ConnectionError("connection reset by peer")
            return result

        c.log_image = log_image
        return c

    monkeypatch.setattr(tracking, "make_client", make_flaky)
    with pytest.raises(ConnectionError):
        tracking.upload(run_dir)
    assert len(read_buffer(run_dir / BUFFER_NAME)) == 3   # nothing confirmed: all kept
    assert len(image_names(client, run_id)) == 2          # but the first image's files are there
    assert tracking.upload(run_dir)["sent"] == 3
    assert len(image_names(client, run_id)) == 6          # three images, each PNG + preview, once
    assert not (run_dir / BUFFER_NAME).exists()


@pytest.mark.slow
def test_images_sent_again_to_a_server_with_proxied_artifacts(server_up, tmp_path):
    client = make_client(server_up.uri)
    run_id = open_run(client, tmp_path / "run", "images-twice")
    rec = {"op": "image", "path": str(png(tmp_path / "s.png")), "key": "samples", "step": 1, "ts": 5}
    for _ in range(3):
        send(client, run_id, rec)
    assert len(image_names(client, run_id)) == 2
