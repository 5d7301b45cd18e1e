"""launch/training/ops.py: `make setup` builds DeepSpeed's CPU op where the launches load it."""
import os
import subprocess
import sys
from pathlib import Path

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
