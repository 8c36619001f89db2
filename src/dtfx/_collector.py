"""The garbage collector's pace while a worker (or a sidecar server) runs.

Python's cyclic garbage collector collects its youngest generation after every 700 net
allocations of container objects, and what survives two such collections moves on to the
oldest generation, whose full collections go through every live object. A worker with
orchestrations in flight allocates at that pace all the time, and almost nothing it makes
is cyclic garbage (reference counting frees it): in the sequence workload (hello-cities
orchestrations started at once) the collector took 14% of the time with 1,000 in flight
and 29% with 20,000, then in 53 full collections of 73-125 ms each.

So while a worker runs, the youngest generation's threshold is 10,000, if the process
still has Python's default thresholds: young objects then mostly die before a collection
looks at them, and few reach the oldest generation. A process that has set its own
thresholds keeps them, and the defaults come back when the last worker stops. The gRPC
sidecar server holds the same pace while it runs (a worker for SDK workers).
"""

from __future__ import annotations

import gc
import threading

PYTHON_DEFAULT = (700, 10, 10)
"""CPython's thresholds, the only ones this module changes."""
WHILE_RUNNING = (10_000, 10, 10)
"""The thresholds while a worker runs."""

_lock = threading.Lock()
_holders = 0
_raised = False


class Hold:
    """A worker's (or a server's) hold on the pace: taken at most once, and given back only
    if taken, however often its owner starts and stops."""

    def __init__(self) -> None:
        self._held = False

    def take(self) -> None:
        """The owner starts: raise the threshold, unless the process has thresholds of its own."""
        if not self._held:
            _hold()
            self._held = True

    def give_back(self) -> None:
        """The owner stops: the last holder puts Python's defaults back, unless the process has
        set other thresholds meanwhile."""
        if self._held:
            _release()
            self._held = False


def _hold() -> None:
    global _holders, _raised
    with _lock:
        _holders += 1
        if not _raised and gc.get_threshold() == PYTHON_DEFAULT:
            gc.set_threshold(*WHILE_RUNNING)
            _raised = True


def _release() -> None:
    global _holders, _raised
    with _lock:
        _holders -= 1
        if _holders == 0 and _raised:
            if gc.get_threshold() == WHILE_RUNNING:
                gc.set_threshold(*PYTHON_DEFAULT)
            _raised = False
