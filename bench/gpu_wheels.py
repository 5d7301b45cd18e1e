"""Wheels for an offline GPU machine: its Python has a CUDA torch, not the rest of this project.

A lent GPU machine reaches no package index. `download` (here, where an index answers) puts the
project's packages that such an image lacked into one folder, pinned to the versions installed
in this virtualenv (the ones the suite ran with), as wheels for the GPU machine's Python; the
folder travels with the checkout. `install` (there; `bench/gpu.sh` runs it when an import fails)
installs into a target folder the wheels whose distribution that Python does not have yet, so
nothing the image ships (torch, numpy, typing_extensions, ...) is shadowed, and prints the folder
to put on PYTHONPATH.

    .venv/bin/python bench/gpu_wheels.py download --out .whl --python-version 3.12     # make gpu-wheels
    python3 bench/gpu_wheels.py install .whl /tmp/site                                  # there

Standard library only: on the GPU machine it runs before anything else is importable.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

# What the 4 December H200 image (torch 2.11 CUDA, Python 3.12) lacked for `bench/gpu.sh` with
# tracking off: DeepSpeed's config parser, the config's validation, the augmentations and the
# shard reader, with their dependencies. mlflow is left out (`tracking.enable: false`).
PACKAGES = ("hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
            "typing_extensions", "albumentations", "albucore", "simsimd", "stringzilla",
            "webdataset", "braceexpand")
# Built here from its sdist as a pure-Python wheel; its CUDA ops compile on first use there.
SOURCE_ONLY = ("deepspeed",)
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-[^-]+-[^-]+\.whl$")


def normalise(name: str) -> str:
    """PEP 503: `typing_extensions`, `Typing-Extensions` and `typing.extensions` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(names, version=md.version) -> list[str]:
    """`name==version` for each name, as installed here; a name not installed here is an error
    naming it (a wheel of some other version would be one the suite never ran with)."""
    out, missing = [], []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"gpu_wheels: not installed in {sys.prefix}: {', '.join(missing)} (run make setup first)")
    return out


def download_commands(python: str, out: Path, python_version: str, binary: list[str], source: list[str]) -> list[list[str]]:
    """pip's commands: binary wheels for the target interpreter and platforms (never an sdist,
    which would build for this machine's Python), then the source-only packages as wheels built
    here without their ops (DS_BUILD_OPS=0 in the environment)."""
    cmds = [[python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", python_version, "--implementation", "cp",
             *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), *binary]]
    if source:
        cmds.append([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                     "-w", str(out), *source])
    return cmds


def wheel_project(path: Path) -> str:
    """The normalised project name from a wheel's file name; a name that is not a wheel's is an
    error naming the file."""
    m = WHEEL_NAME.match(path.name)
    if not m:
        raise SystemExit(f"gpu_wheels: {path} is not named like a wheel (name-version-python-abi-platform.whl)")
    return normalise(m["name"])


def check_python(path: Path, python=sys.version_info) -> None:
    """A compiled wheel for another CPython than this one is an error naming the file and the fix
    (pip's own message would only say "not a supported wheel on this platform")."""
    tags = WHEEL_NAME.match(path.name)["python"].split(".")
    here = f"cp{python[0]}{python[1]}"
    if all(t.startswith("cp") for t in tags) and here not in tags:
        raise SystemExit(f"gpu_wheels: {path.name} is built for {'.'.join(tags)}, this Python is {here} "
                         f"(download again with --python-version {python[0]}.{python[1]})")


def to_install(folder: Path, installed=None) -> tuple[list[Path], list[str]]:
    """The folder's wheels whose project this Python lacks (each checked to be for this Python),
    and the names of those it has."""
    if installed is None:
        installed = {normalise(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_wheels: no wheels in {folder}")
    todo, present = [], []
    for w in wheels:
        name = wheel_project(w)
        if name in installed:
            present.append(name)
        else:
            check_python(w)
            todo.append(w)
    return todo, present


def download(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"}
    for cmd in download_commands(sys.executable, out, args.python_version,
                                 pins([*PACKAGES, *args.also]), pins(SOURCE_ONLY)):
        r = subprocess.run(cmd, env=env)
        if r.returncode:
            raise SystemExit(f"gpu_wheels: pip {cmd[3]} failed (exit {r.returncode}; its message is above)")
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {out} for CPython {args.python_version}: "
          f"let the folder travel with the checkout; bench/gpu.sh installs what is missing there")
    return 0


def install(args) -> int:
    folder, target = Path(args.folder), Path(args.target)
    todo, present = to_install(folder)
    if present:
        print(f"gpu_wheels: already installed, left alone: {', '.join(present)}", file=sys.stderr)
    if todo:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--disable-pip-version-check", "--target", str(target), *map(str, todo)])
        if r.returncode:
            raise SystemExit(f"gpu_wheels: pip could not install the wheels of {folder} into {target} "
                             f"(exit {r.returncode}; its message is above)")
        print(f"gpu_wheels: installed {len(todo)} wheels into {target}", file=sys.stderr)
    print(target)  # for PYTHONPATH
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="here: the wheels, pinned to this virtualenv's versions")
    d.add_argument("--out", default=".whl")
    d.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    d.add_argument("--also", nargs="*", default=[], help="more installed projects the image lacks (e.g. pyarrow)")
    i = sub.add_parser("install", help="there: the wheels this Python lacks, into a folder for PYTHONPATH")
    i.add_argument("folder")
    i.add_argument("target")
    args = ap.parse_args(argv)
    return download(args) if args.cmd == "download" else install(args)


if __name__ == "__main__":
    sys.exit(main())
