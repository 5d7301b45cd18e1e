"""The stall watchdog on its own: fires after the timeout without beats, never while beating, off at 0."""
import time

from launch.training.watchdog import EXIT_STALLED, StallWatchdog


def test_fires_when_no_step_finishes(capsys):
    codes = []
    w = StallWatchdog(0.3, rank=3, exit=codes.append)
    w.beat(41)
    w.start()
    time.sleep(1.0)
    w.stop()
    assert codes == [EXIT_STALLED]
    err = capsys.readouterr().err
    assert "rank 3" in err and "last finished step: 41" in err


def test_quiet_while_steps_finish():
    codes = []
    w = StallWatchdog(0.4, rank=0, exit=codes.append)
    w.start()
    for step in range(12):
        time.sleep(0.1)
        w.beat(step)
    w.stop()
    assert codes == []


def test_zero_disables_it():
    codes = []
    w = StallWatchdog(0, rank=0, exit=codes.append)
    w.start()
    time.sleep(0.2)
    w.stop()
    assert not w.enabled and codes == []
