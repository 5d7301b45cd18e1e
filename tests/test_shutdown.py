"""launch.shutdown.end: the entry points exit without the interpreter's last garbage collection,
and nothing a caller relies on at exit is lost."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import atexit, gc, sys
sys.path.insert(0, {root!r})

class Cyclic:
    def __init__(self):
        self.me = self  # only a garbage collection frees it
    def __del__(self):
        open({marker!r}, "w").write("finalised")

keep = Cyclic()
gc.collect()  # it survives into the oldest generation, which no automatic collection here reaches
del keep  # garbage now, for the exit's collection to find
atexit.register(lambda: open({atexit_file!r}, "w").write("ran"))
with open({data!r}, "w") as f:
    f.write("x" * 100000)
print("last words")  # block-buffered: stdout is a pipe
if {use_end}:
    from launch.shutdown import end
    end(3)
sys.exit(3)
"""


@pytest.mark.parametrize("use_end", [True, False])
def test_end_keeps_the_exit_status_output_and_atexit_and_skips_the_final_collection(tmp_path, use_end):
    paths = {k: str(tmp_path / k) for k in ("marker", "atexit_file", "data")}
    code = CHILD.format(root=str(ROOT), use_end=use_end, **paths)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == "last words\n", (r.returncode, r.stdout, r.stderr)
    assert Path(paths["atexit_file"]).read_text() == "ran"
    assert Path(paths["data"]).stat().st_size == 100000
    # The cycle was garbage before the exit: the plain exit's last collection finalises it, end()
    # leaves it to the operating system (the measure that the collection was skipped).
    assert Path(paths["marker"]).exists() == (not use_end)


def _main_blocks(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [ast.unparse(node) for node in tree.body if isinstance(node, ast.If)
            and ast.unparse(node.test) == "__name__ == '__main__'"]


def test_every_entry_point_that_loads_torch_or_mlflow_ends_through_end():
    """launch/ holds the commands that import torch, DeepSpeed or MLflow (pipeline/'s do not);
    but the code a registered model ships (registry.SHIPPED_MODULES, export.py among them) must
    import nothing else of the project, so export's CLI exits plainly."""
    from launch.release.registry import SHIPPED_MODULES

    shipped = {m.replace(".", "/") + ".py" for m in SHIPPED_MODULES}
    blocks = {p.relative_to(ROOT).as_posix(): _main_blocks(p) for p in sorted((ROOT / "launch").rglob("*.py"))}
    entry = {name: b for name, b in blocks.items() if b and name not in shipped}
    assert "launch/release/export.py" in shipped
    assert {"launch/train.py", "launch/release/evaluate.py", "launch/release/translate.py"} <= set(entry)
    assert [name for name, b in entry.items() if "end(main())" not in b[0]] == []
