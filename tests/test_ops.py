"""launch/training/ops.py: `make setup` builds DeepSpeed's CPU op where the launches load it; GPU ranks
hand DeepSpeed's fused-Adam build an architecture list it can parse."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.training.ops import deepspeed_arch_list, fix_cuda_arch_list, use_this_environment

ROOT = Path(__file__).resolve().parents[1]


def test_prebuild_puts_the_shm_op_where_launches_look():
    # conftest.py points TORCH_EXTENSIONS_DIR into the virtualenv, as the Makefile does for launches;
    # after `make setup` the op is there already and this only loads it
    where = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    out = subprocess.run([sys.executable, "-m", "launch.training.ops"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"deepspeed_shm_comm ready in {where}" in out.stdout, out.stdout + out.stderr
    assert (where / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()


@pytest.mark.parametrize("given, wanted", [
    ("9.0a", "9.0"),                                  # the H200 image's value that broke every GPU rank
    ("8.0;9.0a 10.0f+PTX", "8.0;9.0;10.0+PTX"),       # both separators; +PTX kept
    ("9.0 9.0a", "9.0"),                              # duplicates once rewritten
    ("8.6", "8.6"),
])
def test_arch_list_becomes_one_deepspeeds_builder_parses(given, wanted, monkeypatch):
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, importable on CPU

    assert deepspeed_arch_list(given) == wanted
    builder = FusedAdamBuilder()
    builder.jit_mode = True  # what a launch does: the arch list comes from TORCH_CUDA_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", wanted)
    builder.compute_capability_args()  # raised ValueError("... '0a'") on the unfixed H200 value
    if wanted != given.replace(" ", ";"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
        with pytest.raises(ValueError):
            builder.compute_capability_args()


def test_fix_cuda_arch_list_rewrites_only_what_deepspeed_cannot_read():
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    note = fix_cuda_arch_list(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and "'9.0a' -> '9.0'" in note
    for untouched in ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, {"TORCH_CUDA_ARCH_LIST": "8.0 9.0"}, {}):
        before = dict(untouched)
        assert fix_cuda_arch_list(untouched) is None and untouched == before


def test_help_prints_help_and_builds_nothing(capsys, monkeypatch):
    import launch.training.ops as ops

    monkeypatch.setattr(ops, "prebuild", lambda: pytest.fail("--help started the build"))
    with pytest.raises(SystemExit) as e:
        ops.main(["--help"])
    assert e.value.code == 0 and "TORCH_EXTENSIONS_DIR" in capsys.readouterr().out


BIN = str(Path(sys.executable).parent)  # the suite runs in the project's virtualenv


@pytest.mark.parametrize("extensions", [None, ""])
def test_use_this_environment_points_a_bare_launch_at_the_virtualenvs_build(extensions):
    assert sys.prefix != sys.base_prefix and (Path(BIN) / "ninja").is_file()
    env = {"PATH": "/usr/local/bin:/usr/bin", **({} if extensions is None else {"TORCH_EXTENSIONS_DIR": extensions})}
    assert use_this_environment(env) == ["TORCH_EXTENSIONS_DIR", "PATH"]
    assert env == {"PATH": f"{BIN}:/usr/local/bin:/usr/bin",
                   "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    assert use_this_environment(env) == [] and env["PATH"].count(BIN) == 1  # once is enough


def test_use_this_environment_keeps_what_the_caller_chose():
    env = {"PATH": f"{BIN}:/usr/bin", "TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    assert use_this_environment(env) == [] and env == {"PATH": f"{BIN}:/usr/bin", "TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    env = {}  # no PATH at all: the virtualenv's bin becomes the whole of it
    use_this_environment(env)
    assert env["PATH"] == BIN
