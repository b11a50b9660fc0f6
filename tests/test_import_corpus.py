"""Importing the whole corpus: every file ends stored or dead-lettered, as dcmtk says it should."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from dicomlib.uids import valid_uid
from tests.conftest import Run, run_import, stored_instances
from tests.gcs_emulator import upload_tree

UID_TAGS = {"0020,000d": "study", "0020,000e": "series", "0008,0018": "sop"}


def dcmtk_view(path: Path) -> tuple[str, dict[str, str]]:
    """What dcmtk, an independent parser, makes of a file: a verdict and its top-level UIDs."""
    data = path.read_bytes()
    if len(data) < 132 or data[128:132] != b"DICM":
        return "not_dicom", {}
    dump = subprocess.run(
        ["dcmdump", "-q", "+L", str(path)], capture_output=True, text=True, errors="replace"
    )
    if dump.returncode != 0:
        return "unreadable", {}
    uids = {}
    for line in dump.stdout.splitlines():  # top-level elements are not indented
        match = re.match(r"\((0020,000d|0020,000e|0008,0018)\) (UI \[([^\]]*)\]|UN ([0-9a-f\\]+))", line)
        if match:  # pydicom reads UN with its dictionary VR; dcmtk shows the bytes in hex
            text = match.group(3) or bytes.fromhex(match.group(4).replace("\\", "")).decode()
            uids[UID_TAGS[match.group(1)]] = text.rstrip("\0 ")
    if len(uids) < 3 or not all(uids.values()):
        return "missing_uid", uids
    if not all(valid_uid(uid) for uid in uids.values()):
        return "invalid_uid", uids
    return "stored", uids


def stored_path(store: Path, uids: dict[str, str]) -> Path:
    return store / "studies" / uids["study"] / "series" / uids["series"] / "instances" / f"{uids['sop']}.dcm"


@pytest.fixture(scope="module")
def local_import(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    store = tmp_path_factory.mktemp("store")
    run = run_import(f"--input={corpus_dir}/**", f"--store={store}", dead_letter=store.parent / "dl-local")
    return run, store


def test_counts_add_up(local_import: tuple[Run, Path], corpus_dir: Path) -> None:
    run, _ = local_import
    total = sum(1 for p in corpus_dir.rglob("*") if p.is_file())
    summary = run.summary
    assert summary["matched"] == total
    assert summary["success"] + summary["already_present"] + summary["failure"] == total
    assert summary["failure"] == len(run.dead_letters) > 0
    assert sum(summary["failure_reasons"].values()) == summary["failure"]
    assert summary["success"] > 150
    assert run.status == 3  # some files fail, and the good ones are all stored


def test_every_file_ends_as_dcmtk_says(local_import: tuple[Run, Path], corpus_dir: Path) -> None:
    run, store = local_import
    reasons = run.reasons()
    sources_by_sop: dict[str, list[Path]] = {}
    seen = Counter()
    for path in sorted(p for p in corpus_dir.rglob("*") if p.is_file()):
        verdict, uids = dcmtk_view(path)
        ours = reasons.get(str(path), "stored")
        seen[verdict] += 1
        if verdict == "unreadable":
            assert ours in {"truncated", "malformed"}, path
        elif verdict in {"not_dicom", "missing_uid", "invalid_uid"}:
            assert ours == verdict, path
        else:
            assert ours in {"stored", "conflict"}, (path, reasons.get(str(path)))
            target = stored_path(store, uids)
            assert target.is_file(), path
            same = target.read_bytes() == path.read_bytes()
            assert same == (ours == "stored"), path  # conflicts leave the first instance untouched
            sources_by_sop.setdefault(uids["sop"], []).append(path)
    assert seen["stored"] > 150 and seen["not_dicom"] > 5 and seen["missing_uid"] > 5
    assert len(stored_instances(store)) == len(sources_by_sop) == run.summary["success"]


def test_reimport_changes_nothing(local_import: tuple[Run, Path], corpus_dir: Path, tmp_path: Path) -> None:
    first, store = local_import
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = run_import(f"--input={corpus_dir}/**", f"--store={store}", dead_letter=tmp_path / "dl")
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
    assert again.summary["success"] == 0
    assert again.summary["already_present"] == first.summary["success"] + first.summary["already_present"]
    assert again.summary["failure"] == first.summary["failure"]


def test_gcs_to_gcs_import_matches_local(gcs, corpus_dir: Path, local_import: tuple[Run, Path], tmp_path):
    """The same corpus through gs:// gives the same verdicts, and objects identical to the sources."""
    local_run, _ = local_import
    upload_tree(gcs, corpus_dir, "corpus-in")
    gcs.create_bucket("corpus-store")
    run = run_import("--input=gs://corpus-in/**", "--store=gs://corpus-store/s", dead_letter=tmp_path / "dl")
    for key in ("matched", "success", "already_present", "failure"):
        assert run.summary[key] == local_run.summary[key], key
    local_verdicts = {uri[len(str(corpus_dir)) + 1 :]: r for uri, r in local_run.reasons().items()}
    gcs_verdicts = {uri[len("gs://corpus-in/") :]: r for uri, r in run.reasons().items()}
    assert gcs_verdicts == local_verdicts
    stored = list(gcs.list_blobs("corpus-store", prefix="s/studies/"))
    assert len(stored) == run.summary["success"]
    sources = {blob.md5_hash for blob in gcs.list_blobs("corpus-in")}
    assert all(blob.md5_hash in sources for blob in stored)


def test_header_reads_stop_before_pixel_data(local_import: tuple[Run, Path], corpus_dir: Path) -> None:
    run, _ = local_import
    corpus_bytes = sum(p.stat().st_size for p in corpus_dir.rglob("*") if p.is_file())
    assert run.summary["bytes_read"] < corpus_bytes / 4
