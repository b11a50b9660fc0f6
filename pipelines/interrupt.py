"""Ctrl-C during a local run: exit 1's line and JSON at once, and no worker process left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from transforms import progress


@contextlib.contextmanager
def exit_on_interrupt(report: Callable[[], int]) -> Iterator[None]:
    """Ctrl-C during a run: report (exit 1's line and JSON), stop the worker processes and exit at
    once. Beam would turn a KeyboardInterrupt into tearing down every DoFn, which waits for their
    requests in flight (and their retries) to end.

    Python runs a signal handler in the main thread only, once that is back from what blocks it
    (possibly a long wait); so a watcher thread learns of SIGINT through the signal wake-up socket,
    whichever thread the signal reaches. Only the main thread can set this up: elsewhere (a run
    inside a bigger program) the run keeps Python's default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    once = threading.Lock()
    finished = threading.Event()

    def stop(*_: object) -> None:
        if once.acquire(blocking=False):
            status = report()
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (Beam's threads die loudly with their workers)
            _stop_worker_processes()
            os._exit(status)

    def watch() -> None:
        while not finished.is_set():
            if signal.SIGINT in receiver.recv(64) and not finished.is_set():
                stop()

    receiver, sender = socket.socketpair()
    receiver.setblocking(True)  # waits for ever, whatever socket.setdefaulttimeout() a library has set
    sender.setblocking(False)
    wakeup = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    handler = signal.signal(signal.SIGINT, stop)
    watcher = threading.Thread(target=watch, name="dicom-etl-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        sender.send(b"\0")  # ends the watcher's wait
        watcher.join()
        signal.signal(signal.SIGINT, handler)
        signal.set_wakeup_fd(wakeup)
        receiver.close()
        sender.close()


def _stop_worker_processes() -> None:
    """Kill the processes started during the run (the worker processes of
    `--direct_running_mode=multi_processing`), known by the environment they inherit. Linux (/proc)
    only; elsewhere they end when they notice that the launcher is gone."""
    marker = f"{progress.LAUNCHER}={os.getpid()}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(environ.parent.name)
            if pid != os.getpid() and marker in environ.read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
