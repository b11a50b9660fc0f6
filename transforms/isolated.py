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

import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from transforms.failures import ItemFailed, item_failure


class Isolated:
    """One child process; `call` runs a module-level function there and returns its result."""

    def __init__(self, reason: str) -> None:
        self.reason = reason  # the dead letter's reason when the child crashes or hangs
        self.process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None

    def call(self, function: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """function(*args) in the child; ItemFailed if it raises, crashes or takes over `timeout`
        seconds (the child is then killed, and the next call starts another)."""
        if self.process is None or not self.process.is_alive():
            self._start()
        assert self.connection is not None
        self.connection.send((function, args))
        if not self.connection.poll(timeout):
            self.close()
            raise ItemFailed(self.reason, f"no answer within {timeout:.0f} s: the process was stopped")
        try:
            succeeded, value = self.connection.recv()
        except (EOFError, OSError):
            raise ItemFailed(self.reason, f"the converting process died ({self._end()})") from None
        if succeeded:
            return value
        raise value

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        self._end()

    def _start(self) -> None:
        self._end()
        parent, child = multiprocessing.get_context("spawn").Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(child, self.reason), daemon=True
        )
        self.process.start()
        child.close()
        self.connection = parent

    def _end(self) -> str:
        """Reap the child; how it ended."""
        process, self.process = self.process, None
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if process is None:
            return "not started"
        process.join(5)
        code = process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


def _serve(connection: Connection, reason: str) -> None:
    """The child: answer calls until the parent goes away; errors come back as ItemFailed."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send((True, function(*args)))
        except BaseException as error:  # item_failure re-raises interrupts: the child then ends
            failed = item_failure(error, reason)
            connection.send((False, ItemFailed(failed.reason, failed.detail)))
