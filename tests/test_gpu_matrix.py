"""bench/step.py --gpu-matrix, run as its CPU dry run (--device cpu): the table bench/gpu.sh prints,
and --budget-s, which leaves out the cases that would start too late and says so in their rows."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--sizes", "16", "--dim", "8", "--precisions", "fp32", "bf16", "--compile", "off",
         "--repeats", "1", "--warmup", "0"]


def matrix(*extra):
    out = subprocess.run([sys.executable, "bench/step.py", "--gpu-matrix", *SMALL, *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 16 |")]
    return out, rows


def test_cases_past_the_budget_are_rows_that_say_so_and_do_not_fail_the_run():
    out, rows = matrix("--budget-s", "1e-9")  # spent before the first case already
    assert out.returncode == 0, out.stderr
    assert len(rows) == 2 and all("not run:" in r and "over --budget-s" in r for r in rows), rows
    assert "2 of 2 cases not run" in out.stdout


def test_every_case_is_a_measured_row_then_the_profile_and_the_layouts():
    out, rows = matrix("--profile", "--layouts")
    assert out.returncode == 0, out.stderr
    assert [r.split("|")[2].strip() for r in rows[:2]] == ["fp32", "bf16"]
    assert all(r.rstrip().endswith("| yes |") for r in rows[:2]), rows  # losses finite
    assert "Where one eager iteration goes (16 px, bf16, fused upsampling" in out.stdout and "a CPU dry run" in out.stdout
    assert "| aten::convolution_backward |" in out.stdout  # the top operations, by time
    # the plain upsampling block dispatches fewer operations than the fused one with its border fixes
    ops = {}
    for line in out.stdout.splitlines():
        if line.startswith("Where one eager iteration goes"):
            ops[line.split(", ")[2].split(";")[0]] = int(re.search(r"(\d+) aten operations", line)[1])
    assert set(ops) == {"fused upsampling", "plain upsampling"} and ops["plain upsampling"] < ops["fused upsampling"]
    # the matrix's two rows, then per precision: 2 layouts x 2 cudnn settings, and the plain upsampling
    assert len(rows) == 2 + 10
    assert [r.split("|")[5].strip() for r in rows[2:7]] == ["fused"] * 4 + ["plain"]
