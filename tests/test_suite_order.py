"""The suite's own scheduling: the longest files start first (conftest.LONGEST_FIRST)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from conftest import LONGEST_FIRST, ROOT, pytest_collection_modifyitems


def items(*names: str) -> list:
    return [SimpleNamespace(path=ROOT / "tests" / n, nodeid=f"tests/{n}::t{i}") for i, n in enumerate(names)]


def test_listed_files_go_first_longest_first_and_the_rest_keep_their_order():
    first, second = LONGEST_FIRST[0], LONGEST_FIRST[1]
    got = items("test_a.py", second, "test_b.py", first, second, "test_a.py")
    pytest_collection_modifyitems(got)
    assert [Path(i.path).name for i in got] == [first, second, second, "test_a.py", "test_b.py", "test_a.py"]
    # within a file, the tests' own order is kept
    assert [i.nodeid for i in got][1:3] == [f"tests/{second}::t1", f"tests/{second}::t4"]


def test_every_listed_file_exists_once():
    # a renamed or removed file would silently fall back to the default order
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [n for n in LONGEST_FIRST if not (ROOT / "tests" / n).is_file()]
    assert not missing, missing


def test_make_test_keeps_the_collection_order():
    # without --no-loadscope-reorder xdist re-sorts the files by their number of tests
    recipes = re.findall(r"^\t.*pytest .*$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert recipes and all("--dist loadfile --no-loadscope-reorder" in r for r in recipes), recipes
