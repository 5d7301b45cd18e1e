"""Dataset lineage (pipeline/lineage.py) from every way the config names shards, and its MLflow
dataset inputs (launch/runstore/datasets.py) in a real embedded store."""

import json

import pytest
from mlflow import MlflowClient

from launch.runstore.datasets import dataset_input
from launch.runstore.store import make_client, open_run
from pipeline.hashing import sha256_file
from pipeline.lineage import datasets, domain_dataset, shard_datasets
from pipeline.storage import redact
from test_tracking import make_shards_meta


def by_domain(recs):
    return {r["domain"]: r for r in recs}


def test_digest_follows_content_not_sharding(tmp_path):
    one = by_domain(shard_datasets(make_shards_meta(tmp_path / "one", shard_size=1)))
    two = by_domain(shard_datasets(make_shards_meta(tmp_path / "two", shard_size=3)))
    other = by_domain(shard_datasets(make_shards_meta(tmp_path / "o", keys_a=("a0", "a1", "aX"))))
    assert one["a"]["digest"] == two["a"]["digest"] and one["b"]["digest"] == two["b"]["digest"]
    assert one["a"]["digest"] != one["b"]["digest"]
    assert other["a"]["digest"] != one["a"]["digest"] and other["b"]["digest"] == one["b"]["digest"]
    assert one["a"]["digest_of"] == "manifest" and len(one["a"]["digest"]) == 16
    with pytest.raises(FileNotFoundError, match="index.json"):
        shard_datasets(tmp_path / "missing")


def test_out_dir_records_counts_source_and_file_digests(tmp_path):
    out = make_shards_meta(tmp_path / "out", shard_size=2)
    recs = datasets(shards=out)
    assert [r["name"] for r in recs] == ["shards-a", "shards-b"]
    a, b = recs
    assert a["profile"] == {"samples": 3, "shards": 2, "bytes": 300}
    assert b["profile"] == {"samples": 2, "shards": 1, "bytes": 200}
    assert a["source"] == str((out / "a").resolve()) and b["source"] == str((out / "b").resolve())
    assert a["manifest_sha256"] == sha256_file(out / "manifest.parquet")
    assert a["index_sha256"] == sha256_file(out / "index.json")
    assert json.loads(json.dumps(recs)) == recs  # plain data: it travels in the tracking buffer file


def test_per_domain_index_and_index_without_manifest(tmp_path):
    out = make_shards_meta(tmp_path / "out")
    via_index = by_domain(datasets(shards_a=out / "index.json", shards_b=out))
    via_out = by_domain(shard_datasets(out))
    assert via_index["a"]["digest"] == via_out["a"]["digest"] and via_index["b"] == via_out["b"]
    assert via_index["a"]["source"] == str((out / "index.json").resolve())
    # Without a manifest the digest falls back to the index's shard checksums.
    (out / "manifest.parquet").unlink()
    bare = domain_dataset(out / "index.json", "a")
    assert bare["digest_of"] == "index" and bare["manifest_sha256"] is None
    assert bare["profile"]["samples"] == 3 and bare["digest"] != via_out["a"]["digest"]


def test_patterns_and_url_lists_have_no_manifest_and_no_credentials(tmp_path):
    pattern = "https://user:secret@data.example.org/shards/a-{000000..000003}.tar?X-Amz-Signature=abc"
    rec = domain_dataset(pattern, "a")
    assert rec["digest_of"] == "urls" and rec["manifest_sha256"] is None and rec["index_sha256"] is None
    assert rec["profile"] == {"samples": None, "shards": 4, "bytes": None}
    assert "secret" not in json.dumps(rec) and "Signature" not in json.dumps(rec)
    assert rec["source"] == "https://data.example.org/shards/a-{000000..000003}.tar"
    listed = domain_dataset([f"s3://bucket/b/b-{i:06d}.tar" for i in range(3)], "b")
    assert listed["source"] == "s3://bucket/b/" and listed["profile"]["shards"] == 3
    # The digest names the list of shards: another list, another digest; the same list, the same.
    assert listed["digest"] == domain_dataset([f"s3://bucket/b/b-{i:06d}.tar" for i in range(3)], "b")["digest"]
    assert listed["digest"] != domain_dataset([f"s3://bucket/b/b-{i:06d}.tar" for i in range(4)], "b")["digest"]
    assert redact("pipe:aws s3 cp s3://b/x.tar -") == "pipe:aws ..."
    mixed = by_domain(datasets(shards=make_shards_meta(tmp_path / "out"), shards_b=[f"/d/b-{i}.tar" for i in range(2)]))
    assert mixed["a"]["digest_of"] == "manifest" and mixed["b"]["digest_of"] == "urls"
    with pytest.raises(ValueError, match="domain"):
        domain_dataset(tmp_path, "c")


def test_records_become_mlflow_dataset_inputs(tmp_path):
    out = make_shards_meta(tmp_path / "out")
    recs = datasets(shards_a=out, shards_b="s3://bucket/b-{0..1}.tar") + [
        domain_dataset("pipe:curl -s https://x/a.tar", "a") | {"name": "piped-a"}]
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = make_client(uri)
    run_id = open_run(client, tmp_path / "run", "lineage")
    client.log_inputs(run_id, datasets=[dataset_input(r) for r in recs])
    got = {d.dataset.name: d for d in MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs}
    assert set(got) == {"shards-a", "shards-b", "piped-a"}
    a = got["shards-a"]
    assert a.dataset.digest == recs[0]["digest"] and json.loads(a.dataset.profile)["samples"] == 3
    assert json.loads(a.dataset.source)["uri"] == recs[0]["source"] and a.dataset.source_type == "local"
    assert {t.key: t.value for t in a.tags} == {"mlflow.data.context": "train", "domain": "a",
                                                "source": recs[0]["source"]}
    assert got["shards-b"].dataset.source_type == "s3"
    assert json.loads(got["shards-b"].dataset.profile)["digest_of"] == "urls"
    assert got["piped-a"].dataset.source_type == "code"


# ----------------------------------------------------------------------------- shards at URLs


def test_lineage_for_every_naming_local_and_remote(s3_server, http_server, corpus):
    """Local OUT, S3 OUT, S3 index.json, per-domain specs (S3 index + HTTP OUT), a pattern: where a
    manifest exists the digest is the local one, and sources are the URLs without credentials."""
    from test_loader_remote import http_out, s3_out

    local = corpus / "shards"
    ref = by_domain(shard_datasets(local))
    s3 = s3_out(s3_server, corpus)
    http, _ = http_out(http_server, corpus, "lineage")
    for d in ("a", "b"):
        assert ref[d]["source"] == str((local / d).resolve()) and ref[d]["digest_of"] == "manifest"
    remote = by_domain(datasets(shards=s3))
    for d in ("a", "b"):
        assert remote[d]["source"] == f"{s3}/{d}"
        assert {k: v for k, v in remote[d].items() if k != "source"} == {k: v for k, v in ref[d].items() if k != "source"}
    assert remote["a"]["manifest_sha256"] == sha256_file(local / "manifest.parquet")
    assert remote["a"]["index_sha256"] == sha256_file(local / "index.json")
    assert by_domain(shard_datasets(s3)) == remote
    via_index = domain_dataset(f"{s3}/index.json", "b")
    assert via_index["source"] == f"{s3}/index.json" and via_index["digest"] == ref["b"]["digest"]
    mixed = by_domain(datasets(shards_a=f"{s3}/index.json", shards_b=f"{http}?token=secret"))
    assert mixed["a"]["digest"] == ref["a"]["digest"] and mixed["b"]["digest"] == ref["b"]["digest"]
    assert mixed["b"]["source"] == f"{http}/b" and "secret" not in json.dumps(mixed)
    pattern = domain_dataset(f"{s3}/a/a-{{000000..000005}}.tar", "a")
    assert pattern["digest_of"] == "urls" and pattern["profile"]["shards"] == 6
    assert pattern["source"] == f"{s3}/a/a-{{000000..000005}}.tar"
    with pytest.raises(FileNotFoundError, match="index.json"):
        shard_datasets(s3_server.url("no-such-out"))
    with pytest.raises(ValueError, match="no index.json"):
        domain_dataset(s3_server.url("no-such-out"), "a")


@pytest.mark.slow
def test_per_domain_lineage_reaches_the_mlflow_server(server_up, s3_server, http_server, corpus, tmp_path):
    """shards_a / shards_b as the trainer passes them, logged through the Tracker to the real server."""
    from launch.runstore.tracking import Tracker
    from test_loader_remote import http_out, s3_out

    s3 = s3_out(s3_server, corpus)
    http, _ = http_out(http_server, corpus, "lineage")
    want = {r["name"]: r["digest"] for r in shard_datasets(corpus / "shards")}
    t = Tracker(uri=server_up.uri, experiment="lineage-remote", system_metrics=False)
    run_id = t.start(tmp_path / "run")
    recs = t.log_datasets(shards_a=f"{s3}/index.json", shards_b=http)
    assert t.end() is True and len(recs) == 2
    run = MlflowClient(server_up.uri).get_run(run_id)
    got = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {n: d.digest for n, d in got.items()} == want
    assert json.loads(got["shards-a"].source)["uri"] == f"{s3}/index.json" and got["shards-a"].source_type == "s3"
    assert json.loads(got["shards-b"].source)["url"] == f"{http}/b"
    assert run.data.tags["dataset.b.source"] == f"{http}/b"
    # One domain whose shards cannot be described does not cost the other its lineage.
    t2 = Tracker(uri=server_up.uri, experiment="lineage-remote", system_metrics=False)
    run2 = t2.start(tmp_path / "run2")
    assert [r["domain"] for r in t2.log_datasets(shards_a=s3_server.url("gone"), shards_b=s3)] == ["b"]
    assert t2.end() is True
    assert [d.dataset.name for d in MlflowClient(server_up.uri).get_run(run2).inputs.dataset_inputs] == ["shards-b"]
