"""SIGTERM and SIGINT (preemption, Ctrl-C) end a run with a checkpoint instead of losing it.

The handler only records the signal. The loop adds "stop requested" to the all_reduce it
already does each step, so one signalled rank is enough for every rank to stop after the
same step, save together and exit 0. A second SIGINT interrupts at once (the default).
Under torchrun a signalled agent passes SIGTERM to its workers and gives them some 30 s
before SIGKILL, which the save must fit in.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set `signal_name` instead of killing the process."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C means "now"
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
