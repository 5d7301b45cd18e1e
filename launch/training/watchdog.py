"""Stall watchdog: a rank whose training loop stops making progress ends itself.

A node that vanishes without closing its connections (power loss, a network partition, a frozen
host) leaves every other rank blocked in a collective until torch.distributed's process-group
timeout (30 min by default). Shortening that timeout also cuts short the start-up rendezvous of
slow nodes, so instead each rank watches its own loop: when no step has finished for
`timeout_s`, it prints why and exits, and the DeepSpeed launcher then stops the job, which can
be relaunched and resumes from the last complete checkpoint.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STALLED = 6


class StallWatchdog:
    """Always built; `timeout_s <= 0` makes every call a no-op, so the loop needs no conditionals."""

    def __init__(self, timeout_s: float, rank: int, exit=os._exit):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self._exit = exit  # os._exit: a rank stuck in a collective cannot unwind normally
        self._last = time.monotonic()
        self._step = None
        self._stop = threading.Event()
        self._thread = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self._step = step
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        interval = min(5.0, max(0.05, self.timeout_s / 10))
        while not self._stop.wait(interval):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(f"error: rank {self.rank}: no training step finished in {idle:.0f} s (last finished step: "
                      f"{self._step}; train.stall_timeout_s={self.timeout_s:g}). A peer is probably gone without "
                      f"closing its connections (node lost, network partition) or frozen. Exiting so the "
                      f"launcher stops the job; run the same command again to resume from the last complete "
                      f"checkpoint.", file=sys.stderr, flush=True)
                self._exit(EXIT_STALLED)
                return
