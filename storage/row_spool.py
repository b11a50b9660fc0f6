"""Spooled metadata rows: where a run keeps its rows between the pass that learns the table's
schema and the pass that writes them, so that no runner holds every row of the run in memory (the
direct runner keeps whatever crosses from one stage to the next in memory; a row with its own
schema is tens of KB).

Each spool is a directory in the staging directory of its root: the local temporary directory on
the direct runner, `--temp_location` on a distributed one (its workers share no disk). It is named
for the host and launching process like a staging file: the run removes it when its destinations
are written, a failed local run at its end, and what a killed local run left is removed by a later
run's `clean_staging` once the launching process is gone.
"""

from __future__ import annotations

import glob
import os
import pickle
import shutil
import uuid
import zlib
from typing import NamedTuple

from schemas.rows import Flat
from storage.objects import join, read_bytes, write_bytes
from storage.staging import HOST, SPOOL_ROOT, STAGING, remove_empty_spool_root


class Spooled(NamedTuple):
    path: str
    schema: list[dict]  # the rows' schemas merged


def spool_directory(root: str, run: str) -> str:
    """A new spool directory of this run under `root`, one for each set of destinations written (an
    import writes each destination on its own); only named here, made when rows are spooled."""
    return join(root, STAGING, f"{HOST}.{os.getpid()}.{run}-{uuid.uuid4().hex[:8]}-rows")


def write_spool(directory: str, flats: list[Flat]) -> str:
    """One spool file of `flats`; its path. The spool holds only what this run wrote itself."""
    path = join(directory, f"{uuid.uuid4().hex}.pickle.z")
    data = zlib.compress(pickle.dumps(flats, protocol=pickle.HIGHEST_PROTOCOL), 1)
    write_bytes(path, data, root=directory)
    return path


def read_spool(path: str) -> list[Flat]:
    """The rows of one spool file."""
    return pickle.loads(zlib.decompress(read_bytes(path)))


def remove_local_spools() -> None:
    """The spools this process's local runs left under SPOOL_ROOT, kept or not by how each ended
    (a failed run's spool is of no further use)."""
    for path in glob.glob(os.path.join(SPOOL_ROOT, STAGING, f"{HOST}.{os.getpid()}.*-rows")):
        shutil.rmtree(path, ignore_errors=True)
    remove_empty_spool_root()
