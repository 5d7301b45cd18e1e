"""Stall watchdog: a rank whose training loop stops making progress ends itself.

A node that vanishes without closing its connections (power loss, a network partition, a frozen
host) leaves every other rank blocked in a collective until torch.distributed's process-group
timeout (30 min by default). Shortening that timeout also cuts short the start-up rendezvous of
slow nodes, so instead each rank watches its own loop: when no step has finished for
`timeout_s`, it prints why and exits, and the DeepSpeed launcher then stops the job, which can
be relaunched and resumes from the last complete checkpoint.

Steps that do known slow work once, such as torch.compile's lazy compile in the first step of a
launch, get an allowance on top of the timeout (`start(allowance_s, until_step)`): they are still
watched, so a hang there ends the rank too, only later.
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
        self._allowance_s, self._until_step = 0.0, 0
        self._stop = threading.Event()
        self._thread = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self, allowance_s: float = 0.0, until_step: int = 0) -> None:
        """Watch from now on; the steps up to `until_step` may take `allowance_s` longer."""
        if not self.enabled or self._thread is not None:
            return
        self._allowance_s, self._until_step = float(allowance_s), until_step
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

    def limit_s(self) -> float:
        """How long the step in progress (the one after the last finished) may take."""
        in_allowance = self._step is None or self._step < self._until_step
        return self.timeout_s + (self._allowance_s if in_allowance else 0.0)

    def _watch(self) -> None:
        interval = min(5.0, max(0.05, self.timeout_s / 10))
        while not self._stop.wait(interval):
            idle, limit = time.monotonic() - self._last, self.limit_s()
            if idle > limit:
                extra = f" + {self._allowance_s:g} s allowed for compiling" if limit > self.timeout_s else ""
                print(f"error: rank {self.rank}: no training step finished in {idle:.0f} s (last finished step: "
                      f"{self._step}; train.stall_timeout_s={self.timeout_s:g}{extra}). A peer is probably gone "
                      f"without closing its connections (node lost, network partition) or frozen. Exiting so the "
                      f"launcher stops the job; run the same command again to resume from the last complete "
                      f"checkpoint.", file=sys.stderr, flush=True)
                self._exit(EXIT_STALLED)
                return
