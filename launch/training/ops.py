"""DeepSpeed's JIT-built ops, built ahead of the first launch.

On CPU ranks DeepSpeed compiles a shared-memory all-reduce op the first time a process group
starts (about a minute on 2 cores), and caches it under TORCH_EXTENSIONS_DIR. `make setup` runs
this module so that cost is paid once, at setup, and not by the first `make demo` or test launch;
the Makefile points TORCH_EXTENSIONS_DIR into the virtualenv, whose paths the build names.
A launch by hand (`.venv/bin/deepspeed launch/train.py ...`, the venv not activated) finds the
same build: `use_this_environment` does in each rank what the Makefile does for `make train`.

On GPU ranks DeepSpeed JIT-builds its fused Adam at the first launch. Its builder (0.19) parses
TORCH_CUDA_ARCH_LIST as plain numbers and fails on the architecture-specific suffixes CUDA images
set (seen on an H200 image: TORCH_CUDA_ARCH_LIST=9.0a ended every rank with "invalid literal for
int() with base 10: '0a'"); `deepspeed_arch_list` gives the list DeepSpeed can read.

    python -m launch.training.ops
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

# "9.0", "9.0a", "10.0f", "9.0a+PTX": major.minor, an optional family/arch-specific letter, +PTX
_ARCH = re.compile(r"^(\d+)\.(\d+)[a-z]?(\+PTX)?$", re.IGNORECASE)


def deepspeed_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's op builder can parse it: each "9.0a" / "10.0f" becomes
    "9.0" / "10.0" (+PTX kept), duplicates dropped, order kept. Entries it cannot read (names such
    as "Hopper") stay as they are, for DeepSpeed to report. The ops it builds (fused Adam) use no
    architecture-specific instructions, so the plain targets lose nothing."""
    out: list[str] = []
    for entry in value.replace(";", " ").split():
        m = _ARCH.match(entry)
        fixed = f"{m.group(1)}.{m.group(2)}{'+PTX' if m.group(3) else ''}" if m else entry
        if fixed not in out:
            out.append(fixed)
    return ";".join(out)


def fix_cuda_arch_list(environ=os.environ) -> str | None:
    """Rewrite TORCH_CUDA_ARCH_LIST in `environ` for DeepSpeed's JIT builds (see the module
    docstring); a line saying what changed, or None when nothing did."""
    given = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    fixed = deepspeed_arch_list(given)
    if not given or fixed == given.replace(" ", ";"):
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return (f"TORCH_CUDA_ARCH_LIST={given!r} -> {fixed!r} for DeepSpeed's JIT-built fused Adam (its builder "
            "cannot parse architecture suffixes)")


def use_this_environment(environ=os.environ) -> list[str]:
    """Point DeepSpeed's op build at this virtualenv, as the Makefile does, whoever started the
    process: TORCH_EXTENSIONS_DIR into the virtualenv (kept where set and not empty), and its bin
    folder (the pip ninja, and the other tools of the virtualenv) first on PATH. Without them a
    launch by hand used torch's shared ~/.cache/torch_extensions, where another checkout's build
    names other paths, and the system's ninja, which does not read the pip ninja's build log:
    either rebuilt the op, about 30 s of each rank's start on 2 cores (measured here), at every
    switch between such launches and `make`'s. Outside a virtualenv nothing changes. Returns the
    names of the variables it set."""
    changed = []
    if sys.prefix == sys.base_prefix:
        return changed
    if not environ.get("TORCH_EXTENSIONS_DIR"):
        environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
        changed.append("TORCH_EXTENSIONS_DIR")
    bin_dir = str(Path(sys.executable).parent)
    path = environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        environ["PATH"] = os.pathsep.join([bin_dir, *filter(None, [path])])
        changed.append("PATH")
    return changed


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


def main(argv=None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m launch.training.ops",
                            description="Build DeepSpeed's CPU shared-memory all-reduce op into TORCH_EXTENSIONS_DIR "
                                        "(make setup runs this; about a minute on 2 cores, once).").parse_args(argv)
    use_this_environment()
    try:
        print(prebuild(), flush=True)
    except Exception as e:  # a missing compiler: the first launch tries again and says why
        print(f"DeepSpeed ops: prebuild failed ({type(e).__name__}: {e}); the first launch will build "
              "them instead", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
