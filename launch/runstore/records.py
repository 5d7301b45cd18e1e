"""Tracking records: what the Tracker logs, as JSON-able dicts, how one is sent, and the buffer file.

    {"op": "open", "run": id|None, "experiment", "run_name"}   resume the run, or create one
    {"op": "params", "values": {key: str}}         {"op": "tags", "values": {key: str}}
    {"op": "metrics", "step": n, "ts": ms, "values": {key: float}}
    {"op": "image", "path": png, "key": "samples", "step": n, "ts": ms}
    {"op": "datasets", "datasets": [pipeline.lineage record, ...]}
    {"op": "end", "status": "FINISHED", "ts": ms}

Each record but "open" also carries "run": the run's id, or None for "the run this process opens"
(the server was away before the run existed). RUN_DIR/mlflow-buffer.jsonl holds, one per line, the
records the server has not taken: `python -m launch.runstore.tracking upload` sends them.

A record may be sent more than once (a replay interrupted and run again; a record that reached the
server but whose answer did not, so it was kept too); none is stored twice: MLflow keeps one
metric per (key, value, timestamp, step), one input per dataset and run, and the same params,
tags and end; an image is logged only where the run lacks it (send_image).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from urllib.parse import urlparse

from pipeline.atomic import write_text
from pipeline.storage import redact_text
from launch.runstore.store import embedded_root, is_transient

log = logging.getLogger(__name__)

BUFFER_NAME = "mlflow-buffer.jsonl"
BATCH_OPS = ("metrics", "params", "tags")   # what MlflowClient.log_batch takes, also asynchronously
METRICS_PER_BATCH = 1000                    # MLflow's limit per log_batch request


def now_ms() -> int:
    return int(time.time() * 1000)


def metrics_record(metrics: dict, step: int) -> dict | None:
    """A metrics record of the numbers in `metrics` (tensors and numpy scalars converted; strings and
    dicts left out: metrics hold numbers only); None when there are none."""
    values = {}
    for k, v in metrics.items():
        try:
            values[str(k)] = float(v)
        except (TypeError, ValueError, OverflowError):  # an int beyond a float (10**400) is no metric either
            continue
    return {"op": "metrics", "step": int(step), "ts": now_ms(), "values": values} if values else None


def read_buffer(path: Path) -> list[dict]:
    """The records in a buffer file; a torn last line (a crash while appending) is skipped."""
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON; skipped", path, i + 1)
    return out


def append_buffer(path: Path, records: list[dict]) -> None:
    """Add records at the end (a crash mid-line leaves a torn line that read_buffer skips). After a
    torn line (a crash, a full disk) a newline comes first: glued to it the new record would be
    skipped with it."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    with open(path, "ab+") as f:
        if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
            text = "\n" + text
        f.write(text.encode())


def retarget(records: list[dict], old: str | None, new: str | None) -> list[dict]:
    """`records`, those naming run `old` naming `new` instead: the server did not know `old` and a
    new run was opened for them (store.open_run), where they belong rather than refused."""
    if not old or not new or old == new:
        return records
    return [{**r, "run": new} if r.get("run") == old else r for r in records]


def without_sent(now: list[dict], sent: list[dict]) -> list[dict]:
    """The records of `now` (a buffer file read again) less one of each of `sent`: what another
    process appended meanwhile stays."""
    from collections import Counter

    gone = Counter(json.dumps(r, sort_keys=True) for r in sent)
    out = []
    for rec in now:
        key = json.dumps(rec, sort_keys=True)
        if gone[key] > 0:
            gone[key] -= 1
        else:
            out.append(rec)
    return out


def write_buffer(path: Path, records: list[dict]) -> None:
    """Replace the file with `records` (atomically); no records: no file."""
    if records:
        write_text(path, "".join(json.dumps(r) + "\n" for r in records), durable=False)
    else:
        path.unlink(missing_ok=True)


def batch(rec: dict) -> dict:
    """A metrics, params or tags record as keyword arguments of MlflowClient.log_batch."""
    from mlflow.entities import Metric, Param, RunTag

    op, values = rec["op"], rec["values"]
    if op == "metrics":
        return {"metrics": [Metric(k, float(v), int(rec["ts"]), int(rec["step"])) for k, v in values.items()]}
    if op == "params":
        return {"params": [Param(k, str(v)) for k, v in values.items()]}
    return {"tags": [RunTag(k, str(v)) for k, v in values.items()]}


def send(client, run_id: str, rec: dict) -> None:
    """Send one record and wait for the answer; raises what MLflow raises ("open" is the caller's)."""
    op = rec["op"]
    if op in BATCH_OPS:
        send_batch(client, run_id, rec)
    elif op == "image":
        send_image(client, run_id, rec)
    elif op == "datasets":
        from launch.runstore.datasets import dataset_input

        client.log_inputs(run_id, datasets=[dataset_input(d) for d in rec["datasets"]])
    elif op == "end":
        client.set_terminated(run_id, status=rec["status"], end_time=int(rec["ts"]))
    elif op != "open":
        raise ValueError(f"unknown tracking record op {op!r}")


def image_prefix(rec: dict) -> str:
    """The start of the file name MlflowClient.log_image gives an image record's PNG and preview:
    images/<key, / as ~>+step+<n>+timestamp+<ms>+<a random uuid>."""
    return f"{rec['key'].replace('/', '~')}+step+{int(rec['step'])}+timestamp+{int(rec['ts'])}+"


def artifacts_elsewhere(client, run_id: str) -> str | None:
    """For a run in an embedded store (sqlite at RUN_DIR/mlflow/mlflow.db): its artifact folder when
    that is not RUN_DIR/mlflow/artifacts (the run directory was moved or copied after the run was
    created, and logging there would recreate the old folder or write into the original's), else None."""
    run_dir = embedded_root(client.tracking_uri)
    if run_dir is None:
        return None
    root = run_dir / "mlflow" / "artifacts"
    where = client.get_run(run_id).info.artifact_uri or ""
    if not where.startswith("file://"):
        return None
    return None if Path(urlparse(where).path).resolve().is_relative_to(root.resolve()) else where


def send_image(client, run_id: str, rec: dict) -> None:
    """MlflowClient.log_image(key=, step=, timestamp=), unless the run has that image already: a
    record is sent again after an interrupted replay, or when it reached the server but its answer
    did not, and log_image names each call's files with a random uuid (a second copy, not an
    overwrite). The check reads the run's images/ listing; should MLflow rename its files, it finds
    nothing and the image is logged (tests/test_runstore_review2.py compares with log_image's names)."""
    from PIL import Image

    moved = artifacts_elsewhere(client, run_id)
    if moved:
        raise ValueError(f"image {rec['path']} not logged: the run's artifact folder {redact_text(moved)} is not "
                         "its run directory's (the run directory was moved or copied; MLflow keeps the path "
                         "the run was created with); the image stays in the run directory")
    prefix = image_prefix(rec)
    if any(f.path.rsplit("/", 1)[-1].startswith(prefix) for f in client.list_artifacts(run_id, "images")):
        return
    try:
        with Image.open(rec["path"]) as im:
            image = im.convert("RGB")
    except OSError as e:
        raise ValueError(f"image {rec['path']}: {e}") from None  # gone or damaged: no use retrying
    client.log_image(run_id, image, key=rec["key"], step=int(rec["step"]), timestamp=int(rec["ts"]),
                     synchronous=True)


def send_batch(client, run_id: str, rec: dict) -> None:
    """A metrics, params or tags record in one request; when the server refuses it (a param logged
    before with another value, e.g. on resume; a key MLflow does not accept; NaN), each value
    alone, so that only the refused ones are left out (with a warning), not the whole record."""
    try:
        client.log_batch(run_id, **batch(rec), synchronous=True)
        return
    except Exception as e:
        if is_transient(e) or len(rec["values"]) == 1:
            raise
    for k, v in rec["values"].items():
        try:
            client.log_batch(run_id, **batch({**rec, "values": {k: v}}), synchronous=True)
        except Exception as e:
            if is_transient(e):
                raise
            log.warning("MLflow refused %s %s=%r (%s); left out", rec["op"][:-1], k, str(v)[:100], first_line(e))


def groups(records: list[dict]) -> list[list[dict]]:
    """The records in order, runs of metric records of one run put together (at most
    METRICS_PER_BATCH values a group, one request each); every other record alone."""
    out: list[list[dict]] = []
    for rec in records:
        last = out[-1] if out else None
        if (last and rec["op"] == "metrics" and last[0]["op"] == "metrics" and last[0].get("run") == rec.get("run")
                and sum(len(r["values"]) for r in last) + len(rec["values"]) <= METRICS_PER_BATCH):
            last.append(rec)
        else:
            out.append([rec])
    return out


def send_group(client, run_id: str, group: list[dict]) -> None:
    """send() for a group of groups(): its metric records in one request; when the server refuses
    that request, each record alone (send_batch: then each value alone), so that one refused value
    leaves out that value only, not the group's other records."""
    if group[0]["op"] != "metrics" or len(group) == 1:
        return send(client, run_id, group[0])
    try:
        client.log_batch(run_id, metrics=[m for rec in group for m in batch(rec)["metrics"]], synchronous=True)
    except Exception as e:
        if is_transient(e):
            raise
        for rec in group:
            send(client, run_id, rec)


def first_line(exc: BaseException) -> str:
    """The first line of an error, fit for a log: MLflow's HTTP errors quote the request's URL, and
    with it the user:password@ of a tracking URI that carries them, so every URL is redacted."""
    return redact_text((str(exc).splitlines() or [type(exc).__name__])[0])[:300]
