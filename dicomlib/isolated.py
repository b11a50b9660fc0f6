"""Run calls into native code in a child process, so that what a hostile file does to a codec stays
with that file.

A codec is C or Rust: on crafted input it may panic (and print to the process's stderr), crash
the process outright (a segfault), or never return. In the worker itself any of these would end
the whole run with no summary. Here a crash or a hang costs the one item its `reason` dead letter
and a new child; the child's stdout and stderr go to /dev/null (the item's dead letter says what
failed). The child is started once and reused, one call at a time; calls pass paths and small
values, not instance bytes.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from dicomlib.failures import ItemFailed, RunFailed, item_failure

TIME_ALLOWED_SECONDS = 600  # the most one call may take, plus TIME_ALLOWED_SECONDS_PER_MB of its file
TIME_ALLOWED_SECONDS_PER_MB = 10


def time_allowed(size: int) -> float:
    """Seconds a call on a file of `size` bytes may take before its child is stopped."""
    return TIME_ALLOWED_SECONDS + TIME_ALLOWED_SECONDS_PER_MB * size / 1e6


class Isolated:
    """One child process; `call` runs a module-level function there and returns its result.

    The child is a fresh interpreter running this module (not a fork of the worker, and without
    the worker's main module), so it holds only what the calls import.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason  # the dead letter's reason when the child crashes or hangs
        self.process: subprocess.Popen | None = None
        self.connection: Connection | None = None

    def call(self, function: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """function(*args) in the child; ItemFailed if it raises, crashes or takes over `timeout`
        seconds (the child is then killed, and the next call starts another)."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        assert self.connection is not None
        try:
            self.connection.send((function, args))
            if not self.connection.poll(timeout):
                self.close()
                raise ItemFailed(self.reason, f"no answer within {timeout:.0f} s: the process was stopped")
            succeeded, value = self.connection.recv()
        except (EOFError, OSError):
            raise ItemFailed(self.reason, f"the isolated process died ({self._end()})") from None
        if succeeded:
            return value
        raise value

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._end()

    def _start(self) -> None:
        self._end()
        mine, theirs = socket.socketpair()
        for end in (mine, theirs):  # blocking, whatever socket.setdefaulttimeout() a library has set
            end.setblocking(True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), self.reason],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        theirs.close()
        self.connection = Connection(mine.detach())

    def _end(self) -> str:
        """Reap the child; how it ended."""
        process, self.process = self.process, None
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if process is None:
            return "not started"
        try:
            code = process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


def _serve(connection: Connection, reason: str) -> None:
    """The child: answer calls until the parent goes away; errors come back as ItemFailed."""
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send((True, function(*args)))
        except RunFailed as error:  # not this item's: the parent ends the run with it
            connection.send((False, RunFailed(str(error))))
        except BaseException as error:  # item_failure re-raises interrupts: the child then ends
            failed = item_failure(error, reason)
            connection.send((False, ItemFailed(failed.reason, failed.detail)))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), sys.argv[2])
