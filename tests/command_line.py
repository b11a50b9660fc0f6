"""Running a pipeline as a user does: `python -m pipelines.X` or `dicom-etl X`, as a subprocess of
this interpreter (the project's .venv), in a working directory of its own and with a temporary
directory of its own (where a run's log file goes), so that a test sees everything a run writes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
ENTRIES = ("module", "script")  # python -m pipelines.X, dicom-etl X


PROGRESS_LINE = re.compile(r"[a-z_]+: \d+:\d\d:\d\d elapsed; ")  # pipelines/progress_lines.py


def command(entry: str, pipeline: str) -> list[str]:
    """The command line of `pipeline`; with the script, "" is no pipeline: `dicom-etl` alone, or
    `dicom-etl --help` with the flag as the pipeline."""
    if entry == "module":
        return [sys.executable, "-m", f"pipelines.{pipeline}"]
    return [str(Path(sys.executable).parent / "dicom-etl"), *([pipeline] if pipeline else [])]


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def out(self) -> list[str]:
        return self.stdout.splitlines()

    @property
    def err(self) -> list[str]:
        """What the run said on stderr, but its progress lines: a run that a loaded machine makes last
        over ten seconds prints them too, and they say nothing went wrong."""
        return [line for line in self.stderr.splitlines() if not PROGRESS_LINE.match(line)]

    @property
    def summary(self) -> dict:
        """The last stdout line, the run's JSON summary."""
        return json.loads(self.out[-1])


class Place:
    """A working directory and a temporary directory for one command's runs."""

    def __init__(self, root: Path) -> None:
        self.cwd = root / "work"
        self.tmp = root / "tmp"
        self.cwd.mkdir()
        self.tmp.mkdir()

    def env(self, **extra: str) -> dict[str, str]:
        keep = {
            key: os.environ[key] for key in ("PATH", "HOME", "STORAGE_EMULATOR_HOST") if key in os.environ
        }
        return keep | {"TMPDIR": str(self.tmp), "PYTHONPATH": str(ROOT)} | extra

    def run(self, entry: str, pipeline: str, *args: str, timeout: float = 300, **env: str) -> Result:
        done = subprocess.run(
            [*command(entry, pipeline), *args],
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=self.env(**env),
            timeout=timeout,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def start(self, entry: str, pipeline: str, *args: str, **env: str) -> subprocess.Popen[str]:
        """A run in its own session, as a terminal's foreground job is, for Ctrl-C (`interrupt`)."""
        return subprocess.Popen(
            [*command(entry, pipeline), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.cwd,
            env=self.env(**env),
            start_new_session=True,
        )

    def written(self) -> list[str]:
        """Everything in the working and temporary directories."""
        return sorted(str(path.relative_to(self.cwd.parent)) for path in self.cwd.parent.rglob("*"))


def interrupt(process: subprocess.Popen[str], timeout: float = 60) -> Result:
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group. The pipes
    close only when every process that holds them is gone, workers included."""
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=timeout)
    return Result(process.returncode, stdout, stderr)


def interrupted_import(place: Place, store: SilentServer, mode: str, after: float, **env: str) -> Result:
    """An import of the sample into a store that never answers, in `--direct_running_mode=mode`
    with two workers, interrupted `after` seconds after its first request."""
    process = place.start(
        "script",
        "import_dicom",
        f"--input={SAMPLE}/**.dcm",
        f"--store={store.url}",
        f"--direct_running_mode={mode}",
        "--direct_num_workers=2",
        **env,
    )
    assert store.connected.wait(120), "the run never reached the store"
    time.sleep(after)
    return interrupt(process)


class SilentServer:
    """A TCP server on loopback that accepts connections and never answers: a DICOMweb store that
    hangs, so that a run is still going when a test interrupts it."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/dicom-web"
        self.connected = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.socket.accept()
                self.connections.append(connection)
                self.connected.set()

    def close(self) -> None:
        for connection in [*self.connections, self.socket]:
            connection.close()
