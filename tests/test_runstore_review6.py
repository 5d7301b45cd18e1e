"""Run store review 6: upload leaves out only the refused value of a merged metrics group; a moved
run directory uploads into its own embedded store (the run it names, its images found where they
moved); a number beyond a float is no metric and does not raise into training."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
from mlflow import MlflowClient

from launch.runstore.records import BUFFER_NAME, metrics_record
from launch.runstore.rundir import claim_run_dir
from launch.runstore.store import embedded_uri, run_tracking
from launch.runstore.tracking import Tracker, upload


def write_buffer(run_dir, records) -> None:
    (run_dir / BUFFER_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_one_refused_value_leaves_the_groups_other_records_in(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ts = int(time.time() * 1000)
    recs = [{"op": "open", "run": None, "experiment": "unit", "run_name": "r", "tracking_uri": embedded_uri(run_dir)}]
    for step in range(5):
        values = {"g/total": 1.0 + step, **({"loss@bad": 9.0} if step == 3 else {})}  # a key MLflow refuses
        recs.append({"op": "metrics", "run": None, "step": step, "ts": ts + step, "values": values})
    write_buffer(run_dir, recs)
    res = upload(run_dir)
    history = MlflowClient(embedded_uri(run_dir)).get_metric_history(res["run_id"], "g/total")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 + s) for s in range(5)]  # before: none of them
    assert not (run_dir / BUFFER_NAME).exists()


def test_a_moved_run_directory_uploads_into_its_own_store(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    claim_run_dir(old)
    tracker = Tracker(uri=None, system_metrics=False)
    run_id = tracker.start(old)
    tracker.log_metrics({"g/total": 1.0}, 1)
    tracker.log_image(np.full((8, 8, 3), 200, np.uint8), step=1)
    tracker.end()
    image = next((old / "mlflow-images").glob("*.png"))
    ts = int(time.time() * 1000)  # what a killed process left unsent
    write_buffer(old, [{"op": "metrics", "run": run_id, "step": 5, "ts": ts, "values": {"g/total": 5.0}},
                       {"op": "image", "run": run_id, "path": str(image.resolve()), "key": "late", "step": 5,
                        "ts": ts, "rel": str(image.relative_to(old))}])
    shutil.move(old, new)
    assert run_tracking(new)[0] == embedded_uri(new)  # not the recorded path of old
    res = upload(new)
    assert not old.exists()  # before: recreated, with a stray run in it
    client = MlflowClient(embedded_uri(new))
    assert res["run_id"] == run_id and res["sent"] == 1
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "g/total")) == [(1, 1.0), (5, 5.0)]
    # MLflow keeps the artifact folder the run was created with (old/): the image is left out, not
    # written there, and stays in the run directory
    assert res["dropped"] == 1 and (new / "mlflow-images" / image.name).is_file()


def test_an_image_record_finds_its_file_where_the_run_directory_moved(tmp_path):
    from launch.runstore.tracking import moved_image

    run_dir = tmp_path / "new"
    (run_dir / "mlflow-images").mkdir(parents=True)
    (run_dir / "mlflow-images" / "x.png").write_bytes(b"png")
    rec = {"op": "image", "path": str(tmp_path / "old" / "mlflow-images" / "x.png"), "rel": "mlflow-images/x.png"}
    assert moved_image(run_dir, rec)["path"] == str(run_dir / "mlflow-images" / "x.png")
    assert moved_image(run_dir, {**rec, "rel": "../../etc/passwd"}) == {**rec, "rel": "../../etc/passwd"}


def test_a_run_the_server_lacks_gets_its_records_in_the_new_run(tmp_path):
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir)
    ts = int(time.time() * 1000)
    write_buffer(run_dir, [{"op": "metrics", "run": "0123456789abcdef0123456789abcdef", "step": 2, "ts": ts,
                            "values": {"g/total": 2.0}}])
    other = f"sqlite:///{tmp_path / 'other.db'}"
    res = upload(run_dir, other)
    assert res["sent"] == 1 and res["dropped"] == 0  # before: refused as "run not found", the buffer deleted
    assert [(m.step, m.value) for m in MlflowClient(other).get_metric_history(res["run_id"], "g/total")] == [(2, 2.0)]


def test_a_number_beyond_a_float_is_left_out_not_raised():
    assert metrics_record({"huge": 10 ** 400, "ok": 1}, 3)["values"] == {"ok": 1.0}
    assert metrics_record({"huge": 10 ** 400}, 3) is None
