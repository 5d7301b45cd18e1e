"""Dataset lineage records (pipeline.lineage) as MLflow dataset inputs of a run, through mlflow.data.
Sources are paths or URLs without credentials (s3://bucket/out/a, https://host/out/index.json).

MLflow keeps one dataset per (name, digest) in an experiment: a run that logs a dataset whose name
and digest an earlier run logged (the same samples: the digest follows content, not location) is
linked to that earlier dataset, with the earlier run's source and profile. Where this run read
its shards is therefore on its own input, as the input tag "source" (and in the run tag
dataset.<domain>.source)."""
from __future__ import annotations

import json
import warnings

from pipeline.storage import redact


def dataset_source(source: str):
    """The mlflow.data source for a path or URL; a source no resolver takes (a pipe: command) is
    kept as a code source that records the text."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():  # a local path resolves through two equivalent classes
            warnings.simplefilter("ignore")
            return resolve_dataset_source(source)
    except MlflowException:
        return CodeDatasetSource(tags={"shards": source})


SOURCE_TAG_MAX = 500   # MLflow's limit on an input tag's value


def dataset_input(rec: dict):
    """An mlflow.entities.DatasetInput: a MetaDataset (name, digest, source) with the record's
    profile, tagged with the training context, the domain and this run's source (the dataset's own
    source is the first run's that logged the same name and digest in the experiment)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    # Redacted again: a record read back from an older buffer file may predate redaction.
    source = redact(rec["source"])
    d = MetaDataset(dataset_source(source), name=rec["name"], digest=rec["digest"]).to_dict()
    profile = {**rec["profile"], "digest_of": rec.get("digest_of"), "manifest_sha256": rec.get("manifest_sha256")}
    ent = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                  schema=d.get("schema"), profile=json.dumps(profile))
    if len(source) > SOURCE_TAG_MAX:  # a longer value would have MLflow refuse the whole input
        source = source[:SOURCE_TAG_MAX - 3] + "..."
    return DatasetInput(ent, tags=[InputTag("mlflow.data.context", "train"), InputTag("domain", rec["domain"]),
                                   InputTag("source", source)])


def dataset_tags(recs: list[dict]) -> dict[str, str]:
    """Run tags that name each domain's data: dataset.<domain>.digest and .source."""
    tags = {}
    for r in recs:
        tags[f"dataset.{r['domain']}.digest"] = r["digest"]
        tags[f"dataset.{r['domain']}.source"] = redact(r["source"])
    return tags
