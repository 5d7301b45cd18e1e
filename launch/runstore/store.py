"""Where a run is tracked: the tracking URI, RUN_DIR/tracking.json, the MLflow client, opening the run.

    uri = resolve_uri(run_dir, configured)   # configured, else MLFLOW_TRACKING_URI, else the embedded store
    client = make_client(uri)                # MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = open_run(client, run_dir, experiment, run_id=None, run_name=None)   # resume or create
    run_id = recorded_run(run_dir, uri)      # tracking.json's run, when it is this run dir's on `uri`
    uri, info = run_tracking(run_dir, tracking_uri=None)   # for whoever comes later (release, upload)

With no URI anywhere the store is embedded: SQLite at RUN_DIR/mlflow/mlflow.db, artifacts in
RUN_DIR/mlflow/artifacts, nothing to start. RUN_DIR/tracking.json records
{"tracking_uri", "experiment", "run_id", "run_uid"} once the run exists, the URI without its
password (without_password), run_uid the run directory's (rundir.RUN_MARKER; None without one).

Every MLflow call here and in the run store names its URI through an explicit client. MLflow's
fluent API reads process-wide URIs instead; the few things that exist only there go through
fluent_uri(), the one place that sets them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.storage import redact, redact_text
from launch.runstore.rundir import read_json, read_run_marker

log = logging.getLogger(__name__)

TRACKING_JSON = "tracking.json"


def embedded_uri(run_dir) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow' / 'mlflow.db'}"


def embedded_root(uri: str) -> Path | None:
    """The run directory whose embedded store `uri` is (embedded_uri's inverse), else None."""
    if uri and uri.startswith("sqlite:///") and uri.endswith("/mlflow/mlflow.db"):
        return Path(uri[len("sqlite:///"):]).parent.parent
    return None


def embedded_artifacts(run_dir) -> str:
    return (Path(run_dir).resolve() / "mlflow" / "artifacts").as_uri()


def resolve_uri(run_dir, configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(run_dir)


def read_tracking_json(run_dir) -> dict:
    """RUN_DIR/tracking.json, or {} when there is none (the run was never reached)."""
    return read_json(Path(run_dir) / TRACKING_JSON) or {}


def run_tracking(run_dir, tracking_uri: str | None = None, configured: str | None = None) -> tuple[str, dict]:
    """(URI, tracking.json) of a run: `tracking_uri` when given, else the one the run recorded, else
    `configured` (the server a run was set up for but never reached: its buffer's "open" record
    names it), else the one a new run would use. The recorded URI has no password (open_run leaves
    it out); when MLFLOW_TRACKING_URI names the same server with one, that one is used. Otherwise
    MLflow takes it from MLFLOW_TRACKING_USERNAME/PASSWORD (or _TOKEN) itself."""
    info = read_tracking_json(run_dir)
    recorded, env = info.get("tracking_uri") or configured, os.environ.get("MLFLOW_TRACKING_URI")
    if recorded and env and without_password(env) == without_password(recorded):
        recorded = env
    return tracking_uri or own_store(recorded, run_dir) or resolve_uri(run_dir), info


def own_store(recorded: str | None, run_dir) -> str | None:
    """`recorded`, unless it is the embedded store of another folder while RUN_DIR has its own: the
    run directory was moved or copied (the id, not the path, identifies the run), and the recorded
    path would find no run there, or the original's."""
    own = embedded_uri(run_dir)
    if (recorded and recorded != own and embedded_root(recorded) is not None
            and (Path(run_dir) / "mlflow" / "mlflow.db").is_file()):
        return own
    return recorded


def recorded_run(run_dir, uri: str) -> str | None:
    """The run id RUN_DIR/tracking.json records, when it was written for this run directory's run
    (the same run_uid in the marker) on the same server; else None. A checkpoint is written only
    every so often: a run opened after the last one must be resumed from here, not opened twice."""
    info = read_tracking_json(run_dir)
    marker = read_run_marker(run_dir) or {}
    if info.get("run_uid") != marker.get("run_uid") or info.get("tracking_uri") != without_password(uri):
        return None
    return info.get("run_id")


def without_password(uri: str) -> str:
    """`uri` with the password of a user:password@ and the query parameters whose names say secret
    (params.names_secret: ?password=, ?token=, ?api_key=) left out, and nothing else changed: the
    user, a database URI's other options (postgresql://mlflow@db/runs?sslmode=require) are what
    reconnecting needs; the secrets come back from the caller, MLFLOW_TRACKING_URI or MLflow's
    credential variables."""
    from launch.runstore.params import names_secret

    uri, q, query = uri.partition("?")
    if q:
        query, h, fragment = query.partition("#")
        # raw items, not parse_qsl + urlencode: what is kept stays byte for byte as it was written
        kept = [item for item in query.split("&") if not names_secret(urllib.parse.unquote_plus(item.partition("=")[0]))]
        q = "?" if kept else ""
        query = "&".join(kept) + h + fragment
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if sep and at and ":" in userinfo:
        uri = f"{scheme}://{userinfo.partition(':')[0]}@{host}{slash}{path}"
    return uri + q + query


def make_client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    quiet_credentials(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def quiet_credentials(uri: str) -> None:
    """When `uri` carries user:password@ (or a query), keep MLflow from printing "View run ... at: URL"
    with it when a run ends (its public MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, for this process)."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    if redact(uri) != uri:
        os.environ.setdefault(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name, "true")


def connect_error(uri: str, timeout: float = 2.0) -> OSError | None:
    """For an http(s) URI reached without a proxy, the error a TCP connection to its host gets
    (None when one opens, and for every other URI). A server that is down is then known at once:
    MLflow's own requests retry with backoff before they give up (seconds, even when refused)."""
    from requests.utils import get_environ_proxies, select_proxy

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if select_proxy(uri, get_environ_proxies(uri)):   # the proxy MLflow's requests would take
        return None   # a direct connection proves nothing there
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:   # a port that is not a number: MLflow's own request says so
        return None
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return e
    return None


# Refusals that say nothing about the record: credentials that expired mid-run (or a token being
# renewed), a server shedding load. Sent again later they are taken, so they are kept, never dropped.
AUTH_CODES, AUTH_STATUS = ("UNAUTHENTICATED", "PERMISSION_DENIED"), (401, 403)
# What the server says of a run id it does not have: only these mean "open a new run instead".
NO_RUN_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def is_transient(exc: BaseException) -> bool:
    """True when the error means 'no answer now' rather than 'the request was refused'; 401, 403
    and 429 count as 'no answer now' (refuses_credentials, or a server shedding load)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        if refuses_credentials(exc) or exc.error_code == "RESOURCE_EXHAUSTED" or exc.get_http_status_code() == 429:
            return True
        return not 400 <= exc.get_http_status_code() < 500  # other 4xx: retrying would never succeed
    return not isinstance(exc, (ValueError, TypeError, KeyError, LookupError, FileNotFoundError))


def refuses_credentials(exc: BaseException) -> bool:
    """Whether the server answered 401/403: it is there, but does not take these credentials."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and (exc.error_code in AUTH_CODES
                                                 or exc.get_http_status_code() in AUTH_STATUS)


def experiment_id(client, run_dir: Path, experiment: str) -> str:
    """The id of `experiment`, created when missing. Two launches starting together on a fresh server
    both find none; the one whose create is refused (RESOURCE_ALREADY_EXISTS) takes the other's."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    loc = embedded_artifacts(run_dir) if client.tracking_uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(experiment, artifact_location=loc)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(experiment)
        if exp is None:  # refused for another reason, or removed for good meanwhile
            raise
        return exp.experiment_id


def open_run(client, run_dir, experiment: str, run_id: str | None = None, run_name: str | None = None,
             record: bool = True, keep_status: bool = False) -> str:
    """Resume `run_id` (set it RUNNING; with `keep_status` its status is left as it is: records
    logged to an ended run are taken, and `tracking upload` must not leave a finished run RUNNING
    when it is stopped midway) or create a run in `experiment` (created when missing);
    writes RUN_DIR/tracking.json (unless not `record`) and returns the run's id. A run the server
    does not know (NO_RUN_CODES: no such id, or a deleted run) is replaced by a new one (with a
    warning); every other error raises: no answer, and refused credentials too (a 401 says nothing
    about the run, and a new one would split the training in two)."""
    from mlflow.exceptions import MlflowException

    run_dir, uri = Path(run_dir), client.tracking_uri
    if run_id:
        try:
            if keep_status and client.get_run(run_id).info.lifecycle_stage == "deleted":
                why = "deleted"   # what update_run would refuse (INVALID_PARAMETER_VALUE)
            else:
                why = None
                if not keep_status:
                    client.update_run(run_id, status="RUNNING")
        except MlflowException as e:
            if e.error_code not in NO_RUN_CODES:   # no answer, bad credentials, ...: not "no such run"
                raise
            why = redact_text(str(e))
        if why:
            log.warning("MLflow run %s not found at %s (%s); starting a new run", run_id, redact(uri), why)
            run_id = None
    if not run_id:
        run = client.create_run(experiment_id(client, run_dir, experiment), run_name=run_name or run_dir.name,
                                tags={"run_dir": str(run_dir.resolve())})
        run_id = run.info.run_id
    if not record:
        return run_id
    # tracking.json is world-readable and copied with the run: the URI goes in without its password
    marker = read_run_marker(run_dir) or {}
    write_json(run_dir / TRACKING_JSON, {"tracking_uri": without_password(uri), "experiment": experiment,
                                         "run_id": run_id, "run_uid": marker.get("run_uid")}, indent=2)
    return run_id


@contextlib.contextmanager
def fluent_uri(uri: str):
    """Point MLflow's fluent API (mlflow.start_run, mlflow.end_run, Model.log and the registration
    it does) at `uri` for the block.

    mlflow.set_tracking_uri sets the process-wide URI and MLFLOW_TRACKING_URI; the registry follows
    MLFLOW_REGISTRY_URI (and otherwise the tracking URI). Afterwards the process-wide URI is cleared
    and both variables are put back, so URIs resolve as they did before the block.
    """
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in names}
    quiet_credentials(uri)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_REGISTRY_URI"] = uri
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
