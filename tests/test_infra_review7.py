"""Forwarded values the launchers would alter, and the MLflow server's store URI off the command line.

DeepSpeed (launcher/multinode_runner.py, add_export) wraps a value with a character outside
[\\w@%+=:,./-] in double quotes. pdsh's remote shell removes them; `mpirun -x` (openmpi) runs no
shell, so the quotes reach the ranks. The recipes must refuse what would not arrive unchanged.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from test_infra_static import INFRA, ROOT, dry_run_env, run_bash

SECRETISH = "hunter2"  # part of every refused value: it must never be printed


def check_env_file(tmp_path, content, *launcher):
    env_file = tmp_path / "env"
    env_file.write_text(content)
    return run_bash(["-c", 'source infra/launch/common.sh; check_deepspeed_env "$@"', "x",
                     str(env_file), *launcher])


# ---------------------------------------------------------------- the rule matches DeepSpeed


def test_openmpi_rule_is_deepspeeds_unquoted_set():
    from deepspeed.launcher.multinode_runner import MultiNodeRunner

    class Runner(MultiNodeRunner):  # the abstract methods are not used here
        backend_exists = get_cmd = name = None

    Runner.__abstractmethods__ = frozenset()
    runner = Runner.__new__(Runner)
    runner.exports = {}
    script = 'source infra/launch/common.sh; for v; do forwarded_value_ok openmpi "$v" && echo 1 || echo 0; done'
    values = [f"a{chr(c)}b" for c in range(32, 127)] + ["", "^docker0,lo", "eth0", "mlx5_0:1,mlx5_1:1"]
    proc = run_bash(["-c", script, "x", *values])
    assert proc.returncode == 0, proc.stderr
    verdicts = proc.stdout.split()
    assert len(verdicts) == len(values)
    for value, verdict in zip(values, verdicts):
        runner.add_export("K", value)
        unchanged = runner.exports["K"] == value
        assert (verdict == "1") == unchanged, f"{value!r}: recipe says {verdict}, DeepSpeed sends {runner.exports['K']!r}"


# ---------------------------------------------------------------- openmpi.sh


@pytest.mark.parametrize("var, value", [
    ("NCCL_SOCKET_IFNAME", "^docker0,lo"),
    ("NCCL_IB_HCA", "=mlx5_0!" + SECRETISH),
    ("MLFLOW_EXPERIMENT_NAME", "paper(" + SECRETISH + ")"),
    ("UCX_NET_DEVICES", "mlx5_0:1;" + SECRETISH),
    ("PYTHONWARNINGS", "ignore#" + SECRETISH),
])
def test_openmpi_refuses_values_deepspeed_would_quote(tmp_path, var, value):
    proc = run_bash(["infra/launch/openmpi.sh"], env=dry_run_env(tmp_path, **{var: value}))
    assert proc.returncode == 2, proc.stdout
    assert var in proc.stderr and "openmpi" in proc.stderr and "_@%+=:,./-" in proc.stderr, proc.stderr
    assert value not in proc.stderr + proc.stdout and SECRETISH not in proc.stderr + proc.stdout
    assert not proc.stdout  # nothing was printed as a command


@pytest.mark.parametrize("var, value", [
    ("NCCL_SOCKET_IFNAME", "eth0"), ("NCCL_SOCKET_IFNAME", "=ib0"), ("NCCL_IB_HCA", "mlx5_0:1,mlx5_1:1"),
    ("MLFLOW_TRACKING_URI", "https://mlflow.example.org:5000/x"), ("NCCL_DEBUG", ""),
    ("MLFLOW_EXPERIMENT_NAME", "paper-v2.1_a@b%c+d"),
])
def test_openmpi_accepts_plain_values(tmp_path, var, value):
    proc = run_bash(["infra/launch/openmpi.sh"], env=dry_run_env(tmp_path, **{var: value}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deepspeed --hostfile ") and "--launcher openmpi" in proc.stdout


def test_openmpi_refuses_a_quoted_value_in_deepspeed_env(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\nNCCL_SOCKET_IFNAME=^docker0,lo\n")
    proc = run_bash([str(INFRA / "launch/openmpi.sh")], env=dry_run_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "line 2" in proc.stderr and "NCCL_SOCKET_IFNAME" in proc.stderr, proc.stderr
    assert "^docker0" not in proc.stderr


def test_openmpi_refuses_a_working_directory_deepspeed_would_quote(tmp_path):
    # DeepSpeed exports PYTHONPATH=<cwd>[:...]: a quoted cwd would break imports on every rank
    odd = tmp_path / "my (dir)"
    odd.mkdir()
    proc = run_bash([str(INFRA / "launch/openmpi.sh")], env=dry_run_env(tmp_path), cwd=odd)
    assert proc.returncode == 2 and "working directory" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- multinode.sh (pdsh)


def test_pdsh_accepts_values_its_remote_shell_unquotes(tmp_path):
    # `export NCCL_SOCKET_IFNAME="^docker0,lo";` is read by the remote shell: the value arrives whole
    env = dry_run_env(tmp_path, NCCL_SOCKET_IFNAME="^docker0,lo")
    (tmp_path / ".deepspeed_env").write_text("NCCL_IB_HCA=^mlx5_2\n")
    proc = run_bash(["infra/launch/multinode.sh"], env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("value", ['a"' + SECRETISH, "$(id)" + SECRETISH, "`id`" + SECRETISH,
                                   "a\\" + SECRETISH, "a'" + SECRETISH])
def test_pdsh_refuses_values_its_remote_shell_would_expand(tmp_path, value):
    proc = run_bash(["infra/launch/multinode.sh"], env=dry_run_env(tmp_path, NCCL_IB_HCA=value))
    assert proc.returncode == 2 and "NCCL_IB_HCA" in proc.stderr, proc.stderr
    assert SECRETISH not in proc.stderr + proc.stdout


# ---------------------------------------------------------------- check_deepspeed_env


@pytest.mark.parametrize("launcher", [(), ("openmpi",), ("pdsh",)])
@pytest.mark.parametrize("line", [
    'NCCL_X=a"' + SECRETISH,
    "OMP_NUM_THREADS=$(touch${IFS}MARKER)" + SECRETISH,
    "OMP_NUM_THREADS=`touch${IFS}MARKER`" + SECRETISH,
    "NCCL_DEBUG=${HOME}" + SECRETISH,
    "NCCL_DEBUG=a\\" + SECRETISH,
])
def test_check_deepspeed_env_refuses_shell_syntax(tmp_path, launcher, line):
    marker = tmp_path / "marker"
    proc = check_env_file(tmp_path, f"NCCL_DEBUG=WARN\n{line.replace('MARKER', str(marker))}\n", *launcher)
    assert proc.returncode == 2, proc.stdout
    key = line.split("=")[0]
    assert "line 2" in proc.stderr and key in proc.stderr, proc.stderr
    assert SECRETISH not in proc.stderr
    assert not marker.exists()


def test_check_deepspeed_env_never_prints_a_bad_line(tmp_path):
    proc = check_env_file(tmp_path, f"MLFLOW_TRACKING_PASSWORD = {SECRETISH}\n")
    assert proc.returncode == 2 and "not KEY=VALUE" in proc.stderr, proc.stderr
    assert SECRETISH not in proc.stderr


def test_check_deepspeed_env_rule_depends_on_the_launcher(tmp_path):
    content = "NCCL_SOCKET_IFNAME=^docker0,lo\n"
    assert check_env_file(tmp_path, content, "pdsh").returncode == 0
    for launcher in ((), ("openmpi",)):
        proc = check_env_file(tmp_path, content, *launcher)
        assert proc.returncode == 2 and "NCCL_SOCKET_IFNAME" in proc.stderr, proc.stderr


def test_deepspeed_env_example_passes_the_strict_rule(tmp_path):
    proc = run_bash(["-c", 'source infra/launch/common.sh; check_deepspeed_env "$1" openmpi', "x",
                     str(INFRA / "deepspeed_env.example")])
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- make mlflow-server

STORE_URI = f"postgresql+psycopg2://mlflow:{SECRETISH}@db.example.org:5432/mlflow"


def fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    fake = venv / "bin" / "mlflow"
    fake.write_text(f'#!/bin/sh\n{{ printf "<%s>" "$@"; echo; echo "ENV=$MLFLOW_BACKEND_STORE_URI"; }} >> {log}\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: no setup
    return venv, log


def make(args, env_extra=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MLFLOW")}
    env.update(env_extra or {})
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_make_n_mlflow_server_shows_no_password(tmp_path):
    venv, _ = fake_venv(tmp_path)
    proc = make(["-n", "mlflow-server", f"VENV={venv}"], {"MLFLOW_BACKEND_STORE_URI": STORE_URI})
    assert proc.returncode == 0, proc.stderr
    assert "mlflow server" in proc.stdout
    assert SECRETISH not in proc.stdout + proc.stderr
    assert "--backend-store-uri" not in proc.stdout


@pytest.mark.parametrize("how", ["environment", "make variable"])
def test_mlflow_server_reads_the_store_uri_from_the_environment(tmp_path, how):
    venv, log = fake_venv(tmp_path)
    if how == "environment":
        proc = make(["mlflow-server", f"VENV={venv}"], {"MLFLOW_BACKEND_STORE_URI": STORE_URI})
    else:
        proc = make(["mlflow-server", f"VENV={venv}", f"MLFLOW_BACKEND_STORE_URI={STORE_URI}"])
    assert proc.returncode == 0, proc.stderr
    argv, env_line = log.read_text().splitlines()
    assert SECRETISH not in argv and "--backend-store-uri" not in argv, argv
    assert argv.startswith("<server>") and "<--serve-artifacts>" in argv
    assert env_line == f"ENV={STORE_URI}"  # mlflow server's --backend-store-uri envvar
    assert SECRETISH not in proc.stdout + proc.stderr


def test_mlflow_server_needs_the_store_uri(tmp_path):
    venv, log = fake_venv(tmp_path)
    proc = make(["mlflow-server", f"VENV={venv}"], drop=("MLFLOW_BACKEND_STORE_URI",))
    assert proc.returncode != 0
    assert "set MLFLOW_BACKEND_STORE_URI" in proc.stderr, proc.stderr
    assert not log.exists(), "mlflow started without a store"


def test_mlflow_cli_reads_backend_store_uri_from_its_envvar():
    from mlflow.cli import server

    option = next(p for p in server.params if "--backend-store-uri" in p.opts)
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


# ---------------------------------------------------------------- docs


def test_readme_sends_unforwarded_variables_through_deepspeed_env():
    from deepspeed.launcher.runner import EXPORT_ENVS

    forwarded = tuple(EXPORT_ENVS) + ("NCCL",)
    text = (INFRA / "README.md").read_text()
    for name in ("GLOO_SOCKET_IFNAME", "DEEPSPEED_TIMEOUT"):
        assert not name.startswith(forwarded)
        paragraph = next(p for p in re.split(r"\n(?=- )", text) if f"`{name}`" in p and "pdsh" in p.lower())
        assert ".deepspeed_env" in paragraph, paragraph
    assert "unquoted on the remote command line" not in text
