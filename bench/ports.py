"""A free TCP port on 127.0.0.1 for a server or a rendezvous that a script starts next.

Shared by the benchmarks that launch DeepSpeed, an MLflow or an S3 server, and by the tests'
launch helpers (tests/trainutil.py).
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

_PORTS: set[int] = set()  # every port handed out by this process
_RNG = random.Random()  # its own stream: callers seed the global one


def ephemeral_low() -> int:
    """Where the kernel's range for ports bound to 0 and for outgoing connections starts (Linux; its
    default elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port on 127.0.0.1 below the ephemeral range, never one handed out before by this
    process (launches started close together must not meet on a rendezvous port).
    Not a port bound to 0: that one comes from the range every outgoing connection draws from, and
    between this check and the launcher's bind a client socket (S3, MLflow) took one once
    (EADDRINUSE at the rendezvous). Below the range only an explicit bind takes a port."""
    top = ephemeral_low()
    while True:
        port = _RNG.randrange(max(1024, top - 12000), top)
        if port in _PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # someone's fixed port: try another
                continue
        _PORTS.add(port)
        return port


def handed_out() -> frozenset[int]:
    """The ports free_port has returned in this process (to clean up what launches on them left)."""
    return frozenset(_PORTS)
