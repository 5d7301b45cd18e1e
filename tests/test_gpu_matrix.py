"""bench/step.py --gpu-matrix, run as its CPU dry run (--device cpu): the table bench/gpu.sh prints,
--budget-s, which leaves out the cases that would start too late and says so in their rows, and
--parallel-compile, which compiles side by side and times one case at a time."""
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step  # noqa: E402
from launch.config import cpu_native_bf16  # noqa: E402
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from side_by_side_worker import worker  # noqa: E402
SMALL = ["--device", "cpu", "--sizes", "16", "--dim", "8", "--dis-dim", "8", "--precisions", "fp32", "bf16",
         "--compile", "off", "--repeats", "1", "--warmup", "0"]


# One torch thread per dry-run process: beside the suite's other worker, two threads per process
# spin-wait for each other (on 2 busy cores, 1.8x the wall time and 2.2x the CPU time).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def matrix(*extra):
    out = subprocess.run([sys.executable, "bench/step.py", "--gpu-matrix", *SMALL, *extra], cwd=ROOT,
                         env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 16 |")]
    return out, rows


def test_cases_past_the_budget_are_rows_that_say_so_and_do_not_fail_the_run():
    out, rows = matrix("--budget-s", "1e-9")  # spent before the first case already
    assert out.returncode == 0, out.stderr
    assert len(rows) == 2 and all("not run:" in r and "over --budget-s" in r for r in rows), rows
    assert "2 of 2 cases not run" in out.stdout


def test_every_case_is_a_measured_row():
    out, rows = matrix()
    assert out.returncode == 0, out.stderr
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "bf16"]
    assert all(r.rstrip().endswith("| yes |") for r in rows), rows  # losses finite


def check_profile_and_layouts(stdout: str) -> None:
    """--profile and --layouts, as bench/gpu.sh runs them: where an eager bf16 iteration goes,
    then per precision 2 layouts x 2 cudnn settings and the plain upsampling."""
    assert "Where one eager iteration goes (16 px, bf16, fused upsampling" in stdout and "a CPU dry run" in stdout
    # the top operations, by time: a convolution's backward (aten::convolution_backward, or on a CPU
    # without native bf16, where oneDNN leaves bf16 convolutions to ATen, aten::_slow_conv2d_backward)
    assert re.search(r"^\| aten::\w*conv\w*_backward \|", stdout, re.M), stdout.split("Where one eager")[1][:1500]
    # the plain upsampling block dispatches fewer operations than the fused one with its border fixes
    ops = {}
    for line in stdout.splitlines():
        if line.startswith("Where one eager iteration goes"):
            ops[line.split(", ")[2].split(";")[0]] = int(re.search(r"(\d+) aten operations", line)[1])
    assert set(ops) == {"fused upsampling", "plain upsampling"} and ops["plain upsampling"] < ops["fused upsampling"]
    layouts = stdout.split("Eager layouts")[1].split("\n\n")[0].splitlines()[3:]
    assert [r.split("|")[2].strip() for r in layouts] == ["bf16"] * 5 + ["fp32"] * 5, layouts
    assert [r.split("|")[5].strip() for r in layouts] == (["fused"] * 4 + ["plain"]) * 2, layouts


def test_side_by_side_times_ready_jobs_one_at_a_time_and_stops_the_late_one():
    t0 = time.monotonic()
    jobs = {"a": ("ready",), "late": ("slow",), "b": ("ready",), "dead": ("dies",),
            "bad": ("fails",), "c": ("ready",)}
    # each job is a spawned process that imports the worker's stdlib-only module: well under a
    # second each even on a busy machine, so 10 s is room enough; the slow job sleeps far past it
    results = step.run_side_by_side(jobs, worker, deadline=time.monotonic() + 10)
    assert list(results) == list(jobs)
    assert results["late"] == {"late": True}
    assert "exit code 3" in results["dead"]["error"]
    assert results["bad"] == {"error": "RuntimeError: no kernel"}
    spans = [results[j]["span"] for j in ("a", "b", "c")]
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans  # one at a time, in order
    assert time.monotonic() - t0 < 30  # the late job was stopped at the deadline, not waited for


def test_side_by_side_starts_at_most_at_once_jobs_and_the_rest_as_they_become_ready():
    jobs = {"s1": ("slow",), "r1": ("ready",), "s2": ("slow",), "r2": ("ready",)}
    results = step.run_side_by_side(jobs, worker, deadline=time.monotonic() + 10, at_once=2)
    # s1 and r1 start; r1's place goes to s2, and then no place is free for r2 before the deadline
    assert results == {"s1": {"late": True}, "r1": results["r1"], "s2": {"late": True}, "r2": {"late": True}}
    assert "span" in results["r1"]


def test_gpu_sh_runs_its_whole_flow_as_a_cpu_dry_run(tmp_path):
    """bench/gpu.sh with DEVICE=cpu: the corpus, the shards, a training run through the real
    launcher, the eager table, the profile, the layouts, the batch sweep, then two compiled cases
    (plain and CUDA graphs' mode) compiled side by side and timed one at a time: what a lease
    runs, checked before one."""
    env = {**ONE_THREAD, "DEVICE": "cpu", "PY": sys.executable, "SIZES": "16", "DIM": "8", "DIS_DIM": "8",
           "PRECISIONS": "fp32", "TRAIN_PRECISIONS": "bf16", "TRAIN_SIZE": "32", "TRAIN_DIM": "8",
           "TRAIN_IMAGES": "24", "STEPS": "2",
           "COMPILES": "off on graphs", "COMPILE_BACKEND": "eager", "BATCH_SWEEP": "16", "REPEATS": "1", "WARMUP": "1",
           "LOG_DIR": str(tmp_path / "logs")}  # made if missing
    out = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    train = [line for line in out.stdout.splitlines() if line.startswith("| bf16, official, 32 px")]
    assert len(train) == 1 and "| 2 of 2 |" in train[0] and train[0].rstrip().endswith("| yes |"), train
    assert train[0].startswith("| bf16, official, 32 px, batch 8, width 8 |"), train
    log = (tmp_path / "logs" / "train-bf16.log").read_text()
    # bf16 through the real launcher on CPU ranks: warned about exactly where the CPU lacks bf16 instructions
    assert ("train.precision is bf16 on a CPU without bf16 instructions" in log) == (not cpu_native_bf16()), log[-2000:]
    check_profile_and_layouts(out.stdout)
    table = [line for line in out.stdout.splitlines() if line.startswith("| 16 | fp32 |")][5:]  # after the layouts
    assert [r.split("|")[3].strip() for r in table] == ["off", "on", "on, CUDA graphs"]
    assert all(r.rstrip().endswith("| yes |") for r in table), table  # measured, losses finite
    sweep = itertools.takewhile(lambda line: line.startswith("|"),
                                out.stdout.split("by batch per domain")[1].splitlines()[1:])
    assert [line.split("|")[1].strip() for line in list(sweep)[2:]] == ["8", "16"]  # the table's batch, the swept one
    assert "compiling 2 cases side by side, 2 at a time" in out.stdout and "exit status 0" in out.stdout
    assert "preset official, dim 8, discriminator width 8, batch 8 per domain" in out.stdout


def test_a_job_that_hangs_while_timed_is_an_error_row_within_the_timing_budget():
    jobs = {"r1": ("ready",), "stuck": ("hangs",), "r2": ("ready",)}
    t0 = time.monotonic()
    results = step.run_side_by_side(jobs, worker, deadline=time.monotonic() + 20, timing_s=3)
    assert "span" in results["r1"]
    assert results["stuck"] == {"error": "no result within the 3 s for timing"}
    assert results["r2"] == {"error": "not timed: the 3 s for timing had run out"}
    assert time.monotonic() - t0 < 20  # not the 60 s the stuck job would take
