"""An import stopped by SIGKILL midway, then run again: the store holds every input once, the
metadata view shows every stored instance once, and nothing temporary is left anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import stored_instances
from tests.synthetic import fresh_copies

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = 1500
IMPORT = ["--input=in/*.dcm", "--store=store", "--metadata_destination=meta"]


def start(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.import_dicom", *IMPORT],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
    )  # fmt: skip


def kill_when_stored(run: subprocess.Popen, store: Path, count: int) -> None:
    """SIGKILL the run once the store holds at least `count` instances."""
    deadline = time.monotonic() + 300
    while sum(1 for _ in store.glob("studies/*/series/*/instances/*.dcm")) < count:
        assert run.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.communicate()


def finish(cwd: Path) -> dict:
    run = start(cwd)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def view_keys(table: Path) -> list[tuple[str, str, str]]:
    query = (table / "view.sql").read_text()
    keys = "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID"
    return _at(table).sql(f"SELECT {keys} FROM ({query})").fetchall()


def table_rows(table: Path) -> int:
    return _at(table).sql("SELECT count(*) FROM read_parquet('*.parquet')").fetchall()[0][0]


def _at(directory: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute(f"SET file_search_path = '{directory}'")
    return connection


def leftovers(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if ".dicom-etl-tmp" in p.parts or p.name.startswith("beam-temp")]


@pytest.mark.parametrize("kills", [1, 2])
def test_a_killed_import_run_again_stores_everything_once_with_one_current_row_each(
    kills: int, tmp_path: Path
) -> None:
    fresh_copies(Path(get_testdata_file("CT_small.dcm")), INSTANCES, tmp_path / "in")
    for number in range(kills):
        kill_when_stored(start(tmp_path), tmp_path / "store", (number + 1) * INSTANCES // 3)

    summary = finish(tmp_path)

    stored = stored_instances(tmp_path / "store")  # whole: one file and one index entry each
    assert len(stored) == INSTANCES
    assert summary["already_present"] + summary["success"] == INSTANCES
    keys = view_keys(tmp_path / "meta")
    assert len(keys) == len(set(keys)) == INSTANCES
    assert {sop for _, _, sop in keys} == set(stored)
    assert not leftovers(tmp_path)

    rows = table_rows(tmp_path / "meta")
    again = finish(tmp_path)  # a clean re-run adds no row
    assert (again["already_present"], again["metadata_rows"]) == (INSTANCES, 0)
    assert table_rows(tmp_path / "meta") == rows


def test_leftover_staging_files_of_dead_runs_go_and_a_live_run_keeps_its_own(tmp_path: Path) -> None:
    """What a killed run left is removed by the next run; a concurrent run's files are not, even when
    it has not touched them for a while (a spool waits for the last destination), and a file older
    than its pid's process was left by an earlier process with that pid."""
    from storage.staging import HOST, STAGING, STALE_AFTER, clean_staging

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(finished.stdout)
    running = subprocess.Popen(["sleep", "60"])  # a concurrent run
    time.sleep(3)
    staging = tmp_path / STAGING
    staging.mkdir()
    dead = staging / f"{HOST}.{dead_pid}.0a"
    live = staging / f"{HOST}.{running.pid}.0b"
    reused = staging / f"{HOST}.{running.pid}.0e"
    other_host_recent = staging / f"elsewhere.{dead_pid}.0c"
    other_host_old = staging / f"elsewhere.{dead_pid}.0d"
    for path in (dead, live, reused, other_host_recent, other_host_old):
        path.write_bytes(b"half a file")
    os.utime(other_host_old, (time.time() - STALE_AFTER - 60,) * 2)
    os.utime(reused, (time.time() - 60,) * 2)
    dead_spool = staging / f"{HOST}.{dead_pid}.export_metadata-1-rows"  # a run's spooled rows
    live_spool = staging / f"{HOST}.{running.pid}.export_metadata-2-rows"
    for spool in (dead_spool, live_spool):
        spool.mkdir()
        (spool / "0a.pickle.z").write_bytes(b"rows")
    for path in (live, live_spool):
        os.utime(path, (time.time() - 2,) * 2)

    try:
        assert clean_staging(str(tmp_path)) == 4
    finally:
        running.kill()
        running.wait()

    assert sorted(staging.iterdir()) == sorted([live, other_host_recent, live_spool])


def test_temporary_copies_of_a_killed_process_go_at_the_next_spool() -> None:
    """Downloads and transcoded files live in a staging directory of their own; a process killed
    while it held one leaves it there, and the next process's first spool removes it."""
    script = (
        "import os, time; from storage.staging import spool_file\n"
        "with spool_file() as path:\n"
        "    open(path, 'wb').write(b'half an instance'); print(path, flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
    )  # fmt: skip
    left = Path(holder.stdout.readline().strip())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert left.exists()

    cleaner = "from storage.staging import spool_file\nwith spool_file(): pass\n"
    subprocess.run([sys.executable, "-c", cleaner], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})

    assert not left.exists()


def test_temporary_copies_live_in_a_directory_only_their_user_may_use(tmp_path: Path) -> None:
    """Spools hold patients' headers and pixels: their root in the temporary directory is the
    user's own (0700); one that others may use, or that is not a directory, stops the run."""
    spool = "from storage.staging import spool_file\nwith spool_file(): pass\n"
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}
    root = tmp_path / f"dicom-etl-{os.getuid()}"

    subprocess.run([sys.executable, "-c", spool], check=True, cwd=ROOT, env=env)
    assert root.stat().st_mode & 0o777 == 0o700 and not list(root.iterdir())

    root.chmod(0o755)  # as another user's process could have made it
    refused = subprocess.run([sys.executable, "-c", spool], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and f"{root} must be a directory of this user's" in refused.stderr
