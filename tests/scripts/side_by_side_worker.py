"""run_side_by_side's target in tests/test_gpu_matrix.py, in a module of its own that imports only
the standard library: each job is a spawned process that imports the target's module, and the test
module imports torch (seconds per process on a loaded machine; this module, a fraction of one), so
the tests' deadlines can stay short without a slow import making a ready job look late."""
import os
import time


def worker(conn, how):
    """'ready' times itself by sleeping, 'slow' is never ready in time, 'dies' ends without a
    word, 'fails' reports an error, 'hangs' is ready but never reports its timing."""
    if how == "slow":
        time.sleep(60)
    if how == "hangs":
        conn.send({"ready": 0.0})
        conn.recv()
        time.sleep(60)
    if how == "dies":
        os._exit(3)
    if how == "fails":
        conn.send({"error": "RuntimeError: no kernel"})
        return
    conn.send({"ready": 0.0})
    conn.recv()
    start = time.monotonic()
    time.sleep(0.3)
    conn.send({"span": (start, time.monotonic())})
