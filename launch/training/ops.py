"""DeepSpeed's JIT-built ops, built ahead of the first launch.

On CPU ranks DeepSpeed compiles a shared-memory all-reduce op the first time a process group
starts (about a minute on 2 cores), and caches it under TORCH_EXTENSIONS_DIR. `make setup` runs
this module so that cost is paid once, at setup, and not by the first `make demo` or test launch;
the Makefile points TORCH_EXTENSIONS_DIR into the virtualenv, whose paths the build names.

    python -m launch.training.ops
"""
from __future__ import annotations

import os
import sys
import time


def prebuild() -> str:
    """Build (or load from the cache) the op DeepSpeed's CPU ranks load; a line saying what happened.
    Nothing to do on other accelerators, or where DeepSpeed finds the op incompatible (the ranks
    then run without it, as they would at launch)."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return f"DeepSpeed ops: nothing to prebuild for the {acc.device_name()} accelerator"
    builder = acc.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return "DeepSpeed ops: the shared-memory all-reduce op is not available here; ranks run without it"
    t0 = time.perf_counter()
    builder.load(verbose=False)
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default extensions folder")
    return f"DeepSpeed ops: {builder.NAME} ready in {where} ({time.perf_counter() - t0:.0f} s)"


def main() -> int:
    try:
        print(prebuild(), flush=True)
    except Exception as e:  # a missing compiler: the first launch tries again and says why
        print(f"DeepSpeed ops: prebuild failed ({type(e).__name__}: {e}); the first launch will build "
              "them instead", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
