"""Translators from elsewhere: a registered model version or an export dir, fetched into a run.

    mv = model_version(client, "models:/unit-demo@champion")   # or models:/unit-demo/3
    origin = fetch_export("models:/unit-demo@champion", RUN_DIR / "init", tracking_uri)

`fetch_export` copies the export files (translator weights and JSON, the discriminators' weights
when they were exported) into `dst` and writes `dst/origin.json` saying where they came from;
training starts from them with `init_from` (launch/training/trainer.py).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from launch.runstore.artifacts import EXPORT_FILES, META_NAME, is_export_dir, read_meta
from launch.runstore.store import make_client
from pipeline.atomic import replacing, write_json
from pipeline.storage import redact

ORIGIN_NAME = "origin.json"


def parse_model_uri(spec: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias -> (name, alias, None); models:/name/3 -> (name, None, "3")."""
    rest = spec[len("models:/"):].strip("/") if spec.startswith("models:/") else ""
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, alias, None
    name, _, version = rest.partition("/")
    if not name or not version.isdigit():
        raise ValueError(f"{spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, None, version


def model_version(client, spec: str):
    """The registry's ModelVersion for a models:/ URI."""
    name, alias, version = parse_model_uri(spec)
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


def _copy_export(src: Path, dst: Path) -> None:
    for name in EXPORT_FILES:
        if (src / name).is_file():
            with replacing(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)


def fetch_export(spec: str, dst, tracking_uri: str | None = None) -> dict:
    """Copy the export named by `spec` (an export dir, or a models:/ URI in the registry at
    `tracking_uri`) into `dst`; returns and writes the origin record."""
    dst = Path(dst)
    if not spec.startswith("models:/"):
        if not is_export_dir(spec):
            raise ValueError(f"init_from = {spec!r}: not an export dir (translator.json + translator.safetensors) "
                             "and not a models:/ URI")
        _copy_export(Path(spec), dst)
        origin = {"init_from": str(Path(spec).resolve())}
    else:
        if not tracking_uri:
            raise ValueError(f"init_from = {spec!r}: no registry to look in; set tracking.uri or MLFLOW_TRACKING_URI")
        import mlflow

        client = make_client(tracking_uri)
        mv = model_version(client, spec)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(mv.name, mv.version), dst_path=tmp,
                tracking_uri=tracking_uri))
            found = sorted(local.rglob(META_NAME))
            if not found:
                raise ValueError(f"init_from = {spec!r}: version {mv.version} of {mv.name} holds no {META_NAME}")
            _copy_export(found[0].parent, dst)
        origin = {"init_from": spec, "name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
                  "tracking_uri": redact(tracking_uri)}
    meta = read_meta(dst)
    origin.update({"weights_sha256": meta["weights_sha256"], "step": meta.get("step"),
                   "discriminator": "dis_weights_sha256" in meta})
    write_json(dst / ORIGIN_NAME, origin)
    return origin
