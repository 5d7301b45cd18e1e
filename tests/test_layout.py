"""The house rules, checked on the source: which part may import which, and no long functions.

    pipeline/  -> nothing of launch/ or model/      model/ -> nothing of the project
    launch/runstore/ -> pipeline/ only              (no models, no trainer, no release)
    launch/training/ and launch/release/ -> runstore, config, pipeline, model; never each other
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def imported(path: Path) -> set[str]:
    """Every module name `path` imports (absolute, at any depth: inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


RULES = [  # (folder, forbidden import prefixes)
    ("pipeline", ("launch", "model")),
    ("model", ("launch", "pipeline")),
    ("launch/runstore", ("launch.training", "launch.release", "launch.config", "launch.train", "model")),
    ("launch/training", ("launch.release", "launch.train")),
    ("launch/release", ("launch.training", "launch.train")),
]


@pytest.mark.parametrize("folder,forbidden", RULES, ids=[r[0] for r in RULES])
def test_no_import_runs_back_up(folder, forbidden):
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in files(folder) for name in sorted(imported(p))
           if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from launch.training import trainer\n")
    assert "launch.training.trainer" in imported(p)


def test_no_function_needs_scrolling():
    long = []
    for folder in ("pipeline", "model", "launch"):
        for p in files(folder):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these:\n" + "\n".join(long)


def test_one_atomic_write_and_one_file_hash():
    """Renames into place live in pipeline/atomic.py only, and no other module defines its own
    sha256-of-a-file or atomic-write helper (streaming digests of data being written are fine)."""
    found = []
    for folder in ("pipeline", "launch", "model"):
        for p in files(folder):
            if p.name in ("atomic.py", "hashing.py"):
                continue
            tree = ast.parse(p.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                        w in node.name.lower() for w in ("sha256", "atomic")):
                    found.append(f"{p.relative_to(ROOT)}: defines {node.name}")
                if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename") and \
                        isinstance(node.value, ast.Name) and node.value.id == "os":
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno}: os.{node.attr}")
    assert not found, "\n".join(found)
