"""bench/ports.py: the port picker the benchmarks and the launch tests share."""
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ports  # noqa: E402


def test_ports_are_below_the_ephemeral_range_bindable_and_never_repeated():
    got = [ports.free_port() for _ in range(40)]
    assert len(set(got)) == len(got)
    assert all(1024 <= p < ports.ephemeral_low() for p in got)
    assert set(got) <= ports.handed_out()
    for p in got[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # raises if the picker handed out a taken port


class Scripted:
    """Stands in for the picker's random stream: these ports first, in order."""
    def __init__(self, *seq):
        self.seq = list(seq)

    def randrange(self, lo, hi):
        return self.seq.pop(0)


def test_a_taken_port_and_one_already_handed_out_are_skipped(monkeypatch):
    before = ports.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # taken for the rest of this test
        taken = held.getsockname()[1]
        fresh = next(p for p in range(ports.ephemeral_low() - 1, 1024, -1)
                     if p not in ports.handed_out() and p != taken and bindable(p))
        monkeypatch.setattr(ports, "_RNG", Scripted(before, taken, fresh))
        assert ports.free_port() == fresh


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
