"""Stopping a run cleanly: SIGINT and SIGTERM (what schedulers send before killing a job) ask
the loop to finish its step and write a checkpoint; a second signal stops at once."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (after a checkpoint, unless stopped at once);
    ``exit_code`` is 128 + the signal number, ``message`` says how to resume."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


class StopSignals:
    """While training: the first SIGINT or SIGTERM asks the loop to stop after the current step
    (`signum` is set); a second one stops at once (`TrainingInterrupted`, no checkpoint).
    Installed only in the main thread; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    #: a repeat within this many seconds is the same request delivered twice (to the process
    #: group and by a launcher such as torchrun), not a second one
    REPEAT_S = 1.0

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._saved: dict[int, Any] = {}
        self._when = 0.0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self._when < self.REPEAT_S:
                return
            raise TrainingInterrupted(f"{name} again: stopped at once, without writing a "
                                      "checkpoint (the last one written is intact)",
                                      128 + signum)
        self.signum = signum
        self._when = time.monotonic()
        if self.announce:
            print(f"localearn: {name}: finishing the current step, then writing a checkpoint "
                  f"(send {name} again to stop at once)", file=sys.stderr, flush=True)
