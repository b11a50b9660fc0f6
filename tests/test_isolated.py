"""Native code that crashes, hangs or panics on a hostile file costs that file, not the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicomlib.failures import ItemFailed
from dicomlib.isolated import Isolated

ROOT = Path(__file__).resolve().parents[1]


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)  # what a codec's buffer overrun does


def hang() -> None:
    time.sleep(3600)


def fail() -> None:
    raise ValueError("not a frame")


def add(a: int, b: int) -> int:
    return a + b


def test_a_crash_a_hang_and_an_error_each_fail_one_call_and_the_next_call_works() -> None:
    isolated = Isolated("cannot_convert")
    try:
        assert isolated.call(add, 2, 3, timeout=60) == 5
        with pytest.raises(ItemFailed, match="killed by SIGSEGV") as crashed:
            isolated.call(crash, timeout=60)
        assert crashed.value.reason == "cannot_convert"
        with pytest.raises(ItemFailed, match="no answer within 1 s"):
            isolated.call(hang, timeout=1)
        with pytest.raises(ItemFailed, match="ValueError: not a frame"):
            isolated.call(fail, timeout=60)
        assert isolated.call(add, 4, 5, timeout=60) == 9
    finally:
        isolated.close()


@pytest.mark.parametrize("file_type", ["png", "octet-stream"])
def test_a_codec_panic_is_one_dead_letter_and_the_rest_is_exported(file_type: str, tmp_path: Path) -> None:
    """pylibjpeg-rle panics (a BaseException, and Rust's message on stderr) on MR_small_RLE.dcm with
    one bit flipped; the export still ends with its summary and only our lines on stderr."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    flipped = bytearray(Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes())
    flipped[2112] ^= 0x04
    (inbox / "flipped.dcm").write_bytes(bytes(flipped))
    (inbox / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    environment = {"PYTHONPATH": str(ROOT), "PATH": "", "RUST_BACKTRACE": "1"}

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", f"pipelines.{name}", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment,
        )  # fmt: skip

    assert run("import_dicom", "--input=in/*.dcm", "--store=store").returncode == 0
    done = run("export_dicom", "--store=store", "--output=out", f"--file_type={file_type}")
    assert done.returncode == 3
    assert "panicked" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["success"], summary["failure_reasons"]) == (1, {"cannot_convert": 1})
    [dead_letter] = (tmp_path / "dead_letter").glob("export*.jsonl")
    [record] = [json.loads(line) for line in dead_letter.open()]
    assert "PanicException" in record["detail"] and "RLE Lossless" in record["detail"]
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 1  # the CT's file, and nothing of the other
