"""Static guard: the project uses MLflow, DeepSpeed and webdataset through their public APIs only."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PRIVATE_MLFLOW = [
    re.compile(r"mlflow(\.\w+)*\._\w"),                   # mlflow.tracking._model_registry, x._to_mlflow_entity
    re.compile(r"from mlflow[\w.]* import [^#\n]*\b_\w"),   # from mlflow.x import _private
    re.compile(r"\._tracking_uri|\._registry_uri|_to_mlflow_entity|\._operation_futures"),
    re.compile(r"system_metrics\.metrics|system_metrics_monitor"),  # MLflow's monitor classes: start_run's business
]


PRIVATE_OTHERS = [
    re.compile(r"\b(deepspeed|webdataset|wds)(\.\w+)*\._[a-zA-Z]"),          # deepspeed.x._private
    re.compile(r"from (deepspeed|webdataset)[\w.]* import [^#\n]*\b_[a-zA-Z]"),  # from deepspeed.x import _private
]


def test_no_private_library_api():
    """The project talks to MLflow, DeepSpeed and webdataset through their public APIs only
    (MLflow through explicit clients; its fluent API only through launch.runstore.store.fluent_uri),
    in the code and in the benches and tests too."""
    hits = []
    for folder in ("launch", "pipeline", "model", "infra", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # the patterns themselves
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if any(p.search(line) for p in PRIVATE_MLFLOW + PRIVATE_OTHERS):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "private library API:\n" + "\n".join(hits)
    assert PRIVATE_MLFLOW[0].search("from mlflow.tracking._model_registry import utils")  # the guards bite
    assert PRIVATE_MLFLOW[1].search("from mlflow.models.utils import _flatten_nested_params")
    assert PRIVATE_OTHERS[0].search("pool = deepspeed.launcher.runner._parse_hostfile(lines)")
    assert PRIVATE_OTHERS[1].search("from deepspeed.launcher.runner import _parse_hostfile")
    assert PRIVATE_OTHERS[1].search("from webdataset.tariterators import url_opener, _x")
    assert not any(p.search("from deepspeed.launcher.runner import fetch_hostfile") for p in PRIVATE_OTHERS)
