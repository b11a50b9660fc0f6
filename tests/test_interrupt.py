"""Ctrl-C's watcher keeps watching whatever default socket timeout a library has set."""

from __future__ import annotations

import socket
import threading
import time

from pipelines.interrupt import exit_on_interrupt


def test_the_interrupt_watcher_outlives_a_default_socket_timeout() -> None:
    """Google's clients set socket.setdefaulttimeout(); the watcher's wait must not time out with it."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.05)
    try:
        with exit_on_interrupt(lambda: 0):
            time.sleep(0.5)
            watchers = [t for t in threading.enumerate() if t.name == "dicom-etl-interrupt"]
            assert watchers and all(t.is_alive() for t in watchers)
    finally:
        socket.setdefaulttimeout(previous)
