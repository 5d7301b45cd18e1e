"""Two nodes on one machine: two network namespaces joined by a veth pair, one DeepSpeed
launcher (infra/launch/node.sh) with one CPU rank in each, gloo over the veth addresses; both
read their shards from an S3 server that lives on node 0 (moto inside its namespace), written
there by `make shards` run on node 0. Where namespaces cannot be made, the same two-node launch
runs over 127.0.0.1 with the session's S3 server (said, not skipped)."""
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from conftest import ROOT, S3Server, s3_env

from trainutil import delete_namespaces, finish_nodes, free_port, metrics, resumed_step, \
    start_nodes, two_nodes, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def nodes(request):
    n = two_nodes(f"{os.getpid() % 100000}")
    request.addfinalizer(lambda: delete_namespaces(n.namespaces))
    return n


@pytest.fixture
def node_s3(request, nodes, tmp_path):
    """(endpoint, bucket) of an S3 server on node 0: moto in node 0's namespace on its veth
    address, so node 1 reaches it over the veth pair; the session's server on loopback."""
    if not nodes.isolated:
        server = request.getfixturevalue("s3_server")
        return server.endpoint, server.bucket
    server = S3Server(tmp_path / "node-s3.log", host="10.213.0.1", netns=nodes.namespaces[0])
    server.start()
    request.addfinalizer(server.stop)
    bucket = f"nodes-{uuid.uuid4().hex[:8]}"
    make = f"import s3fs; s3fs.S3FileSystem(endpoint_url={server.endpoint!r}).mkdir({bucket!r})"
    deadline = time.monotonic() + 60
    while True:  # the server answers once it has started inside the namespace
        r = on_node(nodes, 0, [sys.executable, "-c", make], server.endpoint)
        if r.returncode == 0:
            return server.endpoint, bucket
        assert time.monotonic() < deadline, r.stderr[-2000:] + server.log.read_text()[-2000:]
        time.sleep(0.5)


def on_node(nodes, node: int, cmd: list, endpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run([*nodes.prefix[node], *map(str, cmd)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **s3_env(endpoint)}, timeout=300)


def test_two_nodes_train_checkpoint_resume_one_mlflow_run(corpus, tmp_path, nodes, node_s3):
    from mlflow import MlflowClient

    endpoint, bucket = node_s3
    shards = f"s3://{bucket}/multinode-shards"
    r = on_node(nodes, 0, [sys.executable, "-m", "pipeline.shards", "--src-a", corpus / "demo" / "trainA",
                           "--src-b", corpus / "demo" / "trainB", "--out", shards, "--workers", "1",
                           "--max-per-shard", "8", "--no-progress"], endpoint)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = tmp_path / "run"
    # Only rank 0 logs, so the embedded SQLite store in the shared run dir is safe.
    cfg = write_config(tmp_path / "c.yaml", corpus, run_dir, max_steps=4, ckpt_every=2,
                       tracking={"enable": True, "experiment": "multinode", "system_metrics": False})
    conf = yaml.safe_load(cfg.read_text())
    conf["data"]["shards"] = shards
    cfg.write_text(yaml.safe_dump(conf))
    tx0 = nodes.tx_bytes(1)
    procs = start_nodes(nodes, cfg, port=free_port(), tmp=tmp_path, env=s3_env(endpoint))
    outs = finish_nodes(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[1][-4000:]
    assert "training 4 steps on 2 rank(s)" in outs[0], outs[0][-4000:]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "ckpt" / "step-00000004" / "COMPLETE").is_file()
    # Both ranks wrote their own stream state into the checkpoint.
    assert {p.name for p in (run_dir / "ckpt" / "step-00000004").glob("rank-*.json")} == \
        {"rank-00000.json", "rank-00001.json"}
    if nodes.isolated:  # the gradients really crossed the veth pair (tiny preset: > 100 kB per step)
        assert nodes.tx_bytes(1) - tx0 > 400_000, nodes.tx_bytes(1) - tx0

    # Second launch of both nodes: continues from the checkpoint at step 4 to step 7.
    procs = start_nodes(nodes, cfg, "train.max_steps=7", port=free_port(), tmp=tmp_path, env=s3_env(endpoint))
    outs = finish_nodes(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[1][-4000:]
    assert resumed_step(outs[0]) == 4
    assert "training 3 steps on 2 rank(s)" in outs[0], outs[0][-4000:]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7]

    # One MLflow run holds both launches' metrics.
    info = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    exp = client.get_experiment_by_name("multinode")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [info["run_id"]]
    hist = client.get_metric_history(info["run_id"], "g/total")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6, 7]
    assert runs[0].data.params["world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
    # The lineage names the bucket the nodes streamed from.
    assert runs[0].data.tags["dataset.a.source"] == f"{shards}/a"
